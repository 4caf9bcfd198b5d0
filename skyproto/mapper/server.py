"""The mapper daemon's Twisted side: thin adapters between sockets, the codec and the table.

One :class:`MapperServerFactory` serves any number of listening ports (IPv4, IPv6, UNIX,
loopback) over one :class:`skyproto.mapper.table.MapperTable`. Each connection carries
exactly one EPMD request (EPMD.md section 1). An ALIVE2_REQ keeps its connection open and
the registration lives exactly as long as it; every other request is answered and
closed. Malformed input closes only that connection. The mapper is unauthenticated by
design, so what happens per connection (registered, refused, dropped, timed out) is
counted in :class:`MapperCounters` and logged at debug level only: nobody can flood the
log by connecting. The reactor (for the idle timeout) is injected, never imported.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Mapping
from typing import Final
from typing import Protocol as TypingProtocol

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from .epmd import (
    KILL_NO,
    KILL_OK,
    MAX_REQUEST_LENGTH,
    NAMES_REQ,
    PORT_PLEASE2_REQ,
    STOP_NOEXIST,
    STOP_STOPPED,
    Alive2RefusedError,
    Alive2Request,
    DumpRequest,
    EpmdError,
    KillRequest,
    NamesRequest,
    PortPlease2Request,
    Request,
    RequestReader,
    StopRequest,
    alive2_reply,
    decode_request,
    encode_dump_reply,
    encode_names_reply,
    encode_reply,
)
from .table import MapperTable

__all__ = [
    "DEFAULT_PACKET_TIMEOUT",
    "RELAXED_ENV",
    "IdleWatched",
    "MapperCounters",
    "MapperServerFactory",
    "MapperServerProtocol",
    "describe_address",
    "is_local_peer",
    "relaxed_from_environ",
]

#: epmd's default ``-packet_timeout``: idle, unregistered connections are closed after it.
DEFAULT_PACKET_TIMEOUT: Final = 60.0
#: epmd checks idle connections every second if the packet timeout is under this, else
#: every this many seconds (its select() timeout).
_IDLE_CHECK: Final = 5
#: Setting this variable (to anything) turns relaxed command checking on, as for epmd.
RELAXED_ENV: Final = "ERL_EPMD_RELAXED_COMMAND_CHECK"

_READING: Final = "reading"
_REGISTERED: Final = "registered"
_REFUSED: Final = "refused"
_CLOSING: Final = "closing"


class IdleWatched(TypingProtocol):
    """A connection the factory's sweep may time out while it waits for its request."""

    #: the whole second of its last activity (epmd's ``mod_time``)
    last_activity: int

    def timed_out(self) -> None:
        """Idle past the packet timeout: close, count and log it."""


def relaxed_from_environ(environ: Mapping[str, str]) -> bool:
    """True if ``ERL_EPMD_RELAXED_COMMAND_CHECK`` is set in ``environ`` (to any value)."""
    return RELAXED_ENV in environ


def is_local_peer(peer: IAddress, host: IAddress) -> bool:
    """Whether epmd would treat ``peer`` as local (allowed ALIVE2, DUMP, KILL, STOP).

    Loopback (127.0.0.0/8, ::1, and IPv4-mapped 127.x), or the same address as our side
    of the socket. UNIX sockets, ``loopback:`` and other non-IP transports are local.
    """
    if not isinstance(peer, IPv4Address | IPv6Address):
        return True
    peer_ip = _ip(peer.host)
    if peer_ip is None:
        return False
    if peer_ip.is_loopback:
        return True
    if isinstance(peer_ip, ipaddress.IPv6Address):
        mapped = peer_ip.ipv4_mapped
        if mapped is not None and mapped.is_loopback:
            return True
    if isinstance(host, IPv4Address | IPv6Address):
        return _ip(host.host) == peer_ip
    return False


def describe_address(address: IAddress) -> str:
    """``host:port`` for IP addresses (``[host]:port`` for IPv6), else the address's repr."""
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    return str(address)


@attrs.define
class MapperCounters:
    """What one mapper has seen, counted rather than logged one line each."""

    connections: int = 0  #: connections accepted
    requests: int = 0  #: complete requests handled
    registrations: int = 0  #: ALIVE2_REQ accepted
    unregistrations: int = 0  #: registrations ended (connection closed, a byte, STOP)
    refused: int = 0  #: ALIVE2_REQ answered with an error (name taken or invalid)
    dropped: int = 0  #: closed without a reply: malformed, forbidden, unknown, extra bytes
    timed_out: int = 0  #: closed by the packet timeout before a complete request
    stopped: int = 0  #: names removed by STOP_REQ
    kills_refused: int = 0  #: KILL_REQ answered NO (live nodes)
    kills_ignored: int = 0  #: KILL_REQ accepted with no on_kill handler


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


