"""A node that lists several masters talks to one at a time and moves to the next when it
loses it, re-joining with its harbor, incarnation and names; links and calls go on."""

from __future__ import annotations

import random
from typing import Any

import pytest
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock

from skyproto.errors import ConfigurationError
from skyproto.master.client import MasterClient
from skyproto.master.registry import InMemoryRegistry
from skyproto.master.server import MasterService
from skyproto.node.node import Node
from skyproto.services import Echo
from skyproto.testing import settle
from skyproto.transports.loopback import network_for

from .cluster import SECRET, result_of
from .test_master_timeouts import Listener

MASTERS = ["loopback:m1", "loopback:m2"]


def master_at(clock: Clock, name: str) -> tuple[MasterService, Any]:
    service = MasterService(InMemoryRegistry(), clock, SECRET, auto_grace=0, name_grace=0)
    ports: list[Any] = []
    serverFromString(clock, name).listen(service).addCallback(ports.append)
    return service, ports[0]


def kill(clock: Clock, name: str, port: Any) -> None:
    """Like SIGKILL of that master: its port goes, every connection to it fails."""
    port.stopListening()
    for connection in network_for(clock).connections_to(name.split(":", 1)[1]):
        connection.cut("master killed")


def answer(clock: Clock, call: Any) -> Any:
    settle(clock, 0.1)
    return result_of(call)


def test_a_node_moves_to_the_next_master_and_keeps_its_harbor_names_and_links() -> None:
    clock = Clock()
    first, first_port = master_at(clock, MASTERS[0])
    second, _ = master_at(clock, MASTERS[1])
    alpha, beta = Node(1, clock, SECRET), Node(2, clock, SECRET)
    alpha.listen("loopback:alpha")
    beta.listen("loopback:beta")
    echo = beta.spawn(Echo())
    beta.register_name("ECHO", echo)
    for node in (alpha, beta):
        node.join_master(MASTERS, f"n{node.harbor}@test")
    settle(clock, 0.5)
    assert set(first.joined) == {1, 2} and not second.joined  # the first listed, first
    assert answer(clock, alpha.call("ECHO", "before")) == "before"
    link = alpha.router.peers[2].link
    kill(clock, MASTERS[0], first_port)
    pending = alpha.call(echo, "during")
    settle(clock, 1.0)
    assert set(second.joined) == {1, 2}
    assert {h: c.incarnation for h, c in second.joined.items()} == {
        1: alpha.incarnation, 2: beta.incarnation}
    assert second.registry.snapshot().names == {"ECHO": echo}  # re-asserted
    assert alpha.master is not None and alpha.master.endpoint_description == MASTERS[1]
    assert result_of(pending) == "during"
    assert alpha.router.peers[2].link is link  # the link never noticed
    assert answer(clock, alpha.call("ECHO", "after")) == "after"


def test_each_attempt_tries_the_next_master_in_turn() -> None:
    clock = Clock()
    client = MasterClient(clock, ["loopback:nobody1", "loopback:nobody2", "loopback:m3"],
                          SECRET, Listener(), None, retry_initial=0.1, retry_max=0.2)
    master_at(clock, "loopback:m3")
    tried = []
    client.start()
    for _ in range(40):
        tried.append(client.endpoint_description)
        clock.advance(0.05)
        if client.connected:
            break
    assert client.connected and client.endpoint_description == "loopback:m3"
    assert client.masters == ["loopback:nobody1", "loopback:nobody2", "loopback:m3"]
    assert tried[0] == "loopback:nobody1" and "loopback:nobody2" in tried
    settle(clock, 0)
    client.stop()


def test_a_bad_master_in_the_list_is_one_clear_error() -> None:
    with pytest.raises(ConfigurationError, match="bad master endpoint 'nosuch:x'"):
        MasterClient(Clock(), ["loopback:m1", "nosuch:x"], SECRET, Listener())
    with pytest.raises(ConfigurationError, match="no master endpoint"):
        MasterClient(Clock(), [], SECRET, Listener())


def test_connections_that_fail_after_connecting_still_back_off() -> None:
    """A master that accepts the connection and then fails it (TLS refused, handshake
    dropped) resets ClientService's count of failures at each connection; the client keeps
    its own, so it backs off all the same instead of retrying ten times a second."""
    clock = Clock()
    client = MasterClient(clock, "loopback:m1", SECRET, Listener(), None,
                          retry_initial=0.1, retry_max=2.0, rng=random.Random(1))
    assert client.retry_delay(0) <= 0.1
    for _ in range(6):  # six connections made, none welcomed
        client._new_attempt()
    assert client.retry_delay(0) >= 1.0  # as if the sixth failure in a row
