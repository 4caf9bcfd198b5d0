"""The ``loopback:NAME`` endpoint: an in-process, in-memory stream transport.

Tests and single-process clusters use it wherever a ``tcp:`` or ``unix:`` endpoint
string would go.  It behaves like a socket in the ways that matter to protocols:
connection setup and every delivery happen later, through the injected reactor
(never inside ``connect()`` or ``write()``), order is preserved, ``loseConnection``
flushes first, and a registered producer is paused at a high-water mark.  Each
connection also carries fault hooks (``cut``, ``pause``/``resume``, ``delay``) and the
per-reactor :class:`LoopbackNetwork` can refuse names or cut everything.

Listeners live in one :class:`LoopbackNetwork` per reactor object (see
:func:`network_for`), so a ``Clock`` in one test never sees another test's names.
This module imports only Twisted, zope.interface, attrs and the standard library,
and never the global reactor.
"""

from __future__ import annotations

import itertools
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Final, Literal, cast

import attrs
from twisted.internet import error
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IDelayedCall,
    IListeningPort,
    ILoggingContext,
    IProducer,
    IProtocol,
    IProtocolFactory,
    IPullProducer,
    IPushProducer,
    IReactorCore,
    IReactorTime,
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
    ITransport,
)
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "DEFAULT_HIGH_WATER",
    "LoopbackAddress",
    "LoopbackClientEndpoint",
    "LoopbackClientParser",
    "LoopbackConnection",
    "LoopbackNetwork",
    "LoopbackPort",
    "LoopbackServerEndpoint",
    "LoopbackServerParser",
    "LoopbackTransport",
    "network_for",
]

DEFAULT_HIGH_WATER: Final = 64 * 1024
"""Unsent bytes above which a registered streaming producer is paused (as Twisted's TCP)."""

Side = Literal["server", "client"]

_log = Logger()


def _failure(exception: BaseException | None = None) -> Failure:
    """A Failure of ``exception``, or of the exception being handled (typed wrapper)."""
    return Failure(exception)


def _check_name(name: object) -> str:
    """Return ``name`` if it is a usable loopback name, else raise ``ValueError``."""
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"a loopback endpoint needs a non-empty name, as in 'loopback:master' (got {name!r})"
        )
    if ":" in name:
        raise ValueError(f"a loopback endpoint name must not contain ':' (got {name!r})")
    return name


@implementer(IAddress)
@attrs.frozen
class LoopbackAddress:
    """The address of one end of a loopback connection (or of a listener).

    ``connection_id`` is unique per :class:`LoopbackNetwork`; a listening port's own
    address (``LoopbackPort.getHost()``) has ``connection_id`` 0.
    """

    name: str
    side: Side
    connection_id: int


