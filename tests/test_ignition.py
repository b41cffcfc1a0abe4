"""Ignition rendering and validation, cross-checked with ignition-validate and the schema."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import pytest

from netboot.ignition.render import (
    IgnitionError,
    IgnitionRenderer,
    SiteSettings,
    SwarmFacts,
    bundled_template_dir,
    data_url,
)
from netboot.ignition.validate import SCHEMA_PATH, validate_ignition

REPO = Path(__file__).resolve().parents[1]
SHARED_SCHEMA = Path(__file__).resolve().parents[2] / "shared" / "ignition-schema" / (
    "ignition-v3_3.schema.json"
)
IGNITION_VALIDATE = shutil.which("ignition-validate")

WORKER_TOKEN = "SWMTKN-1-0123456789abcdefworkerSECRET"
MANAGER_TOKEN = "SWMTKN-1-0123456789abcdefmanagerSECRET"
FACTS = SwarmFacts("10.252.0.1:2377", WORKER_TOKEN, MANAGER_TOKEN)
FULL_SITE = SiteSettings(
    ntp=["0.pool.example", "ntp.lab"],
    registry_mirrors=["http://mirror.lab:5000"],
    insecure_registries=["registry.lab:5000"],
    http_proxy="http://user:p%40ss@proxy.lab:3128",
    https_proxy="http://proxy.lab:3128",
    no_proxy="localhost,127.0.0.1,.lab",
)


def context(**over: Any) -> dict[str, Any]:
    ctx: dict[str, Any] = {
        "hostname": "node-01",
        "mac": "52:54:00:12:34:56",
        "uuid": "8f3a0b52-1c2d-4e5f-8a9b-0c1d2e3f4a5b",
        "base_url": "http://10.252.0.1:8080",
        "vars": {},
        "swarm": FACTS,
        "site": FULL_SITE,
        "ssh_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample admin@lab"],
        "node_urls": {},
        "role": "worker",
    }
    ctx.update(over)
    return ctx


CASES: list[tuple[str, dict[str, Any]]] = [
    ("swarm-worker", context()),
    ("swarm-worker", context(swarm=None)),
    ("swarm-worker", context(site=SiteSettings(), ssh_keys=[])),
    ("swarm-manager", context(role="manager")),
    ("swarm-manager", context(role="manager", site=SiteSettings(ntp=["ntp.lab"]))),
    (
        "swarm-manager",
        context(
            role="manager",
            swarm=None,
            vars={"swarm_init": True, "swarm_advertise_addr": "10.252.0.1"},
        ),
    ),
]


@pytest.fixture
def renderer() -> IgnitionRenderer:
    return IgnitionRenderer(bundled_template_dir())


def decode_source(url: str) -> bytes:
    head, _, payload = url.partition(",")
    if head.endswith(";base64"):
        return base64.b64decode(payload)
    return unquote_to_bytes(payload)


def file_text(cfg: dict[str, Any], path: str) -> str:
    for f in cfg["storage"]["files"]:
        if f["path"] == path:
            return decode_source(f["contents"]["source"]).decode()
    raise KeyError(path)


def unit(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    for u in cfg.get("systemd", {}).get("units", []):
        if u["name"] == name:
            return u
    raise KeyError(name)


def ignition_validate(tmp_path: Path, raw: bytes) -> subprocess.CompletedProcess[str]:
    if IGNITION_VALIDATE is None:
        pytest.skip("ignition-validate missing: apt-get install ignition")
    path = tmp_path / "config.ign"
    path.write_bytes(raw)
    return subprocess.run(
        [IGNITION_VALIDATE, str(path)], check=False, capture_output=True, text=True, timeout=60
    )


# ---------------------------------------------------------------- bundled templates


def test_bundled_templates_listed(renderer: IgnitionRenderer) -> None:
    assert renderer.templates() == ["swarm-manager", "swarm-worker"]


@pytest.mark.parametrize(("template", "ctx"), CASES, ids=[f"{t}-{i}" for i, (t, _) in
                                                           enumerate(CASES)])
def test_bundled_output_passes_ignition_validate(
    renderer: IgnitionRenderer, tmp_path: Path, template: str, ctx: dict[str, Any]
) -> None:
    raw = renderer.render(template, ctx)
    proc = ignition_validate(tmp_path, raw)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "warning" not in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr


@pytest.mark.parametrize(("template", "ctx"), CASES, ids=[f"{t}-{i}" for i, (t, _) in
                                                           enumerate(CASES)])
def test_bundled_output_passes_official_schema(
    renderer: IgnitionRenderer, template: str, ctx: dict[str, Any]
) -> None:
    if not SHARED_SCHEMA.exists():
        pytest.skip(f"official schema not found at {SHARED_SCHEMA} (no shared/ beside the repo)")
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SHARED_SCHEMA.read_text())
    cfg = json.loads(renderer.render(template, ctx))
    jsonschema.Draft4Validator(schema).validate(cfg)
    assert validate_ignition(cfg) == []


def test_output_is_canonical_and_deterministic(renderer: IgnitionRenderer) -> None:
    raw = renderer.render("swarm-worker", context())
    assert raw == renderer.render("swarm-worker", context())
    cfg = json.loads(raw)
    assert raw == json.dumps(cfg, sort_keys=True, separators=(",", ":"),
                             ensure_ascii=False).encode()
    assert cfg["ignition"]["version"] == "3.3.0"


def test_worker_content(renderer: IgnitionRenderer) -> None:
    cfg = json.loads(renderer.render("swarm-worker", context()))
    assert cfg["passwd"]["users"] == [
        {"name": "core", "sshAuthorizedKeys": context()["ssh_keys"]}
    ]
    assert file_text(cfg, "/etc/hostname") == "node-01\n"
    assert "NTP=0.pool.example ntp.lab" in file_text(
        cfg, "/etc/systemd/timesyncd.conf.d/netboot.conf"
    )
    daemon = json.loads(file_text(cfg, "/etc/docker/daemon.json"))
    assert daemon == {
        "registry-mirrors": ["http://mirror.lab:5000"],
        "insecure-registries": ["registry.lab:5000"],
    }
    profile = file_text(cfg, "/etc/profile.d/netboot-proxy.sh")
    assert "export http_proxy=http://user:p%40ss@proxy.lab:3128" in profile
    dropin = unit(cfg, "docker.service")["dropins"][0]
    # '%' is a systemd specifier and must be doubled in unit files.
    assert 'Environment="HTTP_PROXY=http://user:p%%40ss@proxy.lab:3128"' in dropin["contents"]
    assert 'Environment="NO_PROXY=localhost,127.0.0.1,.lab"' in dropin["contents"]

    env = file_text(cfg, "/etc/netboot/swarm.env")
    assert f"SWARM_TOKEN={WORKER_TOKEN}\n" in env
    assert "SWARM_MANAGER=10.252.0.1:2377\n" in env
    env_file = next(f for f in cfg["storage"]["files"] if f["path"] == "/etc/netboot/swarm.env")
    assert env_file["mode"] == 0o600
    join = unit(cfg, "swarm-join.service")
    assert join["enabled"] is True
    lines = join["contents"].splitlines()
    for line in ("After=docker.service network-online.target", "Wants=network-online.target",
                 "Requires=docker.service", "EnvironmentFile=/etc/netboot/swarm.env"):
        assert line in lines
    assert "{{.Swarm.LocalNodeState}}" in join["contents"]
    # The token never sits in a world-readable unit file.
    assert WORKER_TOKEN not in json.dumps(cfg["systemd"])
    leave = unit(cfg, "swarm-leave.service")["contents"]
    assert "After=docker.service swarm-join.service" in leave.splitlines()
    assert "Requires=docker.service" not in leave
    assert "docker swarm leave --force" in leave
    assert MANAGER_TOKEN.encode() not in renderer.render("swarm-worker", context())


def test_worker_without_swarm_or_site(renderer: IgnitionRenderer) -> None:
    cfg = json.loads(renderer.render("swarm-worker", context(swarm=None, site=SiteSettings())))
    paths = [f["path"] for f in cfg["storage"]["files"]]
    assert paths == ["/etc/hostname"]
    assert cfg["systemd"].get("units") is None


def test_site_as_plain_dict(renderer: IgnitionRenderer) -> None:
    site = {"ntp": ["ntp.lab"], "registry_mirrors": [], "insecure_registries": [],
            "http_proxy": None, "https_proxy": None, "no_proxy": None}
    assert renderer.render("swarm-worker", context(site=site)) == renderer.render(
        "swarm-worker", context(site=SiteSettings(ntp=["ntp.lab"])))


def test_manager_joins_with_manager_token(renderer: IgnitionRenderer) -> None:
    cfg = json.loads(renderer.render("swarm-manager", context(role="manager")))
    env = file_text(cfg, "/etc/netboot/swarm.env")
    assert f"SWARM_TOKEN={MANAGER_TOKEN}\n" in env
    assert WORKER_TOKEN not in env
    assert "docker swarm join" in unit(cfg, "swarm-join.service")["contents"]
    assert "docker node demote" in unit(cfg, "swarm-leave.service")["contents"]


def test_manager_init_only_when_asked(renderer: IgnitionRenderer) -> None:
    with pytest.raises(IgnitionError, match="swarm-manager.*swarm_init"):
        renderer.render("swarm-manager", context(role="manager", swarm=None))
    cfg = json.loads(renderer.render("swarm-manager", context(
        role="manager", swarm=None,
        vars={"swarm_init": True, "swarm_advertise_addr": "10.252.0.1"})))
    assert file_text(cfg, "/etc/netboot/swarm.env") == "SWARM_ADVERTISE_ADDR=10.252.0.1\n"
    assert "docker swarm init" in unit(cfg, "swarm-join.service")["contents"]
    with pytest.raises(IgnitionError,
                       match=r"_node\.yaml\.j2 line \d+: undefined.*swarm_advertise"):
        renderer.render("swarm-manager", context(role="manager", swarm=None,
                                                 vars={"swarm_init": True}))


# ------------------------------------------------------------- custom templates


def write_template(tmp_path: Path, name: str, body: str) -> IgnitionRenderer:
    (tmp_path / f"{name}.yaml.j2").write_text(body)
    return IgnitionRenderer(tmp_path)


def test_conveniences_inline_and_octal_modes(tmp_path: Path) -> None:
    r = write_template(tmp_path, "conv", """\
