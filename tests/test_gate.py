"""The gate and SIMPLEDB over loopback, driven by a Clock."""

from __future__ import annotations

import re
from typing import Any

import pytest
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.protocols.basic import Int16StringReceiver, LineOnlyReceiver

from skyproto.gate import GateConfig, GateFactory, request_payload
from skyproto.node.node import Node
from skyproto.services import Echo, SimpleDB

from .cluster import SECRET, Parked, mesh, result_of


class LineClient(LineOnlyReceiver):
    delimiter = b"\n"

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.closed = False

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line.decode())

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True


class PacketClient(Int16StringReceiver):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def stringReceived(self, string: bytes) -> None:
        self.lines.append(string.decode())


def gate(clock: Clock, node: Node, name: str = "gate", **config: Any) -> GateFactory:
    factory = GateFactory(node, GateConfig(**config))
    serverFromString(clock, f"loopback:{name}").listen(factory)
    return factory


def connect(clock: Clock, name: str = "gate", protocol: type[Protocol] = LineClient) -> Any:
    d = clientFromString(clock, f"loopback:{name}").connect(Factory.forProtocol(protocol))
    clock.advance(0)
    return result_of(d)


def say(clock: Clock, client: Any, *lines: str) -> list[str]:
    for line in lines:
        client.transport.write(line.encode() + b"\n")
    clock.advance(0)
    replies: list[str] = client.lines
    return replies


def test_request_payload_keeps_spaces_in_the_last_part():
    assert request_payload("SET greeting hello  world ") == ["SET", "greeting", "hello  world"]
    assert request_payload("GET k") == ["GET", "k"]
    assert request_payload("PING") == ["PING"]


def test_set_and_get_through_the_gate_to_a_remote_simpledb():
    clock, (front, back) = mesh(2)
    front.register_name("SIMPLEDB", back.spawn(SimpleDB()))
    gate(clock, front)
    client = connect(clock)
    assert say(clock, client, "SET greeting hello world", "GET greeting", "GET nothing") == [
        "OK", "VALUE hello world", "NOTFOUND"]


def test_errors_are_prompt_one_line_replies():
    clock, (front, back) = mesh(2, default_timeout=2)
    front.register_name("SIMPLEDB", back.spawn(SimpleDB()))
    gate(clock, front)
    client = connect(clock)
    assert say(clock, client, "FROB x", "SET onlykey", "\xff".encode("latin-1").decode("latin-1"),
               "") == ["ERROR unknown command FROB", "ERROR usage: SET <key> <value>",
                       "ERROR unknown command ÿ", "ERROR empty request"]
    client.transport.write(b"\xff\xfe\n")
    clock.advance(0)
    assert client.lines[-1] == "ERROR requests are UTF-8 text"


def test_unreachable_simpledb_is_an_error_not_silence():
    clock, (front, back) = mesh(2)
    gate(clock, front)
    client = connect(clock)
    assert say(clock, client, "GET k")[-1].startswith("ERROR no such service")
    front.register_name("SIMPLEDB", back.spawn(SimpleDB()))
    front.router.peers[2].link.transport.connection.cut()
    clock.advance(0)
    assert say(clock, client, "GET k")[-1].startswith("ERROR unavailable: harbor 2")


def test_timeout_is_an_error():
    clock, (front, back) = mesh(2)
    front.register_name("SLOW", back.spawn(Parked()))
    gate(clock, front, target="SLOW", timeout=1.5)
    client = connect(clock)
    say(clock, client, "GET k")
    clock.advance(1.5)
    assert len(client.lines) == 1
    assert re.fullmatch(r"ERROR timeout: no reply within 1\.5 s \(session \d+\)", client.lines[0])


def test_replies_come_back_in_request_order():
    clock = Clock()
    node = Node(1, clock, SECRET)
    slow = Parked()
    node.spawn(slow, "TARGET")
    gate(clock, node, target="TARGET")
    client = connect(clock)
    say(clock, client, "first", "second")
    slow.waiting[1].callback("second reply")
    clock.advance(0)
    assert client.lines == []  # held until the first is answered
    slow.waiting[0].callback("first reply")
    clock.advance(0)
    assert client.lines == ["first reply", "second reply"]