class LoopbackNetwork:
    """The registry of loopback listeners and live connections for one reactor.

    Tests use it to find connections (``connections``, ``connections_to``) and to
    inject faults that are not tied to one connection (``refuse``, ``cut_all``).
    """

    def __init__(self) -> None:
        self._listeners: dict[str, LoopbackPort] = {}
        self._refused: set[str] = set()
        self._connections: dict[LoopbackConnection, None] = {}  # oldest first
        self._ids = itertools.count(1)
        # Pipes with bytes due now, flushed by one reactor call (not one call each: a
        # process with thousands of connections would keep the reactor's heap that big).
        self._ready: list[_Pipe] = []
        self._ready_call: IDelayedCall | None = None

    @property
    def connections(self) -> tuple[LoopbackConnection, ...]:
        """The live connections, oldest first (a snapshot: safe to cut while iterating)."""
        return tuple(self._connections)

    def connections_to(self, name: str) -> tuple[LoopbackConnection, ...]:
        """The live connections that were made to the listener called ``name``."""
        return tuple(c for c in self._connections if c.name == name)

    def listening(self, name: str) -> bool:
        """Whether a port is listening on ``name`` right now."""
        return name in self._listeners

    def refuse(self, name: str, refused: bool = True) -> None:
        """Make new connects to ``name`` fail with ``ConnectionRefusedError`` (or stop that).

        Existing connections and the listener itself are not touched.
        """
        if refused:
            self._refused.add(name)
        else:
            self._refused.discard(name)

    def is_refused(self, name: str) -> bool:
        """Whether :meth:`refuse` is in force for ``name``."""
        return name in self._refused

    def cut_all(self, reason: str = "cut") -> int:
        """Cut every live connection (see :meth:`LoopbackConnection.cut`); return how many."""
        live = self.connections
        for connection in live:
            connection.cut(reason)
        return len(live)

    def _next_id(self) -> int:
        return next(self._ids)

    def _add(self, connection: LoopbackConnection) -> None:
        self._connections[connection] = None

    def _forget(self, connection: LoopbackConnection) -> None:
        self._connections.pop(connection, None)

    def _flush_soon(self, pipe: _Pipe, reactor: IReactorTime) -> None:
        self._ready.append(pipe)
        if self._ready_call is None:
            self._ready_call = reactor.callLater(0, self._flush_ready)

    def _flush_ready(self) -> None:
        self._ready_call = None
        ready, self._ready = self._ready, []
        for pipe in ready:
            if pipe._call is _DUE_NOW:  # else discarded (or flushed) since
                pipe._call = None
                _guarded("a loopback delivery", pipe.flush_due)


_networks: weakref.WeakKeyDictionary[IReactorTime, LoopbackNetwork] = weakref.WeakKeyDictionary()


def network_for(reactor: IReactorTime) -> LoopbackNetwork:
    """The :class:`LoopbackNetwork` of ``reactor``, created on first use.

    Keyed weakly by the reactor object, so each ``Clock`` in a test gets a fresh one.
    """
    network = _networks.get(reactor)
    if network is None:
        network = _networks[reactor] = LoopbackNetwork()
    return network


#: a pipe's pending flush when it is on its network's ready list
_DUE_NOW: Final = cast(IDelayedCall, object())


class _Pipe:
    """One direction of a connection: bytes written on ``source``, delivered to ``sink``.

    Chunks carry a due time (write time + the connection's delay, never earlier than the
    chunk before, so order holds); ``None`` marks the writer's loseConnection.  A flush
    delivers every due chunk as one ``dataReceived``.  Delivery stalls while the
    connection is paused or the sink has paused reading; data for a sink that has called
    loseConnection (and so stopped reading, as in Twisted's TCP) is dropped.
    """

    def __init__(
        self, connection: LoopbackConnection, source: LoopbackTransport, sink: LoopbackTransport
    ) -> None:
        self._connection = connection
        self.source = source
        self.sink = sink
        self._chunks: deque[tuple[float, bytes | None]] = deque()
        self._last_due = float("-inf")
        self._call: IDelayedCall | None = None
        self.queued = 0

    def push(self, data: bytes | None) -> None:
        """Queue ``data`` (or the end-of-stream marker) and make sure a flush is coming."""
        due = max(self._connection.reactor.seconds() + self._connection.delay, self._last_due)
        self._last_due = due
        self._chunks.append((due, data))
        if data is not None:
            self.queued += len(data)
        self.schedule()

    def can_flow(self) -> bool:
        connection = self._connection
        if connection.closed or connection.paused:
            return False
        return self.sink.disconnecting or not self.sink.reading_paused

    def schedule(self) -> None:
        """Schedule a flush for the first queued chunk, unless one is pending or stalled."""
        if self._call is not None or not self._chunks or not self.can_flow():
            return
        target = self._chunks[0][0]
        reactor = self._connection.reactor
        wait = target - reactor.seconds()
        if wait <= 0:
            self._call = _DUE_NOW
            self._connection.network._flush_soon(self, reactor)
        else:
            self._call = reactor.callLater(wait, self._flush, target)

    def discard(self) -> None:
        """Forget everything queued and any pending flush (the connection is gone)."""
        if self._call is not None and self._call is not _DUE_NOW and self._call.active():
            self._call.cancel()
        self._call = None
        self._chunks.clear()
        self.queued = 0

    def flush_due(self) -> None:
        """Deliver what is due by now (the network's ready list)."""
        self._flush(float("-inf"))

    def _flush(self, target: float) -> None:
        self._call = None
        if not self.can_flow():
            return
        # ``target`` is the due time this call was scheduled for: treat it as reached even
        # if float rounding makes the clock read a hair earlier.
        limit = max(target, self._connection.reactor.seconds())
        parts: list[bytes] = []
        while self._chunks and self._chunks[0][0] <= limit:
            chunk = self._chunks[0][1]
            if chunk is None:
                break
            self._chunks.popleft()
            parts.append(chunk)
        if parts:
            data = b"".join(parts)
            self.queued -= len(data)
            if not self.sink.disconnecting:
                self._connection._deliver(self.sink, data)
            if self._connection.closed:
                return
            self.source._drained()
        if self._connection.closed:
            return
        if (
            self._chunks
            and self._chunks[0][1] is None
            and self._chunks[0][0] <= limit
            and self.can_flow()
        ):
            self._chunks.popleft()
            self._connection._close_done()
            return
        self.schedule()