storage:
  files:
    - path: /etc/a
      mode: 0644
      contents: {inline: "hello {{ hostname }}\\n"}
    - path: /etc/b
      mode: "0755"
      contents:
        inline: "{{ greeting }}"
      append:
        - inline: "more"
    - path: /etc/c
      mode: "0o600"
  directories:
    - path: /var/lib/x
      mode: 0700
systemd:
  units:
    - name: hello.service
      contents: |
        [Service]
        ExecStart=/bin/true
""")
    # vars are also reachable at top level (greeting), next to the reserved names.
    raw = r.render("conv", context(vars={"greeting": "hi % there", "hostname": "ignored"}))
    cfg = json.loads(raw)
    files = cfg["storage"]["files"]
    assert [f["mode"] for f in files] == [0o644, 0o755, 0o600]
    assert decode_source(files[0]["contents"]["source"]) == b"hello node-01\n"
    assert decode_source(files[1]["contents"]["source"]) == b"hi % there"
    assert decode_source(files[1]["append"][0]["source"]) == b"more"
    assert "inline" not in json.dumps(cfg)
    assert cfg["storage"]["directories"][0]["mode"] == 0o700
    proc = ignition_validate(tmp_path, raw)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_typo_key_refused_with_path(tmp_path: Path) -> None:
    r = write_template(tmp_path, "typo", """\
