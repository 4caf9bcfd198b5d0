"""The loopback: endpoint, driven deterministically by a Clock."""

from __future__ import annotations

import gc
import re
import weakref
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IListeningPort,
    ILoggingContext,
    IPullProducer,
    IPushProducer,
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from skyproto.transports import loopback
from skyproto.transports.loopback import (
    DEFAULT_HIGH_WATER,
    LoopbackAddress,
    LoopbackClientEndpoint,
    LoopbackClientParser,
    LoopbackConnection,
    LoopbackNetwork,
    LoopbackServerEndpoint,
    LoopbackServerParser,
    LoopbackTransport,
    network_for,
)

# --- helpers -------------------------------------------------------------------------


class Recorder(Protocol):
    """Remembers everything that happens to it."""

    def __init__(self) -> None:
        self.made = 0
        self.received: list[bytes] = []
        self.lost: list[Failure] = []

    def connectionMade(self) -> None:
        self.made += 1

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.append(reason)

    @property
    def data(self) -> bytes:
        return b"".join(self.received)

    @property
    def tr(self) -> LoopbackTransport:
        transport: object = self.transport
        assert isinstance(transport, LoopbackTransport)
        return transport


class Capture(Factory):
    """A factory that keeps the protocols it built (or builds none)."""

    def __init__(self, refuse: bool = False) -> None:
        self.built: list[Recorder] = []
        self.refuse = refuse
        self.starts = 0
        self.stops = 0

    def startFactory(self) -> None:
        self.starts += 1

    def stopFactory(self) -> None:
        self.stops += 1

    def buildProtocol(self, addr: Any) -> Recorder | None:
        if self.refuse:
            return None
        proto = Recorder()
        proto.factory = self
        self.built.append(proto)
        return proto


def result_of(d: Deferred[Any]) -> Any:
    """The result a Deferred has already fired with (raises if it failed or is pending)."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def failure_of(d: Deferred[Any], *types: type[BaseException]) -> Failure:
    """The Failure a Deferred has already failed with; checks its type."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    assert isinstance(box[0], Failure), f"expected a failure, got {box[0]!r}"
    assert box[0].check(*types), box[0]
    return box[0]


def is_pending(d: Deferred[Any]) -> bool:
    return not d.called


class Pair:
    """A server and a client Recorder connected over loopback:NAME on a Clock."""

    def __init__(self, clock: Clock, name: str = "svc") -> None:
        self.clock = clock
        self.server_factory = Capture()
        self.port = result_of(LoopbackServerEndpoint(clock, name).listen(self.server_factory))
        self.client_factory = Capture()
        d = LoopbackClientEndpoint(clock, name).connect(self.client_factory)
        clock.advance(0)
        self.client: Recorder = result_of(d)
        self.server: Recorder = self.server_factory.built[0]
        self.connection: LoopbackConnection = self.client.tr.connection


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pair(clock: Clock) -> Pair:
    return Pair(clock)


# --- interfaces ----------------------------------------------------------------------


def test_objects_provide_their_interfaces(pair: Pair) -> None:
    assert verifyObject(IStreamServerEndpoint, LoopbackServerEndpoint(pair.clock, "x"))
    assert verifyObject(IStreamClientEndpoint, LoopbackClientEndpoint(pair.clock, "x"))
    assert verifyObject(IListeningPort, pair.port)
    for transport in (pair.client.tr, pair.server.tr):
        assert verifyObject(ITransport, transport)
        assert verifyObject(IConsumer, transport)
        assert verifyObject(IPushProducer, transport)
        assert verifyObject(ILoggingContext, transport)
    assert verifyObject(IAddress, pair.server.tr.getHost())
    assert verifyObject(IPlugin, LoopbackServerParser())
    assert verifyObject(IStreamServerEndpointStringParser, LoopbackServerParser())
    assert verifyObject(IPlugin, LoopbackClientParser())
    assert verifyObject(IStreamClientEndpointStringParserWithReactor, LoopbackClientParser())
    assert LoopbackServerParser().prefix == LoopbackClientParser().prefix == "loopback"