class MapperServerProtocol(Protocol):
    """One connection to the mapper: reads its single request and acts on it.

    States: reading (subject to the idle timeout), registered (ALIVE2 accepted: any byte or the
    close unregisters), refused (ALIVE2 error reply sent: kept open, unregistered, as epmd
    does), closing (answered; further bytes are ignored). ``last_activity`` is in whole
    seconds, like epmd's ``mod_time``: set when the connection opens and at each chunk
    of bytes received while reading.
    """

    log = Logger()

    def __init__(self, factory: MapperServerFactory) -> None:
        self.factory = factory
        self.state = _READING
        self.registered: str | None = None
        self.fd = -1
        self.last_activity = 0
        self._reader = RequestReader()
        self._kill_requested = False

    def connectionMade(self) -> None:
        """A new connection: note its activity and whether it comes from this host."""
        # Kept lean: a mapper serves many one-request connections. No TCP_NODELAY: every
        # reply is a single write followed by a close, so Nagle never holds anything back.
        self._reader.local = self._is_local
        self.last_activity = self.factory.whole_seconds()
        self.factory.connection_opened(self)

    def _is_local(self) -> bool:
        """Section 2 rule 1, evaluated only for the requests that need it."""
        transport = self.transport
        assert transport is not None
        peer = transport.getPeer()
        if isinstance(peer, IPv4Address) and peer.host.startswith("127."):
            return True
        return is_local_peer(peer, transport.getHost())

    @property
    def peer(self) -> str:
        """The peer's address, for log messages."""
        transport = self.transport
        return "?" if transport is None else describe_address(transport.getPeer())

    def dataReceived(self, data: bytes) -> None:
        """Bytes of a request: answered once whole; a malformed or refused one closes the
        connection."""
        state = self.state
        if state is _READING:
            self.last_activity = self.factory.whole_seconds()  # epmd: "Note activity"
            try:
                request = self._reader.feed(data)
            except Alive2RefusedError as e:
                self._refuse(e.reason, e.reply)
                return
            except EpmdError as e:
                self._drop(str(e))
                return
            if request is None:
                return
            self.factory.request_received(self)
            self.factory.counters.requests += 1
            self._handle(request)
        elif state is _REGISTERED or state is _REFUSED:
            self._drop(f"got {len(data)} more bytes than expected on ALIVE socket")
        # _CLOSING: the request was answered; the connection is on its way out.

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """The connection ended: its registration (if any) goes with it."""
        self._release()
        self.state = _CLOSING
        self.factory.connection_closed(self)
        if self._kill_requested:
            self._kill_requested = False
            self.factory.killed()

    # ------------------------------------------------------------------ requests

    def _handle(self, request: Request) -> None:
        factory = self.factory
        table = factory.table
        if isinstance(request, PortPlease2Request):
            self._answer(table.port2_reply(request.name))
        elif isinstance(request, Alive2Request):
            self._register(request)
        elif isinstance(request, NamesRequest):
            self._answer(encode_names_reply(factory.port, table.name_ports()))
        elif isinstance(request, DumpRequest):
            active, unused = table.dump()
            self._answer(encode_dump_reply(factory.port, active, unused))
        elif isinstance(request, KillRequest):
            if not factory.relaxed and len(table):
                factory.counters.kills_refused += 1
                self.log.debug("refusing KILL_REQ from {peer}: live nodes", peer=self.peer)
                self._answer(KILL_NO)
            else:
                self.log.debug("KILL_REQ from {peer} accepted", peer=self.peer)
                self._kill_requested = True
                self._answer(KILL_OK)
        else:
            self._stop(request)

    def _register(self, request: Alive2Request) -> None:
        self.fd = self.factory.descriptor(self.transport)
        registration = self.factory.table.register(
            request.name,
            request.port,
            request.node_type,
            request.protocol,
            request.high,
            request.low,
            request.extra,
            fd=self.fd,
        )
        if registration is None:
            reason = f"node name {request.name!r} is already registered"
            self._refuse(reason, encode_reply(alive2_reply(request.high, None)))
            return
        self.state = _REGISTERED
        self.registered = request.name
        self.factory.node_registered(request.name, self)
        self.factory.counters.registrations += 1
        assert self.transport is not None
        self.transport.write(encode_reply(alive2_reply(request.high, registration.creation)))
        self.log.debug(
            "registered {name} at port {port} with creation {creation} for {peer}",
            name=request.name,
            port=request.port,
            creation=registration.creation,
            peer=self.peer,
        )

    def _stop(self, request: StopRequest) -> None:
        if not self.factory.relaxed:
            self._drop(f"STOP_REQ for {request.name!r} without relaxed command check")
            return
        if self.factory.stop_node(request.name):
            self.factory.counters.stopped += 1
            self.log.debug("stopped {name} for {peer}", name=request.name, peer=self.peer)
            self._answer(STOP_STOPPED)
        else:
            self._answer(STOP_NOEXIST + STOP_STOPPED)  # what real epmd sends [observed]

    # ------------------------------------------------------------------ helpers

    def _answer(self, reply: bytes) -> None:
        """Send the whole reply in one write, then close (the reply ends at the close)."""
        self.state = _CLOSING
        transport = self.transport
        assert transport is not None
        transport.write(reply)
        transport.loseConnection()

    def _refuse(self, reason: str, reply: bytes) -> None:
        """Send an ALIVE2 error reply and keep the connection open, unregistered, like epmd."""
        self.factory.request_received(self)  # exempt from the idle timeout from now on
        self.factory.counters.refused += 1
        self.state = _REFUSED
        self.log.debug("refused ALIVE2_REQ from {peer}: {reason}", peer=self.peer, reason=reason)
        assert self.transport is not None
        self.transport.write(reply)

    def _drop(self, reason: str) -> None:
        """Close this connection (only this one) without a reply; count it, log why."""
        self.factory.counters.dropped += 1
        self._close(reason)

    def _close(self, reason: str) -> None:
        self.factory.request_received(self)
        self._release()
        self.state = _CLOSING
        self.log.debug("closing {peer}: {reason}", peer=self.peer, reason=reason)
        assert self.transport is not None
        self.transport.loseConnection()

    def finish_reply(self, rest: bytes) -> None:
        """Send the end of a reply the listening port began (see ``MapperPort``), then close.

        The request is counted here, the connection in :meth:`connectionMade` as usual.
        """
        self.factory.request_received(self)
        self.factory.counters.requests += 1
        self._answer(rest)

    def timed_out(self) -> None:
        """The factory's sweep found this connection idle past packet_timeout seconds."""
        if self.state is _READING:
            self.factory.counters.timed_out += 1
            self._close(
                f"no complete request within {self.factory.packet_timeout} s "
                f"({self._reader.buffered} bytes buffered)"
            )

    def _release(self) -> None:
        """Unregister this connection's name, if it holds one."""
        name, self.registered = self.registered, None
        if name is not None:
            self.factory.node_unregistered(name, self)

    def unregistered_by_stop(self) -> None:
        """STOP_REQ removed our name: forget it and close the registration socket."""
        self.registered = None
        self.state = _CLOSING
        if self.transport is not None:
            self.transport.loseConnection()