@implementer(ITransport, IConsumer, IPushProducer, ILoggingContext)
class LoopbackTransport:
    """One side of a :class:`LoopbackConnection`, handed to that side's protocol.

    Provides what protocols commonly call on a TCP transport.  ``pauseProducing`` stops
    delivery *to* this side (as a TCP transport stops reading); ``registerProducer``
    pauses a streaming producer while more than ``high_water`` bytes written here are
    still undelivered.
    """

    high_water: int = DEFAULT_HIGH_WATER

    def __init__(self, connection: LoopbackConnection, side: Side, protocol: IProtocol) -> None:
        self.connection = connection
        self.side: Side = side
        self.protocol = protocol
        self.connected = False
        self.disconnecting = False
        self.disconnected = False
        self.reading_paused = False
        self._tcp_no_delay = False
        self._tcp_keep_alive = False
        self._producer: IProducer | None = None
        self._streaming = False
        self._producer_paused = False
        self._lost_notified = False

    def __repr__(self) -> str:
        return (
            f"<LoopbackTransport {self.side} of loopback:{self.connection.name}"
            f" #{self.connection.connection_id}>"
        )

    @property
    def _out(self) -> _Pipe:
        return self.connection._pipe_from(self.side)

    @property
    def _in(self) -> _Pipe:
        return self.connection._pipe_to(self.side)

    @property
    def producer(self) -> IProducer | None:
        """The registered producer, if any."""
        return self._producer

    @property
    def unsent(self) -> int:
        """Bytes written here and not yet delivered to the peer (the flow-control measure)."""
        return self._out.queued

    # ITransport

    def write(self, data: bytes) -> None:
        """Queue ``data`` for the peer; it arrives later, through the reactor."""
        if not isinstance(data, bytes):
            raise TypeError(f"Data must be bytes, not {type(data).__name__}")
        if not self._writable() or not data:
            return
        self._out.push(data)
        self._maybe_pause_producer()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        """Queue the concatenation of ``data`` (every element must be bytes)."""
        chunks = list(data)
        for chunk in chunks:
            if not isinstance(chunk, bytes):
                raise TypeError(f"Data must be bytes, not {type(chunk).__name__}")
        self.write(b"".join(chunks))

    def loseConnection(self) -> None:
        """Close after everything written so far is delivered; stop reading at once.

        Both sides then get ``connectionLost(ConnectionDone)``.  Later writes are ignored.
        """
        if self.disconnecting or self.connection.closed:
            return
        self.disconnecting = True
        self._out.push(None)
        # We stopped reading: what the peer sends us from now on is dropped, not stalled.
        self._in.schedule()

    def abortConnection(self) -> None:
        """Close at once, discarding undelivered data in both directions.

        This side gets ``ConnectionAborted`` (a ``ConnectionLost``), the peer
        ``ConnectionLost``, both later, through the reactor.
        """
        if self.connection.closed:
            return
        self.disconnecting = True
        aborted = _failure(error.ConnectionAborted())
        lost = _failure(error.ConnectionLost("the peer aborted the connection"))
        if self.side == "server":
            self.connection._close(aborted, lost)
        else:
            self.connection._close(lost, aborted)

    def getHost(self) -> LoopbackAddress:
        """This side's address."""
        return LoopbackAddress(self.connection.name, self.side, self.connection.connection_id)

    def getPeer(self) -> LoopbackAddress:
        """The other side's address."""
        other: Side = "client" if self.side == "server" else "server"
        return LoopbackAddress(self.connection.name, other, self.connection.connection_id)

    # IConsumer

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        """Register ``producer`` (push if ``streaming``, else pull), as Twisted's TCP does."""
        if self._producer is not None:
            raise RuntimeError(
                f"Cannot register producer {producer!r}, because producer "
                f"{self._producer!r} was never unregistered."
            )
        if self.disconnected:
            producer.stopProducing()
            return
        self._producer = producer
        self._streaming = streaming
        self._producer_paused = False
        if not streaming:
            cast(IPullProducer, producer).resumeProducing()

    def unregisterProducer(self) -> None:
        """Forget the producer, without disconnecting."""
        self._producer = None
        self._streaming = False
        self._producer_paused = False

    # IPushProducer: this transport as the producer of data for its own protocol.

    def pauseProducing(self) -> None:
        """Stop delivering data to this side's protocol; it queues (nothing is lost)."""
        self.reading_paused = True

    def resumeProducing(self) -> None:
        """Deliver data to this side's protocol again (later, through the reactor)."""
        if self.disconnected:
            return
        self.reading_paused = False
        self._in.schedule()

    def stopProducing(self) -> None:
        """As for TCP: the same as ``loseConnection``."""
        self.loseConnection()

    # TCP-ish options: flags only, there is no socket.

    def setTcpNoDelay(self, enabled: bool) -> None:
        """Remembered only: nothing is delayed in memory."""
        self._tcp_no_delay = bool(enabled)

    def getTcpNoDelay(self) -> bool:
        """What :meth:`setTcpNoDelay` was told."""
        return self._tcp_no_delay

    def setTcpKeepAlive(self, enabled: bool) -> None:
        """Remembered only: an in-memory connection needs no keep-alive."""
        self._tcp_keep_alive = bool(enabled)

    def getTcpKeepAlive(self) -> bool:
        """What :meth:`setTcpKeepAlive` was told."""
        return self._tcp_keep_alive

    # ILoggingContext

    def logPrefix(self) -> str:
        """The protocol's class name and ``loopback``, for Twisted's log."""
        return f"{type(self.protocol).__name__},loopback"

    # internals

    def _writable(self) -> bool:
        return self.connected and not self.disconnecting and not self.connection.closed

    def _maybe_pause_producer(self) -> None:
        producer = self._producer
        if (
            producer is not None
            and self._streaming
            and not self._producer_paused
            and self._out.queued > self.high_water
        ):
            self._producer_paused = True
            cast(IPushProducer, producer).pauseProducing()

    def _drained(self) -> None:
        """Bytes written here were delivered (or dropped): maybe wake the producer."""
        producer = self._producer
        if producer is None:
            return
        if self._streaming:
            if self._producer_paused and self._out.queued < self.high_water:
                self._producer_paused = False
                cast(IPushProducer, producer).resumeProducing()
        elif self._out.queued == 0:
            cast(IPullProducer, producer).resumeProducing()

    def _lost(self, reason: Failure) -> None:
        """Tell the protocol, exactly once, that the connection is gone."""
        if self._lost_notified:
            return
        self._lost_notified = True
        self.connected = False
        self.disconnected = True
        self.reading_paused = True
        producer, self._producer = self._producer, None
        if producer is not None:
            _guarded("stopProducing of a loopback producer", producer.stopProducing)
        _guarded(
            "connectionLost of a loopback protocol", lambda: self.protocol.connectionLost(reason)
        )


