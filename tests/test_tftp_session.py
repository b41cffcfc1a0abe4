"""The transfer state machine, driven packet by packet with a fake clock (no sockets)."""

from __future__ import annotations

import heapq
import os
import random

import pytest

from netboot.tftp import packet as pk
from netboot.tftp.provider import BytesProvider
from netboot.tftp.session import Outcome, ReadSession, negotiate
from tests.tftp_helpers import AtftpClient, SimClient, lossy


class UnsizedProvider(BytesProvider):
    """Content whose size is not known up front (generated on the fly)."""

    def size(self) -> None:  # type: ignore[override]
        return None


def blocks(packets: list[bytes]) -> list[int]:
    return [pk.parse_data(p)[0] for p in packets]


def lockstep(session: ReadSession, first: list[bytes], now: float = 0.0) -> bytes:
    """Ideal client: ACK every DATA as it comes; returns the assembled content."""
    out = bytearray()
    pending = first
    while pending:
        (p,) = pending
        block, payload = pk.parse_data(p)
        out += payload
        pending = session.receive(pk.encode_ack(block), now)
    assert session.outcome is Outcome.COMPLETED
    return bytes(out)


# -- negotiation ---------------------------------------------------------------


def test_negotiate_echoes_only_what_was_asked() -> None:
    neg = negotiate({"blksize": "1468"}, 1000)
    assert neg.oack == {"blksize": "1468"} and neg.blksize == 1468
    neg = negotiate({"tsize": "0", "windowsize": "4", "timeout": "3", "foo": "bar"}, 1000)
    assert neg.oack == {"tsize": "1000", "windowsize": "4", "timeout": "3"}
    assert (neg.blksize, neg.windowsize, neg.timeout) == (512, 4, 3.0)


@pytest.mark.parametrize(("asked", "max_blksize", "got"), [
    ("1468", 65464, "1468"), ("65464", 65464, "65464"), ("70000", 65464, "65464"),
    ("9000", 1468, "1468"), ("8", 1468, "8"), ("7", 1468, None), ("0", 1468, None),
    ("x", 1468, None), ("-5", 1468, None), (" 1024 ", 1468, "1024"),
])
def test_blksize_range_and_mtu_clamp(asked: str, max_blksize: int, got: str | None) -> None:
    assert negotiate({"blksize": asked}, 10, max_blksize=max_blksize).oack.get("blksize") == got


@pytest.mark.parametrize(("asked", "got"), [("1", "1"), ("255", "255"), ("0", None),
                                            ("256", None), ("abc", None)])
def test_timeout_range(asked: str, got: str | None) -> None:
    assert negotiate({"timeout": asked}, 10).oack.get("timeout") == got


@pytest.mark.parametrize(("asked", "got"), [("1", "1"), ("16", "16"), ("65535", "64"),
                                            ("0", None), ("65536", None)])
def test_windowsize_range_and_cap(asked: str, got: str | None) -> None:
    assert negotiate({"windowsize": asked}, 10, max_windowsize=64).oack.get("windowsize") == got


def test_tsize_not_echoed_when_size_unknown() -> None:
    assert negotiate({"tsize": "0"}, None).oack == {}
    assert negotiate({"tsize": "0"}, 0).oack == {"tsize": "0"}


def test_option_names_case_insensitive_via_parser() -> None:
    req = pk.parse_request(pk.encode_request(pk.RRQ, "f", "octet", {"BLKSIZE": "1024",
                                                                      "TSize": "0"}))
    s = ReadSession(BytesProvider(b"x" * 3000), req.options)
    assert pk.parse_oack(s.start(0.0)[0]) == {"blksize": "1024", "tsize": "3000"}


# -- plain transfers -----------------------------------------------------------


def test_no_options_starts_with_data_1() -> None:
    s = ReadSession(BytesProvider(b"hello"))
    out = s.start(0.0)
    assert out == [pk.encode_data(1, b"hello")]
    assert s.receive(pk.encode_ack(1), 0.1) == []
    assert s.outcome is Outcome.COMPLETED and s.deadline is None


def test_only_unknown_options_means_no_oack() -> None:
    s = ReadSession(BytesProvider(b"hi"), {"multicast": "", "foo": "1"})
    assert s.start(0.0) == [pk.encode_data(1, b"hi")]