class MapperServerFactory(Factory):
    """Serves EPMD on every port it listens on, over one shared :class:`MapperTable`.

    ``port`` is the number reported in NAMES/DUMP headers (Erlang's ``net_adm:names``
    insists it equals its own epmd port): pass the port you listen on, or set the
    attribute after listening on port 0. ``relaxed`` is epmd's
    ``-relaxed_command_check`` (see :func:`relaxed_from_environ`); ``on_kill`` is called
    after an accepted KILL_REQ has been answered (the daemon should then exit).

    ``packet_timeout`` is in whole seconds, as epmd's ``-packet_timeout`` (a fraction is
    dropped, as epmd's ``atoi`` does; less than 1 is refused). A connection still reading
    its request is closed once ``last_activity + packet_timeout`` is less than the current
    whole second, checked every second (timeouts under 5 s) or every 5 seconds: exactly
    epmd's rule, so a request trickling in a byte per second with ``-packet_timeout 1``
    (OTP's ``slow_get_port_nr``) is served. ``counters`` counts what happened.
    """

    log = Logger()
    noisy = False

    def __init__(
        self,
        reactor: IReactorTime,
        port: int,
        *,
        table: MapperTable | None = None,
        relaxed: bool = False,
        packet_timeout: float = DEFAULT_PACKET_TIMEOUT,
        on_kill: Callable[[], object] | None = None,
    ) -> None:
        if not packet_timeout >= 1:
            raise ValueError(
                f"packet_timeout must be at least 1 second (whole seconds, as epmd counts "
                f"them), not {packet_timeout!r}"
            )
        self.clock = reactor
        self.port = port
        self.table = table if table is not None else MapperTable(reactor.seconds)
        self.relaxed = relaxed
        #: whole seconds an incomplete request may stay silent
        self.packet_timeout = int(packet_timeout)
        self.on_kill = on_kill
        self.counters = MapperCounters()
        self.connections: set[MapperServerProtocol] = set()
        self._nodes: dict[str, MapperServerProtocol] = {}
        self._serial = 0
        # Connections still reading their request, swept for idleness like epmd does:
        # every second if packet_timeout < 5, else every 5 seconds.
        self._reading: set[IdleWatched] = set()
        self._sweep_interval = 1.0 if self.packet_timeout < _IDLE_CHECK else float(_IDLE_CHECK)
        self._sweeper: IDelayedCall | None = None

    def buildProtocol(self, addr: IAddress | None) -> MapperServerProtocol:
        """One connection of the mapper."""
        return MapperServerProtocol(self)

    def fast_reply(self, data: bytes) -> bytes | None:
        """The whole reply to ``data`` if it is one complete PORT_PLEASE2_REQ or NAMES_REQ.

        For :class:`skyproto.mapper.port.MapperPort`, which answers such connections without
        building a protocol: ``data`` is everything read from a new connection. Nothing is
        counted (see :meth:`answered_fast`). None means anything else (incomplete,
        malformed, another request, more bytes than the request): the caller hands the
        connection and ``data`` to a :class:`MapperServerProtocol`, which does what it
        always does (neither request needs the local-peer check).
        """
        size = len(data)
        if size < 3:
            return None
        length = (data[0] << 8) | data[1]
        if length + 2 != size or length > MAX_REQUEST_LENGTH:
            return None
        opcode = data[2]
        if opcode == PORT_PLEASE2_REQ:
            reply = self.table.port2_reply_by_bytes(data[3:])
            if reply is None:  # not registered (or needs decoding: a trailing NUL, bad bytes)
                try:
                    request = decode_request(data[2:])
                except EpmdError:
                    return None
                assert isinstance(request, PortPlease2Request)
                reply = self.table.port2_reply(request.name)
        elif opcode == NAMES_REQ:
            reply = encode_names_reply(self.port, self.table.name_ports())
        else:
            return None
        return reply

    def answered_fast(self) -> None:
        """Count a connection answered (all of the reply sent) and closed by the port."""
        counters = self.counters
        counters.connections += 1
        counters.requests += 1

    def descriptor(self, transport: object) -> int:
        """The socket's file descriptor (shown by DUMP), or a serial number for non-sockets."""
        get_handle = getattr(transport, "getHandle", None)
        if get_handle is not None:
            handle = get_handle()
            if isinstance(handle, socket.socket):
                return handle.fileno()
        self._serial += 1
        return -self._serial

    def whole_seconds(self) -> int:
        """The clock in whole seconds, as epmd's ``time(NULL)``."""
        return int(self.clock.seconds())

    def connection_opened(self, protocol: MapperServerProtocol) -> None:
        """Count a new connection and watch it for idleness."""
        self.counters.connections += 1
        self.connections.add(protocol)
        self.watch_idle(protocol)

    def watch_idle(self, connection: IdleWatched) -> None:
        """Time ``connection`` out if it stays idle (until :meth:`request_received`)."""
        self._reading.add(connection)
        if self._sweeper is None:
            self._sweeper = self.clock.callLater(self._sweep_interval, self._sweep)

    def request_received(self, connection: IdleWatched) -> None:
        """``connection`` is done reading: it is no longer subject to the idle timeout."""
        self._reading.discard(connection)

    def connection_closed(self, protocol: MapperServerProtocol) -> None:
        """Forget a connection that ended."""
        self.connections.discard(protocol)
        self._reading.discard(protocol)

    def _sweep(self) -> None:
        """Close connections idle past packet_timeout; run again while any are reading."""
        self._sweeper = None
        now = self.whole_seconds()
        timeout = self.packet_timeout
        for protocol in [p for p in self._reading if p.last_activity + timeout < now]:
            protocol.timed_out()
        if self._reading:
            self._sweeper = self.clock.callLater(self._sweep_interval, self._sweep)

    def stopFactory(self) -> None:
        """The last listening port closed: stop sweeping (open connections stay served)."""
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None and sweeper.active():
            sweeper.cancel()

    def node_registered(self, name: str, protocol: MapperServerProtocol) -> None:
        """Remember which connection holds the registration of ``name``."""
        self._nodes[name] = protocol

    def node_unregistered(self, name: str, protocol: MapperServerProtocol) -> None:
        """The registration connection of ``name`` ended: the name goes with it."""
        if self._nodes.get(name) is protocol:
            del self._nodes[name]
            self.table.unregister(name)
            self.counters.unregistrations += 1
            self.log.debug("unregistered {name} ({peer})", name=name, peer=protocol.peer)

    def stop_node(self, name: str) -> bool:
        """STOP_REQ: unregister ``name`` now and close its registration socket."""
        if not self.table.unregister(name):
            return False
        self.counters.unregistrations += 1
        protocol = self._nodes.pop(name, None)
        if protocol is not None:
            protocol.unregistered_by_stop()
        return True

    def killed(self) -> None:
        """An accepted KILL_REQ has been answered and closed: hand over to ``on_kill``."""
        if self.on_kill is None:
            self.counters.kills_ignored += 1
            self.log.debug("KILL_REQ accepted but no on_kill handler is set: carrying on")
            return
        self.log.info("KILL_REQ accepted: stopping")
        self.on_kill()
