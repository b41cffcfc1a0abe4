"""One read transfer as a pure state machine: packets and time in, packets and a deadline out.

No sockets, no asyncio, no clock of its own: the caller passes `now` (any
monotonic seconds) and sends whatever is returned to the peer. That keeps the
protocol testable packet by packet and lets the socket layer stay thin.

Blocks are numbered internally from 1 without limit; only the wire number wraps
(65535 -> 0, as tftpd-hpa, curl, atftp and iPXE expect).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from netboot.tftp import packet as pk
from netboot.tftp.provider import Provider

MIN_BLKSIZE = 8
MAX_BLKSIZE = 65464
DEFAULT_BLKSIZE = 512
_DATA_HDR = struct.Struct("!HH")


class Outcome(enum.Enum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    PROBE = "probe"  # client declined our OACK with ERROR 8: a size probe, not a failure


@dataclass(slots=True)
class Negotiated:
    """What the transfer will use, and the OACK options to send (empty: no OACK)."""

    blksize: int = DEFAULT_BLKSIZE
    windowsize: int = 1
    timeout: float | None = None  # None: the server's own default
    oack: dict[str, str] = field(default_factory=dict)


def _int(value: str) -> int | None:
    try:
        return int(value.strip(), 10)
    except ValueError:
        return None


def negotiate(options: dict[str, str], size: int | None, *, max_blksize: int = MAX_BLKSIZE,
              max_windowsize: int = 64) -> Negotiated:
    """Apply RFC 2348/2349/7440 to the client's options.

    Only options the client asked for are echoed; out-of-range values are ignored
    (as if not asked) rather than refused, since firmware rarely recovers from
    an ERROR 8. Larger-than-allowed blksize/windowsize are clamped, as the RFCs allow.
    """
    neg = Negotiated()
    for name, value in options.items():  # names are already lower-case
        n = _int(value)
        if n is None:
            continue
        if name == "blksize" and n >= MIN_BLKSIZE:
            neg.blksize = min(n, MAX_BLKSIZE, max(max_blksize, MIN_BLKSIZE))
            neg.oack["blksize"] = str(neg.blksize)
        elif name == "tsize" and n >= 0 and size is not None:
            neg.oack["tsize"] = str(size)
        elif name == "timeout" and 1 <= n <= 255:
            neg.timeout = float(n)
            neg.oack["timeout"] = str(n)
        elif name == "windowsize" and 1 <= n <= 65535:
            neg.windowsize = min(n, max(max_windowsize, 1))
            neg.oack["windowsize"] = str(neg.windowsize)
    return neg


class ReadSession:
    """Sends one provider's content to one peer (RRQ side of RFC 1350 + 2347/2348/2349/7440).

    Flow control: a window of `windowsize` blocks is sent; an ACK that moves
    forward slides the window and sends from the block after it. A duplicate or
    stale ACK is ignored (no Sorcerer's Apprentice); only a timeout resends,
    from the block after the last ACKed, up to `retries` times without progress.
    """

    __slots__ = (
        "_acked",
        "_last",
        "_sent_hi",
        "_started",
        "_tries",
        "blksize",
        "bytes_sent",
        "deadline",
        "error_code",
        "oack",
        "outcome",
        "provider",
        "reason",
        "retransmits",
        "retries",
        "timeout",
        "windowsize",
    )

    def __init__(self, provider: Provider, options: dict[str, str] | None = None, *,
                 max_blksize: int = MAX_BLKSIZE, max_windowsize: int = 64,
                 timeout: float = 1.0, retries: int = 5):
        neg = negotiate(options or {}, provider.size(), max_blksize=max_blksize,
                        max_windowsize=max_windowsize)
        self.provider = provider
        self.blksize = neg.blksize
        self.windowsize = neg.windowsize
        # The client's timeout option is echoed, but never makes us slower than our own
        # timer: resending early costs a duplicate DATA (harmless without the Sorcerer's
        # Apprentice bug), while curl's default ask of several seconds per loss would stall.
        self.timeout = min(neg.timeout, timeout) if neg.timeout is not None else timeout
        self.retries = retries
        self.oack = neg.oack
        self.deadline: float | None = None
        self.outcome = Outcome.RUNNING
        self.reason = ""
        self.error_code = -1  # code of an ERROR the client sent, if any
        self.bytes_sent = 0  # payload bytes, retransmissions included
        self.retransmits = 0
        self._acked = 0  # highest block acknowledged (0: OACK or nothing yet)
        self._sent_hi = 0  # highest block sent so far
        self._last: int | None = None  # final (short) block once it has been read
        self._tries = 0  # consecutive timeouts without progress
        self._started = False  # False until ACK 0 while an OACK is outstanding

    @property
    def done(self) -> bool:
        return self.outcome is not Outcome.RUNNING

    def start(self, now: float) -> list[bytes]:
        """First packets: the OACK if any option was accepted, else DATA 1 (and its window)."""
        if self.oack:
            self.deadline = now + self.timeout
            return [pk.encode_oack(self.oack)]
        self._started = True
        return self._send_window(now)

    def _send_window(self, now: float) -> list[bytes]:
        # Hot path (once per ACK): kept to plain locals, no helper calls but read_at.
        bs = self.blksize
        first = block = self._acked + 1
        stop = first + self.windowsize
        last = self._last
        if last is not None and last < stop:
            stop = last + 1
        read_at = self.provider.read_at
        pack = _DATA_HDR.pack
        out: list[bytes] = []
        sent = 0
        while block < stop:
            payload = read_at((block - 1) * bs, bs)
            out.append(pack(pk.DATA, block & 0xFFFF) + payload)
            n = len(payload)
            sent += n
            block += 1
            if n < bs:
                self._last = block - 1
                break
        hi = block - 1
        sent_hi = self._sent_hi
        if first <= sent_hi:  # part of this window went out before
            self.retransmits += min(sent_hi, hi) - first + 1
        if hi > sent_hi:
            self._sent_hi = hi
        self.bytes_sent += sent
        self.deadline = now + self.timeout
        return out

    def receive(self, data: bytes, now: float) -> list[bytes]:
        """Feed one packet from the peer; returns packets to send back.

        Raises packet.MalformedPacket for bytes that are neither ACK nor ERROR;
        the caller counts and drops those, the session is unaffected.
        """
        if self.outcome is not Outcome.RUNNING:
            return []
        if self._started and len(data) >= 4 and data[1] == pk.ACK and data[0] == 0:
            # Hot path: an ACK during the data phase, parsed inline.
            delta = (((data[2] << 8) | data[3]) - self._acked) & 0xFFFF
            if delta == 0 or delta > self._sent_hi - self._acked:
                return []  # duplicate or out-of-window: never resend on it
            self._acked += delta
            self._tries = 0
            last = self._last
            if last is not None and self._acked >= last:
                self._finish(Outcome.COMPLETED, "")
                return []
            return self._send_window(now)
        op = pk.opcode_of(data)
        if op == pk.ACK:
            block = pk.parse_ack(data)
            if not self._started:
                if block != 0:
                    return []  # stray ACK before the OACK was acknowledged
                self._started = True
                self._tries = 0
                return self._send_window(now)
            return []  # unreachable in the data phase: the hot path took it
        if op == pk.ERROR:
            code, _msg = pk.parse_error(data)
            self.error_code = code
            if not self._started and code == pk.ERR_OPTION:
                self._finish(Outcome.PROBE, "client declined options")
            else:
                self._finish(Outcome.FAILED, "client error")
            return []
        raise pk.MalformedPacket("unexpected opcode")

    def on_timer(self, now: float) -> list[bytes]:
        """Call when `now >= deadline`: resend what is unacknowledged, or give up."""
        if self.outcome is not Outcome.RUNNING or self.deadline is None or now < self.deadline:
            return []
        self._tries += 1
        if self._tries > self.retries:
            self._finish(Outcome.FAILED, "timeout")
            return [pk.encode_error(pk.ERR_UNDEFINED, "timeout")]
        if not self._started:
            self.retransmits += 1
            self.deadline = now + self.timeout
            return [pk.encode_oack(self.oack)]
        return self._send_window(now)

    def abort(self, reason: str) -> None:
        """End the transfer from outside (server shutdown, replaced by a new request)."""
        if self.outcome is Outcome.RUNNING:
            self._finish(Outcome.FAILED, reason)

    def _finish(self, outcome: Outcome, reason: str) -> None:
        self.outcome = outcome
        self.reason = reason
        self.deadline = None
