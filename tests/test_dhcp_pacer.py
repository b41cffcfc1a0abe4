"""The reply pacer on its own clock: what leaves now, what is held, when it leaves."""

from __future__ import annotations

from netboot.dhcp.pacer import BURST, FLOOR, HEADROOM, WINDOW, Pacer

RELAY = ("10.77.0.50", 67)
OTHER = ("10.78.0.1", 67)


def _drain(p: Pacer, until: float, step: float = 0.001) -> list[tuple[float, bytes]]:
    """Run the pacer's timer by hand up to ``until``: (time, reply) as they leave."""
    out: list[tuple[float, bytes]] = []
    now = 0.0
    while True:
        at = p.deadline()
        if at is None or at > until:
            return out
        now = max(now + step, at)
        out += [(now, data) for _, data in p.due(now)]


def test_a_steady_flow_under_the_floor_is_never_held() -> None:
    p = Pacer()
    t = 0.0
    for i in range(4_000):  # 4,000 a second for a second, evenly
        assert p.offer(RELAY, b"%d" % i, t)
        t += 1 / 4000
    assert p.deadline() is None and p.held == 0


def test_a_faster_steady_flow_waits_in_its_first_window_only() -> None:
    p = Pacer()
    t, held_after_first_window, flushed = 0.0, 0, 0
    for _ in range(20_000):  # 20,000 a second for a second; the first window's backlog
        # (held at the floor rate) drains at HEADROOM x 20,000/s within 0.3 s
        if not p.offer(RELAY, b"x", t) and t > 4 * WINDOW:
            held_after_first_window += 1
        flushed += len(p.due(t))
        t += 5e-5
    assert held_after_first_window == 0
    assert p.held == 0 and p.dropped == 0 and flushed > 0


def test_a_burst_leaves_at_once_up_to_the_bucket_then_at_the_floor_rate_in_order() -> None:
    p = Pacer(max_age=10.0)
    sent_now = [p.offer(RELAY, b"%03d" % i, 0.0) for i in range(300)]
    assert sent_now == [True] * BURST + [False] * (300 - BURST)
    later = _drain(p, until=1.0)
    assert [d for _, d in later] == [b"%03d" % i for i in range(BURST, 300)]  # in order
    # nothing leaves faster than the floor rate (a fresh destination has no history)
    for k, (at, _) in enumerate(later):
        assert at >= (k + 1) / FLOOR - 1e-9


def test_the_pace_follows_the_destinations_recent_demand() -> None:
    """After a second at 10,000/s and a stall shorter than the window, a backlog of
    300 leaves at up to HEADROOM x 10,000/s: not in one burst, not at the floor."""
    p = Pacer(max_age=10.0)
    t = 0.0
    for _ in range(10_000):
        p.offer(RELAY, b"x", t)
        p.due(t)
        t += 1e-4
    assert p.held == 0
    stall_end = t + WINDOW / 2
    now_sent = sum(p.offer(RELAY, b"b", stall_end) for _ in range(300))
    assert now_sent == BURST
    times = [at for at, _ in _drain_from(p, stall_end)]
    assert len(times) == 300 - BURST
    took = times[-1] - stall_end
    assert (300 - BURST) / (HEADROOM * 10_000 * 1.2) <= took < 0.9 * (300 - BURST) / FLOOR


def _drain_from(p: Pacer, start: float) -> list[tuple[float, bytes]]:
    out: list[tuple[float, bytes]] = []
    now = start
    while (at := p.deadline()) is not None:
        now = max(now + 1e-4, at)
        out += [(now, d) for _, d in p.due(now)]
    return out


def test_destinations_are_paced_apart() -> None:
    p = Pacer()
    assert all(p.offer(RELAY, b"a", 0.0) for _ in range(BURST))
    assert not p.offer(RELAY, b"a", 0.0)
    assert all(p.offer(OTHER, b"b", 0.0) for _ in range(BURST))  # its own bucket


def test_a_reply_held_past_max_age_is_dropped_and_counted() -> None:
    p = Pacer(max_age=0.01, floor=100.0)  # 100/s until the first window ends at 25 ms
    for _ in range(BURST + 52):
        p.offer(RELAY, b"r", 0.0)
    left = _drain(p, until=1.0)
    assert len(left) + p.dropped == 52
    assert p.dropped >= 50 and all(at <= 0.01 + 0.001 for at, _ in left)
    assert p.held == 0 and p.deadline() is None


def test_held_replies_keep_their_order_behind_new_ones() -> None:
    """While replies are held, a new one for that destination queues behind them,
    even when a token has come back meanwhile."""
    p = Pacer(max_age=10.0)
    for i in range(BURST + 1):
        p.offer(RELAY, b"%d" % i, 0.0)
    assert not p.offer(RELAY, b"late", 0.01)  # a token is due by now, the queue first
    assert p.due(0.01) == [(RELAY, b"%d" % BURST), (RELAY, b"late")]


def test_a_busy_server_is_not_throttled_below_its_own_pace() -> None:
    """A server answering flat out (64 replies per wake-up, 30 µs apart, the timer run
    once between wake-ups): nothing is dropped, and once its first window told the
    pacer its demand, the held queue stays within a wake-up's replies, though each
    wake-up's replies exceed the bucket."""
    p = Pacer(max_age=0.25)
    t, most_held = 0.0, 0
    for _ in range(2_000):  # 2,000 wake-ups, 128,000 replies over ~4 s
        for _ in range(64):
            p.offer(RELAY, b"r", t)
            t += 3e-5
        p.due(t)
        if t > 3 * WINDOW:
            most_held = max(most_held, p.held)
    assert p.dropped == 0
    assert most_held < 2 * 64
