"""Heartbeats: timers that never die, liveness by bytes, stalls, negotiated timing.

Each of these failed before the hardening (see the issue's list of failures)."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.task import Clock

from skyproto.errors import QueueFull
from skyproto.harbor.link import HarborLink
from skyproto.node.node import Node
from skyproto.wire.codec import encode_cbor, encode_data_frame
from skyproto.wire.heartbeat import HeartbeatTimer, HeartbeatTiming

from .cluster import Parked, failure_of, make_node, mesh


def link_of(node: Node, harbor: int) -> HarborLink:
    """The node's current link to ``harbor`` (the test expects one)."""
    link = cast(HarborLink | None, node.router.peers[harbor].link)
    assert link is not None
    return link


def transport_of(link: HarborLink) -> Any:
    """The link's loopback transport (with its fault hooks)."""
    assert link.transport is not None
    return link.transport


class Beats:
    def __init__(self, clock: Clock, interval: float = 1.0, timeout: float = 3.0) -> None:
        self.beats = 0
        self.silences: list[float] = []
        self.refuse = False
        self.timer = HeartbeatTimer(clock, interval, timeout, self.beat, self.silences.append)

    def beat(self) -> None:
        self.beats += 1
        if self.refuse:
            raise QueueFull("1000 bytes already wait for a slow peer")


def test_a_beat_that_raises_does_not_kill_the_timer() -> None:
    clock = Clock()
    beats = Beats(clock)
    beats.timer.start()
    beats.refuse = True
    clock.advance(1.0)
    assert beats.beats == 1
    beats.timer.heard()
    clock.advance(1.0)  # before: the timer was dead after the first QueueFull
    assert beats.beats == 2
    for _ in range(4):
        clock.advance(1.0)
    clock.advance(0)
    assert beats.silences, "silence must still be detected after failed beats"


class TurnClock(Clock):
    """A Clock that runs, per advance, only the calls that were due when it started, as a
    reactor turn does: a call scheduled meanwhile waits for the next turn, after I/O."""

    def advance(self, amount: float) -> None:
        self.rightNow += amount
        self._sortCalls()
        due = [call for call in self.calls if call.getTime() <= self.seconds()]
        for call in due:
            if call in self.calls:
                self.calls.remove(call)
                call.called = 1
                call.func(*call.args, **call.kw)


def test_silence_is_confirmed_after_the_reactor_reads_what_waits() -> None:
    """A stalled reactor fires the timer late; data that arrived meanwhile is read before
    the next turn, so the silence is checked again then, before the peer is dropped."""
    clock = TurnClock()
    beats = Beats(clock)
    beats.timer.start()
    clock.advance(10.0)  # a 10 s stall: the tick finds 10 s of silence...
    assert beats.silences == []
    beats.timer.heard()  # ...but the peer's bytes were waiting, and are read now
    clock.advance(0)
    assert beats.silences == []
    for _ in range(4):
        clock.advance(1.0)
    clock.advance(0)
    assert len(beats.silences) == 1 and 3.0 <= beats.silences[0] <= 4.0


def test_the_slower_side_governs() -> None:
    fast, slow = HeartbeatTiming(1.0, 3.0), HeartbeatTiming(5.0, 15.0)
    assert fast.governing(slow) == slow == slow.governing(fast)
    assert HeartbeatTiming(1.0, 20.0).governing(HeartbeatTiming(5.0, 15.0)) == \
        HeartbeatTiming(5.0, 20.0)


def test_a_node_beating_every_5_s_stays_linked_to_one_that_expects_3() -> None:
    clock = Clock()
    a = make_node(clock, 1)  # every 1 s, silent after 3 s
    b = make_node(clock, 2, heartbeat_interval=5.0, heartbeat_timeout=15.0)
    a.add_peer(2, "loopback:h2")
    clock.advance(0)
    link = link_of(a, 2)
    assert isinstance(link, HarborLink)
    assert link.timing == HeartbeatTiming(5.0, 15.0)
    for _ in range(60):
        clock.advance(1.0)
    assert a.router.state(2) == "up" and b.router.state(1) == "up"
    assert a.router.peers[2].link is link


def test_a_large_frame_arriving_slowly_is_a_sign_of_life() -> None:
    """Liveness counts bytes: an 8 MiB frame on a 20 Mbit/s link takes more than 3 s."""
    clock, (a, b) = mesh(2)
    parked = b.spawn(Parked())
    a_link = link_of(a, 2)
    b_link = link_of(b, 1)
    assert isinstance(a_link, HarborLink) and isinstance(b_link, HarborLink)
    a_link._heartbeat.stop()  # a's beats would hide the test; only the big frame's bytes flow
    frame = encode_data_frame(a.handle, parked, -1, 0, encode_cbor(b"x" * (8 << 20)))
    assert a_link._sealer is not None
    frame = a_link._sealer.seal(frame)  # one record, as a's own write would be
    piece = len(frame) // 100
    for i in range(100):  # 8 MiB over 6 s
        b_link.dataReceived(frame[i * piece:(i + 1) * piece])
        clock.advance(0.06)
    b_link.dataReceived(frame[100 * piece:])
    clock.advance(0)
    assert b.router.state(1) == "up" and b.router.peers[1].link is b_link  # never dropped


def test_a_silent_peer_is_still_dropped_and_its_calls_fail() -> None:
    clock, (a, b) = mesh(2)
    parked = b.spawn(Parked())
    d = a.call(parked, "x", timeout=30)
    clock.advance(0)
    b_link = link_of(b, 1)
    assert b_link is not None and b_link.transport is not None
    transport_of(b_link).connection.pause()  # nothing flows either way, no close
    for _ in range(40):
        clock.advance(0.1)
    assert "silent" in str(failure_of(d, Exception).value)
