"""Backpressure instead of loss: exact outbound accounting, replies never dropped, feeders held.

Each test here failed on the code before the hardening: replies were refused with QueueFull
(lost, the caller saw a bare CallTimeout), the backlog counted bytes written since the
transport paused rather than bytes waiting, and a payload was encoded only when flushed.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from skyproto.errors import FrameTooLarge, QueueFull
from skyproto.harbor.link import HarborLink
from skyproto.node.node import Node
from skyproto.node.service import Service
from skyproto.services.echo import Echo
from skyproto.wire.framing import FrameProtocol

from .cluster import failure_of, make_node, mesh, result_of


def link_of(node: Node, harbor: int) -> HarborLink:
    """The node's current link to ``harbor`` (the test expects one)."""
    link = cast(HarborLink | None, node.router.peers[harbor].link)
    assert link is not None
    return link


def transport_of(link: HarborLink) -> Any:
    """The link's loopback transport (with its fault hooks)."""
    assert link.transport is not None
    return link.transport


class Big(Service):
    """Answers every request with ``size`` bytes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.requests = 0

    def receive(self, source: int, session: int, payload: Any) -> Any:
        self.requests += 1
        return b"r" * self.size


class Sink(FrameProtocol):
    def frame_received(self, frame: bytes) -> None:
        pass


def connected_sink(max_outbound: int = 1000, mark: int = 400) -> tuple[Sink, StringTransport]:
    proto = Sink(max_outbound=max_outbound, outbound_mark=mark)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def test_the_backlog_is_the_bytes_waiting_here_not_the_bytes_written_since_a_pause() -> None:
    proto, transport = connected_sink()
    assert transport.producer is not None
    transport.producer.pauseProducing()  # the transport's buffer is over its own mark
    proto.send_frame(b"a" * 296, must=False)  # 300 bytes framed
    assert proto.held_bytes == 300 and transport.value() == b""
    transport.producer.resumeProducing()  # the transport drained: what waited goes out
    assert proto.held_bytes == 0 and len(transport.value()) == 300
    transport.producer.pauseProducing()
    # Before, the 300 bytes written during the first pause still counted: 300 + 800 > 1000.
    proto.send_frame(b"b" * 796, must=False)
    assert proto.held_bytes == 800


def test_refusable_frames_meet_the_limit_and_replies_never_do() -> None:
    proto, transport = connected_sink()
    assert transport.producer is not None
    transport.producer.pauseProducing()
    proto.send_frame(b"x" * 896, must=False)
    try:
        proto.send_frame(b"y" * 196, must=False)
    except QueueFull as e:
        assert "900 bytes already wait for a slow peer (limit 1000)" in str(e)
    else:
        raise AssertionError("a request past the limit must be refused")
    proto.send_frame(b"z" * 996)  # a reply: queued, never refused
    assert proto.held_bytes == 1900


def test_crossing_the_mark_and_draining_are_told_once_each() -> None:
    events: list[str] = []
    proto, transport = connected_sink()
    proto.outbound_congested = lambda: events.append("congested")  # type: ignore[method-assign]
    proto.outbound_drained = lambda: events.append("drained")  # type: ignore[method-assign]
    assert transport.producer is not None
    transport.producer.pauseProducing()
    for _ in range(5):
        proto.send_frame(b"x" * 96)
    assert events == ["congested"]
    transport.producer.resumeProducing()
    assert events == ["congested", "drained"]


def test_replies_that_pile_up_for_a_slow_caller_all_arrive_once_it_reads() -> None:
    """Before: the callee's replies past max_outbound raised QueueFull and were lost; the
    caller waited for a CallTimeout although the node knew at once."""
    clock, (a, b) = mesh(2, max_outbound=256 * 1024)
    big = b.spawn(Big(16 * 1024))
    a_link = link_of(a, 2)
    assert a_link is not None and a_link.transport is not None
    transport_of(a_link).pauseProducing()  # a does not read its replies for a while
    calls = []
    for i in range(40):  # 640 KiB of replies, made one request at a time
        calls.append(a.call(big, i, timeout=60))
        clock.advance(0.01)
    b_link = link_of(b, 1)
    assert b_link is not None
    assert b_link.held_bytes > 0  # replies wait at b, none refused; b stopped reading a
    assert b_link.paused
    transport_of(a_link).resumeProducing()
    for _ in range(20):
        clock.advance(0.1)
    outcomes = [result_of(d) for d in calls]
    assert not [o for o in outcomes if isinstance(o, Failure)]
    assert all(o == b"r" * 16 * 1024 for o in outcomes)


def test_a_callee_whose_replies_pile_up_stops_reading_that_caller_until_they_drain() -> None:
    clock, (a, b) = mesh(2, max_outbound=256 * 1024)
    big = b.spawn(Big(32 * 1024))
    service = b.services[big & 0xFFFFFF]
    assert isinstance(service, Big)
    a_link = link_of(a, 2)
    assert a_link is not None and a_link.transport is not None
    transport_of(a_link).pauseProducing()
    calls = [a.call(big, i, timeout=60) for i in range(100)]
    for _ in range(20):
        clock.advance(0.1)
    held_back = service.requests
    assert held_back < 100, "b must stop reading requests while their replies wait"
    b_link = link_of(b, 1)
    assert b_link is not None and b_link.held_bytes < 2 * 1024 * 1024
    transport_of(a_link).resumeProducing()
    for _ in range(50):
        clock.advance(0.1)
    assert service.requests == 100
    assert all(result_of(d) == b"r" * 32 * 1024 for d in calls)


def test_a_caller_gets_queue_full_naming_the_cause_never_a_bare_timeout() -> None:
    clock, (a, b) = mesh(2, max_outbound=64 * 1024)
    echo = b.spawn(Echo())
    b_link = link_of(b, 1)
    assert b_link is not None and b_link.transport is not None
    transport_of(b_link).pauseProducing()  # b stops reading a's requests
    outcomes: list[Any] = []
    for _ in range(100):
        a.call(echo, b"x" * 4096, timeout=30).addBoth(outcomes.append)
        clock.advance(0)
    refused = [o for o in outcomes if isinstance(o, Failure)]
    assert refused and all(o.check(QueueFull) for o in refused)
    transport_of(b_link).resumeProducing()
    for _ in range(10):
        clock.advance(0.1)
    assert len(outcomes) == 100
    assert all(o == b"x" * 4096 for o in outcomes if not isinstance(o, Failure))


def test_a_congested_link_holds_the_nodes_feeders_until_it_drains() -> None:
    clock, (a, b) = mesh(2, max_outbound=256 * 1024)
    echo = b.spawn(Echo())
    told: list[bool] = []
    a.flow.subscribe(told.append)
    b_link = link_of(b, 1)
    assert b_link is not None and b_link.transport is not None
    transport_of(b_link).pauseProducing()
    for _ in range(20):
        a.call(echo, b"x" * 16 * 1024, timeout=30).addErrback(lambda f: None)
    clock.advance(0)
    assert told == [True]
    transport_of(b_link).resumeProducing()
    for _ in range(10):
        clock.advance(0.1)
    assert told == [True, False]


def test_a_payload_is_encoded_when_the_call_is_made() -> None:
    """Before: queued messages kept the caller's object and were encoded at flush, so a
    caller mutating it afterwards changed what was sent, or broke the whole queue."""
    clock = Clock()
    a = make_node(clock, 1)
    b = make_node(clock, 2)
    echo = b.spawn(Echo())
    a.add_peer(2, "loopback:h2")
    payload = ["original"]
    d = a.call(echo, payload)
    payload[0] = "changed afterwards"
    payload.append("x" * (a.config.max_frame + 1))  # past the frame limit if re-encoded
    later = a.call(echo, "next")
    clock.advance(0)
    assert result_of(d) == ["original"]
    assert result_of(later) == "next"
    assert a.router.state(2) == "up"


def test_a_payload_over_the_message_limit_fails_the_call_at_once() -> None:
    clock = Clock()
    a = make_node(clock, 1, max_message=1024)
    make_node(clock, 2, max_message=1024)
    a.add_peer(2, "loopback:h2")
    d = a.call(0x02000002, b"x" * 2048)
    failure = failure_of(d, FrameTooLarge)
    assert "exceeds the limit of 1024" in str(failure.value)
    clock.advance(0)
    assert a.router.state(2) == "up"
