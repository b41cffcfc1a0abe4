"""A stand-in for netboot's inventory endpoint, for testing the commissioning OS alone.

    POST /api/v1/nodes/<uuid>/inventory?token=<token>&format=sh
    Content-Type: application/json, body: the inventory

It checks what the real endpoint would (the node's UUID and token, format=sh, a JSON
object with every key of the contract) and answers as netboot will, in plain text:
first ``NETBOOT_ACTION=set-bmc`` with a new BMC address, then ``wait`` once, then
``poweroff``. Every request goes to ``--out`` as one JSON line.

    python tests/e2e/inventory_stub.py --host H --port P --uuid U --token T --out F \\
        --bmc-address A --bmc-netmask M [--bmc-gateway G]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from aiohttp import web

KEYS = {"smbios", "cpu", "memory_bytes", "disks", "nics", "lldp", "bmc"}
SMBIOS = {"uuid", "serial", "vendor", "product", "bios_version"}


def problems(inv: object) -> list[str]:
    """What is missing or mistyped in an inventory, by the contract."""
    if not isinstance(inv, dict):
        return ["not a JSON object"]
    out = [f"missing {k}" for k in sorted(KEYS - inv.keys())]
    if not isinstance(inv.get("smbios"), dict) or SMBIOS - inv["smbios"].keys():
        out.append("smbios lacks keys")
    cpu = inv.get("cpu")
    if not isinstance(cpu, dict) or not isinstance(cpu.get("count"), int):
        out.append("cpu.count is not an int")
    if not isinstance(inv.get("memory_bytes"), int):
        out.append("memory_bytes is not an int")
    for d in inv.get("disks") or []:
        if set(d) != {"name", "size_bytes", "model"}:
            out.append(f"disk keys {sorted(d)}")
    for n in inv.get("nics") or []:
        if set(n) != {"mac", "driver", "link", "speed_mbps"} or not isinstance(n["link"], bool):
            out.append(f"nic {n}")
    bmc = inv.get("bmc")
    if bmc is not None and set(bmc) != {"address", "netmask", "gateway", "mac", "source"}:
        out.append(f"bmc keys {sorted(bmc)}")
    if inv.get("lldp") is not None and set(inv["lldp"]) != {"chassis", "port"}:
        out.append("lldp keys")
    return out


def make_app(args: argparse.Namespace) -> web.Application:
    seen: list[int] = []

    async def inventory(request: web.Request) -> web.Response:
        record: dict = {"uuid": request.match_info["uuid"], "query": dict(request.query),
                        "content_type": request.content_type}
        status, answer = 200, ""
        body = await request.read()
        if request.match_info["uuid"].lower() != args.uuid.lower():
            status, answer = 404, "unknown node\n"
        elif request.query.get("token") != args.token:
            status, answer = 403, "bad token\n"
        elif request.query.get("format") != "sh" or request.content_type != "application/json":
            status, answer = 400, "want format=sh and application/json\n"
        else:
            try:
                record["inventory"] = inv = json.loads(body)
            except ValueError as exc:
                inv, record["inventory"] = None, None
                record["problems"] = [f"not JSON: {exc}: {body[:200]!r}"]
            else:
                record["problems"] = problems(inv)
            if record["problems"]:
                status, answer = 400, "; ".join(record["problems"]) + "\n"
            else:
                seen.append(1)
                if len(seen) == 1:
                    answer = ("NETBOOT_ACTION=set-bmc\n"
                              f"NETBOOT_BMC_ADDRESS={args.bmc_address}\n"
                              f"NETBOOT_BMC_NETMASK={args.bmc_netmask}\n"
                              + (f"NETBOOT_BMC_GATEWAY={args.bmc_gateway}\n"
                                 if args.bmc_gateway else ""))
                elif len(seen) == 2:
                    answer = "NETBOOT_ACTION=wait\n"
                else:
                    answer = "NETBOOT_ACTION=poweroff\n"
        record["status"], record["answer"] = status, answer
        with open(args.out, "a") as f:
            f.write(json.dumps(record) + "\n")
        return web.Response(status=status, text=answer)

    app = web.Application()
    app.router.add_post("/api/v1/nodes/{uuid}/inventory", inventory)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for opt in ("--host", "--uuid", "--token", "--bmc-address", "--bmc-netmask"):
        p.add_argument(opt, required=True)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--bmc-gateway")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    web.run_app(make_app(args), host=args.host, port=args.port, print=lambda *a: print(
        f"inventory stub listening on {args.host}:{args.port}", flush=True))


if __name__ == "__main__":
    main()
