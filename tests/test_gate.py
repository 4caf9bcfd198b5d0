"""The gate and SIMPLEDB over loopback, driven by a Clock."""

from __future__ import annotations

import re
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.protocols.basic import Int16StringReceiver, LineOnlyReceiver
from twisted.python.failure import Failure

from skyproto.gate import GateConfig, GateFactory, request_payload
from skyproto.node.node import Node
from skyproto.node.service import Service
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
    assert request_payload("SET greeting hello  world ") == ["SET", "greeting", "hello  world "]
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


# --- a gate client on a transport double ---------------------------------------------------

class Big(Service):
    """Replies with ``size`` letters x: a reply too large for packet framing."""

    def __init__(self, size: int) -> None:
        self.size = size

    def receive(self, source: int, session: int, payload: Any) -> Any:
        return "x" * self.size


def attach(factory: GateFactory, port: int = 40000) -> tuple[Any, StringTransport]:
    """A gate client on a StringTransport, as if ``127.0.0.1:port`` had connected."""
    address = IPv4Address("TCP", "127.0.0.1", port)
    protocol = factory.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    return protocol, transport


def packets(data: bytes) -> list[bytes]:
    """Split 2-byte length-prefixed packets."""
    found = []
    while data:
        size = int.from_bytes(data[:2], "big")
        found.append(data[2:2 + size])
        data = data[2 + size:]
    return found


def test_a_half_closed_client_gets_every_reply_in_order_then_the_close():
    clock = Clock()
    node = Node(1, clock, SECRET)
    node.spawn(SimpleDB())
    client, transport = attach(GateFactory(node, GateConfig()))
    assert IHalfCloseableProtocol.providedBy(client)
    client.dataReceived(b"SET a 1\nGET a\nGET nothing\n")
    client.readConnectionLost()  # printf ... | nc -N: the client's write side is closed
    assert not transport.disconnecting  # the replies are still to come
    clock.advance(0)
    assert transport.value() == b"OK\nVALUE 1\nNOTFOUND\n"
    assert transport.disconnecting


def test_a_half_closed_client_waits_for_a_slow_reply_and_its_held_requests():
    clock = Clock()
    node = Node(1, clock, SECRET, default_timeout=60)
    slow = Parked()
    node.spawn(slow, "TARGET")
    client, transport = attach(GateFactory(node, GateConfig(target="TARGET", max_in_flight=1)))
    client.dataReceived(b"first\nsecond\nthird")  # the last line has no newline
    client.readConnectionLost()
    clock.advance(0)
    for n, reply in enumerate(["one", "two", "three"]):
        assert not transport.disconnecting
        assert len(slow.waiting) == n + 1  # held by the in-flight limit, then read
        slow.waiting[n].callback(reply)
        clock.advance(0)
    assert transport.value() == b"one\ntwo\nthree\n"
    assert transport.disconnecting


def test_a_half_closed_packet_client_gets_its_replies_then_the_close():
    clock = Clock()
    node = Node(1, clock, SECRET)
    node.spawn(SimpleDB())
    client, transport = attach(GateFactory(node, GateConfig(framing="packet")))
    client.dataReceived(b"".join(len(p).to_bytes(2, "big") + p for p in [b"SET a 1", b"GET a"]))
    client.readConnectionLost()
    clock.advance(0)
    assert packets(transport.value()) == [b"OK", b"VALUE 1"]
    assert transport.disconnecting


def test_a_packet_cut_short_by_a_half_close_is_answered_with_an_error():
    clock = Clock()
    node = Node(1, clock, SECRET)
    node.spawn(SimpleDB())
    client, transport = attach(GateFactory(node, GateConfig(framing="packet")))
    client.dataReceived(b"\x00\x05GET a\x00\x10GET")
    client.readConnectionLost()
    clock.advance(0)
    assert packets(transport.value()) == [b"NOTFOUND", b"ERROR the input ended inside a packet"]
    assert transport.disconnecting


