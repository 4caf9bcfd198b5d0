"""Every wait on the master is bounded once: dials, requests, and calls by name."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from skyproto.errors import CallError, CallTimeout, MasterUnavailable
from skyproto.interfaces import IMasterListener
from skyproto.master.client import JoinInfo, MasterClient
from skyproto.master.messages import LookupName
from skyproto.node.node import Node

from .cluster import SECRET, Parked, failure_of
from .test_master import Cluster, FakeMaster


@implementer(IMasterListener)
class Listener:
    def master_table(self, table: Any, first: bool) -> None:
        pass

    def master_event(self, event: Any) -> None:
        pass

    def master_refused(self, reason: str) -> None:
        pass

    def master_lost(self, reason: str) -> None:
        pass


def fired(d: Any) -> bool:
    box: list[object] = []

    def record(result: object) -> object:
        box.append(result)
        return result

    d.addBoth(record)
    return bool(box)


def advance(clock: Clock, seconds: float, step: float = 0.01) -> None:
    for _ in range(round(seconds / step)):
        clock.advance(step)


def test_a_call_by_name_with_no_master_fails_at_its_own_timeout():
    clock = Clock()
    node = Node(1, clock, SECRET)
    node.listen("loopback:h1")
    node.join_master("loopback:nobody-listens", "n1@test", "loopback:h1")
    call = node.call("UNKNOWN", "hello", timeout=1)
    advance(clock, 0.98)
    assert not fired(call)
    advance(clock, 0.08)  # the session layer's deadlines have a 50 ms resolution
    # The name cannot be resolved without a master: MasterUnavailable (not CallTimeout,
    # which says a callee did not answer; here no callee was ever found).
    error = failure_of(call, MasterUnavailable).value
    assert "within 1 s" in str(error)


def test_the_name_lookup_takes_its_time_off_the_call():
    cluster = Cluster()
    a, b = cluster.node(1), cluster.node(2)
    b.spawn(Parked(), "SLOW")  # never answers
    cluster.settle()
    assert a.master is not None and a.master.protocol is not None
    a.membership.names.clear()
    a.master.names.clear()  # a cache miss: the call must ask the master first
    a.master.protocol.transport.connection.delay = 0.3  # the lookup takes 0.6 s
    started = cluster.clock.seconds()
    call = a.call("SLOW", "x", timeout=1)
    while not fired(call):
        assert cluster.clock.seconds() - started < 3
        cluster.clock.advance(0.01)
    assert cluster.clock.seconds() - started <= 1.06  # one deadline, not 0.6 s + 1 s
    failure_of(call, CallTimeout)


def test_a_master_request_has_one_deadline_for_connecting_and_answering():
    reactor = MemoryReactorClock()
    client = MasterClient(reactor, "tcp:127.0.0.1:1", SECRET, Listener(),
                          JoinInfo(1, 5, "n1@test", "tcp:127.0.0.1:2"))
    lookup = client.lookup_name("X", timeout=1)
    advance(reactor, 0.6)
    master = FakeMaster(client)  # the master comes up after 0.6 s ...
    master.welcome()
    assert any(isinstance(m, LookupName) for m in master.received())
    advance(reactor, 0.35)  # ... and never answers
    assert not fired(lookup)
    advance(reactor, 0.1)
    failure_of(lookup, CallError)  # at 1 s in all: not 0.6 s plus another 5 s


def test_a_dial_that_never_completes_is_given_up_and_retried():
    reactor = MemoryReactorClock()  # its TCP connects never complete: a silent master
    client = MasterClient(reactor, "tcp:10.255.255.1:2013", SECRET, Listener(),
                          JoinInfo(1, 5, "n1@test", "tcp:127.0.0.1:2"))
    client.start()
    assert len(reactor.tcpClients) == 1
    advance(reactor, 4.9, step=0.1)
    assert len(reactor.tcpClients) == 1
    advance(reactor, 0.2, step=0.1)  # the attempt's bound (the request timeout, 5 s)
    assert reactor.connectors[0].stoppedConnecting
    advance(reactor, 1.0, step=0.1)  # the first retry comes within the backoff's cap
    assert len(reactor.tcpClients) == 2
    advance(reactor, 6.0, step=0.1)
    assert len(reactor.tcpClients) == 3  # every attempt is bounded
    client.stop()


def test_reconnect_delays_are_capped_and_jittered_from_the_given_rng():
    import random

    client = MasterClient(Clock(), "tcp:127.0.0.1:1", SECRET, Listener(),
                          rng=random.Random(4))
    delays = [client.retry_delay(attempt) for attempt in range(1, 12)]
    assert all(0 < d <= 0.5 for d in delays)
    assert all(d >= 0.25 for d in delays[2:])  # at the cap: 0.25 to 0.5 s
    again = MasterClient(Clock(), "tcp:127.0.0.1:1", SECRET, Listener(),
                         rng=random.Random(4))
    assert [again.retry_delay(attempt) for attempt in range(1, 12)] == delays
