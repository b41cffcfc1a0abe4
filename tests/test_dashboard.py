"""Dashboard: server-rendered HTML, and the real page in headless Chromium."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import struct
import tempfile
import urllib.request
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from netboot.util.text import human_duration
from tests.nodes import Clock, observe, patch, populate, transition, uuid_of
from tests.test_api import Served, serve_registry

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
STATES = {
    "00000000-0000-0000-0000-00000000d001": ("discovered", None),
    "00000000-0000-0000-0000-00000000d002": ("booting", None),
    "00000000-0000-0000-0000-00000000d003": ("deploying", None),  # stuck (old)
    "00000000-0000-0000-0000-00000000d004": ("installed", None),
    "00000000-0000-0000-0000-00000000d005": ("error", "disk /dev/sda not found"),
}
STUCK = "00000000-0000-0000-0000-00000000d003"
FRESH_DEPLOYING = "00000000-0000-0000-0000-00000000d006"


@pytest.fixture
async def populated(tmp_path: Path) -> AsyncIterator[Served]:
    clock = Clock(1_700_000_000.0)
    async with serve_registry(tmp_path, stuck_after=600, clock=clock) as srv:
        reg = srv.registry
        for i, (uuid, (state, reason)) in enumerate(STATES.items()):
            await observe(reg, uuid, mac=f"52:54:00:00:d0:{i:02x}", address=f"10.0.0.{10 + i}",
                              source="dhcp", serial=f"SN-{i:04d}", vendor="Dell Inc.",
                              product="PowerEdge R640", profile="coreos", boot=True)
            if state != "discovered":
                await transition(reg, uuid, state, source="test", reason=reason)
        clock.t += 3600  # the deploying one has been there an hour: stuck
        await observe(reg, FRESH_DEPLOYING, mac=None, address="10.0.0.99", source="dhcp",
                          serial="SN-FRESH", profile="coreos")
        await transition(reg, FRESH_DEPLOYING, "deploying", source="test")
        await patch(reg, STUCK, hostname="stuck-01.lab", labels={"rack": "r7"})
        yield srv


async def _get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.text()


def test_human_duration() -> None:
    assert [human_duration(x) for x in (0, 59, 61, 3725, 90000)] == [
        "0s", "59s", "1m 1s", "1h 2m", "1d 1h"]


async def test_index_html(populated: Served) -> None:
    st, html = await _get(populated.url + "/")
    assert st == 200
    for uuid, (state, _) in STATES.items():
        assert f'id="node-{uuid}" data-state="{state}"' in html
    assert f'<tr id="node-{STUCK}" data-state="deploying"\n        class="stuck"' in html
    assert f'<tr id="node-{FRESH_DEPLOYING}" data-state="deploying"\n        class=""' in html
    assert "disk /dev/sda not found" in html and 'http-equiv="refresh"' in html  # noscript
    assert '/static/live.js' in html
    st, html = await _get(populated.url + "/?state=error")
    assert html.count('<tr id="node-') == 1
    st, html = await _get(populated.url + "/?limit=4")  # pages keep the filters they had
    assert html.count('<tr id="node-') == 4 and 'id="prev"' not in html
    assert 'id="next" rel="next" href="/?limit=4&amp;cursor=' in html
    st, html = await _get(populated.url + "/?q=sn-fresh&state=deploying&profile=")
    assert html.count('<tr id="node-') == 1 and f'id="node-{FRESH_DEPLOYING}"' in html
    assert 'value="sn-fresh"' in html and "<option selected>deploying</option>" in html
    st, html = await _get(populated.url + "/?q=nobody")
    assert st == 200 and "No nodes match" in html
    for bad in ("cursor=bogus", "limit=5000"):
        st, text = await _get(populated.url + "/?" + bad)
        assert st == 400 and "the first page is at /" in text, bad
    st, css = await _get(populated.url + "/static/style.css")
    assert st == 200 and "tr.stuck" in css


async def test_node_page(populated: Served) -> None:
    st, html = await _get(f"{populated.url}/nodes/{STUCK}")
    assert st == 200
    assert "stuck-01.lab" in html and "rack=r7" in html and "SN-0002" in html
    kinds = [part.split('"')[0] for part in html.split('<tr class="event-')[1:]]
    assert kinds == ["patch", "state", "boot", "discovered"]  # newest first
    st, html = await _get(f"{populated.url}/nodes/00000000-0000-0000-0000-0000000000ff")
    assert st == 404 and "No node" in html
    st, _ = await _get(f"{populated.url}/nodes/<script>")
    assert st == 400


def _png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA PNG into rows of raw pixel bytes (no Pillow needed)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    height = bpp = 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, ctype = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and ctype in (2, 6), (depth, ctype)
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, rows


def _need_chromium() -> None:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip("needs apt-get install -y chromium chromium-driver")
    pytest.importorskip("selenium", reason="pip install selenium (test extra)")


@contextlib.contextmanager
def _chromium() -> Iterator[Any]:
    """A headless Chromium under chromedriver, with a throwaway profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="netboot-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                 "--window-size=1400,700"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _browser(url: str, shot: Path) -> dict[str, object]:
    from selenium.webdriver.common.by import By

    with _chromium() as driver:
        driver.get(url)
        rows = driver.find_elements(By.CSS_SELECTOR, "#nodes tbody tr")
        stuck_row = driver.find_element(By.ID, f"node-{STUCK}")
        fresh_row = driver.find_element(By.ID, f"node-{FRESH_DEPLOYING}")
        error_pill = driver.find_element(By.CSS_SELECTOR, "tr[data-state=error] .state")
        out = {
            "title": driver.title,
            "rows": [r.get_attribute("data-state") for r in rows],
            "stuck_class": stuck_row.get_attribute("class"),
            "stuck_bg": stuck_row.value_of_css_property("background-color"),
            "fresh_bg": fresh_row.value_of_css_property("background-color"),
            "error_bg": error_pill.value_of_css_property("background-color"),
            "summary": driver.find_element(By.ID, "summary").text,
        }
        driver.save_screenshot(str(shot))
        return out


