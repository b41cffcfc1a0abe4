"""Per-node Ignition artefacts in the boot path: rendering with the node's context,
caching, kernel arguments per OS, swarm facts and failures that must not boot."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

from netboot.boot import ipxe, pxelinux
from netboot.boot.booter import Booter
from netboot.boot.spec import LocalBoot, Refusal
from netboot.config import ConfigStore, SwarmConfig
from netboot.ignition.artifacts import Artifacts, NodeArtifacts, SwarmSource, sign
from netboot.ignition.render import SwarmFacts

REPO = Path(__file__).resolve().parents[1]
SECRET = "artifacts-test-secret"
WORKER_TOKEN = "SWMTKN-1-worker-0123456789abcdefTOPSECRETw"
MANAGER_TOKEN = "SWMTKN-1-manager-0123456789abcdefTOPSECRETm"
U1 = "11111111-0000-4000-8000-000000000001"
U2 = "11111111-0000-4000-8000-000000000002"
U3 = "11111111-0000-4000-8000-000000000003"
U4 = "11111111-0000-4000-8000-000000000004"
M1 = "52:54:00:10:00:01"
M2 = "52:54:00:10:00:02"
M3 = "52:54:00:10:00:03"
M4 = "52:54:00:10:00:04"

PROFILES = {
    # the default: Flatcar through iPXE, joining the swarm as a worker
    "flatcar": """\
kernel: flatcar/vmlinuz
initrds: [flatcar/initrd.cpio.gz]
cmdline: "console=ttyS0 host={{ hostname }}"
os: flatcar
ignition: swarm-worker
ssh_keys: ["ssh-ed25519 AAAAC3Nza-test admin@lab"]
site: {ntp: [ntp.profile.lab]}
""",
    "fcos-pxe": """\
loader: pxelinux
kernel: fcos/vmlinuz
initrds: [fcos/initrd.img]
cmdline: "console=ttyS0 coreos.live.rootfs_url={{ images_url }}/fcos/rootfs.img"
os: fcos
ignition: swarm-worker
""",
    "other": """\
kernel: other/vmlinuz
initrds: [other/initrd.gz]
cmdline: "console=ttyS0"
os: other
ignition: swarm-worker
""",
    "broken": """\
kernel: flatcar/vmlinuz
os: flatcar
ignition: swarm-worker
site: {ntp: ["not a host"]}
""",
    "broken-pxe": """\
loader: pxelinux
kernel: flatcar/vmlinuz
os: flatcar
ignition: no-such-template
""",
    "manager": """\
kernel: flatcar/vmlinuz
os: flatcar
ignition: swarm-manager
role: manager
""",
    "plain": """\
