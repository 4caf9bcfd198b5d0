"""The master's session machine and the master client's join machine: every state takes every
event, an exception never leaves a session stuck, and pre-auth failures do not flood the log."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from automat import NoTransition
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure

from skyproto.master.client import JoinInfo, MasterClient, MasterClientProtocol
from skyproto.master.messages import (
    GetTable,
    Observe,
    Refused,
    Welcome,
)
from skyproto.master.registry import InMemoryRegistry, Joined, NameBound, Table
from skyproto.master.server import MasterService

from .cluster import SECRET
from .test_master import FakeMaster, MasterPeer
from .test_master_timeouts import Listener

# --- the master's sessions -------------------------------------------------------------

def observe(peer: MasterPeer) -> None:
    _, proof = peer.authenticate()
    peer.send(Observe(proof, 1.0, 3.0))


def session_in(state: str) -> MasterPeer:
    service = MasterService(InMemoryRegistry(), Clock(), SECRET,
                            auto_grace=5.0 if state == "waiting" else 0.0)
    peer = MasterPeer(service)
    if state == "waiting":
        peer.join(0)
    elif state == "joined":
        peer.join(1)
    elif state == "observing":
        observe(peer)
    elif state in ("closing", "closed"):
        peer.join(1)
        peer.connection.drop("for the test")
        if state == "closed":
            peer.connection.connectionLost(Failure(ConnectionDone()))
    assert peer.connection.state == state
    return peer


SESSION_STATES = ["handshaking", "waiting", "joined", "observing", "closing", "closed"]
SESSION_EVENTS: dict[str, Callable[[Any], None]] = {
    "message": lambda m: m.message(GetTable(1)),
    "late": lambda m: m.late(),
    "silent": lambda m: m.silent(3.0),
    "drop": lambda m: m.drop("why"),
    "lost": lambda m: m.lost("why"),
    "admit": lambda m: m.admit(),
    "observe": lambda m: m.observe(),
    "wait": lambda m: m.wait(1.0, "why"),
    "welcome": lambda m: m.welcome(Joined(1, (), ())),
    "refused": lambda m: m.refused("why", True),
    "bind": lambda m: m.bind(1, "NAME", 0x01000002),
}


@pytest.mark.parametrize("state", SESSION_STATES)
@pytest.mark.parametrize("event", sorted(SESSION_EVENTS))
def test_every_session_state_takes_every_event(state, event):
    peer = session_in(state)
    try:
        SESSION_EVENTS[event](peer.connection.machine)
    except NoTransition:
        pytest.fail(f"state {state} has no transition for {event}")
    except AssertionError:
        # the machine itself never sends these before a Join arrived: no request to admit
        assert (state, event) in {("handshaking", "admit"), ("handshaking", "welcome")}


def test_an_exception_in_a_transition_drops_that_connection_and_nothing_else(events):
    clock = Clock()
    service = MasterService(InMemoryRegistry(), clock, SECRET, auto_grace=2.0)
    bystander = MasterPeer(service)
    bystander.join(1)
    waiting = MasterPeer(service)
    waiting.join(0)  # --harbor auto in the start-up grace: decided when it ends
    assert waiting.connection.state == "waiting"

    def broken(*args: Any) -> Any:
        raise RuntimeError("registry on fire")

    real_join = service.registry.join
    service.registry.join = broken
    clock.advance(2.1)
    assert waiting.transport.disconnecting  # logged and dropped, not stuck in waiting
    failures = [e for e in events if "log_failure" in e]
    assert failures and "registry on fire" in str(failures[0]["log_failure"].value)
    waiting.connection.connectionLost(Failure(ConnectionDone()))
    assert waiting.connection.state == "closed" and waiting.connection not in service.connections
    service.registry.join = real_join
    newcomer = MasterPeer(service)
    welcome, *_ = newcomer.join(2, node="n2@test")
    assert isinstance(welcome, Welcome) and bystander.connection.state == "joined"


def test_failures_before_authentication_are_counted_and_logged_at_debug_only(events):
    clock = Clock()
    service = MasterService(InMemoryRegistry(), clock, SECRET)
    for _ in range(10):
        garbage = MasterPeer(service)
        garbage.connection.dataReceived(garbage.wire.encode(GetTable(1)))
    for _ in range(10):
        MasterPeer(service).join(1, secret=b"not the secret, 16+")
    for _ in range(10):
        MasterPeer(service)  # says nothing
    clock.advance(service.handshake_timeout)
    loud = [formatEvent(e) for e in events if e.get("log_level") != LogLevel.debug]
    assert loud == []
    assert service.preauth_failures == {"protocol error": 10, "authentication failed": 10,
                                        "handshake timeout": 10}
    joined = MasterPeer(service)
    joined.join(1)
    joined.connection.drop("an authenticated node misbehaved")
    assert [e for e in events if e.get("log_level") == LogLevel.warn
            and "an authenticated node misbehaved" in formatEvent(e)]


# --- the master client -------------------------------------------------------------------

def client_in(state: str) -> tuple[MasterClient, Any]:
    reactor = MemoryReactorClock()
    client = MasterClient(reactor, "tcp:127.0.0.1:1", SECRET, Listener(),
                          JoinInfo(1, 5, "n1@test", "tcp:127.0.0.1:2"))
    master: Any = None
    if state == "connecting":
        client.start()
    elif state == "handshaking":
        MasterClientProtocol(client).makeConnection(StringTransport())
    elif state in ("joining", "up", "resyncing", "refused"):
        master = FakeMaster(client)
        if state in ("up", "resyncing"):
            master.welcome()
        if state == "resyncing":
            master.send(NameBound(7, "GAP", 0x02000002))
        if state == "refused":
            master.send(Refused("no"))
    elif state == "stopped":
        client.stop()
    assert client.state == state
    return client, master


CLIENT_STATES = ["idle", "connecting", "handshaking", "joining", "up", "resyncing",
                 "refused", "stopped"]
CLIENT_EVENTS: dict[str, Callable[[Any, MasterClient], None]] = {
    "start": lambda m, c: m.start(),
    "stop": lambda m, c: m.stop(),
    "connected": lambda m, c: m.connected(MasterClientProtocol(c)),
    "proven": lambda m, c: m.proven(),
    "observing": lambda m, c: m.observing(),
    "welcomed": lambda m, c: m.welcomed(Welcome(1, (), Table(0, (), {}))),
    "event": lambda m, c: m.event(NameBound(1, "X", 0x01000002)),
    "gap": lambda m, c: m.gap(),
    "resynced": lambda m, c: m.resynced(Table(9, (), {})),
    "resync_failed": lambda m, c: m.resync_failed(),
    "refused": lambda m, c: m.refused("why"),
    "lost": lambda m, c: m.lost("why"),
}


@pytest.mark.parametrize("state", CLIENT_STATES)
@pytest.mark.parametrize("event", sorted(CLIENT_EVENTS))
def test_every_client_state_takes_every_event(state, event):
    client, _ = client_in(state)
    try:
        CLIENT_EVENTS[event](client._machine, client)
    except NoTransition:
        pytest.fail(f"state {state} has no transition for {event}")


def test_an_exception_in_the_client_drops_the_connection_and_it_reconnects(events):
    class Broken(Listener):
        def master_table(self, table: Any, first: bool) -> None:
            raise RuntimeError("listener on fire")

    reactor = MemoryReactorClock()
    client = MasterClient(reactor, "tcp:127.0.0.1:1", SECRET, Broken(),
                          JoinInfo(1, 5, "n1@test", "tcp:127.0.0.1:2"))
    master = FakeMaster(client)
    master.welcome()
    assert master.transport.disconnecting
    assert any("listener on fire" in str(e["log_failure"].value)
               for e in events if "log_failure" in e)
    master.protocol.connectionLost(Failure(ConnectionDone()))
    assert client.state == "connecting" and not client.connected