@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 1024, 5000])
def test_final_short_block_including_empty(size: int) -> None:
    content = os.urandom(size)
    s = ReadSession(BytesProvider(content))
    first = s.start(0.0)
    got = lockstep(s, first)
    assert got == content
    assert s.bytes_sent == size


def test_multiple_of_blksize_ends_with_zero_length_block() -> None:
    s = ReadSession(BytesProvider(b"a" * 1024))
    p1 = s.start(0.0)
    p2 = s.receive(pk.encode_ack(1), 0.0)
    p3 = s.receive(pk.encode_ack(2), 0.0)
    assert p3 == [pk.encode_data(3, b"")]
    assert blocks(p1 + p2) == [1, 2]
    assert s.receive(pk.encode_ack(3), 0.0) == []
    assert s.outcome is Outcome.COMPLETED


def test_unsized_provider_ends_on_short_read() -> None:
    content = os.urandom(2000)
    s = ReadSession(UnsizedProvider(content), {"tsize": "0", "blksize": "1000"})
    assert pk.parse_oack(s.start(0.0)[0]) == {"blksize": "1000"}
    assert lockstep(s, s.receive(pk.encode_ack(0), 0.0)) == content


def test_oack_then_ack0_then_data() -> None:
    content = os.urandom(3000)
    s = ReadSession(BytesProvider(content), {"blksize": "1468", "tsize": "0"})
    (oack,) = s.start(0.0)
    assert pk.parse_oack(oack) == {"blksize": "1468", "tsize": "3000"}
    assert s.receive(pk.encode_ack(1), 0.0) == []  # stray ACK before ACK 0 ignored
    first = s.receive(pk.encode_ack(0), 0.0)
    assert blocks(first) == [1]
    assert len(pk.parse_data(first[0])[1]) == 1468
    assert lockstep(s, first) == content


def test_rollover_wraps_to_zero_and_content_is_intact() -> None:
    blksize = 8
    content = os.urandom(blksize * 65540 + 3)
    s = ReadSession(BytesProvider(content), {"blksize": str(blksize)})
    s.start(0.0)
    out = bytearray()
    wire: list[int] = []
    pending = s.receive(pk.encode_ack(0), 0.0)
    while pending:
        block, payload = pk.parse_data(pending[0])
        wire.append(block)
        out += payload
        pending = s.receive(pk.encode_ack(block), 0.0)
    assert bytes(out) == content
    assert wire[65534:65538] == [65535, 0, 1, 2]
    assert s.outcome is Outcome.COMPLETED


# -- loss, duplicates, timeouts -------------------------------------------------


def test_duplicate_ack_never_resends() -> None:
    s = ReadSession(BytesProvider(b"x" * 2000))
    s.start(0.0)
    assert blocks(s.receive(pk.encode_ack(1), 0.0)) == [2]
    assert s.receive(pk.encode_ack(1), 0.1) == []  # Sorcerer's Apprentice would resend 2 here
    assert s.receive(pk.encode_ack(1), 0.2) == []
    assert blocks(s.receive(pk.encode_ack(2), 0.3)) == [3]
    assert s.retransmits == 0


def test_timeout_resends_then_gives_up() -> None:
    s = ReadSession(BytesProvider(b"x" * 2000), timeout=1.0, retries=3)
    s.start(0.0)
    assert s.deadline == 1.0
    assert s.on_timer(0.5) == []  # early wake-up: nothing
    assert blocks(s.on_timer(1.0)) == [1]
    assert s.deadline == 2.0  # backoff: 1, 2, 4 x timeout
    assert s.on_timer(1.5) == []
    assert blocks(s.on_timer(2.0)) == [1]
    assert s.deadline == 4.0
    assert blocks(s.on_timer(4.0)) == [1]
    assert s.deadline == 8.0
    assert s.retransmits == 3
    out = s.on_timer(8.0)
    assert pk.parse_error(out[0])[0] == pk.ERR_UNDEFINED
    assert s.outcome is Outcome.FAILED and s.reason == "timeout"
    assert s.deadline is None
    assert s.on_timer(9.0) == [] and s.receive(pk.encode_ack(1), 9.0) == []


def test_progress_resets_retry_budget() -> None:
    s = ReadSession(BytesProvider(b"x" * 5000), timeout=1.0, retries=1)
    s.start(0.0)
    assert blocks(s.on_timer(1.0)) == [1]
    assert blocks(s.receive(pk.encode_ack(1), 1.5)) == [2]
    assert blocks(s.on_timer(2.5)) == [2]  # a fresh budget for block 2
    assert s.outcome is Outcome.RUNNING