storage:
  files:
    - path: /etc/ok
    - pathh: /etc/motd
      path: /etc/motd
""")
    with pytest.raises(IgnitionError) as info:
        r.render("typo", context())
    assert "typo: " in str(info.value)
    assert "storage.files[1].pathh: unknown key" in str(info.value)
    assert info.value.template == "typo"


def test_unit_without_suffix_refused(tmp_path: Path) -> None:
    r = write_template(tmp_path, "unit", "systemd:\n  units:\n    - name: swarm-join\n")
    with pytest.raises(IgnitionError,
                       match=r"systemd\.units\[0\]\.name: 'swarm-join' needs a unit"):
        r.render("unit", context())


def test_relative_path_refused(tmp_path: Path) -> None:
    r = write_template(tmp_path, "rel", "storage:\n  files:\n    - path: etc/hostname\n")
    with pytest.raises(IgnitionError, match=r"storage\.files\[0\]\.path: must be absolute"):
        r.render("rel", context())


def test_strict_undefined_names_template_and_line(tmp_path: Path) -> None:
    r = write_template(tmp_path, "undef", "storage:\n  files:\n    - path: {{ nope }}\n")
    with pytest.raises(IgnitionError, match=r"undef: undef\.yaml\.j2 line 3: undefined.*nope"):
        r.render("undef", context())


def test_bad_yaml_does_not_echo_values(tmp_path: Path) -> None:
    r = write_template(tmp_path, "yam", "storage: [\n  {{ swarm.worker_token }}: : :\n")
    with pytest.raises(IgnitionError) as info:
        r.render("yam", context())
    assert "rendered YAML line" in str(info.value)
    assert WORKER_TOKEN not in str(info.value)


def test_missing_template(tmp_path: Path) -> None:
    with pytest.raises(IgnitionError, match="not found"):
        IgnitionRenderer(tmp_path).render("ghost", context())


# ------------------------------------------------------------------- validator


def base_cfg(**extra: Any) -> dict[str, Any]:
    return {"ignition": {"version": "3.3.0"}, **extra}


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        (base_cfg(storage={"files": [{"path": "/a", "pathh": "/b"}]}),
         "storage.files[0].pathh: unknown key"),
        (base_cfg(storag={}), "storag: unknown key"),
        (base_cfg(systemd={"units": [{"name": "x.service", "dropins": [{"nam": "a.conf"}]}]}),
         "systemd.units[0].dropins[0].nam: unknown key"),
        (base_cfg(passwd={"users": [{"name": "core", "sshKeys": []}]}),
         "passwd.users[0].sshKeys: unknown key"),
        ({"ignition": {"version": "3.4.0"}}, "ignition.version: must be '3.3.0'"),
        ({}, "ignition: required key missing"),
        (base_cfg(systemd={"units": [{"name": "foo"}]}), "systemd.units[0].name: 'foo' needs"),
        (base_cfg(systemd={"units": [{"name": "a.service", "dropins": [{"name": "x"}]}]}),
         "systemd.units[0].dropins[0].name: 'x' must end in .conf"),
        (base_cfg(storage={"directories": [{"path": "var/x"}]}),
         "storage.directories[0].path: must be absolute"),
        (base_cfg(storage={"links": [{"path": "/a/../b", "target": "/c"}]}),
         "storage.links[0].path: must be normalised"),
        (base_cfg(storage={"files": [{"path": "/a", "mode": 0o10000}]}),
         "storage.files[0].mode: must be within"),
        (base_cfg(storage={"files": [{"path": "/a", "mode": "0644"}]}),
         "storage.files[0].mode: expected integer or null, got string"),
        (base_cfg(storage={"files": [{"path": "/a", "contents": {"source": "data:,a b"}}]}),
         "storage.files[0].contents.source: data: URL payload must be percent-encoded"),
        (base_cfg(storage={"files": [{"path": "/a", "contents": {"source": "data:,%zz"}}]}),
         "storage.files[0].contents.source: data: URL payload must be percent-encoded"),
        (base_cfg(storage={"files": [{"path": "/a", "contents": {"source": "data:;base64,@@"}}]}),
         "storage.files[0].contents.source: data: URL has invalid base64"),
        (base_cfg(storage={"files": [{"path": "/a", "contents": {"source": "datax"}}]}),
         "storage.files[0].contents.source: URL scheme"),
        (base_cfg(storage={"files": [{"path": "/a", "contents": {"source": "oem:///x"}}]}),
         "storage.files[0].contents.source: URL scheme 'oem'"),
        (base_cfg(storage={"files": [{"path": "/a"}, {"path": "/a"}]}),
         "storage.files[1].path: duplicate"),
        (base_cfg(ignition={"version": "3.3.0", "config": {"merge": [{"sourc": "x"}]}}),
         "ignition.config.merge[0].sourc: unknown key"),
    ],
)
def test_validator_refuses(cfg: dict[str, Any], expected: str) -> None:
    problems = validate_ignition(cfg)
    assert any(p.startswith(expected) for p in problems), problems


def test_validator_accepts_good_config() -> None:
    cfg = base_cfg(
        storage={
            "files": [{"path": "/etc/x", "mode": 0o644, "overwrite": True,
                       "contents": {"source": data_url("a b\n"),
                                    "verification": {"hash": "sha256-" + "0" * 64}}}],
            "links": [{"path": "/etc/l", "target": "x"}],
        },
        systemd={"units": [{"name": "a.timer", "enabled": True, "contents": "[Timer]\n"}]},
    )
    assert validate_ignition(cfg) == []


def test_ignition_validate_agrees_on_hard_errors(tmp_path: Path) -> None:
    """Our refusals are ones Ignition also makes (except unknown keys: it only warns)."""
    for cfg in (
        base_cfg(storage={"files": [{"path": "etc/x"}]}),
        base_cfg(systemd={"units": [{"name": "foo", "contents": "[Unit]\n"}]}),
        base_cfg(storage={"files": [{"path": "/a", "contents": {"source": "data:,a b"}}]}),
    ):
        assert validate_ignition(cfg)
        proc = ignition_validate(tmp_path, json.dumps(cfg).encode())
        assert proc.returncode != 0, cfg
    typo = base_cfg(storage={"files": [{"path": "/a", "pathh": "/b"}]})
    proc = ignition_validate(tmp_path, json.dumps(typo).encode())
    assert proc.returncode == 0 and "pathh" in proc.stdout + proc.stderr
    assert validate_ignition(typo)


def test_data_url_round_trip() -> None:
    for payload in (b"", b"plain text\n", bytes(range(256)), "naïve ☃".encode()):
        url = data_url(payload)
        assert decode_source(url) == payload
        assert validate_ignition(base_cfg(storage={"files": [
            {"path": "/x", "contents": {"source": url}}]})) == []


# --------------------------------------------------------------------- secrets


def test_swarm_facts_repr_hides_tokens() -> None:
    for text in (repr(FACTS), str(FACTS), f"{FACTS}", repr([FACTS])):
        assert WORKER_TOKEN not in text and MANAGER_TOKEN not in text
        assert "10.252.0.1:2377" in text


def test_site_settings_refuse_injection() -> None:
    with pytest.raises(ValueError, match="http_proxy"):
        SiteSettings(http_proxy='http://x"\nExecStart=/bin/evil')
    with pytest.raises(ValueError, match="ntp"):
        SiteSettings(ntp=["a\nb"])


def test_vendored_schema_matches_official() -> None:
    assert SCHEMA_PATH.is_file()
    assert (SCHEMA_PATH.parent / "README").is_file()
    if not SHARED_SCHEMA.exists():
        pytest.skip(f"official schema not found at {SHARED_SCHEMA}")
    assert SCHEMA_PATH.read_bytes() == SHARED_SCHEMA.read_bytes()
    assert bundled_template_dir() == REPO / "ignition"