def _guarded(what: str, call: Callable[[], object]) -> bool:
    """Run ``call``; log (and swallow) an exception, as the reactor does.  True if it ran."""
    try:
        call()
    except Exception:
        _log.failure("Unhandled error in {what}", what=what)
        return False
    return True


class LoopbackConnection:
    """One loopback connection: both transports, the two pipes, and the fault hooks.

    Reachable as ``transport.connection`` from either side and listed in
    ``network.connections`` until closed.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        network: LoopbackNetwork,
        name: str,
        connection_id: int,
        server_protocol: IProtocol,
        client_protocol: IProtocol,
        client_factory: IProtocolFactory | None = None,
    ) -> None:
        self.reactor = reactor
        self.network = network
        self.name = name
        self.connection_id = connection_id
        self.paused = False
        self.closed = False
        self._delay = 0.0
        self._client_factory = client_factory
        self.server = LoopbackTransport(self, "server", server_protocol)
        self.client = LoopbackTransport(self, "client", client_protocol)
        self._to_client = _Pipe(self, self.server, self.client)
        self._to_server = _Pipe(self, self.client, self.server)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "paused" if self.paused else "open"
        return f"<LoopbackConnection loopback:{self.name} #{self.connection_id} {state}>"

    @property
    def transports(self) -> tuple[LoopbackTransport, LoopbackTransport]:
        """``(server, client)``."""
        return (self.server, self.client)

    @property
    def delay(self) -> float:
        """Seconds (on the reactor's clock) each write waits before delivery; default 0.

        A change applies to data written afterwards; order is always preserved.
        """
        return self._delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        seconds = float(seconds)
        if not seconds >= 0:
            raise ValueError(f"delay must be >= 0 seconds, not {seconds!r}")
        self._delay = seconds

    def set_delay(self, seconds: float) -> None:
        """The same as setting :attr:`delay`."""
        self.delay = seconds

    def pause(self) -> None:
        """Stall delivery in both directions (including a pending close); nothing is lost."""
        self.paused = True

    def resume(self) -> None:
        """Restart delivery after :meth:`pause`; queued data arrives later, in order."""
        self.paused = False
        self._to_client.schedule()
        self._to_server.schedule()

    def cut(self, reason: str = "cut") -> None:
        """Fail the connection like a network failure; undelivered data is discarded.

        Both protocols get ``connectionLost(ConnectionLost(reason))`` later, through the
        reactor; writes made before that are silently dropped.
        """
        self._close(_failure(error.ConnectionLost(reason)), _failure(error.ConnectionLost(reason)))

    # internals

    def _pipe_from(self, side: Side) -> _Pipe:
        return self._to_client if side == "server" else self._to_server

    def _pipe_to(self, side: Side) -> _Pipe:
        return self._to_server if side == "server" else self._to_client

    def _start(self, connected: Deferred[IProtocol]) -> None:
        """Connect both protocols, then fire the client's Deferred (inside a reactor call)."""
        self.server.connected = True
        self.client.connected = True
        if not _guarded("makeConnection of a loopback server protocol", self._make_server):
            self.cut("the server protocol failed in makeConnection")
        try:
            self.client.protocol.makeConnection(self.client)
        except Exception:
            failed = _failure()
            self.cut("the client protocol failed in makeConnection")
            connected.errback(failed)
            return
        connected.callback(self.client.protocol)

    def _make_server(self) -> None:
        self.server.protocol.makeConnection(self.server)

    def _deliver(self, sink: LoopbackTransport, data: bytes) -> None:
        try:
            sink.protocol.dataReceived(data)
        except Exception:
            failed = _failure()
            _log.failure(
                "Unhandled error in dataReceived of {protocol}", failed, protocol=sink.protocol
            )
            lost = _failure(error.ConnectionLost("the peer's protocol failed"))
            if sink.side == "server":
                self._close(failed, lost)
            else:
                self._close(lost, failed)

    def _close_done(self) -> None:
        self._close(_failure(error.ConnectionDone()), _failure(error.ConnectionDone()))

    def _close(self, server_reason: Failure, client_reason: Failure) -> None:
        """Close now (no more delivery or writes); tell both protocols later, once."""
        if self.closed:
            return
        self.closed = True
        self._to_client.discard()
        self._to_server.discard()
        self.network._forget(self)
        self.reactor.callLater(0, self._notify_lost, server_reason, client_reason)

    def _notify_lost(self, server_reason: Failure, client_reason: Failure) -> None:
        self.server._lost(server_reason)
        self.client._lost(client_reason)
        factory, self._client_factory = self._client_factory, None
        if factory is not None:
            _guarded("doStop of a loopback client factory", factory.doStop)


@implementer(IListeningPort)
class LoopbackPort:
    """A listening loopback name; made by :meth:`LoopbackServerEndpoint.listen`."""

    def __init__(self, network: LoopbackNetwork, name: str, factory: IProtocolFactory) -> None:
        self.network = network
        self.name = _check_name(name)
        self.factory = factory
        self.listening = False

    def __repr__(self) -> str:
        state = "listening" if self.listening else "not listening"
        return f"<LoopbackPort loopback:{self.name} {state}>"

    def startListening(self) -> None:
        """Take the name; ``CannotListenError`` if another port already has it."""
        if self.listening:
            return
        if self.network.listening(self.name):
            raise error.CannotListenError(  # type: ignore[no-untyped-call]
                "loopback", self.name, "name already in use"
            )
        self.network._listeners[self.name] = self
        self.listening = True
        self.factory.doStart()

    def stopListening(self) -> Deferred[None]:
        """Free the name; connections already made stay up."""
        if self.listening:
            self.listening = False
            if self.network._listeners.get(self.name) is self:
                del self.network._listeners[self.name]
            self.factory.doStop()
        return succeed(None)

    def getHost(self) -> LoopbackAddress:
        """The address this port listens on."""
        return LoopbackAddress(self.name, "server", 0)


class _LoopbackEndpoint:
    """What both ends share: a checked name in a network (default: the reactor's)."""

    def __init__(
        self, reactor: IReactorTime, name: str, network: LoopbackNetwork | None = None
    ) -> None:
        self.reactor = reactor
        self.name = _check_name(name)
        self.network = network if network is not None else network_for(reactor)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} loopback:{self.name}>"