kernel: demo/vmlinuz
initrds: [demo/initrd.cpio.gz]
cmdline: "console=ttyS0"
""",
}


def write_tree(root: Path, *, swarm: str | None = None, http_port: int = 8080) -> Path:
    """A config tree using the bundled templates; static swarm facts unless ``swarm`` given."""
    (root / "profiles").mkdir(parents=True)
    (root / "machines").mkdir()
    (root / "images").mkdir()
    for name, body in PROFILES.items():
        (root / "profiles" / f"{name}.yaml").write_text(body)
    machines = {"n3": (M3, U3, "fcos-pxe"), "n4": (M4, U4, "broken"),
                "n5": ("52:54:00:10:00:05", None, "broken-pxe"),
                "n6": ("52:54:00:10:00:06", None, "other"),
                "n7": ("52:54:00:10:00:07", None, "manager"),
                "n8": ("52:54:00:10:00:08", None, "plain")}
    for host, (mac, uuid, profile) in machines.items():
        body = f'mac: "{mac}"\nhostname: {host}\nprofile: {profile}\n'
        (root / "machines" / f"{host}.yaml").write_text(
            body + (f'uuid: "{uuid}"\n' if uuid else ""))
    if swarm is None:
        swarm = (f"swarm:\n  manager_addr: 10.9.0.1:2377\n  worker_token: {WORKER_TOKEN}\n"
                 f"  manager_token: {MANAGER_TOKEN}\n")
    (root / "netboot.yaml").write_text(
        f"images_dir: images\ndata_dir: data\naddress: 127.0.0.1\nhttp_port: {http_port}\n"
        f"ignition_dir: {REPO / 'ignition'}\ndefault_profile: flatcar\n"
        f"api:\n  secret: {SECRET}\n"
        "site:\n  ntp: [ntp.site.lab]\n  registry_mirrors: ['https://mirror.site.lab']\n"
        + swarm)
    return root / "netboot.yaml"


@dataclass
class Outcome:
    """What a boot script request came to: the artefacts, or why it was refused."""

    artifacts: NodeArtifacts | None
    ignition_error: str | None


def script_for(booter: Booter, mac: str, uuid: str | None) -> tuple[str, Outcome]:
    """Decide and render, as the boot-script endpoint does (it records nothing)."""
    d = booter.decide(mac, uuid, "ipxe")
    error = d.reason if isinstance(d, Refusal) and d.failed else None
    oem = None if isinstance(d, LocalBoot) else d.oem
    return ipxe.render(d, booter.base_url), Outcome(oem, error)


def pxelinux_for(booter: Booter, mac: str, uuid: str) -> str | None:
    return pxelinux.render(booter.decide(mac, uuid, "pxelinux"))


def make_booter(config: Path, **kw: object) -> tuple[Booter, Artifacts]:
    store = ConfigStore(config)
    artifacts = Artifacts.from_config(store.server, SECRET.encode(), **kw)  # type: ignore[arg-type]
    return Booter(store, "127.0.0.1", store.server.http_port, artifacts=artifacts), artifacts


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return write_tree(tmp_path)


def _files(config: bytes) -> dict[str, str]:
    """path -> decoded contents of every storage file in an Ignition config."""
    out = {}
    for f in json.loads(config)["storage"]["files"]:
        src = f["contents"]["source"]
        if src.startswith("data:;base64,"):
            out[f["path"]] = base64.b64decode(src[len("data:;base64,"):]).decode()
        else:
            assert src.startswith("data:,"), src
            out[f["path"]] = unquote(src[len("data:,"):])
    return out


def test_ipxe_script_for_flatcar(tree: Path) -> None:
    booter, artifacts = make_booter(tree)
    script, r = script_for(booter, M1, U1)
    assert r.ignition_error is None and r.artifacts is not None and r.artifacts.ok
    lines = script.splitlines()
    assert lines[1] == ("kernel http://127.0.0.1:8080/images/flatcar/vmlinuz "
                        "initrd=initrd.cpio.gz initrd=netboot-oem.cpio.gz flatcar.first_boot=1 "
                        f"console=ttyS0 host=node-52540010000{1}")
    assert lines[2] == "initrd http://127.0.0.1:8080/images/flatcar/initrd.cpio.gz"
    prefix = f"initrd --name netboot-oem.cpio.gz http://127.0.0.1:8080/oem/{U1}.cpio.gz?exp="
    assert lines[3].startswith(prefix), lines[3]
    exp, sig = lines[3][len(prefix):].split("&sig=")
    assert sig == sign(SECRET.encode(), "oem", U1, int(exp))
    assert 3500 < int(exp) - time.time() <= 3600
    assert lines[4] == "boot" and len(lines) == 5
    assert "ignition.config.url" not in script  # the OEM archive carries the config


def test_config_has_node_context_site_override_and_swarm(tree: Path) -> None:
    booter, _ = make_booter(tree)
    _, r = script_for(booter, M1, U1)
    assert r.artifacts is not None and r.artifacts.config is not None
    cfg = json.loads(r.artifacts.config)
    assert cfg["ignition"]["version"] == "3.3.0"
    keys = cfg["passwd"]["users"][0]["sshAuthorizedKeys"]
    assert keys == ["ssh-ed25519 AAAAC3Nza-test admin@lab"]
    files = _files(r.artifacts.config)
    assert files["/etc/hostname"] == "node-525400100001\n"
    # the profile's ntp overrides the site's; registry_mirrors (not overridden) stays
    assert "NTP=ntp.profile.lab" in files["/etc/systemd/timesyncd.conf.d/netboot.conf"]
    assert json.loads(files["/etc/docker/daemon.json"])["registry-mirrors"] == [
        "https://mirror.site.lab"]
    assert files["/etc/netboot/swarm.env"] == (
        f"SWARM_MANAGER=10.9.0.1:2377\nSWARM_TOKEN={WORKER_TOKEN}\n")
    units = {u["name"] for u in cfg["systemd"]["units"]}
    assert {"swarm-join.service", "swarm-leave.service"} <= units
    assert r.artifacts.digest == hashlib.sha256(r.artifacts.config).hexdigest()


def test_oem_archive_holds_the_config_at_the_flatcar_path(tree: Path, tmp_path: Path) -> None:
    booter, _ = make_booter(tree)
    _, r = script_for(booter, M1, U1)
    assert r.artifacts is not None and r.artifacts.archive is not None
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], cwd=out, input=gzip.decompress(r.artifacts.archive),
                   check=True)
    assert (out / "usr/share/oem/config.ign").read_bytes() == r.artifacts.config


def test_pxelinux_for_fcos_adds_oem_initrd_and_kernel_args(tree: Path) -> None:
    booter, _ = make_booter(tree)
    text = pxelinux_for(booter, M3, U3)  # U3: what DHCP saw
    assert text is not None
    assert f"  INITRD images/fcos/initrd.img,oem/{U3}.cpio.gz" in text.splitlines()
    assert ("  APPEND ignition.firstboot ignition.platform.id=metal console=ttyS0 "
            "coreos.live.rootfs_url=http://127.0.0.1:8080/images/fcos/rootfs.img"
            in text.splitlines())


def test_os_other_gets_only_the_oem_initrd(tree: Path) -> None:
    booter, _ = make_booter(tree)
    script, _ = script_for(booter, "52:54:00:10:00:06", U2)
    kernel = script.splitlines()[1]
    assert kernel.endswith("initrd=initrd.gz initrd=netboot-oem.cpio.gz console=ttyS0"), kernel


def test_profiles_without_ignition_are_unchanged(tree: Path) -> None:
    booter, artifacts = make_booter(tree)
    script, r = script_for(booter, "52:54:00:10:00:08", U2)
    assert script == ("#!ipxe\nkernel http://127.0.0.1:8080/images/demo/vmlinuz "
                      "initrd=initrd.cpio.gz console=ttyS0\n"
                      "initrd http://127.0.0.1:8080/images/demo/initrd.cpio.gz\nboot\n")
    assert r.artifacts is None and artifacts.issued(U2) is None


def test_repeat_is_a_cache_hit_and_inputs_invalidate(tree: Path) -> None:
    booter, artifacts = make_booter(tree)
    _, first = script_for(booter, M1, U1)
    _, again = script_for(booter, M1, U1)
    assert again.artifacts is first.artifacts
    c = artifacts.counters
    assert c.get("ignition_cache_hits_total") == 1
    assert c.get("ignition_renders_total", result="ok") == 1
    # new swarm facts (a rotated token) are a new input: re-rendered with the new token
    artifacts.swarm.facts = SwarmFacts("10.9.0.1:2377", "SWMTKN-1-rotated", MANAGER_TOKEN)
    _, rotated = script_for(booter, M1, U1)
    assert rotated.artifacts is not None and rotated.artifacts.config is not None
    assert b"SWMTKN-1-rotated" in rotated.artifacts.config
    assert c.get("ignition_renders_total", result="ok") == 2
    # another node of the same profile is its own render
    script_for(booter, M2, U2)
    assert c.get("ignition_renders_total", result="ok") == 3


def test_template_edit_is_picked_up(tmp_path: Path) -> None:
    tdir = tmp_path / "ign"
    tdir.mkdir()
    tpl = tdir / "mine.yaml.j2"
    tpl.write_text('storage:\n  files:\n    - path: /etc/hostname\n      mode: 0644\n'
                   '      contents: {inline: {{ (hostname ~ "\\n") | q }}}\n')
    config = write_tree(tmp_path / "t")
    text = config.read_text().replace(f"ignition_dir: {REPO / 'ignition'}", f"ignition_dir: {tdir}")
    config.write_text(text)
    (config.parent / "profiles" / "flatcar.yaml").write_text(
        "kernel: k\nos: flatcar\nignition: mine\n")
    booter, artifacts = make_booter(config)
    _, r1 = script_for(booter, M1, U1)
    assert r1.artifacts is not None and r1.artifacts.ok
    assert artifacts.refresh_templates() is False
    tpl.write_text(tpl.read_text().replace("/etc/hostname", "/etc/hostname2"))
    assert artifacts.refresh_templates() is True
    _, r2 = script_for(booter, M1, U1)
    assert r2.artifacts is not None and r2.artifacts.config is not None
    assert b"/etc/hostname2" in r2.artifacts.config


def test_failed_config_is_not_served_and_script_says_why(tree: Path) -> None:
    booter, artifacts = make_booter(tree)
    script, r = script_for(booter, M4, U4)
    assert r.ignition_error is not None and "ntp" in r.ignition_error
    assert script.startswith("#!ipxe\necho netboot: NOT BOOTING this machine")
    assert f"echo netboot: {r.ignition_error}" in script
    assert script.endswith("exit 1\n") and "kernel" not in script and "boot\n" not in script
    assert artifacts.counters.get("ignition_renders_total", result="error") == 1
    # pxelinux: the message, then a failure handed back to the firmware
    text = pxelinux_for(booter, "52:54:00:10:00:05", U2)
    assert text is not None and "no-such-template" in text and "LOCALBOOT -1" in text
    assert "KERNEL" not in text


def test_no_uuid_means_no_ignition(tree: Path) -> None:
    booter, _ = make_booter(tree)
    script, r = script_for(booter, M1, None)
    assert r.ignition_error is not None and "UUID" in r.ignition_error
    assert "NOT BOOTING" in script


def test_swarm_configured_but_unreachable_is_a_render_error(tmp_path: Path) -> None:
    config = write_tree(tmp_path, swarm=f"swarm:\n  docker_socket: {tmp_path / 'none.sock'}\n")
    booter, artifacts = make_booter(config)

    async def refresh() -> None:
        await artifacts.swarm.refresh()

    import asyncio

    asyncio.run(refresh())
    assert artifacts.swarm.facts is None and artifacts.swarm.error
    _, r = script_for(booter, M1, U1)
    assert r.ignition_error is not None
    assert "swarm facts unavailable" in r.ignition_error and "none.sock" in r.ignition_error


def test_no_swarm_at_all_worker_is_a_plain_host_manager_fails(tmp_path: Path) -> None:
    booter, _ = make_booter(write_tree(tmp_path, swarm=""))
    _, worker = script_for(booter, M1, U1)
    assert worker.artifacts is not None and worker.artifacts.ok
    assert worker.artifacts.config is not None and b"swarm-join" not in worker.artifacts.config
    _, manager = script_for(booter, "52:54:00:10:00:07", U2)
    assert manager.ignition_error is not None and "needs swarm facts" in manager.ignition_error


def test_partial_static_swarm_config_is_reported() -> None:
    src = SwarmSource(SwarmConfig(manager_addr="10.0.0.1:2377", worker_token="x"))
    assert src.facts is None and src.configured and "together" in (src.error or "")


def test_tokens_never_logged(tree: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    booter, artifacts = make_booter(tree)
    for mac, uuid in ((M1, U1), (M4, U4), ("52:54:00:10:00:07", U2)):
        _, r = script_for(booter, mac, uuid)
        if r.artifacts is not None:
            repr(r.artifacts)
            logging.getLogger("test").info("artefacts %r %s", r.artifacts, artifacts.swarm.facts)
    artifacts.refused("bad_signature", "oem", U1, "127.0.0.9", "http")
    assert "refused oem for" in caplog.text
    assert WORKER_TOKEN not in caplog.text and MANAGER_TOKEN not in caplog.text


async def test_background_upkeep_notices_template_edits(tmp_path: Path) -> None:
    """Artifacts.run (what serve starts) re-stats templates so boots never touch the disk."""
    import asyncio

    tdir = tmp_path / "ign"
    tdir.mkdir()
    tpl = tdir / "mine.yaml.j2"
    tpl.write_text("storage:\n  files:\n    - path: /etc/a\n      contents: {inline: x}\n")
    config = write_tree(tmp_path / "t")
    config.write_text(config.read_text().replace(f"ignition_dir: {REPO / 'ignition'}",
                                                 f"ignition_dir: {tdir}"))
    (config.parent / "profiles" / "flatcar.yaml").write_text("kernel: k\nignition: mine\n")
    booter, artifacts = make_booter(config)
    task = asyncio.create_task(artifacts.run())
    try:
        _, r1 = script_for(booter, M1, U1)
        assert r1.artifacts is not None and r1.artifacts.config is not None
        assert b'"/etc/a"' in r1.artifacts.config
        before = artifacts.fingerprint
        tpl.write_text(tpl.read_text().replace("/etc/a", "/etc/b"))
        for _ in range(60):
            if artifacts.fingerprint != before:
                break
            await asyncio.sleep(0.1)
        _, r2 = script_for(booter, M1, U1)
        assert r2.artifacts is not None and r2.artifacts.config is not None
        assert b'"/etc/b"' in r2.artifacts.config
    finally:
        task.cancel()