def test_oack_resent_on_timeout() -> None:
    s = ReadSession(BytesProvider(b"x"), {"tsize": "0"}, timeout=2.0)
    (oack,) = s.start(0.0)
    assert s.on_timer(2.0) == [oack]
    assert s.retransmits == 1


def test_client_timeout_option_sets_retransmit_timer_up_to_ours() -> None:
    s = ReadSession(BytesProvider(b"x"), {"timeout": "7"}, timeout=10.0)
    assert pk.parse_oack(s.start(10.0)[0]) == {"timeout": "7"}
    assert s.deadline == 17.0
    s = ReadSession(BytesProvider(b"x"), {"timeout": "7"}, timeout=1.0)
    assert pk.parse_oack(s.start(10.0)[0]) == {"timeout": "7"}  # echoed as asked
    assert s.deadline == 11.0  # but we retransmit on our own, shorter timer


def test_malformed_input_raises_and_leaves_session_intact() -> None:
    s = ReadSession(BytesProvider(b"x" * 600))
    s.start(0.0)
    for bad in (b"", b"\x00", b"\x00\x04\x00", b"\x00\x03\x00\x01data", b"\x00\x01f\x00octet\x00"):
        with pytest.raises(pk.MalformedPacket):
            s.receive(bad, 0.0)
    assert blocks(s.receive(pk.encode_ack(1), 0.0)) == [2]


def test_ack_from_the_future_ignored() -> None:
    s = ReadSession(BytesProvider(b"x" * 5000))
    s.start(0.0)
    assert s.receive(pk.encode_ack(5), 0.0) == []
    assert s.receive(pk.encode_ack(40000), 0.0) == []
    assert s.outcome is Outcome.RUNNING


# -- errors and the UEFI size probe ---------------------------------------------


def test_size_probe_error8_after_oack_is_quiet() -> None:
    s = ReadSession(BytesProvider(b"x" * 100), {"tsize": "0"})
    (oack,) = s.start(0.0)
    assert pk.parse_oack(oack) == {"tsize": "100"}
    assert s.receive(pk.encode_error(pk.ERR_OPTION, "tsize probe"), 0.1) == []
    assert s.outcome is Outcome.PROBE and s.deadline is None


def test_error_during_data_is_failure() -> None:
    s = ReadSession(BytesProvider(b"x" * 5000))
    s.start(0.0)
    assert s.receive(pk.encode_error(pk.ERR_OPTION, "late"), 0.1) == []
    assert s.outcome is Outcome.FAILED and s.error_code == pk.ERR_OPTION


def test_other_error_after_oack_is_failure() -> None:
    s = ReadSession(BytesProvider(b"x"), {"blksize": "1024"})
    s.start(0.0)
    s.receive(pk.encode_error(pk.ERR_DISK_FULL, "full"), 0.1)
    assert s.outcome is Outcome.FAILED and s.error_code == pk.ERR_DISK_FULL


def test_abort() -> None:
    s = ReadSession(BytesProvider(b"x"))
    s.start(0.0)
    s.abort("shutdown")
    assert (s.outcome, s.reason) == (Outcome.FAILED, "shutdown")
    s.abort("again")
    assert s.reason == "shutdown"


# -- windowsize (RFC 7440) --------------------------------------------------------


def windowed(content: bytes, ws: int, blksize: int = 512) -> ReadSession:
    s = ReadSession(BytesProvider(content), {"blksize": str(blksize), "windowsize": str(ws)})
    s.start(0.0)
    return s


def test_window_sent_and_advanced_on_last_ack() -> None:
    s = windowed(os.urandom(512 * 10 + 5), 4)
    assert blocks(s.receive(pk.encode_ack(0), 0.0)) == [1, 2, 3, 4]
    assert blocks(s.receive(pk.encode_ack(4), 0.0)) == [5, 6, 7, 8]
    assert blocks(s.receive(pk.encode_ack(8), 0.0)) == [9, 10, 11]  # 11 is the short one
    assert s.receive(pk.encode_ack(11), 0.0) == []
    assert s.outcome is Outcome.COMPLETED


