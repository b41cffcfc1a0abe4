"""One read transfer as a pure state machine: packets and time in, packets and a deadline out.

No sockets, no asyncio, no clock of its own: the caller passes `now` (any
monotonic seconds) and sends whatever is returned to the peer. That keeps the
protocol testable packet by packet and lets the socket layer stay thin.

Blocks are numbered internally from 1 without limit; only the wire number wraps
(65535 -> 0, as tftpd-hpa, curl, atftp and iPXE expect).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from netboot.tftp import packet as pk
from netboot.tftp.provider import Provider

MIN_BLKSIZE = 8
MAX_BLKSIZE = 65464
DEFAULT_BLKSIZE = 512


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


# Module-level aliases: in Python 3.11 `Outcome.RUNNING` goes through EnumType.__getattr__
# (about a microsecond of interpreter work), too dear for a per-packet check.
_RUNNING = Outcome.RUNNING
_COMPLETED = Outcome.COMPLETED
_FAILED = Outcome.FAILED
_PROBE = Outcome.PROBE

CHUNK = 256 * 1024  # most content read (and framed as DATA packets) at a time
#: least read at a time: a lock-step transfer needs one block in memory, and 10,000 of
#: them at once with 256 KiB each were 2.5 GB (a UEFI storm); 32 KiB is a read per
#: 22 blocks of 1468 bytes (16 KiB cost 0.2-0.4 µs more per ACK, measured)
MIN_CHUNK = 32 * 1024
#: what all transfers' chunks of one process may hold together: with more transfers at
#: once than that allows at MIN_CHUNK each, chunks shrink (to FLOOR_CHUNK at least), so
#: 10,000 machines at once do not need 10,000 x 32 KiB (the storm's peak RSS was 398 MiB)
CHUNK_BUDGET = 64 << 20
FLOOR_CHUNK = 8 * 1024
MAX_CHUNK_BLOCKS = 512  # keeps a preadv under IOV_MAX (1024) for tiny blksizes
# Byte k of these is the high/low byte of wire block number k & 0xFFFF, for k up to
# 65535 + MAX_CHUNK_BLOCKS, so one slice gives the numbers of a whole chunk, rollover included.
_BLOCK_HI = (b"".join(bytes([h]) * 256 for h in range(256)) * 2)[:65536 + MAX_CHUNK_BLOCKS]
_BLOCK_LO = (bytes(range(256)) * 258)[:65536 + MAX_CHUNK_BLOCKS]
_OPCODE_DATA = bytes([pk.DATA]) * MAX_CHUNK_BLOCKS


def chunk_bytes(blksize: int, windowsize: int, concurrent: int = 1) -> int:
    """Content framed at a time: four windows (so a window rarely spans two chunks),
    between MIN_CHUNK and CHUNK, but no more than this transfer's share of CHUNK_BUDGET
    among ``concurrent`` transfers (and never under FLOOR_CHUNK)."""
    want = min(CHUNK, max(MIN_CHUNK, 4 * windowsize * blksize))
    return max(FLOOR_CHUNK, min(want, CHUNK_BUDGET // max(1, concurrent)))


class ReadSession:
    """Sends one provider's content to one peer (RRQ side of RFC 1350 + 2347/2348/2349/7440).

    Flow control: a window of `windowsize` blocks is sent; an ACK that moves
    forward slides the window and sends from the block after it. A duplicate or
    stale ACK is ignored (no Sorcerer's Apprentice); only a timeout resends,
    from the block after the last ACKed, up to `retries` times without progress.

    DATA packets are framed a chunk (~256 KiB of content) at a time into one fresh
    buffer, header and payload in place (`preadv` straight from the file when the
    provider offers `readinto_at`); the packets returned are memoryviews over that
    buffer, which is never written again, so a caller may hold them as long as it likes.
    The in-order ACK (the case of nearly every packet) is `on_ack`: a list slice of
    ready packets and a few counters, no dispatch.
    """

    __slots__ = (
        "_acked",
        "_chunk",
        "_fast",
        "_last",
        "_last_len",
        "_pk_first",
        "_pk_full",
        "_pkts",
        "_readinto",
        "_rexmit_bytes",
        "_sent_hi",
        "_started",
        "_tries",
        "_tries_at",
        "blksize",
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
                 timeout: float = 1.0, retries: int = 5, concurrent: int = 1):
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
        self._chunk = chunk_bytes(self.blksize, self.windowsize, concurrent)
        self.oack = neg.oack
        self.deadline: float | None = None
        self.outcome = _RUNNING
        self.reason = ""
        self.error_code = -1  # code of an ERROR the client sent, if any
        self.retransmits = 0
        self._rexmit_bytes = 0  # payload bytes of retransmitted DATA
        self._acked = 0  # highest block acknowledged (0: OACK or nothing yet)
        self._sent_hi = 0  # highest block sent so far
        self._last: int | None = None  # final (short) block once it has been read
        self._last_len = 0  # its payload length
        self._tries = 0  # consecutive timeouts without progress
        self._tries_at = 0  # _acked when _tries was last counted (the fast path never resets it)
        self._started = False  # False until ACK 0 while an OACK is outstanding
        self._fast = False  # started and running: on_ack may take its fast path
        self._pkts: list[memoryview] = []  # framed DATA packets of the current chunk
        self._pk_first = 1  # block number of _pkts[0]
        self._pk_full = 0  # leading packets of _pkts that are full-size and not the final one
        self._readinto = getattr(provider, "readinto_at", None)

    @property
    def done(self) -> bool:
        return self.outcome is not _RUNNING

    @property
    def sent_hi(self) -> int:
        """The highest block sent so far (what a stalled receiver last saw)."""
        return self._sent_hi

    @property
    def bytes_sent(self) -> int:
        """Payload bytes sent, retransmissions included (derived: the fast path counts nothing)."""
        hi, last = self._sent_hi, self._last
        if last is not None and hi >= last:
            unique = (last - 1) * self.blksize + self._last_len
        else:
            unique = hi * self.blksize
        return unique + self._rexmit_bytes

    def start(self, now: float) -> list[memoryview | bytes]:
        """First packets: the OACK if any option was accepted, else DATA 1 (and its window)."""
        if self.oack:
            self.deadline = now + self.timeout
            return [pk.encode_oack(self.oack)]
        self._started = self._fast = True
        return self._send_window(now)

    def _load(self, first: int) -> None:
        """Frame the chunk of DATA packets that starts at block `first`."""
        bs = self.blksize
        step = bs + 4
        count = max(1, min(self._chunk // bs, MAX_CHUNK_BLOCKS))
        offset = (first - 1) * bs
        size = self.provider.size()
        if size is not None:  # no bigger buffer than the rest of the content needs
            count = max(1, min(count, (size - offset) // bs + 1))
        want = count * bs
        buf = bytearray(count * step)
        mv = memoryview(buf)
        pkts = [mv[p:p + step] for p in range(0, count * step, step)]
        readinto = self._readinto
        if readinto is not None:
            n = readinto(offset, [v[4:] for v in pkts])
        else:
            data = self.provider.read_at(offset, want)
            n = len(data)
            dv = memoryview(data)
            for j in range(0, (n + bs - 1) // bs):
                o = j * bs
                part = dv[o:o + bs]
                p = j * step + 4
                buf[p:p + len(part)] = part
        full = n // bs
        if n < want:  # end of content in this chunk: a short (maybe empty) final block
            del pkts[full + 1:]
            p = full * step
            pkts[full] = mv[p:p + 4 + n - full * bs]
            self._last = first + full
            self._last_len = n - full * bs
            self._pk_full = full
        else:
            self._pk_full = count
        # Headers with three strided copies instead of a pack per block: opcode bytes,
        # then the high and low bytes of the wire block numbers, cut from tables.
        f = first & 0xFFFF
        mv[1::step] = _OPCODE_DATA[:count]
        mv[2::step] = _BLOCK_HI[f:f + count]
        mv[3::step] = _BLOCK_LO[f:f + count]
        self._pkts = pkts
        self._pk_first = first

    def _send_window(self, now: float) -> list[memoryview | bytes]:
        """The window from the block after the last ACKed: the general (and retransmit) path."""
        first = block = self._acked + 1
        stop = first + self.windowsize
        out: list[memoryview | bytes] = []
        while block < stop:
            last = self._last
            if last is not None:
                if block > last:
                    break
                if stop > last + 1:
                    stop = last + 1
            i = block - self._pk_first
            if i < 0 or i >= len(self._pkts):
                self._load(block)
                continue
            take = self._pkts[i:i + stop - block]
            out += take
            block += len(take)
        hi = block - 1
        sent_hi = self._sent_hi
        if first <= sent_hi:  # part of this window went out before
            again = min(sent_hi, hi) - first + 1
            self.retransmits += again
            self._rexmit_bytes += sum(len(p) for p in out[:again]) - 4 * again
        if hi > sent_hi:
            self._sent_hi = hi
        self.deadline = now + self.timeout
        return out

    def on_ack(self, block: int, now: float) -> list[memoryview | bytes]:
        """An ACK (wire block number) during the data phase: the per-packet hot path.

        The common case, an ACK of everything sent whose next window is full blocks
        already framed, is a list slice and three stores; anything else (a gap, a
        duplicate, completion, a chunk boundary, before the OACK was acknowledged,
        after the end) goes through the general path.
        """
        hi = self._sent_hi
        if block == hi & 0xFFFF and self._fast:
            # While _fast, hi > _acked (every advancing ACK sends or completes) and
            # _pk_first <= hi + 1 (chunks are framed only for blocks about to be sent).
            i = hi + 1 - self._pk_first
            ws = self.windowsize
            if i + ws <= self._pk_full:
                self._acked = hi
                self._sent_hi = hi + ws
                self.deadline = now + self.timeout
                return self._pkts[i:i + ws]
        return self._ack(block, now)

    def _ack(self, block: int, now: float) -> list[memoryview | bytes]:
        if not self._fast:
            return self._ack_slow(block, now)
        acked = self._acked
        delta = (block - acked) & 0xFFFF
        if delta == 0 or delta > self._sent_hi - acked:
            return []  # duplicate or out-of-window: never resend on it
        acked += delta
        self._acked = acked
        last = self._last
        if last is not None and acked >= last:
            self._finish(_COMPLETED, "")
            return []
        return self._send_window(now)

    def _ack_slow(self, block: int, now: float) -> list[memoryview | bytes]:
        if self.outcome is not _RUNNING:
            return []
        if not self._started:
            if block != 0:
                return []  # stray ACK before the OACK was acknowledged
            self._started = self._fast = True
            self._tries = 0
            self._tries_at = -1  # ACK 0 is progress: the next timeout counts from one
            return self._send_window(now)
        return []

    def receive(self, data: bytes, now: float) -> list[memoryview | bytes]:
        """Feed one packet from the peer; returns packets to send back.

        Raises packet.MalformedPacket for bytes that are neither ACK nor ERROR;
        the caller counts and drops those, the session is unaffected.
        """
        if len(data) >= 4 and data[1] == pk.ACK and data[0] == 0:
            return self.on_ack((data[2] << 8) | data[3], now)
        if self.outcome is not _RUNNING:
            return []
        op = pk.opcode_of(data)
        if op == pk.ACK:
            pk.parse_ack(data)  # too short: raises MalformedPacket
        if op == pk.ERROR:
            code, _msg = pk.parse_error(data)
            self.error_code = code
            if not self._started and code == pk.ERR_OPTION:
                self._finish(_PROBE, "client declined options")
            else:
                self._finish(_FAILED, "client error")
            return []
        raise pk.MalformedPacket("unexpected opcode")

    def on_timer(self, now: float) -> list[memoryview | bytes]:
        """Call when `now >= deadline`: resend what is unacknowledged, or give up."""
        if self.outcome is not _RUNNING or self.deadline is None or now < self.deadline:
            return []
        if self._acked != self._tries_at:  # progress since the last timeout: a fresh budget
            self._tries_at = self._acked
            self._tries = 0
        self._tries += 1
        if self._tries > self.retries:
            self._finish(_FAILED, "timeout")
            return [pk.encode_error(pk.ERR_UNDEFINED, "timeout")]
        # Back off (1, 2, 4, 8, 8 x timeout): a storm on a congested link keeps its
        # machines instead of giving up on them after a few seconds.
        backoff = self.timeout * (1 << min(self._tries - 1, 3))
        if not self._started:
            self.retransmits += 1
            self.deadline = now + backoff
            return [pk.encode_oack(self.oack)]
        out = self._send_window(now)
        self.deadline = now + backoff
        return out

    def abort(self, reason: str) -> None:
        """End the transfer from outside (server shutdown, replaced by a new request)."""
        if self.outcome is _RUNNING:
            self._finish(_FAILED, reason)

    def _finish(self, outcome: Outcome, reason: str) -> None:
        self.outcome = outcome
        self.reason = reason
        self.deadline = None
        self._fast = False
        self._pkts = []
        self._pk_full = 0
