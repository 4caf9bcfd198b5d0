"""Helpers: in-process clusters of nodes on the loopback transport, driven by a Clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from skyproto.node.node import Node
from skyproto.node.service import Service
from skyproto.testing import settle
from skyproto.transports.loopback import network_for

SECRET = b"test-secret-sixteen"


class Collector(Service):
    """Records one-way messages; replies to calls with 'ok'."""

    def __init__(self) -> None:
        self.received: list[tuple[int, int, Any]] = []

    def receive(self, source: int, session: int, payload: Any) -> Any:
        self.received.append((source, session, payload))
        return "ok"


class Parked(Service):
    """Never answers until told to: its pending Deferreds are kept in ``waiting``."""

    def __init__(self) -> None:
        self.waiting: list[Deferred[Any]] = []

    def receive(self, source: int, session: int, payload: Any) -> Any:
        d: Deferred[Any] = Deferred()
        self.waiting.append(d)
        return d


class Failing(Service):
    def receive(self, source: int, session: int, payload: Any) -> Any:
        raise ValueError(f"bad payload {payload!r}")


def make_node(clock: Clock, harbor: int, secret: bytes = SECRET, **kwargs: Any) -> Node:
    node = Node(harbor, clock, secret, **kwargs)
    node.listen(f"loopback:h{harbor}")
    return node


def mesh(count: int, clock: Clock | None = None, **kwargs: Any) -> tuple[Clock, list[Node]]:
    """``count`` nodes, harbor 1..count, every one a static peer of every other."""
    clock = clock or Clock()
    nodes = [make_node(clock, h, **kwargs) for h in range(1, count + 1)]
    for node in nodes:
        for other in nodes:
            if other is not node:
                node.add_peer(other.harbor, f"loopback:h{other.harbor}")
    settle(clock)
    return clock, nodes


def result_of(d: Deferred[Any]) -> Any:
    """The value (or Failure) a Deferred fired with; fails the test if it has not fired."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0]


def failure_of(d: Deferred[Any], kind: type[BaseException]) -> Failure:
    outcome = result_of(d)
    assert isinstance(outcome, Failure), f"expected a {kind.__name__}, got {outcome!r}"
    assert outcome.check(kind), f"expected a {kind.__name__}, got {outcome.value!r}"
    return outcome


def network(clock: Clock) -> Any:
    return network_for(clock)
