"""The peer machine on its own: every state, every event, on a Clock with a fake dialer."""

from __future__ import annotations

import random
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface import implementer

from skyproto.errors import HarborDown, QueueFull
from skyproto.interfaces import IHarborLink
from skyproto.node.peer import Peer, PeerCore
from skyproto.wire.codec import Frame

STATES = ("idle", "dialing", "handshaking", "up", "backoff", "removed")


@implementer(IHarborLink)
class FakeLink:
    def __init__(self, incarnation: int = 1) -> None:
        self.local_harbor = 1
        self.up = True
        self.retired = False
        self.peer_harbor = 2
        self.peer_incarnation = incarnation
        self.frames: list[tuple[bytes, bool]] = []
        self.closed: list[str] = []
        self.fail_writes = False

    def write_frame(self, frame: Frame, must: bool) -> None:
        if self.fail_writes:
            raise ConnectionError("transport gone")
        assert isinstance(frame, bytes)  # these tests send small frames only
        self.frames.append((frame, must))

    def send_data(self, source: int, destination: int, session: int, ptype: int,
                  payload: Any) -> None:
        raise AssertionError("the peer machine sends encoded frames only")

    def retire(self, reason: str) -> None:
        self.retired = True

    def close(self, reason: str) -> None:
        self.closed.append(reason)


class Harness:
    def __init__(self, endpoint: str | None = "loopback:h2", max_queue_bytes: int = 100) -> None:
        self.clock = Clock()
        self.dials: list[Deferred[Any]] = []
        self.failed: list[tuple[int, HarborDown]] = []
        self.refuse_dial = False
        self.core = PeerCore(2, self.clock, random.Random(1), self.start_dial,
                             lambda harbor, error: self.failed.append((harbor, error)),
                             endpoint=endpoint, retry_initial=0.5, retry_max=2.0,
                             max_queue_bytes=max_queue_bytes, handshake_timeout=5.0)
        self.peer = Peer(self.core)

    def start_dial(self, core: PeerCore) -> Deferred[Any]:
        if self.refuse_dial:
            raise ValueError("no such endpoint type")
        attempt: Deferred[Any] = Deferred()
        self.dials.append(attempt)
        return attempt

    def into(self, state: str) -> FakeLink | None:
        """Drive the machine into ``state`` the way the router would."""
        inputs = self.peer.inputs
        link = None
        if state in ("dialing", "handshaking", "up", "backoff"):
            inputs.dial()
        if state == "handshaking":
            inputs.connected()
        if state == "up":
            link = FakeLink()
            inputs.attach(link)
        if state == "backoff":
            inputs.dial_failed("refused")
        if state == "removed":
            inputs.remove("gone")
        assert self.peer.state == state
        return link


def test_a_new_peer_is_idle_and_dials_on_demand() -> None:
    h = Harness()
    assert h.peer.state == "idle"
    h.peer.inputs.dial()
    assert h.peer.state == "dialing" and len(h.dials) == 1
    h.peer.inputs.dial()  # a second reason to dial starts no second dial
    assert len(h.dials) == 1


def test_a_send_while_idle_dials_and_queues_encoded_frames_then_flushes_in_order() -> None:
    h = Harness()
    h.peer.send(b"one")
    h.peer.send(b"two")
    assert h.peer.state == "dialing" and h.core.queued_bytes == 6
    h.peer.inputs.connected()
    assert h.peer.state == "handshaking"
    h.peer.send(b"three")
    link = FakeLink()
    h.peer.inputs.attach(link)
    assert h.peer.state == "up"
    assert [f for f, _ in link.frames] == [b"one", b"two", b"three"]
    assert all(must for _, must in link.frames)
    assert h.core.queued_bytes == 0
    h.peer.inputs.dial_done()  # the dial's own outcome arrives after the attach
    assert h.peer.state == "up" and h.core.attempt is None


def test_the_queue_is_bounded_in_bytes() -> None:
    h = Harness(max_queue_bytes=10)
    h.peer.send(b"x" * 6)
    with pytest.raises(QueueFull, match="6 bytes already wait for harbor 2's link"):
        h.peer.send(b"y" * 5)
    h.peer.send(b"z" * 4)
    assert h.core.queued_bytes == 10


def test_a_failed_dial_fails_what_waits_and_backs_off_with_jitter_then_redials() -> None:
    h = Harness()
    h.peer.send(b"call")
    h.peer.inputs.dial_failed("connection refused")
    assert h.peer.state == "backoff"
    assert h.failed and "unreachable: connection refused" in str(h.failed[0][1])
    with pytest.raises(HarborDown, match="connection refused"):
        h.peer.send(b"more")
    assert h.core.retry is not None
    delay = h.core.retry.getTime()
    assert 0.4 <= delay <= 0.6
    h.clock.advance(delay)
    assert h.peer.state == "dialing" and len(h.dials) == 2


