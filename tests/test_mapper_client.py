"""MapperClient: against our server over iosim and real 127.0.0.1 sockets, and bad replies."""

from __future__ import annotations

import struct
from typing import Any, TypeVar, cast

import pytest
import pytest_twisted
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer
from zope.interface.verify import verifyObject

from skyproto.errors import AddressError, ProtocolError
from skyproto.interfaces import IMapperClient
from skyproto.mapper.client import MapperClient, MapperRegistration, RegistrationRefusedError
from skyproto.mapper.epmd import Alive2Response, Alive2XResponse, NamesResponse, Port2Response
from skyproto.mapper.port import mapper_server_endpoint
from skyproto.mapper.server import MapperServerFactory
from skyproto.testing import wait_for

LOCAL = IPv4Address("TCP", "127.0.0.1", 40000)
HOST = IPv4Address("TCP", "127.0.0.1", 4369)
T0 = 1_700_000_000

_T = TypeVar("_T")


# --------------------------------------------------------------------------- fake endpoints


@implementer(IStreamClientEndpoint)
class PumpEndpoint:
    """Connects each client protocol to a fresh server protocol over iosim."""

    def __init__(self, server: MapperServerFactory, clock: Clock) -> None:
        self.server = server
        self.clock = clock
        self.pumps: list[iosim.IOPump] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        client = factory.buildProtocol(HOST)
        server = self.server.buildProtocol(LOCAL)
        assert client is not None
        server_io = iosim.FakeTransport(server, isServer=True, hostAddress=HOST, peerAddress=LOCAL)
        client_io = iosim.FakeTransport(client, isServer=False, hostAddress=LOCAL, peerAddress=HOST)
        self.pumps.append(
            iosim.connect(server, server_io, client, client_io, greet=False, clock=self.clock)
        )
        return succeed(client)

    def flush(self) -> None:
        for _ in range(20):
            if not any([pump.pump(advanceClock=False) for pump in self.pumps]):
                return


@implementer(IStreamClientEndpoint)
class StringEndpoint:
    """Connects each client protocol to a StringTransport the test drives by hand."""

    def __init__(self) -> None:
        self.connections: list[tuple[Protocol, StringTransport]] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        built = factory.buildProtocol(HOST)
        assert built is not None
        protocol = cast(Protocol, built)
        transport = StringTransport(hostAddress=LOCAL, peerAddress=HOST)
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return succeed(protocol)

    def last(self) -> tuple[Protocol, StringTransport]:
        return self.connections[-1]


@implementer(IStreamClientEndpoint)
class HangingEndpoint:
    """Never connects; records whether the attempt was cancelled."""

    def __init__(self) -> None:
        self.cancelled = 0

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        def cancel(d: Deferred[Any]) -> None:
            self.cancelled += 1
            d.errback(error.ConnectingCancelledError(HOST))

        return Deferred(cancel)