def test_over_long_line_is_refused_and_only_that_client_goes():
    clock = Clock()
    node = Node(1, clock, SECRET)
    node.spawn(SimpleDB())
    gate(clock, node, max_request=32)
    bad, good = connect(clock), connect(clock)
    say(clock, bad, "SET k " + "x" * 100)
    assert bad.lines == ["ERROR request longer than 32 bytes"] and bad.closed
    assert say(clock, good, "SET k v", "GET k") == ["OK", "VALUE v"]


def test_a_full_gate_closes_its_least_active_client_for_a_newcomer():
    clock = Clock()
    node = Node(1, clock, SECRET)
    node.spawn(SimpleDB())
    factory = gate(clock, node, max_clients=2)
    idle, busy = connect(clock), connect(clock)
    clock.advance(1)
    assert say(clock, busy, "SET a b") == ["OK"]
    newcomer = connect(clock)
    clock.advance(0)
    assert idle.lines == ["ERROR the gate is full and this connection was the least active"]
    assert idle.closed and not busy.closed
    assert len(factory.clients) == 2
    assert say(clock, newcomer, "GET a") == ["VALUE b"]
    assert say(clock, busy, "GET a") == ["OK", "VALUE b"]


def test_idle_clients_are_closed_but_not_while_a_reply_is_pending():
    clock = Clock()
    node = Node(1, clock, SECRET, default_timeout=60)
    slow = Parked()
    node.spawn(slow, "TARGET")
    gate(clock, node, target="TARGET", idle_timeout=10)
    waiting, silent = connect(clock), connect(clock)
    say(clock, waiting, "slow request")
    clock.advance(10)
    assert silent.closed and silent.lines == ["ERROR idle for 10 s"]
    assert not waiting.closed  # its request is still with the cluster
    slow.waiting[0].callback("done")
    clock.advance(0)
    assert waiting.lines == ["done"]
    clock.advance(10)
    assert waiting.closed


def test_agents_come_and_go_with_their_clients():
    clock = Clock()
    node = Node(1, clock, SECRET)
    node.spawn(SimpleDB())
    gate(clock, node)
    before = len(node.services)
    client = connect(clock)
    assert len(node.services) == before + 1
    client.transport.loseConnection()
    clock.advance(0)
    assert len(node.services) == before


def test_packet_framing():
    clock = Clock()
    node = Node(1, clock, SECRET)
    node.spawn(SimpleDB())
    gate(clock, node, framing="packet")
    client = connect(clock, protocol=PacketClient)
    client.sendString(b"SET k two words")
    client.sendString(b"GET k")
    clock.advance(0)
    assert client.lines == ["OK", "VALUE two words"]


def test_a_client_that_does_not_read_is_not_read_from():
    clock = Clock()
    node = Node(1, clock, SECRET)
    node.spawn(Echo(), "TARGET")
    factory = gate(clock, node, target="TARGET")
    client = connect(clock)
    client.transport.pauseProducing()  # the client stops reading its replies
    big = "x" * 3000
    for _ in range(100):
        client.transport.write(f"ECHO {big}\n".encode())
        clock.advance(0)
    server = next(iter(factory.clients))
    assert "replies" in server.holds
    held = server.transport.unsent
    assert held < 2 * server.transport.high_water  # bounded, not the whole 300 KB
    client.transport.resumeProducing()
    clock.advance(0)
    assert not server.holds
    assert len(client.lines) == 100


def test_in_flight_limit_pauses_reading():
    clock = Clock()
    node = Node(1, clock, SECRET)
    slow = Parked()
    node.spawn(slow, "TARGET")
    factory = gate(clock, node, target="TARGET", max_in_flight=2)
    client = connect(clock)
    say(clock, client, "a", "b", "c", "d")
    server = next(iter(factory.clients))
    assert len(slow.waiting) == 2 and "in flight" in server.holds
    slow.waiting[0].callback("A")
    clock.advance(0)
    assert len(slow.waiting) >= 3
    for d in slow.waiting[1:]:
        if not d.called:
            d.callback("later")
    clock.advance(0)
    for d in slow.waiting:
        if not d.called:
            d.callback("later")
    clock.advance(0)
    assert client.lines[0] == "A" and len(client.lines) == 4


def test_unknown_framing():
    with pytest.raises(ValueError, match="framing"):
        GateFactory(Node(1, Clock(), SECRET), GateConfig(framing="xml"))