def test_backoff_doubles_and_is_capped() -> None:
    h = Harness()
    delays = []
    for _ in range(6):
        h.peer.inputs.dial()
        start = h.clock.seconds()
        h.peer.inputs.dial_failed("timeout")
        assert h.core.retry is not None
        delays.append(h.core.retry.getTime() - start)
        h.clock.advance(delays[-1])
    assert delays[0] < delays[1] < delays[2]
    assert max(delays) <= 2.0 * 1.2


def test_a_dial_that_cannot_start_is_one_failed_dial_not_a_stuck_machine() -> None:
    h = Harness()
    h.refuse_dial = True
    h.peer.inputs.dial()
    assert h.peer.state == "dialing"
    h.clock.advance(0)
    assert h.peer.state == "backoff"
    assert "cannot dial: no such endpoint type" in h.core.last_error


def test_a_handshake_that_ends_without_a_link_backs_off() -> None:
    h = Harness()
    h.into("handshaking")
    h.peer.inputs.dial_done()  # e.g. the router refused it as stale
    assert h.peer.state == "backoff"


def test_link_lost_backs_off_and_keeps_the_reason() -> None:
    h = Harness()
    h.into("up")
    h.peer.inputs.lost("link to harbor 2 lost: cut")
    assert h.peer.state == "backoff" and h.peer.link is None
    with pytest.raises(HarborDown, match="cut"):
        h.peer.send(b"x")


def test_flushing_that_raises_fails_the_queue_and_closes_the_link_but_the_machine_goes_on() -> None:
    h = Harness()
    h.peer.send(b"queued")
    link = FakeLink()
    link.fail_writes = True
    h.peer.inputs.attach(link)
    assert h.peer.state == "up"
    assert link.closed and "sending queued frames failed" in link.closed[0]
    assert h.failed and "queued frames lost" in str(h.failed[0][1])
    h.peer.inputs.lost("closed")
    assert h.peer.state == "backoff"


def test_detach_waits_for_the_replacing_link_then_gives_up() -> None:
    h = Harness()
    h.into("up")
    h.peer.inputs.detach("retired by the peer")
    assert h.peer.state == "handshaking"
    h.peer.send(b"waits")  # queued for the link that replaces it
    replacement = FakeLink()
    h.peer.inputs.attach(replacement)
    assert [f for f, _ in replacement.frames] == [b"waits"]
    h.peer.inputs.detach("retired again")
    h.clock.advance(5.0)
    assert h.peer.state == "backoff"


def test_remove_from_every_state_cancels_everything_and_sends_fail() -> None:
    for state in STATES:
        h = Harness()
        link = h.into(state)
        if state in ("dialing", "handshaking"):
            h.peer.send(b"queued")
        h.peer.inputs.remove("the master says it left")
        assert h.peer.state == "removed"
        assert h.core.retry is None and h.core.attempt is None
        assert not h.clock.getDelayedCalls()
        if link is not None:
            assert link.closed == ["the master says it left"]
        if state in ("dialing", "handshaking"):
            assert "is down: the master says it left" in str(h.failed[-1][1])
            assert h.dials[0].called  # the dial in flight was cancelled
            h.dials[0].addErrback(lambda _: None)
        with pytest.raises(HarborDown):
            h.peer.send(b"x")


def test_a_link_attached_after_removal_is_closed() -> None:
    h = Harness()
    h.into("removed")
    late = FakeLink()
    h.peer.inputs.attach(late)
    assert h.peer.state == "removed" and late.closed == ["harbor 2 was removed"]


def test_every_event_in_every_state_is_handled() -> None:
    """No (state, event) pair raises or leaves the machine between states."""
    events: list[tuple[str, tuple[Any, ...]]] = [
        ("dial", ()), ("send", (b"f",)), ("connected", ()), ("dial_done", ()),
        ("dial_failed", ("x",)), ("attach", (FakeLink(),)), ("lost", ("x",)),
        ("retry_due", ()), ("remove", ("x",)), ("detach", ("x",)),
    ]
    for state in STATES:
        for name, args in events:
            h = Harness()
            h.into(state)
            getattr(h.peer.inputs, name)(*args)
            assert h.peer.state in STATES, (state, name)
            for attempt in h.dials:
                attempt.addErrback(lambda _: None)


def test_a_peer_nobody_told_us_the_address_of_cannot_queue() -> None:
    h = Harness(endpoint=None)
    with pytest.raises(HarborDown, match="does not know where it listens"):
        h.peer.send(b"x")
    assert h.peer.state == "idle"