def result_of(d: Deferred[_T]) -> _T:
    """The synchronous result of ``d`` (it must have fired with a value)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]  # type: ignore[no-any-return]


def failure_of(d: Deferred[Any]) -> Failure:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    assert isinstance(results[0], Failure), results[0]
    return results[0]


def is_lost(registration: MapperRegistration) -> bool:
    return not registration.active


def close(protocol: Protocol) -> None:
    protocol.connectionLost(Failure(error.ConnectionDone()))


class Pumped:
    """A client and our server on one Clock, over iosim."""

    def __init__(self, **options: Any) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.server = MapperServerFactory(self.clock, 4369, **options)
        self.endpoint = PumpEndpoint(self.server, self.clock)
        self.client = MapperClient(self.clock, self.endpoint)

    def run(self, d: Deferred[_T]) -> _T:
        self.endpoint.flush()
        return result_of(d)


# --------------------------------------------------------------------------- over iosim


def test_client_provides_the_interface() -> None:
    client = MapperClient(Clock(), StringEndpoint())
    assert verifyObject(IMapperClient, client)


def test_register_lookup_names_unregister() -> None:
    env = Pumped()
    reg = env.run(env.client.register("foo", 1234, b"\0extra"))
    assert isinstance(reg, MapperRegistration)
    assert reg.creation == T0 + 1
    assert reg.reply == Alive2XResponse(0, T0 + 1)
    assert reg.active
    found = env.run(env.client.port_please("foo"))
    assert found == Port2Response(1234, 77, 0, 6, 6, "foo", b"\0extra")
    assert env.run(env.client.port_please("bar")) is None
    assert env.run(env.client.names()) == [("foo", 1234)]
    assert env.run(env.client.names_reply()) == NamesResponse(4369, (("foo", 1234),))
    done = reg.unregister()
    env.endpoint.flush()
    assert result_of(done) is None
    assert is_lost(reg) and reg.closed_by_us
    assert env.server.table.lookup("foo") is None
    assert result_of(reg.when_lost()) is None  # fires at once once lost
    assert result_of(reg.unregister()) is None  # idempotent
    assert "lost" in repr(reg)
    # Registering again gives a new creation.
    again = env.run(env.client.register("foo", 1234))
    assert again.creation == T0 + 2
    assert env.server.connections == {p for p in env.server.connections if p.registered}


def test_register_old_version_and_hidden_node() -> None:
    env = Pumped()
    reg = env.run(env.client.register("h", 5, node_type=72, high=5, low=5))
    assert reg.reply == Alive2Response(0, (T0 + 1) % 3 + 1)
    assert env.run(env.client.port_please("h")) == Port2Response(5, 72, 0, 5, 5, "h", b"")


def test_register_taken_name_is_refused() -> None:
    env = Pumped()
    first = env.run(env.client.register("foo", 1))
    d = env.client.register("foo", 2)
    env.endpoint.flush()
    failure = failure_of(d)
    failure.trap(RegistrationRefusedError)
    assert cast(RegistrationRefusedError, failure.value).result == 1
    assert first.active
    # The client closed the refused connection; only the winner is left on the server.
    assert len(env.server.connections) == 1


def test_the_mapper_closing_a_registration_is_reported() -> None:
    env = Pumped(relaxed=True)
    reg = env.run(env.client.register("foo", 1))
    lost = reg.when_lost()
    assert not lost.called
    assert env.server.stop_node("foo")
    env.endpoint.flush()
    assert result_of(lost) is None
    assert not reg.closed_by_us
    assert reg.lost_reason is not None


def test_invalid_names_fail_before_sending() -> None:
    endpoint = StringEndpoint()
    client = MapperClient(Clock(), endpoint)
    for d in (
        client.register("", 1),
        client.register("a\0b", 1),
        client.register("x" * 256, 1),
        client.port_please(""),
    ):
        failure_of(d).trap(AddressError)
    failure_of(client.register("a", 1, b"x" * 1021)).trap(ValueError)
    failure_of(client.register("a", 70000)).trap(ValueError)
    assert endpoint.connections == []


# --------------------------------------------------------------------------- bad replies


def test_request_bytes() -> None:
    endpoint = StringEndpoint()
    client = MapperClient(Clock(), endpoint)
    client.port_please("foo")
    assert endpoint.last()[1].value() == b"\x00\x04zfoo"
    client.names()
    assert endpoint.last()[1].value() == b"\x00\x01n"
    client.register("a", 0x1234)
    assert endpoint.last()[1].value() == bytes.fromhex("000e 78 1234 4d 00 0006 0006 0001 61 0000")


@pytest.mark.parametrize(
    "reply",
    [
        b"",  # closed without a reply
        b"w",
        b"w\x00\x04\xd2",
        b"x\x01",
        b"w\x01junk",
        bytes.fromhex("77 00 04d2 4d 00 0006 0005 0003 666f6f 0000 ff"),
    ],
)
def test_malformed_port2_reply_errbacks_protocol_error(reply: bytes) -> None:
    endpoint = StringEndpoint()
    d = MapperClient(Clock(), endpoint).port_please("foo")
    protocol, _ = endpoint.last()
    protocol.dataReceived(reply)
    close(protocol)
    failure_of(d).trap(ProtocolError)


def test_port2_reply_in_pieces() -> None:
    endpoint = StringEndpoint()
    d = MapperClient(Clock(), endpoint).port_please("foo")
    protocol, _ = endpoint.last()
    for byte in bytes.fromhex("77 00 04d2 4d 00 0006 0005 0003 666f6f 0000"):
        protocol.dataReceived(bytes([byte]))
    assert not d.called  # the reply ends at the close
    close(protocol)
    assert result_of(d) == Port2Response(1234, 77, 0, 6, 5, "foo", b"")


def test_oversized_reply_is_cut_off() -> None:
    endpoint = StringEndpoint()
    d = MapperClient(Clock(), endpoint).port_please("foo")
    protocol, transport = endpoint.last()
    protocol.dataReceived(b"w\x00" + b"\0" * 5000)
    failure_of(d).trap(ProtocolError)
    assert transport.disconnecting
    protocol.dataReceived(b"more")  # ignored
    close(protocol)


def test_malformed_names_reply() -> None:
    endpoint = StringEndpoint()
    d = MapperClient(Clock(), endpoint).names()
    protocol, _ = endpoint.last()
    protocol.dataReceived(b"\0\0\x11\x11garbage\n")
    close(protocol)
    failure_of(d).trap(ProtocolError)


@pytest.mark.parametrize(
    "reply",
    [
        b"w\x00\x00\x00\x00\x01",  # wrong opcode
        bytes.fromhex("76 00 00000005 00"),  # one byte too many
    ],
)
def test_malformed_alive2_reply(reply: bytes) -> None:
    endpoint = StringEndpoint()
    d = MapperClient(Clock(), endpoint).register("foo", 1)
    protocol, transport = endpoint.last()
    protocol.dataReceived(reply)
    failure_of(d).trap(ProtocolError)
    assert transport.disconnecting


def test_alive2_reply_in_pieces_and_close_before_reply() -> None:
    endpoint = StringEndpoint()
    client = MapperClient(Clock(), endpoint)
    d = client.register("foo", 1)
    protocol, _ = endpoint.last()
    for byte in bytes.fromhex("76 00 00000005"):
        protocol.dataReceived(bytes([byte]))
    assert result_of(d).creation == 5
    d2 = client.register("bar", 1)
    protocol2, _ = endpoint.last()
    protocol2.dataReceived(b"v\x00")
    close(protocol2)
    failure_of(d2).trap(ProtocolError)


def test_unexpected_bytes_on_a_registration_drop_it() -> None:
    endpoint = StringEndpoint()
    d = MapperClient(Clock(), endpoint).register("foo", 1)
    protocol, transport = endpoint.last()
    protocol.dataReceived(bytes.fromhex("76 00 00000005"))
    reg = result_of(d)
    protocol.dataReceived(b"?")
    assert transport.disconnecting
    close(protocol)
    assert is_lost(reg) and not reg.closed_by_us


# --------------------------------------------------------------------------- timeouts


def test_connect_timeout() -> None:
    clock = Clock()
    endpoint = HangingEndpoint()
    client = MapperClient(clock, endpoint)
    d = client.port_please("foo")
    clock.advance(9.9)
    assert not d.called
    clock.advance(0.1)
    failure_of(d).trap(TimeoutError)
    assert endpoint.cancelled == 1


def test_reply_timeout_aborts_the_connection() -> None:
    clock = Clock()
    endpoint = StringEndpoint()
    client = MapperClient(clock, endpoint, timeout=3)
    d = client.register("foo", 1)
    _, transport = endpoint.last()
    clock.advance(3)
    failure_of(d).trap(TimeoutError)
    assert transport.disconnecting
    d2 = client.names()
    _, transport2 = endpoint.last()
    clock.advance(3)
    failure_of(d2).trap(TimeoutError)
    assert transport2.disconnecting
    assert clock.getDelayedCalls() == []


def test_cancel_a_request() -> None:
    clock = Clock()
    endpoint = StringEndpoint()
    d = MapperClient(clock, endpoint).port_please("foo")
    protocol, transport = endpoint.last()
    d.cancel()
    failure_of(d).trap(CancelledError)
    assert transport.disconnecting
    close(protocol)  # a late close changes nothing
    assert clock.getDelayedCalls() == []


def test_connection_failure_is_passed_on() -> None:
    @implementer(IStreamClientEndpoint)
    class Refusing:
        def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            d.errback(error.ConnectionRefusedError())
            return d

    clock = Clock()
    d = MapperClient(clock, Refusing()).names()
    failure_of(d).trap(error.ConnectionRefusedError)
    assert clock.getDelayedCalls() == []


# --------------------------------------------------------------------------- real sockets


def within(d: Deferred[_T], seconds: float = 10) -> Deferred[_T]:
    from twisted.internet import reactor

    return d.addTimeout(seconds, reactor)


def port_of(listening: IListeningPort) -> int:
    host = listening.getHost()
    assert isinstance(host, IPv4Address)
    return host.port


async def stop(listening: IListeningPort) -> None:
    stopped = listening.stopListening()
    if stopped is not None:
        await within(stopped)


async def until(predicate: Any, seconds: float = 5) -> None:
    """Wait (polling every 10 ms on the reactor) until ``predicate()`` is true."""
    from twisted.internet import reactor

    await wait_for(predicate, "the condition", seconds, clock=reactor, interval=0.01)


#: How a mapper listens: Twisted's own tcp.Port, or the daemon's MapperPort.
LISTENERS = pytest.mark.parametrize("listener", [serverFromString, mapper_server_endpoint])


@LISTENERS
@pytest_twisted.ensureDeferred
async def test_client_and_server_over_real_sockets(listener: Any) -> None:
    from twisted.internet import reactor

    server = MapperServerFactory(reactor, 0)
    port: IListeningPort = await within(
        listener(reactor, "tcp:0:interface=127.0.0.1").listen(server)
    )
    try:
        server.port = port_of(port)
        client = MapperClient(
            reactor,
            TCP4ClientEndpoint(reactor, "127.0.0.1", server.port),
        )
        a = await within(client.register("a", 1111))
        b = await within(client.register("b\u00e9", 2222, b"\x00cbor"))
        assert a.creation >= 4 and b.creation >= 4
        with pytest.raises(RegistrationRefusedError):
            await within(client.register("a", 3333))
        names = await within(client.names_reply())
        assert names == NamesResponse(server.port, (("b\u00e9", 2222), ("a", 1111)))
        assert await within(client.port_please("b\u00e9")) == Port2Response(
            2222, 77, 0, 6, 6, "b\u00e9", b"\x00cbor"
        )
        await within(a.unregister())
        await until(lambda: server.table.lookup("a") is None)
        assert await within(client.port_please("a")) is None
        await within(b.unregister())
        await until(lambda: not server.connections)
    finally:
        await stop(port)


@pytest_twisted.ensureDeferred
async def test_connection_refused_over_real_sockets() -> None:
    from twisted.internet import reactor

    port: IListeningPort = await within(
        serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            MapperServerFactory(reactor, 0)
        )
    )
    number = port_of(port)
    await stop(port)
    client = MapperClient(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", number))
    with pytest.raises(error.ConnectionRefusedError):
        await within(client.names())


@LISTENERS
@pytest_twisted.ensureDeferred
async def test_byte_at_a_time_over_real_sockets(listener: Any) -> None:
    """A raw client trickling its request one byte per write still gets served."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import connectProtocol
    from twisted.internet.task import deferLater

    server = MapperServerFactory(reactor, 0)
    port: IListeningPort = await within(
        listener(reactor, "tcp:0:interface=127.0.0.1").listen(server)
    )
    try:
        number = port_of(port)
        client = MapperClient(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", number))
        reg = await within(client.register("slow", 4321))

        class Trickle(Protocol):
            def __init__(self) -> None:
                self.data = b""
                self.done: Deferred[bytes] = Deferred()

            def dataReceived(self, data: bytes) -> None:
                self.data += data

            def connectionLost(self, reason: Failure = connectionDone) -> None:
                self.done.callback(self.data)

        trickle = Trickle()
        await within(connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", number), trickle))
        assert trickle.transport is not None
        for byte in struct.pack(">H", 5) + b"zslow":
            trickle.transport.write(bytes([byte]))
            await deferLater(reactor, 0.01)
        reply = await within(trickle.done)
        assert reply[:4] == bytes.fromhex("77 00 10e1")
        await within(reg.unregister())
    finally:
        await stop(port)