def test_addresses(pair: Pair) -> None:
    cid = pair.connection.connection_id
    assert cid > 0
    assert pair.server.tr.getHost() == LoopbackAddress("svc", "server", cid)
    assert pair.server.tr.getPeer() == LoopbackAddress("svc", "client", cid)
    assert pair.client.tr.getHost() == pair.server.tr.getPeer()
    assert pair.client.tr.getPeer() == pair.server.tr.getHost()
    assert pair.port.getHost() == LoopbackAddress("svc", "server", 0)
    with pytest.raises(AttributeError):
        pair.port.getHost().name = "other"


def test_tcp_option_flags(pair: Pair) -> None:
    transport = pair.client.tr
    assert transport.getTcpNoDelay() is False
    transport.setTcpNoDelay(True)
    assert transport.getTcpNoDelay() is True
    assert transport.getTcpKeepAlive() is False
    transport.setTcpKeepAlive(True)
    assert transport.getTcpKeepAlive() is True
    assert pair.server.tr.getTcpNoDelay() is False


# --- network registry ----------------------------------------------------------------


def test_one_network_per_reactor() -> None:
    first, second = Clock(), MemoryReactorClock()
    assert network_for(first) is network_for(first)
    assert network_for(first) is not network_for(second)
    result_of(LoopbackServerEndpoint(first, "only-here").listen(Capture()))
    assert network_for(first).listening("only-here")
    assert not network_for(second).listening("only-here")
    d = LoopbackClientEndpoint(second, "only-here").connect(Capture())
    second.advance(0)
    failure_of(d, error.ConnectionRefusedError)


def test_network_is_forgotten_with_its_reactor() -> None:
    reactor = Clock()
    network = weakref.ref(network_for(reactor))
    assert network() is not None
    del reactor
    gc.collect()
    assert network() is None


def test_explicit_network_is_used(clock: Clock) -> None:
    private = LoopbackNetwork()
    result_of(LoopbackServerEndpoint(clock, "hidden", network=private).listen(Capture()))
    assert private.listening("hidden")
    assert not network_for(clock).listening("hidden")
    d = LoopbackClientEndpoint(clock, "hidden", network=private).connect(Capture())
    clock.advance(0)
    assert isinstance(result_of(d), Recorder)
    assert len(private.connections) == 1
    assert network_for(clock).connections == ()


# --- connect / listen ----------------------------------------------------------------


def test_connect_is_asynchronous(clock: Clock) -> None:
    server_factory, client_factory = Capture(), Capture()
    result_of(LoopbackServerEndpoint(clock, "svc").listen(server_factory))
    d = LoopbackClientEndpoint(clock, "svc").connect(client_factory)
    assert is_pending(d)
    assert server_factory.built == [] and client_factory.built == []
    clock.advance(0)
    client = result_of(d)
    assert client is client_factory.built[0]
    (server,) = server_factory.built
    assert (server.made, client.made) == (1, 1)
    assert server.tr.connection is client.tr.connection
    assert network_for(clock).connections == (client.tr.connection,)
    assert network_for(clock).connections_to("svc") == (client.tr.connection,)
    assert network_for(clock).connections_to("other") == ()
    assert server.tr.connected and client.tr.connected


def test_connect_without_listener_is_refused(clock: Clock) -> None:
    d = LoopbackClientEndpoint(clock, "nobody").connect(Capture())
    assert is_pending(d)
    clock.advance(0)
    failure = failure_of(d, error.ConnectionRefusedError)
    assert "nobody" in str(failure.value)


def test_network_refuse_and_unrefuse(clock: Clock) -> None:
    server_factory = Capture()
    result_of(LoopbackServerEndpoint(clock, "svc").listen(server_factory))
    network = network_for(clock)
    network.refuse("svc")
    assert network.is_refused("svc")
    d = LoopbackClientEndpoint(clock, "svc").connect(Capture())
    clock.advance(0)
    failure_of(d, error.ConnectionRefusedError)
    assert server_factory.built == []
    network.refuse("svc", False)
    d = LoopbackClientEndpoint(clock, "svc").connect(Capture())
    clock.advance(0)
    assert isinstance(result_of(d), Recorder)