def test_window_gap_restarts_after_last_acked() -> None:
    s = windowed(os.urandom(512 * 20), 4)
    s.receive(pk.encode_ack(0), 0.0)
    out = s.receive(pk.encode_ack(2), 0.0)  # client lost block 3
    assert blocks(out) == [3, 4, 5, 6]
    assert s.retransmits == 2  # 3 and 4 went out before
    assert s.receive(pk.encode_ack(2), 0.0) == []  # duplicate: no resend
    assert s.receive(pk.encode_ack(1), 0.0) == []  # stale: no resend


def test_window_timeout_resends_whole_window_from_last_acked() -> None:
    s = windowed(os.urandom(512 * 20), 4)
    s.receive(pk.encode_ack(0), 0.0)
    s.receive(pk.encode_ack(4), 0.5)
    assert blocks(s.on_timer(1.5)) == [5, 6, 7, 8]


def test_window_rollover_ack_mapping() -> None:
    content = os.urandom(8 * 65600)
    s = windowed(content, 16, blksize=8)
    out = bytearray()
    pending = s.receive(pk.encode_ack(0), 0.0)
    seen_zero = False
    while pending:
        for p in pending:
            block, payload = pk.parse_data(p)
            seen_zero |= block == 0
            out += payload
        pending = s.receive(pk.encode_ack(block), 0.0)
    assert seen_zero
    assert bytes(out) == content


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("ws", [1, 3, 8])
def test_random_loss_dup_reorder_delivers_intact(seed: int, ws: int) -> None:
    """Simulated 15% loss, 5% duplication, reordering in both directions, with timeouts."""
    rng = random.Random(seed * 100 + ws)
    size = rng.choice([0, 100, 512 * 37, 512 * 40 + 77])
    content = rng.randbytes(size)
    s = ReadSession(BytesProvider(content), {"windowsize": str(ws), "blksize": "512"},
                    timeout=1.0, retries=50)
    client = SimClient(blksize=512, windowsize=ws)
    now = 0.0
    to_client = lossy(s.start(now), rng, 0.15, 0.05, 0.2)
    oack_done = False
    for _ in range(20000):
        if s.done:
            break
        to_server: list[bytes] = []
        for p in to_client:
            if pk.opcode_of(p) == pk.OACK:
                to_server.append(pk.encode_ack(0))
            else:
                oack_done = True
                to_server += client.on_packet(p)
        if not to_server and not to_client:
            now = max(now + 0.3, s.deadline or now)
            to_client = s.on_timer(now)
            if rng.random() < 0.5 and oack_done and not client.done:
                to_server = client.on_timeout()
        else:
            to_client = []
        now += 0.001
        for a in lossy(to_server, rng, 0.15, 0.05, 0.2):
            to_client += s.receive(a, now)
        to_client = lossy(to_client, rng, 0.15, 0.05, 0.2)
    assert s.outcome is Outcome.COMPLETED, s.reason
    assert client.done and bytes(client.data) == content


def test_backoff_leaves_silences_longer_than_a_client_timer() -> None:
    """Defaults: resends 1, 2, 4, 8, 8 s apart, so a client that only re-ACKs after 5 s of
    silence (atftp) gets two chances; its late ACK is progress and slides the window."""
    s = windowed(os.urandom(512 * 40), 4)
    s.receive(pk.encode_ack(0), 0.0)
    s.receive(pk.encode_ack(4), 0.0)  # 5-8 out; the client's ACK 8 is lost
    sent = []
    now = 0.0
    while s.deadline is not None and len(sent) < 4:
        now = s.deadline
        assert blocks(s.on_timer(now)) == [5, 6, 7, 8]
        sent.append(now)
    assert sent == [1.0, 2.0, 4.0, 8.0] and s.deadline == 16.0
    assert blocks(s.receive(pk.encode_ack(8), 13.0)) == [9, 10, 11, 12]  # its timer, at 8 + 5
    assert s.deadline == 14.0
    # progress gave a fresh budget: the next timeout backs off 1 s again, not 8
    assert blocks(s.on_timer(14.0)) == [9, 10, 11, 12] and s.deadline == 15.0


