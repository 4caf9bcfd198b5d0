"""A TCP listening port for the mapper that answers lookups below Twisted's transports.

Almost every connection to a mapper is one PORT_PLEASE2_REQ: accept, one small request,
one small reply, close. With a plain ``tcp.Port`` each of them costs a protocol, a
``tcp.Server`` transport, ``makeConnection``, a reactor ``addReader``/``removeReader``
pair and ``loseConnection``, which is most of the mapper's CPU (docs/performance.md,
"Mapper"). :class:`MapperPort` is a ``tcp.Port`` (same binding, interface, backlog, IPv6,
``getHost`` and ``stopListening``) whose accept loop reads each new socket at once,
without waiting (the client has usually sent its request by then). If what it reads is
exactly one complete PORT_PLEASE2_REQ or NAMES_REQ, the factory's pre-encoded reply goes
out in one ``send`` and the socket is closed: no Twisted object is made at all.

Everything else is handed over, with the bytes already read, to the ordinary protocol on
an ordinary ``tcp.Server`` transport, exactly as ``tcp.Port`` would have built them, so
the normal code path (ALIVE2 registrations that stay open, the local-peer checks, the
size limits, malformed requests and their logged reasons, the idle timeout) is unchanged:
a request not in yet or split across segments, a peer that closed or reset first, a
reply too big for one ``send``, any other request or any malformed one. Accept errors
other than "no more connections" are left to ``tcp.Port.doRead``'s own handling.

:func:`mapper_server_endpoint` gives the endpoint to listen on for a description:
``tcp:`` and ``tcp6:`` descriptions listen with a :class:`MapperPort`, everything else
(``unix:``, ``loopback:``, ``systemd:``, plugins) exactly as ``serverFromString`` does.
The reactor is always passed in.
"""

from __future__ import annotations

import socket
from errno import EAGAIN, EWOULDBLOCK
from typing import Any, Final

from twisted.internet import tcp
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorFDSet,
    IReactorTCP,
    IReadDescriptor,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .epmd import MAX_REQUEST_LENGTH
from .server import MapperServerFactory, describe_address

__all__ = ["MapperPort", "listen_mapper_tcp", "mapper_server_endpoint"]

#: One read of a new connection: any request epmd accepts (3057 + 2 bytes) and one more.
_READ_SIZE: Final = MAX_REQUEST_LENGTH + 3
_NOT_YET: Final = (EAGAIN, EWOULDBLOCK)
_MSG_DONTWAIT: Final = getattr(socket, "MSG_DONTWAIT", 0)