@implementer(IStreamServerEndpoint)
class LoopbackServerEndpoint(_LoopbackEndpoint):
    """Listen on ``loopback:NAME`` in ``network`` (default: the reactor's network)."""

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        """Listen with ``factory``; fails with ``CannotListenError`` if the name is taken."""
        port = LoopbackPort(self.network, self.name, factory)
        try:
            port.startListening()
        except error.CannotListenError:
            return fail()
        return succeed(cast(IListeningPort, port))


@implementer(IStreamClientEndpoint)
class LoopbackClientEndpoint(_LoopbackEndpoint):
    """Connect to ``loopback:NAME`` in ``network`` (default: the reactor's network)."""

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        """Connect later, through the reactor; the Deferred fires with the client protocol.

        Fails with ``ConnectionRefusedError`` when nothing listens on the name, the name
        is refused, or the server factory builds no protocol; with ``NoProtocol`` when
        ``factory`` builds none.  Cancelling before the attempt runs stops it.
        """
        pending: list[IDelayedCall] = []

        def cancel(_: Deferred[IProtocol]) -> None:
            if pending and pending[0].active():
                pending[0].cancel()

        connected: Deferred[IProtocol] = Deferred(cancel)
        pending.append(self.reactor.callLater(0, self._attempt, factory, connected))
        return connected

    def _refused(self, connected: Deferred[IProtocol], why: str) -> None:
        connected.errback(
            _failure(
                error.ConnectionRefusedError(  # type: ignore[no-untyped-call]
                    string=f"loopback:{self.name}: {why}"
                )
            )
        )

    def _attempt(self, factory: IProtocolFactory, connected: Deferred[IProtocol]) -> None:
        if connected.called:
            return
        network = self.network
        port = network._listeners.get(self.name)
        if port is None:
            self._refused(connected, "nothing is listening on this name")
            return
        if network.is_refused(self.name):
            self._refused(connected, "refused by LoopbackNetwork.refuse()")
            return
        connection_id = network._next_id()
        server_address = LoopbackAddress(self.name, "server", connection_id)
        client_address = LoopbackAddress(self.name, "client", connection_id)
        server_protocol: IProtocol | None = None
        try:
            server_protocol = port.factory.buildProtocol(client_address)
        except Exception:
            _log.failure("Unhandled error in buildProtocol of {factory}", factory=port.factory)
        if server_protocol is None:
            self._refused(connected, "the server factory built no protocol")
            return
        factory.doStart()
        try:
            client_protocol = factory.buildProtocol(server_address)
            if client_protocol is None:
                raise error.NoProtocol()
        except Exception:
            failed = _failure()
            factory.doStop()
            connected.errback(failed)
            return
        connection = LoopbackConnection(
            self.reactor,
            network,
            self.name,
            connection_id,
            server_protocol,
            client_protocol,
            client_factory=factory,
        )
        network._add(connection)
        connection._start(connected)


