"""The files in deploy/, each read by the parser of the tool that runs it.

- deploy/netboot.service: `systemd-analyze verify` (the unit loads without a warning),
  `systemd-analyze security --offline=yes` (its exposure score), the hardening
  directives themselves, and `netboot serve` run under the seccomp rules that the
  unit's MemoryDenyWriteExecute= and RestrictAddressFamilies= install;
- deploy/netboot-stack.yml: docker/cli's JSON schema for compose file format 3.8
  (tests/data/compose/, no network needed) and `docker stack config`, which needs no
  daemon (Docker 25 and later);
- deploy/netboot.nomad.hcl: python-hcl2. It parses HCL2 syntax only, not Nomad's job
  rules (`nomad job validate` checks those; Nomad is not in Debian), so the structure
  that matters here is asserted by hand.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "netboot.service"
STACK = ROOT / "deploy" / "netboot-stack.yml"
NOMAD = ROOT / "deploy" / "netboot.nomad.hcl"
COMPOSE_SCHEMA = Path(__file__).parent / "data" / "compose" / "config_schema_v3.8.json"

NET_CAPS = {"CAP_NET_BIND_SERVICE", "CAP_NET_RAW"}
FAMILIES = {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK", "AF_PACKET"}
#: systemd-analyze security's score for the unit was 1.8 ("OK") with systemd 252;
#: this leaves room for a later systemd that weighs a setting differently.
MAX_EXPOSURE = 2.0


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (Debian's systemd package)")
    return exe


def _directives(text: str) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> the values in order; a unit file may repeat a key."""
    out: dict[tuple[str, str], list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        out.setdefault((section, key.strip()), []).append(value.strip())
    return out


def _service() -> dict[str, list[str]]:
    return {k: v for (s, k), v in _directives(UNIT.read_text()).items() if s == "Service"}


# --- deploy/netboot.service ------------------------------------------------------------


def _verify(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` on ``text`` as netboot.service.

    verify refuses a unit whose ExecStart= binary does not exist, so it runs in a root
    of its own (--root): the unit in etc/systemd/system, an executable stub at the
    ExecStart= path, and a copy of this system's units for the ones the unit orders
    itself against (sysinit.target, network-online.target, ...). The unit file is
    checked as it is, its ExecStart= line included."""
    root = tmp_path / "root"
    system_units = next(p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                        if p.is_dir())
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    exe = _service()["ExecStart"][0].split()[0]
    stub = root / exe.lstrip("/")
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system/netboot.service").write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSTEMD_")}
    return subprocess.run([_systemd_analyze(), "verify", f"--root={root}", "--man=no",
                           "netboot.service"], capture_output=True, text=True, timeout=30,
                          env={**env, "LC_ALL": "C", "SYSTEMD_LOG_COLOR": "0"})


def test_unit_verifies_without_a_warning(tmp_path: Path) -> None:
    r = _verify(tmp_path / "as-is", UNIT.read_text())
    print(f"systemd-analyze verify: exit {r.returncode}, output {r.stdout + r.stderr!r}")
    # verify exits 0 for unknown keys and unparsable values too, and only warns: the
    # output must be empty.
    assert (r.returncode, r.stdout + r.stderr) == (0, "")

    # ... and it does warn, in this root, for a value it cannot parse.
    broken = UNIT.read_text().replace("ProtectSystem=strict", "ProtectSystem=stirct")
    r = _verify(tmp_path / "broken", broken)
    assert "stirct" in r.stdout + r.stderr, r.stderr  # 252: "Failed to parse protect ..."


def test_unit_hardening_directives() -> None:
    svc = _service()
    one = {k: v[0] for k, v in svc.items() if len(v) == 1}
    assert one["ExecStart"] == \
        "/opt/netboot/.venv/bin/netboot serve --config /etc/netboot/netboot.yaml"
    assert set(one["CapabilityBoundingSet"].split()) == NET_CAPS
    assert len(one["CapabilityBoundingSet"].split()) == 2
    assert set(one["AmbientCapabilities"].split()) == NET_CAPS
    assert set(one["RestrictAddressFamilies"].split()) == FAMILIES
    assert one.get("DynamicUser") == "yes" or one.get("User") == "netboot"
    assert one["StateDirectory"] == "netboot"
    assert "/var/lib/netboot" in one["ReadWritePaths"].split()
    assert one["EnvironmentFile"] == "-/etc/netboot/netboot.env"
    assert svc["SystemCallFilter"][0] == "@system-service"
    assert "PrivateUsers" not in one or one["PrivateUsers"] == "no"  # caps on the host
    for key, value in {"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                       "NoNewPrivileges": "yes", "ProtectKernelTunables": "yes",
                       "ProtectControlGroups": "yes", "RestrictNamespaces": "yes",
                       "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes",
                       "Restart": "on-failure"}.items():
        assert one.get(key) == value, key


def test_unit_exposure_score() -> None:
    r = subprocess.run([_systemd_analyze(), "security", "--offline=yes", "--no-pager",
                        f"--threshold={int(MAX_EXPOSURE * 10)}", str(UNIT)],
                       capture_output=True, text=True, timeout=30,
                       env={**os.environ, "LC_ALL": "C", "SYSTEMD_COLORS": "0"})
    if "--offline" in r.stderr and r.returncode != 0:
        pytest.skip(f"this systemd-analyze has no security --offline: {r.stderr.strip()}")
    m = re.search(r"Overall exposure level for netboot\.service: (\d+\.\d+) (\S+)", r.stdout)
    assert m, r.stdout + r.stderr
    print(f"systemd-analyze security --offline=yes: {m.group(0)}")
    assert float(m.group(1)) <= MAX_EXPOSURE
    assert r.returncode == 0, r.stderr  # --threshold: non-zero above it


#: Run as `python -c WRAPPER FAMILIES PROGRAM ARG...`: installs the seccomp filter that
#: systemd 252 installs for MemoryDenyWriteExecute=yes (x86-64: mmap with PROT_WRITE and
#: PROT_EXEC together, mprotect and pkey_mprotect with PROT_EXEC, shmat with SHM_EXEC
#: fail with EPERM) and for RestrictAddressFamilies= (socket() of another family fails
#: with EAFNOSUPPORT), checks that a writable and executable mapping is refused, then
#: execs PROGRAM, which inherits the filter, as do its children.
WRAPPER = r"""
import ctypes, mmap, os, socket, struct, sys
families = [getattr(socket, name) for name in sys.argv[1].split()]
LD, JEQ, AND, RET = 0x20, 0x15, 0x54, 0x06
ALLOW, EPERM, EAFNOSUPPORT = 0x7FFF0000, 0x00050001, 0x00050000 | 97
ARG0, ARG2 = 16, 16 + 8 * 2                    # seccomp_data.args[i], low 32 bits
prog = [(LD, 4), (JEQ, 0xC000003E, "nr"), (RET, ALLOW),   # another arch: not ours
        "nr", (LD, 0), (JEQ, 9, "mmap"), (JEQ, 10, "mprotect"), (JEQ, 329, "mprotect"),
        (JEQ, 30, "shmat"), (JEQ, 41, "socket"), (RET, ALLOW),
        "mmap", (LD, ARG2), (AND, 0x6), (JEQ, 0x6, "eperm"), (RET, ALLOW),
        "mprotect", (LD, ARG2), (AND, 0x4), (JEQ, 0x4, "eperm"), (RET, ALLOW),
        "shmat", (LD, ARG2), (AND, 0o100000), (JEQ, 0o100000, "eperm"), (RET, ALLOW),
        "socket", (LD, ARG0), *[(JEQ, f, "allow") for f in families], (RET, EAFNOSUPPORT),
        "allow", (RET, ALLOW), "eperm", (RET, EPERM)]
labels, code = {}, []
for item in prog:
    if isinstance(item, str):
        labels[item] = len(code)
    else:
        code.append(item)
blob = b"".join(struct.pack("=HBBI", op, labels[rest[0]] - i - 1 if rest else 0, 0, k)
                for i, (op, k, *rest) in enumerate(code))
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(Fprog(len(code), blob)), 0, 0):
    sys.exit(f"seccomp: {os.strerror(ctypes.get_errno())}")   # PR_SET_NO_NEW_PRIVS, SECCOMP
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit("seccomp: a writable and executable mapping was allowed")
except PermissionError:
    print("seccomp: writable+executable mapping refused", flush=True)
os.execv(sys.argv[2], sys.argv[2:])
"""


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_runs_under_the_units_seccomp_rules(tmp_path: Path) -> None:
    """`netboot serve` (uvloop, aiohttp, pydantic-core, cryptography, SQLite, the TFTP
    worker process) starts and answers HTTP and TFTP under MemoryDenyWriteExecute= and
    the unit's RestrictAddressFamilies=. Not covered: SystemCallFilter=, and whatever
    PostgreSQL's client does once the registry is one."""
    if platform.machine() != "x86_64":
        pytest.skip("the filter here is written for x86-64 system call numbers")
    if os.geteuid() != 0:
        pytest.skip("SO_BINDTODEVICE (ProxyDHCP, TFTP) needs CAP_NET_RAW: run as root")
    http, tftp = _free_port(socket.SOCK_STREAM), _free_port(socket.SOCK_DGRAM)
    cfg = tmp_path / "etc"
    for d in ("profiles", "machines"):
        (cfg / d).mkdir(parents=True)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "hello.txt").write_bytes(b"served under seccomp\n")
    (cfg / "netboot.yaml").write_text(yaml.safe_dump({
        "interface": "lo", "address": "127.0.0.1", "http_port": http,
        "data_dir": str(tmp_path / "data"), "images_dir": str(tmp_path / "images"),
        "default_profile": None,
        "dhcp": {"port": _free_port(socket.SOCK_DGRAM),
                 "proxy_port": _free_port(socket.SOCK_DGRAM)},
        "tftp": {"port": tftp, "roots": [], "workers": 1}}))
    families = " ".join(_service()["RestrictAddressFamilies"][0].split())
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", WRAPPER, families, sys.executable,
                                 "-m", "netboot", "serve", "--config", str(cfg / "netboot.yaml")],
                                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        base = f"http://127.0.0.1:{http}"
        deadline = time.monotonic() + 8
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=1) as r:
                    health = json.load(r)
                break
            except OSError:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        assert health["status"] == "ok", health
        for path in ("/", "/metrics"):  # the dashboard (jinja2) and the counters
            with urllib.request.urlopen(base + path, timeout=2) as r:
                assert r.status == 200
        # A TFTP read, served by the worker process (tftp.workers: 1).
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(3)
            s.sendto(b"\0\1images/hello.txt\0octet\0", ("127.0.0.1", tftp))
            data, peer = s.recvfrom(1024)
            s.sendto(b"\0\4\0\1", peer)
        assert data == b"\0\3\0\1served under seccomp\n"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log.read_text()
    print(text)
    assert "seccomp: writable+executable mapping refused" in text
    assert "Operation not permitted" not in text and "Traceback" not in text, text


# --- deploy/netboot-stack.yml ----------------------------------------------------------


def test_stack_matches_the_compose_3_8_schema() -> None:
    doc = yaml.safe_load(STACK.read_text())
    validator = jsonschema.Draft4Validator(json.loads(COMPOSE_SCHEMA.read_text()))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(doc)]
    assert errors == []
    bad = json.loads(json.dumps(doc))
    bad["services"]["netboot"]["cap_ad"] = bad["services"]["netboot"].pop("cap_add")
    assert not validator.is_valid(bad)  # the schema does refuse a misspelt key

    assert doc["version"] == "3.8"
    svc = doc["services"]["netboot"]
    assert svc["image"] == "netboot:latest"
    assert svc["command"] == ["netboot", "serve", "--config", "/etc/netboot/netboot.yaml"]
    assert svc["deploy"]["mode"] == "global"  # the schema takes any string here
    assert svc["networks"] == ["hostnet"]
    assert doc["networks"]["hostnet"] == {"external": True, "name": "host"}
    assert "ports" not in svc
    assert svc["cap_drop"] == ["ALL"]
    assert {f"CAP_{c}" for c in svc["cap_add"]} == NET_CAPS
    mounts = {m["target"]: m for m in svc["volumes"]}
    assert mounts["/etc/netboot"] == {"type": "bind", "source": "/etc/netboot",
                                      "target": "/etc/netboot", "read_only": True}
    assert mounts["/var/lib/netboot"]["type"] == "volume"
    assert mounts["/var/lib/netboot"]["source"] in doc["volumes"]
    assert svc["secrets"][0]["source"] == "netboot_secret"
    assert svc["secrets"][0]["target"] == "netboot_secret"  # /run/secrets/netboot_secret
    assert doc["secrets"]["netboot_secret"] == {"external": True}


def test_stack_docker_stack_config() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI")
    r = subprocess.run([docker, "stack", "config", "-c", str(STACK)], capture_output=True,
                       text=True, timeout=30, env={**os.environ, "DOCKER_CLI_HINTS": "false"})
    if r.returncode != 0 and "config" in r.stderr and ("unknown" in r.stderr.lower()
                                                       or "usage" in r.stderr.lower()):
        pytest.skip(f"this docker CLI has no `docker stack config` (Docker 25+): "
                    f"{r.stderr.strip().splitlines()[0]}")
    assert r.returncode == 0, r.stderr
    merged = yaml.safe_load(r.stdout)
    svc = merged["services"]["netboot"]
    # what `docker stack deploy` would send: nothing dropped or renamed on the way
    assert svc["networks"] == {"hostnet": None}
    assert merged["networks"]["hostnet"] == {"name": "host", "external": True}
    assert svc["cap_add"] == ["NET_BIND_SERVICE", "NET_RAW"]
    assert svc["cap_drop"] == ["ALL"]
    assert svc["deploy"]["mode"] == "global"
    assert merged["secrets"]["netboot_secret"] == {"name": "netboot_secret", "external": True}


# --- deploy/netboot.nomad.hcl ----------------------------------------------------------


def _only(blocks: list[dict]) -> dict:
    assert len(blocks) == 1, blocks
    return blocks[0]


def _labelled(blocks: list[dict]) -> dict[str, dict]:
    return {label: body for block in blocks for label, body in block.items()}


def test_nomad_job_structure() -> None:
    import hcl2

    # Syntax only: python-hcl2 knows HCL2, not which blocks and attributes a Nomad job
    # may have (`nomad job validate` does; it is not installable from Debian).
    doc = hcl2.loads(NOMAD.read_text(), serialization_options=hcl2.SerializationOptions(
        with_comments=False, strip_string_quotes=True, explicit_blocks=False))
    job = _labelled(doc["job"])["netboot"]
    assert job["type"] == "system"
    assert _only(job["update"])["max_parallel"] == 1
    group = _labelled(job["group"])["netboot"]
    assert _only(group["network"])["mode"] == "host"
    assert "port" not in _only(group["network"])
    volumes = _labelled(group["volume"])
    assert volumes["config"] == {"type": "host", "source": "netboot-config", "read_only": True}
    assert volumes["data"]["type"] == "host"

    task = _labelled(group["task"])["netboot"]
    assert task["driver"] == "docker"
    config = _only(task["config"])
    assert config["image"] == "netboot:latest"
    assert [config["command"], *config["args"]] == \
        ["netboot", "serve", "--config", "/etc/netboot/netboot.yaml"]
    assert config["network_mode"] == "host"
    assert config["cap_drop"] == ["all"]
    assert {f"CAP_{c.upper()}" for c in config["cap_add"]} == NET_CAPS
    mounts = {m["volume"]: m for m in task["volume_mount"]}
    assert mounts["config"] == {"volume": "config", "destination": "/etc/netboot",
                                "read_only": True}
    assert mounts["data"]["destination"] == "/var/lib/netboot"

    template = _only(task["template"])
    assert template["env"] is True
    assert template["destination"].startswith("secrets/")  # the task's private directory
    body = template["data"]
    assert body.startswith("<<-EOT\n") and body.rstrip().endswith("EOT"), body
    assert 'nomadVar "nomad/jobs/netboot"' in body
    assert "NETBOOT_SECRET={{ .secret }}" in body