def test_a_reply_too_large_for_packet_framing_is_an_error_and_the_connection_goes_on():
    clock = Clock()
    node = Node(1, clock, SECRET)
    node.spawn(Big(70000), "BIG")
    node.spawn(SimpleDB())
    gate(clock, node, target="BIG", framing="packet")
    client = connect(clock, protocol=PacketClient)
    client.sendString(b"GET big")
    clock.advance(0)
    assert client.lines == [
        "ERROR reply too large for packet framing (70000 bytes, at most 65535)"]
    client.sendString(b"GET big")
    clock.advance(0)
    assert len(client.lines) == 2 and client.transport.connected


ODD_VALUES = [
    "a\rb", "tab\there\t", "v\x0bw", "form\x0cfeed", "fs\x1cgs\x1drs\x1e", "nel\x85end",
    "ls\u2028ps\u2029", "trailing spaces  ", "  leading", " ", "two  inner  spaces",
]


def test_the_line_gate_returns_values_byte_for_byte():
    clock = Clock()
    node = Node(1, clock, SECRET)
    node.spawn(SimpleDB())
    gate(clock, node)
    client = connect(clock)
    for n, value in enumerate(ODD_VALUES):
        say(clock, client, f"SET k{n} {value}", f"GET k{n}")
    assert client.lines == [line for value in ODD_VALUES for line in ("OK", f"VALUE {value}")]


def test_telnet_line_ends_lose_only_their_one_cr():
    clock = Clock()
    node = Node(1, clock, SECRET)
    node.spawn(SimpleDB())
    gate(clock, node)
    client = connect(clock)
    client.transport.write(b"SET k v \r\nGET k\r\nSET j w\r\r\nGET j\r\n")
    clock.advance(0)
    assert client.lines == ["OK", "VALUE v ", "OK", "VALUE w\r"]


def test_the_packet_gate_returns_values_byte_for_byte():
    clock = Clock()
    node = Node(1, clock, SECRET)
    node.spawn(SimpleDB())
    gate(clock, node, framing="packet")
    client = connect(clock, protocol=PacketClient)
    client.sendString("SET k two\nlines\r\u2028 ".encode())
    client.sendString(b"GET k")
    clock.advance(0)
    assert client.lines == ["OK", "VALUE two\nlines\r\u2028 "]


def test_request_payload_splits_on_single_spaces_and_keeps_the_rest_exactly():
    assert request_payload("SET k  v ") == ["SET", "k", " v "]
    assert request_payload("SET k\tv") == ["SET", "k\tv"]
    assert request_payload("SET k ") == ["SET", "k", ""]
    assert request_payload("GET\x0bk") == ["GET\x0bk"]


def test_a_full_gate_evicts_an_idle_client_never_one_with_a_request_in_flight():
    clock = Clock()
    node = Node(1, clock, SECRET, default_timeout=60)
    slow = Parked()
    node.spawn(slow, "TARGET")
    factory = gate(clock, node, target="TARGET", max_clients=2)
    waiting = connect(clock)
    say(clock, waiting, "slow request")  # the least recently active, but it awaits a reply
    clock.advance(1)
    idle = connect(clock)
    newcomer = connect(clock)
    assert idle.closed and idle.lines == [
        "ERROR the gate is full and this connection was the least active"]
    assert not waiting.closed and not newcomer.closed
    slow.waiting[0].callback("done")
    clock.advance(0)
    assert waiting.lines == ["done"]
    assert (factory.accepted, factory.evicted, factory.refused) == (3, 1, 0)


def test_a_full_gate_whose_clients_all_await_replies_refuses_the_newcomer():
    clock = Clock()
    node = Node(1, clock, SECRET, default_timeout=60)
    slow = Parked()
    node.spawn(slow, "TARGET")
    factory = gate(clock, node, target="TARGET", max_clients=2)
    first, second = connect(clock), connect(clock)
    say(clock, first, "a")
    say(clock, second, "b")
    newcomer = connect(clock)
    clock.advance(0)
    assert newcomer.lines == ["ERROR too many clients"] and newcomer.closed
    assert not first.closed and not second.closed and len(factory.clients) == 2
    for d in slow.waiting:
        d.callback("done")
    clock.advance(0)
    assert first.lines == second.lines == ["done"]
    assert (factory.accepted, factory.evicted, factory.refused) == (2, 0, 1)