def _name_from_description(args: tuple[object, ...], kwargs: dict[str, object]) -> str:
    """The NAME of a ``loopback:NAME`` description, as parsed by Twisted's endpoints."""
    if kwargs:
        raise ValueError(
            "loopback: endpoints take no options and names must not contain '='"
            f" (got {', '.join(f'{k}={v}' for k, v in kwargs.items())})"
        )
    if not args:
        return _check_name("")
    if len(args) > 1:
        raise ValueError(
            "a loopback endpoint name must not contain ':'"
            f" (got {':'.join(str(a) for a in args)!r})"
        )
    return _check_name(args[0])


def _reactor_time(reactor: object) -> IReactorTime:
    if not IReactorTime.providedBy(reactor):
        raise TypeError(f"loopback: endpoints need a reactor with callLater, not {reactor!r}")
    return reactor


@implementer(IPlugin, IStreamServerEndpointStringParser)
class LoopbackServerParser:
    """``serverFromString(reactor, "loopback:NAME")`` support (a Twisted plugin object)."""

    prefix = "loopback"

    def parseStreamServer(
        self, reactor: IReactorCore, *args: object, **kwargs: object
    ) -> LoopbackServerEndpoint:
        """``loopback:NAME`` as a server endpoint."""
        return LoopbackServerEndpoint(_reactor_time(reactor), _name_from_description(args, kwargs))


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class LoopbackClientParser:
    """``clientFromString(reactor, "loopback:NAME")`` support (a Twisted plugin object)."""

    prefix = "loopback"

    def parseStreamClient(
        self, reactor: IReactorCore, *args: object, **kwargs: object
    ) -> LoopbackClientEndpoint:
        """``loopback:NAME`` as a client endpoint."""
        return LoopbackClientEndpoint(_reactor_time(reactor), _name_from_description(args, kwargs))