async def test_dashboard_in_headless_chromium(populated: Served, tmp_path: Path) -> None:
    _need_chromium()
    shot = tmp_path / "dashboard.png"
    got = await asyncio.to_thread(_browser, populated.url + "/", shot)
    assert got["title"] == "netboot: 6 nodes"
    assert sorted(got["rows"]) == sorted([s for s, _ in STATES.values()] + ["deploying"])
    assert got["stuck_class"] == "stuck"
    assert got["stuck_bg"] == "rgba(253, 226, 225, 1)"  # --stuck-bg
    assert got["fresh_bg"] != got["stuck_bg"]
    assert got["error_bg"] == "rgba(220, 38, 38, 1)"  # --error
    assert "1 stuck" in got["summary"] and "1 error" in got["summary"]

    data = shot.read_bytes()
    assert len(data) > 20_000, len(data)
    width, height, rows = _png_pixels(data)
    assert (width, height) == (1400, 700) or width > 800
    bpp = len(rows[0]) // width
    colours = {row[i:i + 3] for row in rows[::7] for i in range(0, len(row), bpp * 5)}
    assert len(colours) > 20, f"screenshot looks blank: {len(colours)} colours"
    keep = os.environ.get("NETBOOT_DASHBOARD_SHOT")
    if keep:
        shutil.copy(shot, keep)


MANY = 10_000


def _rows(driver: Any) -> list[str]:
    from selenium.webdriver.common.by import By

    return [r.get_attribute("id").removeprefix("node-")
            for r in driver.find_elements(By.CSS_SELECTOR, "#nodes tbody tr")]


def _follow(driver: Any, element_id: str) -> None:
    """Click a link or button that loads a new page, and wait for that page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    old = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.ID, element_id).click()
    WebDriverWait(driver, 30).until(ec.staleness_of(old))


def _many_nodes_browser(url: str, register: Any) -> dict[str, Any]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    out: dict[str, Any] = {}
    with _chromium() as driver:
        driver.get(url + "/")
        out["title"] = driver.title
        out["first"] = _rows(driver)
        out["has_prev"] = bool(driver.find_elements(By.ID, "prev"))
        # live: a node this page does not show is counted, and the page is not fetched again
        driver.execute_script("window.netbootMark = 'still this page';")
        WebDriverWait(driver, 30).until(
            lambda d: d.execute_script("return document.getElementById('live').textContent")
            == "nodes \u00b7 live")
        register()
        fresh = driver.find_element(By.ID, "fresh")
        WebDriverWait(driver, 30).until(lambda d: fresh.is_displayed())
        out["fresh"] = fresh.text
        out["mark"] = driver.execute_script("return window.netbootMark")
        out["rows_after_live"] = len(_rows(driver))

        _follow(driver, "next")
        out["second"] = _rows(driver)
        _follow(driver, "prev")
        out["back"] = _rows(driver)

        box = driver.find_element(By.ID, "q")
        box.send_keys("sn-04242")
        _follow(driver, "search")
        out["search"] = _rows(driver)
        out["search_url"] = driver.current_url
        out["search_has_next"] = bool(driver.find_elements(By.ID, "next"))
        return out


async def test_dashboard_pages_and_searches_10000_nodes(tmp_path: Path) -> None:
    _need_chromium()
    async with serve_registry(tmp_path) as srv:
        everyone = await populate(srv.registry, MANY)  # one commit, no HTTP
        newcomer = "20000000-0000-0000-0000-000000000001"
        token = srv.registry.node_token(newcomer)

        def register() -> None:  # the booted OS of a new machine reports (from the thread)
            req = urllib.request.Request(
                f"{srv.url}/api/v1/nodes/{newcomer}/register", method="POST",
                data=json.dumps({"serial": "NEW-1"}).encode(),
                headers={"X-Node-Token": token, "Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                assert r.status == 200

        got = await asyncio.to_thread(_many_nodes_browser, srv.url, register)
    assert got["title"] == f"netboot: {MANY} nodes"
    assert got["first"] == everyone[:100] and not got["has_prev"]
    assert got["fresh"].startswith("1 new node since this page was loaded")
    assert got["mark"] == "still this page" and got["rows_after_live"] == 100
    assert got["second"] == everyone[100:200]
    assert got["back"] == everyone[:100]
    assert got["search"] == [uuid_of(4242)] and not got["search_has_next"]
    assert "q=sn-04242" in got["search_url"]