def test_client_comings_and_goings_are_counted_and_logged_at_debug_only():
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace", "").startswith("skyproto.gate"):
            events.append(event)

    clock = Clock()
    node = Node(1, clock, SECRET)
    node.spawn(SimpleDB())
    factory = gate(clock, node, max_clients=2, max_request=16, idle_timeout=10)
    globalLogPublisher.addObserver(observe)
    try:
        clients = [connect(clock) for _ in range(5)]  # three of them evict the first three
        say(clock, clients[3], "SET k " + "x" * 20)  # too long: refused
        clients[4].transport.loseConnection()
        clock.advance(0)
        clock.advance(10)  # idle
    finally:
        globalLogPublisher.removeObserver(observe)
    assert all(client.closed for client in clients)
    loud = [e["log_format"] for e in events if e["log_level"] > LogLevel.debug]
    assert len(loud) == 1 and loud[0].startswith("the gate is full")  # once, not per client
    assert any(e["log_level"] == LogLevel.debug for e in events)
    assert (factory.accepted, factory.evicted, factory.refused) == (5, 3, 0)


def test_a_refusal_is_logged_in_words_at_debug():
    events: list[dict[str, Any]] = []
    clock = Clock()
    node = Node(1, clock, SECRET)
    _, transport = attach(GateFactory(node, GateConfig(idle_timeout=10)), 40123)
    globalLogPublisher.addObserver(events.append)
    try:
        clock.advance(10)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert transport.value() == b"ERROR idle for 10 s\n" and transport.disconnecting
    [line] = [formatEvent(e) for e in events
              if e.get("log_namespace") == "skyproto.gate.LineClient"]
    assert line == "closing gate client 127.0.0.1 (port=40123): idle for 10 s"


def test_a_congested_cluster_stops_the_gate_reading_its_clients():
    clock = Clock()
    node = Node(1, clock, SECRET)
    node.spawn(SimpleDB())
    factory = GateFactory(node, GateConfig())
    client, transport = attach(factory)
    node.flow.congested(2)
    assert transport.producerState == "paused" and "cluster" in client.holds
    client.dataReceived(b"SET a 1\n")  # already in the kernel's buffer: kept, not handled
    clock.advance(0)
    assert transport.value() == b""
    node.flow.drained(2)
    assert transport.producerState == "producing" and not client.holds
    clock.advance(0)
    assert transport.value() == b"OK\n"
    # a client that connects while the cluster is congested starts held
    node.flow.congested(3)
    late, late_transport = attach(factory, 40001)
    assert late_transport.producerState == "paused" and "cluster" in late.holds
    node.flow.drained(3)
    assert late_transport.producerState == "producing"


def test_the_cluster_hold_adds_to_the_in_flight_hold_and_ends_with_the_client():
    clock = Clock()
    node = Node(1, clock, SECRET, default_timeout=60)
    slow = Parked()
    node.spawn(slow, "TARGET")
    client, transport = attach(GateFactory(node, GateConfig(target="TARGET", max_in_flight=1)))
    client.dataReceived(b"a\n")
    clock.advance(0)
    node.flow.congested(2)
    assert client.holds == {"in flight", "cluster"}
    slow.waiting[0].callback("A")
    clock.advance(0)
    assert transport.producerState == "paused" and client.holds == {"cluster"}
    node.flow.drained(2)
    assert transport.producerState == "producing"
    client.connectionLost(Failure(ConnectionDone()))
    node.flow.congested(2)  # the lost client has unsubscribed: nothing pauses it
    assert transport.producerState == "producing"


def test_a_missing_gate_service_error_names_the_services_that_exist():
    clock = Clock()
    node = Node(1, clock, SECRET)
    node.spawn(SimpleDB(), "SIMPLEDB")
    node.spawn(Echo(), ".echo")
    gate(clock, node, target="SIMPLEBD")
    client = connect(clock)
    assert say(clock, client, "GET k") == [
        "ERROR no such service: no service is named 'SIMPLEBD' (names: .echo, SIMPLEDB)"]
