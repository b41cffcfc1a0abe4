"""A flood of boot-script requests with random UUIDs, from one address.

What a loop over made-up UUIDs does to a netboot server: ``-n`` GETs of
``/ipxe/node?uuid=<random>&mac=<random>`` over ``-c`` keep-alive connections
(aiohttp), each answer read and sorted: a boot script (``kernel``), netboot's
"ask again later" script (``chain --replace``, limits.new_nodes), or anything else.
Prints (and writes with --json) the counts, the time taken and requests/s.

    .venv/bin/python bench/flood.py --url http://10.77.0.2:8080 -n 200000 -c 64

Exit status 0 if every request was answered with one of the two scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid as uuidlib
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp


async def _worker(session: aiohttp.ClientSession, url: str, todo: list[int],
                  counts: Counter[str]) -> None:
    while todo:
        todo.pop()
        u = uuidlib.UUID(bytes=os.urandom(16), version=4)
        mac = ":".join(f"{b:02x}" for b in (b"\x52\x54" + os.urandom(4)))
        try:
            async with session.get(f"{url}/ipxe/node?uuid={u}&mac={mac}") as r:
                body = await r.read()
                status = r.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            counts[f"error {type(exc).__name__}"] += 1
            continue
        if status != 200:
            counts[f"http {status}"] += 1
        elif b"\nkernel " in body:
            counts["booted"] += 1
        elif b"chain --replace" in body:
            counts["retry"] += 1
        else:
            counts["other"] += 1


async def flood(url: str, n: int, concurrency: int) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    todo = list(range(n))
    conn = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        start = time.monotonic()
        await asyncio.gather(*(_worker(session, url, todo, counts)
                               for _ in range(concurrency)))
        elapsed = time.monotonic() - start
    return {"requests": n, "concurrency": concurrency, "seconds": round(elapsed, 3),
            "per_second": round(n / elapsed, 1), **dict(counts)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", required=True, help="netboot's base URL")
    ap.add_argument("-n", type=int, default=200_000, help="requests")
    ap.add_argument("-c", type=int, default=64, help="connections (keep-alive)")
    ap.add_argument("--json", type=Path, help="write the result here")
    a = ap.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        uvloop = None
    run = uvloop.run if uvloop is not None else asyncio.run
    result = run(flood(a.url.rstrip("/"), a.n, a.c))
    text = json.dumps(result, sort_keys=True)
    print(text, flush=True)
    if a.json:
        a.json.write_text(text)
    return 0 if result.get("booted", 0) + result.get("retry", 0) == a.n else 1


if __name__ == "__main__":
    sys.exit(main())
