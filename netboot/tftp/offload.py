"""File transfers in a second process: the TFTP data path on the other core.

The main process keeps every decision: it parses the RRQ, applies the limits,
resolves the path (the router may record a fetch), makes the transfer's two
sockets (see ``TftpServer._transfer_sockets``) and opens the file. For a plain
file it then hands the three descriptors and the request's options to the
worker over a Unix socket (SCM_RIGHTS) and closes its own copies. The worker
runs the same ``ReadSession`` and ``_Transfer`` code on its own event loop and
reports each ended transfer back (outcome, bytes, counters), so the counters,
``on_transfer`` (the lifecycle) and the registry stay in the main process, with
one writer. Generated content (pxelinux configs, OEM archives) stays in the main
process: it is small and it is the main process's to make.

The worker is ``python -m netboot.tftp.offload FD``: a fresh interpreter, not a
fork of one that runs threads. It exits when the main process closes its end
(or dies: the socket reads EOF). If the worker is gone, transfers are served in
the main process again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from netboot.metrics import Counters
from netboot.tftp.provider import FileProvider
from netboot.tftp.session import Outcome, ReadSession

log = logging.getLogger("netboot.tftp")

#: one control message (JSON); the descriptors travel beside it
MAX_MESSAGE = 1 << 16
CONTROL_BUFFER = 4 << 20
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)


@dataclass(frozen=True, slots=True)
class Ended:
    """What the worker reports about one transfer."""

    outcome: Outcome
    reason: str
    bytes_sent: int
    retransmits: int
    error_code: int


OnEnded = Callable[[int, Ended], None]


class Offload:
    """The main process's end: start the worker, hand transfers over, hear how they ended."""

    def __init__(self, control: socket.socket, proc: subprocess.Popen[bytes],
                 counters: Counters, on_ended: OnEnded):
        self._control = control
        self._proc = proc
        self._counters = counters
        self._on_ended = on_ended
        self._loop = asyncio.get_running_loop()
        self._next_id = 0
        self.alive = True
        self._loop.add_reader(control.fileno(), self._on_readable)

    @classmethod
    def start(cls, counters: Counters, on_ended: OnEnded) -> Offload:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (ours, theirs):  # room for a rack's worth of hand-offs and reports
            try:  # as root, past net.core.wmem_max
                s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, CONTROL_BUFFER)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CONTROL_BUFFER)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "netboot.tftp.offload", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        return cls(ours, proc, counters, on_ended)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def hand_off(self, provider: FileProvider, sock: socket.socket, catcher: socket.socket,
                 peer: tuple[str, int], options: dict[str, str], *, max_blksize: int,
                 max_windowsize: int, timeout: float, retries: int) -> int | None:
        """Give one transfer to the worker; its id, or None if the worker is gone (the
        caller then serves it itself). The caller keeps, and closes, its descriptors."""
        if not self.alive:
            return None
        self._next_id += 1
        tid = self._next_id
        msg = {"op": "start", "id": tid, "peer": list(peer), "options": options,
               "max_blksize": max_blksize, "max_windowsize": max_windowsize,
               "timeout": timeout, "retries": retries}
        try:
            socket.send_fds(self._control, [json.dumps(msg).encode()],
                            [sock.fileno(), catcher.fileno(), provider.fileno()])
        except (BlockingIOError, InterruptedError):  # the worker is behind: serve it here
            return None
        except OSError as exc:  # the worker is gone
            self._lost(f"hand-off failed: {exc}")
            return None
        return tid

    def abort(self, tid: int, reason: str) -> None:
        self._send({"op": "abort", "id": tid, "reason": reason})

    def _send(self, msg: dict[str, Any]) -> None:
        if not self.alive:
            return
        try:
            self._control.send(json.dumps(msg).encode())
        except (BlockingIOError, InterruptedError):
            pass  # an abort only: the transfer then ends on its own timer
        except OSError as exc:
            self._lost(f"control message failed: {exc}")

    def _on_readable(self) -> None:
        for _ in range(64):
            try:
                data = self._control.recv(MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lost(str(exc))
                return
            if not data:
                self._lost("worker exited")
                return
            try:
                msg = json.loads(data)
                for name, labels, value in msg.get("counters", ()):
                    self._counters.inc(name, value, **labels)
                self._on_ended(msg["id"], Ended(Outcome(msg["outcome"]), msg["reason"],
                                                msg["bytes_sent"], msg["retransmits"],
                                                msg["error_code"]))
            except Exception:  # noqa: BLE001 - one bad report must not stop the others
                log.exception("TFTP worker: bad report %r", data[:200])

    def _lost(self, why: str) -> None:
        if self.alive:
            self.alive = False
            log.error("TFTP worker process lost (%s): serving file transfers in the main "
                      "process from now on", why)
            self._loop.remove_reader(self._control.fileno())
            self._on_ended(0, Ended(Outcome.FAILED, "worker lost", 0, 0, -1))

    async def close(self) -> None:
        """Stop the worker: it aborts what it still runs and exits."""
        if self.alive:
            self.alive = False
            self._loop.remove_reader(self._control.fileno())
        self._control.close()
        try:
            await asyncio.wait_for(asyncio.to_thread(self._proc.wait), 5)
        except TimeoutError:
            self._proc.kill()
            await asyncio.to_thread(self._proc.wait)


# -- the worker process ------------------------------------------------------------


class _Host:
    """What ``_Transfer`` needs of a server, in the worker: loop, clock, counters, and
    where an ended transfer goes (a report to the main process)."""

    def __init__(self, control: socket.socket, stop: asyncio.Event):
        self._loop = asyncio.get_running_loop()
        self._time = self._loop.time
        self.counters = Counters()
        self._control = control
        self._stop = stop
        self._by_id: dict[int, Any] = {}
        self._ids: dict[int, int] = {}  # id(transfer) -> transfer id
        self._outbox: deque[bytes] = deque()  # reports the main process has no room for yet

    def _wrong_tid(self, sock: socket.socket, data: bytes, addr: tuple[str, int]) -> None:
        from netboot.tftp.server import answer_wrong_tid

        answer_wrong_tid(self.counters, sock, data, addr)

    def start(self, msg: dict[str, Any], fds: list[int]) -> None:
        from netboot.tftp.server import _Transfer

        sock_fd, catcher_fd, file_fd = fds
        sock = socket.socket(fileno=sock_fd)
        catcher = socket.socket(fileno=catcher_fd)
        provider = FileProvider("", fd=file_fd)
        session = ReadSession(provider, msg["options"], max_blksize=msg["max_blksize"],
                              max_windowsize=msg["max_windowsize"], timeout=msg["timeout"],
                              retries=msg["retries"], concurrent=len(self._by_id) + 1)
        peer = (msg["peer"][0], msg["peer"][1])
        t = _Transfer(self, session, sock, catcher, peer, "", "")  # type: ignore[arg-type]
        self._by_id[msg["id"]] = t
        self._ids[id(t)] = msg["id"]
        self._loop.add_reader(sock.fileno(), t.on_readable)
        self._loop.add_reader(catcher.fileno(), t.on_catcher_readable)
        t.send_all(session.start(self._time()))
        if session.outcome is Outcome.RUNNING:
            t.arm()
        else:
            self._finish(t)

    def abort(self, tid: int, reason: str) -> None:
        t = self._by_id.get(tid)
        # Packets that came before the abort count first: a client that reuses its port
        # sends the last ACK, then the next RRQ (which the main process saw first).
        while t is not None and tid in self._by_id and _readable(t.sock):
            t.on_readable()
        if tid in self._by_id:
            t.session.abort(reason)
            self._finish(t)

    def _finish(self, t: Any) -> None:
        tid = self._ids.pop(id(t), None)
        if tid is None:
            return
        del self._by_id[tid]
        if t.timer is not None:
            t.timer.cancel()
            t.timer = None
        for sock in (t.sock, t.catcher):
            self._loop.remove_reader(sock.fileno())
            sock.close()
        s = t.session
        s.provider.close()
        counters = [[name, dict(key), value] for name, key, value in self.counters.items()]
        self.counters = Counters()
        report = {"id": tid, "outcome": s.outcome.value, "reason": s.reason,
                  "bytes_sent": s.bytes_sent, "retransmits": s.retransmits,
                  "error_code": s.error_code, "counters": counters}
        self._outbox.append(json.dumps(report).encode())
        if len(self._outbox) == 1:
            self._flush()

    def _flush(self) -> None:
        """Send queued reports in order; wait for room without blocking the transfers."""
        box = self._outbox
        while box:
            try:
                self._control.send(box[0])
            except (BlockingIOError, InterruptedError):
                self._loop.add_writer(self._control.fileno(), self._flush)
                return
            except OSError:
                box.clear()
                self._stop.set()
                return
            box.popleft()
        self._loop.remove_writer(self._control.fileno())

    def on_control(self) -> None:
        for _ in range(64):
            try:
                data, fds, _flags, _addr = socket.recv_fds(self._control, MAX_MESSAGE, 3)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._stop.set()
                return
            if not data:
                for fd in fds:
                    os.close(fd)
                self._stop.set()  # the main process closed its end, or died
                return
            try:
                msg = json.loads(data)
                if msg["op"] == "start" and len(fds) == 3:
                    self.start(msg, fds)
                    continue
                if msg["op"] == "abort":
                    self.abort(msg["id"], msg["reason"])
            except Exception:  # noqa: BLE001 - one bad hand-off must not stop the worker
                log.exception("TFTP worker: bad hand-off")
            for fd in fds:  # not taken over by a transfer
                try:
                    os.close(fd)
                except OSError:
                    pass

    def shutdown(self) -> None:
        for tid in list(self._by_id):
            self.abort(tid, "shutdown")


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


async def _worker(fd: int) -> None:
    control = socket.socket(fileno=fd)
    control.setblocking(False)
    stop = asyncio.Event()
    host = _Host(control, stop)
    loop = asyncio.get_running_loop()
    loop.add_reader(control.fileno(), host.on_control)
    await stop.wait()
    loop.remove_reader(control.fileno())
    host.shutdown()
    control.close()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when to stop
    logging.basicConfig(level=logging.WARNING, format="netboot tftp worker: %(message)s")
    try:
        import uvloop

        uvloop.run(_worker(int(args[0])))
    except ImportError:
        asyncio.run(_worker(int(args[0])))


if __name__ == "__main__":
    main()