def test_server_factory_building_no_protocol_refuses(clock: Clock) -> None:
    result_of(LoopbackServerEndpoint(clock, "svc").listen(Capture(refuse=True)))
    d = LoopbackClientEndpoint(clock, "svc").connect(Capture())
    clock.advance(0)
    failure_of(d, error.ConnectionRefusedError)
    assert network_for(clock).connections == ()


def test_client_factory_building_no_protocol_fails(clock: Clock) -> None:
    server_factory = Capture()
    result_of(LoopbackServerEndpoint(clock, "svc").listen(server_factory))
    d = LoopbackClientEndpoint(clock, "svc").connect(Capture(refuse=True))
    clock.advance(0)
    failure_of(d, error.NoProtocol)
    assert network_for(clock).connections == ()
    assert all(p.made == 0 for p in server_factory.built)


def test_cancel_before_the_attempt(clock: Clock) -> None:
    server_factory = Capture()
    result_of(LoopbackServerEndpoint(clock, "svc").listen(server_factory))
    d = LoopbackClientEndpoint(clock, "svc").connect(Capture())
    d.cancel()
    failure_of(d, CancelledError)
    clock.advance(0)
    assert server_factory.built == []
    assert clock.getDelayedCalls() == []


def test_name_in_use(clock: Clock) -> None:
    result_of(LoopbackServerEndpoint(clock, "svc").listen(Capture()))
    failure = failure_of(
        LoopbackServerEndpoint(clock, "svc").listen(Capture()), error.CannotListenError
    )
    assert "svc" in str(failure.value)


def test_stop_listening_frees_the_name_and_keeps_connections(pair: Pair) -> None:
    clock, network = pair.clock, network_for(pair.clock)
    assert network.listening("svc")
    assert pair.server_factory.starts == 1
    result_of(pair.port.stopListening())
    assert not network.listening("svc")
    assert pair.server_factory.stops == 1
    result_of(pair.port.stopListening())  # idempotent
    assert pair.server_factory.stops == 1
    d = LoopbackClientEndpoint(clock, "svc").connect(Capture())
    clock.advance(0)
    failure_of(d, error.ConnectionRefusedError)
    pair.client.tr.write(b"still up")
    clock.advance(0)
    assert pair.server.data == b"still up"
    assert pair.connection in network.connections
    result_of(LoopbackServerEndpoint(clock, "svc").listen(Capture()))
    assert network.listening("svc")


def test_client_factory_started_and_stopped(pair: Pair) -> None:
    assert (pair.client_factory.starts, pair.client_factory.stops) == (1, 0)
    pair.client.tr.loseConnection()
    pair.clock.advance(0)
    assert (pair.client_factory.starts, pair.client_factory.stops) == (1, 1)