class MapperPort(tcp.Port):
    """A ``tcp.Port`` serving a :class:`MapperServerFactory`, lookups answered in the accept loop.

    Construct and start it as a ``tcp.Port`` (or use :func:`listen_mapper_tcp`). A new
    connection whose request is not in yet waits in a light reader (:class:`_Waiting`:
    no protocol, no transport, subject to the factory's idle timeout) for its first bytes,
    which are answered or handed over the same way. ``fast`` counts connections answered
    without a transport, ``waited`` those that needed a second read, ``handed_over`` those
    given to the normal protocol.
    """

    factory: MapperServerFactory
    _log = Logger()

    def __init__(
        self,
        port: int,
        factory: MapperServerFactory,
        backlog: int = 50,
        interface: str = "",
        reactor: Any = None,
    ) -> None:
        super().__init__(port, factory, backlog, interface, reactor)
        #: connections answered and closed without a transport
        self.fast = 0
        #: connections whose request was not in at accept time
        self.waited = 0
        #: connections handed over to a MapperServerProtocol on a tcp.Server
        self.handed_over = 0
        #: connections waiting for their first bytes (closed if the port stops first)
        self.waiting: set[_Waiting] = set()

    def doRead(self) -> None:
        """Accept every pending connection; answer the simple ones, hand the rest over."""
        # As tcp.Port does: try as many accepts as last time (at least one), 20 more if
        # that many were waiting; so a lone connection costs no failing accept() call.
        limit = self.numberAccepts
        accepted = 0
        try:
            accept = self.socket.accept
            reply_for = self.factory.fast_reply
            while accepted < limit:
                try:
                    client, address = accept()
                except OSError as e:
                    if e.errno not in _NOT_YET:
                        # EMFILE (with Twisted's reserved descriptor), EPERM, ECONNABORTED:
                        # tcp.Port knows what to do and what to log.
                        super().doRead()  # type: ignore[no-untyped-call]
                    break
                accepted += 1
                try:
                    data = client.recv(_READ_SIZE, _MSG_DONTWAIT)
                except OSError as e:
                    if e.errno in _NOT_YET:
                        self._wait(client, address)
                    else:  # reset already: the normal path sees it and cleans up
                        self._hand_over(client, address, b"")
                    continue
                reply = reply_for(data) if data else None
                if reply is None:
                    self._hand_over(client, address, data)
                else:
                    self._answer(client, address, reply)
        except Exception:
            # As tcp.Port: a bug serving one connection must not stop the listening port.
            self._log.failure("serving a new mapper connection")
        self.numberAccepts = limit + 20 if accepted == limit else max(1, accepted)

    def _wait(self, client: socket.socket, address: Any) -> None:
        """Watch ``client`` for its first bytes (and for idleness) with a light reader."""
        self.waited += 1
        waiting = _Waiting(self, client, address, self.factory.whole_seconds())
        self.waiting.add(waiting)
        self.factory.watch_idle(waiting)
        self.reactor.addReader(waiting)

    def connectionLost(self, reason: Failure) -> None:
        """The port stopped listening: connections still waiting for a request close too,
        as the protocols of a stopped mapper's last clients would time out."""
        for waiting in list(self.waiting):
            waiting.abandon()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def _answer(self, client: socket.socket, address: Any, reply: bytes) -> None:
        """Send ``reply`` in one ``send`` and close; a partial send goes the normal way."""
        try:
            sent = client.send(reply, _MSG_DONTWAIT)
        except OSError:
            sent = len(reply)  # the peer is gone (reset): nothing more to do for it
        if sent < len(reply):
            self._hand_over(client, address, b"", reply[sent:])
            return
        self.fast += 1
        self.factory.answered_fast()
        client.close()

    def _hand_over(
        self, client: socket.socket, address: Any, data: bytes, rest: bytes | None = None
    ) -> None:
        """Give ``client`` to the normal protocol, as tcp.Port would, then feed it ``data``.

        ``rest`` is the unsent end of a fast reply: the protocol counts the request,
        writes ``rest`` and closes, as if it had answered itself.
        """
        if len(address) == 4:  # IPv6: keep the scope id, as tcp.Port does
            host = socket.getnameinfo(address, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
            address = (host[0], *address[1:])
        protocol = self.factory.buildProtocol(self._addressType("TCP", *address))
        session = self.sessionno
        self.sessionno = session + 1
        transport = self.transport(client, protocol, address, self, session, self.reactor)
        self.handed_over += 1
        protocol.makeConnection(transport)  # type: ignore[no-untyped-call]
        if rest is not None:
            protocol.finish_reply(rest)
        elif data:
            protocol.dataReceived(data)


@implementer(IReadDescriptor)
class _Waiting:
    """A new connection whose request was not in at accept time: a reader and nothing more.

    Its first readable event decides: one complete PORT_PLEASE2_REQ or NAMES_REQ is
    answered by the port; anything else (part of a request, EOF, a reset, another
    request) is handed over with what was read, so the protocol carries on from there.
    The factory's sweep may time it out first, exactly as it would a protocol.
    """

    __slots__ = ("_address", "_client", "_done", "_fd", "_port", "last_activity")

    def __init__(
        self, port: MapperPort, client: socket.socket, address: Any, now: int
    ) -> None:
        self._port = port
        self._client = client
        self._address = address
        self._fd = client.fileno()  # kept after the close: the reactor asks after doRead
        self._done = False
        self.last_activity = now

    def fileno(self) -> int:
        """The socket's descriptor (what the reactor polls)."""
        return self._fd

    def logPrefix(self) -> str:
        """What Twisted's logging context says while this reader runs."""
        return "MapperPort"

    def _finish(self) -> bool:
        """Stop reading and stop being watched; False if that was already done."""
        if self._done:
            return False
        self._done = True
        port = self._port
        port.waiting.discard(self)
        port.reactor.removeReader(self)
        port.factory.request_received(self)
        return True

    def doRead(self) -> None:
        """The first bytes (or EOF, or an error): answer, or hand over to the protocol."""
        client = self._client
        try:
            data = client.recv(_READ_SIZE, _MSG_DONTWAIT)
        except OSError as e:
            if e.errno in _NOT_YET:
                return  # a spurious wake-up: keep waiting
            data = b""
        if not self._finish():
            return
        port = self._port
        reply = port.factory.fast_reply(data) if data else None
        if reply is None:
            port._hand_over(client, self._address, data)
        else:
            port._answer(client, self._address, reply)

    def connectionLost(self, reason: Failure) -> None:
        """The reactor gave up on this descriptor (a hang-up): the normal path cleans up."""
        if self._finish():
            self._port._hand_over(self._client, self._address, b"")

    def abandon(self) -> None:
        """The port is gone: stop waiting and close, with no answer."""
        if self._finish():
            self._client.close()

    def timed_out(self) -> None:
        """The factory's sweep: no byte within packet_timeout seconds. Close, count, log."""
        if not self._finish():
            return
        port = self._port
        factory = port.factory
        factory.counters.connections += 1
        factory.counters.timed_out += 1
        port._log.debug(
            "closing {peer}: {reason}",
            peer=describe_address(port._addressType("TCP", *self._address)),
            reason=f"no complete request within {factory.packet_timeout} s (0 bytes buffered)",
        )
        self._client.close()


def listen_mapper_tcp(
    reactor: IReactorFDSet,
    port: int,
    factory: MapperServerFactory,
    backlog: int = 50,
    interface: str = "",
) -> MapperPort:
    """Like ``reactor.listenTCP``, with a :class:`MapperPort`; raises CannotListenError."""
    listening = MapperPort(port, factory, backlog, interface, reactor)
    listening.startListening()
    return listening


@implementer(IReactorTCP)
class _MapperTCPReactor:
    """What a TCP server endpoint needs of its reactor, listening with a MapperPort.

    Only ``listenTCP`` differs (and only for a :class:`MapperServerFactory`); everything
    else is the real reactor's.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def listenTCP(
        self, port: int, factory: IProtocolFactory, backlog: int = 50, interface: str = ""
    ) -> IListeningPort:
        if isinstance(factory, MapperServerFactory):
            return listen_mapper_tcp(self._reactor, port, factory, backlog, interface)
        listening: IListeningPort = self._reactor.listenTCP(port, factory, backlog, interface)
        return listening

    def connectTCP(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - unused
        return self._reactor.connectTCP(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def mapper_server_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """The server endpoint a mapper should listen on for ``description``.

    ``tcp:`` and ``tcp6:`` descriptions (port, ``interface``, ``backlog``), on a reactor
    with file descriptors, listen with a :class:`MapperPort` when given a
    :class:`MapperServerFactory`; every other description, factory or reactor is exactly
    ``serverFromString(reactor, description)``. Raises what ``serverFromString`` raises.
    """
    endpoint: IStreamServerEndpoint = serverFromString(reactor, description)
    if type(endpoint) in (TCP4ServerEndpoint, TCP6ServerEndpoint) and IReactorFDSet.providedBy(
        reactor
    ):
        fast: IStreamServerEndpoint = serverFromString(_MapperTCPReactor(reactor), description)
        return fast
    return endpoint
