"""An EPMD client: register a node, look one up, list names (ours or a genuine epmd).

:class:`MapperClient` implements :class:`skyproto.interfaces.IMapperClient` over any
client endpoint (``tcp:127.0.0.1:4369``, ``unix:...``, ``loopback:...``). Each request
opens its own connection, as EPMD requires. A registration keeps its connection open:
the returned :class:`MapperRegistration` unregisters by closing it and tells you when
the mapper closed it (so the node can re-register or take the mapper over). Every
request times out (10 s by default, like OTP) on the injected reactor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Final, Generic, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..errors import SkyprotoError
from ..interfaces import IMapperClient
from .epmd import (
    NODE_TYPE_NORMAL,
    Alive2Reply,
    Alive2Request,
    EpmdError,
    NamesRequest,
    NamesResponse,
    Port2Error,
    Port2Reply,
    Port2Response,
    PortPlease2Request,
    alive2_reply_size,
    decode_alive2_reply,
    decode_names_reply,
    decode_port2_reply,
    encode_request,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "MapperClient",
    "MapperRegistration",
    "RegistrationRefusedError",
]

#: OTP waits 10 s for the registration and PORT2 replies.
DEFAULT_TIMEOUT: Final = 10.0
#: The longest PORT2_RESP: 12 header bytes, a 1020-byte name, 2 bytes, 1020 bytes of Extra.
_MAX_PORT2_REPLY: Final = 12 + 1020 + 2 + 1020
#: A NAMES_RESP longer than this is not from a sane mapper.
_MAX_NAMES_REPLY: Final = 4 * 1024 * 1024

_T = TypeVar("_T")


class RegistrationRefusedError(SkyprotoError):
    """The mapper answered ALIVE2_REQ with an error: the name is taken (or invalid)."""

    def __init__(self, name: str, result: int) -> None:
        super().__init__(f"the mapper refused to register {name!r} (result {result})")
        self.name = name
        self.result = result


class MapperRegistration:
    """A live registration: it lasts as long as its connection to the mapper.

    ``creation`` is what the mapper assigned (32-bit for HighVsn >= 6, else 1..3).
    :meth:`unregister` closes the connection; :meth:`when_lost` fires when the
    connection is gone for any reason, and ``closed_by_us`` then says whether we closed it.
    """

    def __init__(self, name: str, port: int, reply: Alive2Reply, protocol: _Alive2Protocol):
        self.name = name
        self.port = port
        self.reply = reply
        self.creation = reply.creation
        self.closed_by_us = False
        self.lost_reason: Failure | None = None
        self._protocol = protocol
        self._waiters: list[Deferred[None]] = []

    @property
    def active(self) -> bool:
        """True while the registration connection is open."""
        return self.lost_reason is None

    def unregister(self) -> Deferred[None]:
        """Close the registration connection; the Deferred fires once it is closed."""
        if self.active:
            self.closed_by_us = True
            self._protocol.close()
        return self.when_lost()

    def when_lost(self) -> Deferred[None]:
        """A new Deferred that fires (with None) when the registration connection is gone."""
        if not self.active:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def _lost(self, reason: Failure) -> None:
        self.lost_reason = reason
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def __repr__(self) -> str:
        state = "active" if self.active else "lost"
        return (
            f"<MapperRegistration {self.name!r} port={self.port} creation={self.creation} {state}>"
        )


class _RequestProtocol(Protocol, Generic[_T]):
    """Base of the client's one-request connections: fires ``result`` exactly once."""

    log = Logger()

    def __init__(self, request: bytes, result: Deferred[_T]) -> None:
        self.request = request
        self.result = result
        self.finished = False

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        set_no_delay = getattr(transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            with contextlib.suppress(OSError):  # UNIX sockets have no Nagle to switch off
                set_no_delay(True)
        transport.write(self.request)

    def succeed(self, value: _T) -> None:
        if not self.finished:
            self.finished = True
            if not self.result.called:
                self.result.callback(value)

    def fail(self, error: BaseException | Failure) -> None:
        """Errback ``result`` and drop the connection."""
        if not self.finished:
            self.finished = True
            if not self.result.called:
                self.result.errback(error)
        self.abort()

    def cancel(self) -> None:
        """The caller gave up (timeout or cancel): stop caring, drop the connection."""
        self.finished = True
        self.abort()

    def abort(self) -> None:
        transport = self.transport
        if transport is not None and self.connected:
            transport.abortConnection()  # type: ignore[attr-defined]


class _CollectingProtocol(_RequestProtocol[_T]):
    """A request whose reply ends when the mapper closes: collect, then decode."""

    def __init__(
        self, request: bytes, result: Deferred[_T], decode: Callable[[bytes], _T], limit: int
    ) -> None:
        super().__init__(request, result)
        self._decode = decode
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.finished:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.fail(EpmdError(f"reply of more than {self._limit} bytes"))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        if self.finished:
            return
        try:
            value = self._decode(b"".join(self._chunks))
        except EpmdError as e:
            self.fail(e)
        else:
            self.succeed(value)


class _Alive2Protocol(_RequestProtocol[MapperRegistration]):
    """ALIVE2_REQ: read the 6- or 4-byte reply, then hold the connection open."""

    def __init__(self, request: Alive2Request, result: Deferred[MapperRegistration]) -> None:
        super().__init__(encode_request(request), result)
        self.name = request.name
        self.port = request.port
        self.registration: MapperRegistration | None = None
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        if self.registration is not None:
            self.log.warn(
                "mapper sent {size} unexpected bytes on the registration of {name}: closing",
                size=len(data),
                name=self.name,
            )
            self.abort()
            return
        if self.finished:
            return
        self._buffer += data
        try:
            size = alive2_reply_size(self._buffer[0])
            if len(self._buffer) < size:
                return
            reply = decode_alive2_reply(self._buffer)
        except EpmdError as e:
            self.fail(e)
            return
        if reply.result != 0:
            self.fail(RegistrationRefusedError(self.name, reply.result))
            return
        self.registration = MapperRegistration(self.name, self.port, reply, self)
        self.succeed(self.registration)

    def close(self) -> None:
        transport = self.transport
        if transport is not None and self.connected:
            transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        if self.registration is not None:
            self.registration._lost(reason)
        elif not self.finished:
            self.fail(EpmdError("the mapper closed the connection before its ALIVE2 reply"))


@implementer(IMapperClient)
class MapperClient:
    """Talks EPMD to the mapper at ``endpoint`` (ours or a genuine epmd).

    ``reactor`` provides the timeouts (every request errbacks with
    ``twisted.internet.defer.TimeoutError`` after ``timeout`` seconds). Malformed
    replies errback with :class:`skyproto.errors.ProtocolError`; connection failures
    errback with the endpoint's own error.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        endpoint: IStreamClientEndpoint,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.timeout = timeout

    def register(
        self,
        name: str,
        port: int,
        extra: bytes = b"",
        node_type: int = NODE_TYPE_NORMAL,
        high: int = 6,
        low: int = 6,
        protocol: int = 0,
    ) -> Deferred[MapperRegistration]:
        """Deferred of a :class:`MapperRegistration`; errbacks RegistrationRefusedError if taken.

        A name epmd would refuse errbacks with AddressError before anything is sent.
        """
        try:
            request = Alive2Request(port, node_type, protocol, high, low, name, extra)
            return self._run(lambda d: _Alive2Protocol(request, d))
        except ValueError as e:  # AddressError is a ValueError too
            return _failed(e)

    def port_please(self, name: str) -> Deferred[Port2Response | None]:
        """Deferred of the registration (PORT2_RESP) for ``name``, or None if not registered."""
        try:
            request = encode_request(PortPlease2Request(name))
        except ValueError as e:
            return _failed(e)
        reply: Deferred[Port2Reply] = self._run(
            lambda d: _CollectingProtocol(request, d, decode_port2_reply, _MAX_PORT2_REPLY)
        )
        return reply.addCallback(lambda r: None if isinstance(r, Port2Error) else r)

    def names_reply(self) -> Deferred[NamesResponse]:
        """Deferred of the whole NAMES_RESP: the mapper's port and its (name, port) pairs."""
        request = encode_request(NamesRequest())
        return self._run(
            lambda d: _CollectingProtocol(request, d, decode_names_reply, _MAX_NAMES_REPLY)
        )

    def names(self) -> Deferred[list[tuple[str, int]]]:
        """Deferred of the (name, port) pairs the mapper lists, newest first."""
        return self.names_reply().addCallback(lambda r: list(r.nodes))

    def _run(self, build: Callable[[Deferred[_T]], _RequestProtocol[_T]]) -> Deferred[_T]:
        """Connect, run one request protocol, and bound it all by the timeout."""
        cancelling = False
        protocols: list[_RequestProtocol[_T]] = []

        def cancel(_: Deferred[_T]) -> None:
            nonlocal cancelling
            cancelling = True
            connecting.cancel()
            for protocol in protocols:
                protocol.cancel()

        result: Deferred[_T] = Deferred(cancel)
        protocol = build(result)
        protocols.append(protocol)

        def connect_failed(failure: Failure) -> None:
            if not cancelling and not result.called:
                result.errback(failure)

        connecting = self.endpoint.connect(_OneProtocol(protocol))
        connecting.addErrback(connect_failed)
        result.addTimeout(self.timeout, self.reactor)
        return result


class _OneProtocol(Factory):
    """A factory that hands out one given protocol instance (one request, one connection)."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return self._protocol


def _failed(error: BaseException) -> Deferred[_T]:
    d: Deferred[_T] = Deferred()
    d.errback(error)
    return d