def run_atftp(content: bytes, ws: int, seed: int, *, timeout: float, retries: int,
              client_timeout: float) -> tuple[ReadSession, AtftpClient]:
    """Event-driven: the session and atftp's receiver over a link with 10% loss, 2%
    duplication, a quarter of the packets held back 2-6 ms. The option handshake is
    left out (atftp aborts on a second OACK, see tests/test_tftp_lossy.py)."""
    rng = random.Random(seed)
    s = ReadSession(BytesProvider(content), {"blksize": "512", "windowsize": str(ws)},
                    timeout=timeout, retries=retries)
    c = AtftpClient(blksize=512, windowsize=ws, timeout=client_timeout)
    s.start(0.0)
    c.deadline = client_timeout
    queue: list[tuple[float, int, bool, bytes]] = []  # (arrival, seq, to_client, packet)
    seq = 0

    def send(packets: list, now: float, to_client: bool) -> None:
        nonlocal seq
        for p in packets:
            if rng.random() < 0.10:
                continue
            for _ in range(2 if rng.random() < 0.02 else 1):
                delay = 0.0002 + (0.002 + rng.random() * 0.004 if rng.random() < 0.25 else 0)
                seq += 1
                heapq.heappush(queue, (now + delay, seq, to_client, bytes(p)))

    send(s.receive(pk.encode_ack(0), 0.0), 0.0, True)
    while not s.done or not (c.done or c.aborted):
        times = [queue[0][0]] if queue else []
        if s.deadline is not None:
            times.append(s.deadline)
        if not (c.done or c.aborted):
            times.append(c.deadline)
        if not times:
            break
        now = min(times)
        if queue and queue[0][0] == now:
            _, _, to_client, p = heapq.heappop(queue)
            if not to_client:
                send(s.receive(p, now), now, True)
            elif not (c.done or c.aborted):
                send(c.on_packet(p, now), now, False)
        elif s.deadline == now:
            send(s.on_timer(now), now, True)
        else:
            send(c.on_timer(now), now, False)
    return s, c


@pytest.mark.parametrize("seed", range(16))
@pytest.mark.parametrize("ws", [4, 8])
def test_atftp_receiver_through_loss_completes(seed: int, ws: int) -> None:
    content = random.Random(seed).randbytes(512 * 300 + 7)
    s, c = run_atftp(content, ws, seed, timeout=1.0, retries=5, client_timeout=5.0)
    assert c.done and bytes(c.data) == content
    # a lost final ACK leaves the server to time out after the client has everything
    assert s.outcome is Outcome.COMPLETED or s.reason == "timeout"


def test_atftp_receiver_stalls_when_resends_never_leave_it_silence() -> None:
    """The model reproduces the stall seen with the real client: resends never more than
    0.8 s apart keep restarting its 5 s timer, and it ignores them all (no ACK)."""
    stalled = 0
    for seed in range(16):
        content = random.Random(seed).randbytes(512 * 300 + 7)
        s, c = run_atftp(content, 4, seed, timeout=0.1, retries=10, client_timeout=5.0)
        if not c.done:
            assert s.reason == "timeout" and c.extra_ack and c.last == s.sent_hi
            stalled += 1
        else:
            assert bytes(c.data) == content
    assert stalled > 0


def test_chunk_size_follows_the_window_and_the_memory_budget() -> None:
    """Four windows of content, at least MIN_CHUNK, at most CHUNK; with many transfers
    at once each gets its share of CHUNK_BUDGET, down to FLOOR_CHUNK."""
    from netboot.tftp.session import (
        CHUNK,
        CHUNK_BUDGET,
        FLOOR_CHUNK,
        MIN_CHUNK,
        chunk_bytes,
    )

    assert chunk_bytes(1468, 1) == MIN_CHUNK  # lock-step
    assert chunk_bytes(1468, 16) == 4 * 16 * 1468
    assert chunk_bytes(65464, 64) == CHUNK
    assert chunk_bytes(1468, 1, concurrent=CHUNK_BUDGET // MIN_CHUNK) == MIN_CHUNK
    assert chunk_bytes(1468, 4, concurrent=4000) == CHUNK_BUDGET // 4000
    assert chunk_bytes(1468, 1, concurrent=100_000) == FLOOR_CHUNK
    # a session framed under pressure still sends every byte (small chunks, many loads)
    data = bytes(range(256)) * 100
    s = ReadSession(BytesProvider(data), {"blksize": "1468"}, concurrent=100_000)
    assert s._chunk == FLOOR_CHUNK
    assert pk.opcode_of(bytes(s.start(0.0)[0])) == pk.OACK
    got, block, out = bytearray(), 0, s.receive(pk.encode_ack(0), 0.0)
    while out:
        for p in out:
            block, payload = pk.parse_data(bytes(p))
            got += payload
        out = s.on_ack(block, 0.0)
    assert bytes(got) == data and s.outcome is Outcome.COMPLETED