@pytest.mark.parametrize("name", ["", "a:b"])
def test_bad_names(clock: Clock, name: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        LoopbackServerEndpoint(clock, name)
    with pytest.raises(ValueError, match="loopback"):
        LoopbackClientEndpoint(clock, name)


# --- delivery ------------------------------------------------------------------------


def test_delivery_is_asynchronous_and_joined(pair: Pair) -> None:
    pair.client.tr.write(b"a")
    pair.client.tr.write(b"")
    pair.client.tr.write(b"bc")
    pair.client.tr.writeSequence([b"d", b"ef"])
    assert pair.server.received == []
    assert pair.client.tr.unsent == 6
    pair.clock.advance(0)
    assert pair.server.received == [b"abcdef"]
    assert pair.client.tr.unsent == 0
    assert pair.client.received == []


def test_both_directions_and_order(pair: Pair) -> None:
    for i in range(5):
        pair.client.tr.write(b"c%d," % i)
        pair.server.tr.write(b"s%d," % i)
        if i % 2:
            pair.clock.advance(0)
    pair.clock.advance(0)
    assert pair.server.data == b"c0,c1,c2,c3,c4,"
    assert pair.client.data == b"s0,s1,s2,s3,s4,"
    assert len(pair.server.received) == 3


def test_write_requires_bytes(pair: Pair) -> None:
    with pytest.raises(TypeError):
        pair.client.tr.write("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        pair.client.tr.writeSequence([b"ok", "text"])  # type: ignore[list-item]
    pair.clock.advance(0)
    assert pair.server.received == []


def test_reply_written_inside_data_received_arrives_later(pair: Pair) -> None:
    def echo(data: bytes) -> None:
        pair.server.received.append(data)
        pair.server.tr.write(data.upper())

    pair.server.dataReceived = echo  # type: ignore[method-assign]
    pair.client.tr.write(b"ping")
    pair.clock.advance(0)
    assert pair.server.received == [b"ping"]
    assert pair.client.received == [b"PING"]


# --- closing -------------------------------------------------------------------------


def test_lose_connection_flushes_then_both_see_connection_done_once(pair: Pair) -> None:
    pair.client.tr.write(b"last words")
    pair.client.tr.loseConnection()
    assert pair.client.tr.disconnecting
    pair.client.tr.write(b"ignored")
    pair.client.tr.loseConnection()
    assert pair.client.tr.unsent == len(b"last words")
    assert pair.server.lost == [] and pair.client.lost == []
    pair.clock.advance(0)
    assert pair.server.data == b"last words"
    assert len(pair.server.lost) == 1 and len(pair.client.lost) == 1
    assert pair.server.lost[0].check(error.ConnectionDone)
    assert pair.client.lost[0].check(error.ConnectionDone)
    assert network_for(pair.clock).connections == ()
    pair.server.tr.loseConnection()
    pair.client.tr.abortConnection()
    pair.connection.cut()
    pair.clock.advance(10)
    assert len(pair.server.lost) == 1 and len(pair.client.lost) == 1
    assert not pair.client.tr.connected and pair.client.tr.disconnected


def test_lose_connection_stops_reading_on_that_side(pair: Pair) -> None:
    pair.server.tr.write(b"reply nobody reads")
    pair.client.tr.loseConnection()
    pair.clock.advance(0)
    assert pair.client.received == []
    assert pair.client.lost[0].check(error.ConnectionDone)


def test_both_sides_lose_connection_with_data_in_flight(pair: Pair) -> None:
    pair.client.tr.write(b"c")
    pair.server.tr.write(b"s")
    pair.client.tr.loseConnection()
    pair.server.tr.loseConnection()
    pair.clock.advance(0)
    assert len(pair.server.lost) == 1 and len(pair.client.lost) == 1


def test_abort_connection(pair: Pair) -> None:
    pair.client.tr.write(b"discarded")
    pair.server.tr.write(b"discarded too")
    pair.client.tr.abortConnection()
    pair.client.tr.write(b"ignored")
    assert pair.server.lost == [] and pair.client.lost == []
    pair.clock.advance(0)
    assert pair.server.received == [] and pair.client.received == []
    assert len(pair.server.lost) == 1 and len(pair.client.lost) == 1
    assert pair.client.lost[0].check(error.ConnectionAborted)
    assert pair.server.lost[0].check(error.ConnectionLost)
    assert not pair.server.lost[0].check(error.ConnectionDone)
    assert network_for(pair.clock).connections == ()


def test_abort_after_lose_connection_discards_the_rest(pair: Pair) -> None:
    pair.connection.delay = 1.0
    pair.client.tr.write(b"slow")
    pair.client.tr.loseConnection()
    pair.client.tr.abortConnection()
    pair.clock.advance(2)
    assert pair.server.received == []
    assert pair.server.lost[0].check(error.ConnectionLost)
    assert len(pair.client.lost) == 1


def test_exception_in_data_received_drops_the_connection(pair: Pair) -> None:
    def boom(data: bytes) -> None:
        raise RuntimeError("bad protocol")

    pair.server.dataReceived = boom  # type: ignore[method-assign]
    pair.client.tr.write(b"x")
    pair.clock.advance(0)
    assert pair.server.lost[0].check(RuntimeError)
    assert pair.client.lost[0].check(error.ConnectionLost)


# --- fault hooks ---------------------------------------------------------------------


def test_cut_loses_buffered_data_and_both_see_connection_lost(pair: Pair) -> None:
    pair.client.tr.write(b"never arrives")
    pair.server.tr.write(b"nor this")
    pair.connection.cut()
    assert pair.connection.closed
    assert network_for(pair.clock).connections == ()
    pair.client.tr.write(b"into the void")
    assert pair.server.lost == []
    pair.clock.advance(0)
    assert pair.server.received == [] and pair.client.received == []
    for proto in (pair.server, pair.client):
        assert len(proto.lost) == 1
        assert proto.lost[0].check(error.ConnectionLost)
        assert "cut" in str(proto.lost[0].value)


def test_cut_all(clock: Clock) -> None:
    first, second = Pair(clock, "one"), Pair(clock, "two")
    assert network_for(clock).cut_all("network down") == 2
    clock.advance(0)
    for proto in (first.server, first.client, second.server, second.client):
        assert proto.lost[0].check(error.ConnectionLost)
        assert "network down" in str(proto.lost[0].value)
    assert network_for(clock).cut_all() == 0


def test_pause_and_resume_keep_data(pair: Pair) -> None:
    pair.connection.pause()
    pair.client.tr.write(b"one,")
    pair.server.tr.write(b"back,")
    pair.clock.advance(100)
    pair.client.tr.write(b"two")
    pair.clock.advance(100)
    assert pair.server.received == [] and pair.client.received == []
    assert pair.client.tr.unsent == 7
    pair.connection.resume()
    assert pair.server.received == []
    pair.clock.advance(0)
    assert pair.server.received == [b"one,two"]
    assert pair.client.received == [b"back,"]


def test_pause_holds_a_close_too(pair: Pair) -> None:
    pair.connection.pause()
    pair.client.tr.write(b"bye")
    pair.client.tr.loseConnection()
    pair.clock.advance(5)
    assert pair.server.lost == []
    pair.connection.resume()
    pair.clock.advance(0)
    assert pair.server.data == b"bye"
    assert pair.server.lost[0].check(error.ConnectionDone)


def test_delay(pair: Pair) -> None:
    pair.connection.delay = 2.0
    pair.client.tr.write(b"a")
    pair.clock.advance(1.0)
    pair.client.tr.write(b"b")
    pair.clock.advance(0.9)
    assert pair.server.received == []
    pair.clock.advance(0.1)
    assert pair.server.received == [b"a"]
    pair.clock.advance(0.9)
    assert pair.server.received == [b"a"]
    pair.clock.advance(0.1)
    assert pair.server.received == [b"a", b"b"]


def test_delay_never_reorders(pair: Pair) -> None:
    pair.connection.set_delay(5)
    pair.client.tr.write(b"slow,")
    pair.connection.set_delay(0)
    pair.client.tr.write(b"fast")
    pair.clock.advance(4)
    assert pair.server.received == []
    pair.clock.advance(1)
    assert pair.server.received == [b"slow,fast"]


def test_delay_applies_to_the_close(pair: Pair) -> None:
    pair.connection.delay = 3
    pair.client.tr.write(b"x")
    pair.client.tr.loseConnection()
    pair.clock.advance(2.5)
    assert pair.server.lost == [] and pair.server.received == []
    pair.clock.advance(0.5)
    assert pair.server.received == [b"x"]
    assert pair.server.lost[0].check(error.ConnectionDone)


def test_negative_delay_rejected(pair: Pair) -> None:
    with pytest.raises(ValueError):
        pair.connection.delay = -1


# --- the transport as a producer (reading side) --------------------------------------


def test_transport_pause_producing_stops_delivery_to_that_side(pair: Pair) -> None:
    pair.server.tr.pauseProducing()
    pair.client.tr.write(b"waits")
    pair.server.tr.write(b"flows")
    pair.clock.advance(10)
    assert pair.server.received == []
    assert pair.client.received == [b"flows"]
    pair.client.tr.write(b" more")
    pair.server.tr.resumeProducing()
    pair.clock.advance(0)
    assert pair.server.received == [b"waits more"]


def test_pause_producing_inside_data_received(pair: Pair) -> None:
    def slow_reader(data: bytes) -> None:
        pair.server.received.append(data)
        pair.server.tr.pauseProducing()

    pair.server.dataReceived = slow_reader  # type: ignore[method-assign]
    pair.client.tr.write(b"first")
    pair.clock.advance(0)
    pair.client.tr.write(b"second")
    pair.clock.advance(0)
    assert pair.server.received == [b"first"]
    pair.server.tr.resumeProducing()
    pair.clock.advance(0)
    assert pair.server.received == [b"first", b"second"]


def test_reader_pausing_inside_data_received_holds_the_close(pair: Pair) -> None:
    def slow_reader(data: bytes) -> None:
        pair.server.received.append(data)
        pair.server.tr.pauseProducing()

    pair.server.dataReceived = slow_reader  # type: ignore[method-assign]
    pair.client.tr.write(b"bye")
    pair.client.tr.loseConnection()
    pair.clock.advance(1)
    assert pair.server.received == [b"bye"]
    assert pair.server.lost == [] and pair.client.lost == []
    pair.server.tr.resumeProducing()
    pair.clock.advance(0)
    assert pair.server.lost[0].check(error.ConnectionDone)
    assert pair.client.lost[0].check(error.ConnectionDone)


def test_close_waits_for_a_paused_reader(pair: Pair) -> None:
    pair.server.tr.pauseProducing()
    pair.client.tr.write(b"bye")
    pair.client.tr.loseConnection()
    pair.clock.advance(1)
    assert pair.server.lost == [] and pair.client.lost == []
    pair.server.tr.resumeProducing()
    pair.clock.advance(0)
    assert pair.server.data == b"bye"
    assert pair.server.lost[0].check(error.ConnectionDone)
    assert pair.client.lost[0].check(error.ConnectionDone)


def test_stop_producing_is_lose_connection(pair: Pair) -> None:
    pair.client.tr.write(b"x")
    pair.client.tr.stopProducing()
    pair.clock.advance(0)
    assert pair.server.data == b"x"
    assert pair.server.lost[0].check(error.ConnectionDone)


# --- flow control (the transport as a consumer) --------------------------------------


@implementer(IPushProducer)
class PushProducer:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


def test_streaming_producer_paused_at_high_water(pair: Pair) -> None:
    producer = PushProducer()
    transport = pair.client.tr
    assert transport.high_water == DEFAULT_HIGH_WATER == 64 * 1024
    transport.registerProducer(producer, True)
    registered: object = transport.producer
    assert registered is producer
    transport.write(b"x" * DEFAULT_HIGH_WATER)
    assert producer.events == []
    transport.write(b"y")
    assert producer.events == ["pause"]
    transport.write(b"z")
    assert producer.events == ["pause"]
    pair.clock.advance(0)
    assert producer.events == ["pause", "resume"]
    assert len(pair.server.data) == DEFAULT_HIGH_WATER + 2
    transport.write(b"small")
    pair.clock.advance(0)
    assert producer.events == ["pause", "resume"]


def test_high_water_counts_data_held_by_a_paused_reader(pair: Pair) -> None:
    producer = PushProducer()
    transport = pair.client.tr
    transport.high_water = 10
    transport.registerProducer(producer, True)
    pair.server.tr.pauseProducing()
    transport.write(b"123456")
    pair.clock.advance(1)
    assert producer.events == []
    transport.write(b"789012")
    assert transport.unsent == 12
    assert producer.events == ["pause"]
    pair.clock.advance(1)
    assert producer.events == ["pause"]
    pair.server.tr.resumeProducing()
    pair.clock.advance(0)
    assert producer.events == ["pause", "resume"]
    assert pair.server.data == b"123456789012"


def test_pull_producer_asked_for_more_when_buffer_empties(pair: Pair) -> None:
    transport = pair.client.tr

    @implementer(IPullProducer)
    class Pull:
        def __init__(self) -> None:
            self.calls = 0

        def resumeProducing(self) -> None:
            self.calls += 1
            if self.calls <= 3:
                transport.write(b"chunk%d;" % self.calls)
            else:
                transport.unregisterProducer()

        def stopProducing(self) -> None:
            raise AssertionError("not expected")

    pull = Pull()
    transport.registerProducer(pull, False)
    assert pull.calls == 1
    pair.clock.advance(0)
    assert pull.calls == 4
    assert transport.producer is None
    assert pair.server.data == b"chunk1;chunk2;chunk3;"


def test_second_producer_is_an_error(pair: Pair) -> None:
    pair.client.tr.registerProducer(PushProducer(), True)
    with pytest.raises(RuntimeError):
        pair.client.tr.registerProducer(PushProducer(), True)
    pair.client.tr.unregisterProducer()
    pair.client.tr.registerProducer(PushProducer(), True)


def test_producer_stopped_when_the_connection_goes(pair: Pair) -> None:
    producer = PushProducer()
    pair.client.tr.registerProducer(producer, True)
    pair.connection.cut()
    pair.clock.advance(0)
    assert producer.events == ["stop"]
    assert pair.client.tr.producer is None
    late = PushProducer()
    pair.client.tr.registerProducer(late, True)
    assert late.events == ["stop"]


# --- endpoint strings ----------------------------------------------------------------


@pytest.mark.parametrize("reactor_type", [Clock, MemoryReactorClock])
def test_endpoint_strings(reactor_type: type[Clock]) -> None:
    reactor = reactor_type()
    server = serverFromString(reactor, "loopback:master")
    client = clientFromString(reactor, "loopback:master")
    assert isinstance(server, LoopbackServerEndpoint) and server.name == "master"
    assert isinstance(client, LoopbackClientEndpoint) and client.name == "master"
    server_factory = Capture()
    result_of(server.listen(server_factory))
    d = client.connect(Capture())
    reactor.advance(0)
    proto = result_of(d)
    proto.transport.write(b"hello")
    reactor.advance(0)
    assert server_factory.built[0].data == b"hello"


@pytest.mark.parametrize(
    ("description", "message"),
    [
        ("loopback", "non-empty name"),
        ("loopback:", "non-empty name"),
        ("loopback:a:b", "must not contain ':'"),
        ("loopback:a=b", "no options"),
    ],
)
def test_bad_endpoint_strings(clock: Clock, description: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        serverFromString(clock, description)
    with pytest.raises(ValueError, match=message):
        clientFromString(clock, description)


def test_parsers_need_a_clock() -> None:
    with pytest.raises(TypeError):
        LoopbackServerParser().parseStreamServer(object(), "x")  # type: ignore[arg-type]


def test_module_does_not_import_the_global_reactor() -> None:
    with open(loopback.__file__, encoding="utf-8") as f:
        source = f.read()
    assert "import reactor" not in source
    assert "skyproto." not in source.replace("skyproto.errors", "")


# --- the documented example ----------------------------------------------------------


def test_docs_loopback_example_runs() -> None:
    """The Clock-driven example in docs/transports.md works as printed."""
    doc = Path(__file__).resolve().parent.parent / "docs" / "transports.md"
    text = doc.read_text(encoding="utf-8")
    marker = "<!-- example: loopback-test -->"
    assert text.count(marker) == 1
    match = re.search(r"```python\n(.*?)```", text[text.index(marker) :], re.DOTALL)
    assert match is not None
    namespace: dict[str, Any] = {"__name__": "loopback_doc_example"}
    exec(compile(match.group(1), str(doc), "exec"), namespace)
    assert namespace["client"].received == b"pingslow"
