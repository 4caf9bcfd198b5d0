"""The gate (skynet's gate): external clients into the cluster, one agent service each.

A client speaks newline-terminated UTF-8 lines (so ``nc`` and telnet work) or, as an
option, packets with a 2-byte big-endian length (skynet's client framing). A request
``COMMAND ARG REST...`` becomes the payload ``[COMMAND, ARG, REST]`` (split at the first two
spaces; REST is kept byte for byte) for the gate's target service, called from the client's
own agent; the reply, a string, goes back as one line or packet, in request order. Every
failure becomes ``ERROR <reason>`` at once. A client that half-closes (``nc -N``) still gets
every reply, then the close. Limits: clients, line/packet length, and requests in flight per
client. A client is no longer read from while its replies pile up (it does not read), while
it has too many requests in flight, or while a harbor link this node sends to is congested.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Final

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.basic import Int16StringReceiver, LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from .errors import (
    CallTimeout,
    HarborDown,
    MasterUnavailable,
    NoSuchService,
    QueueFull,
    RemoteError,
)
from .node.node import Node
from .node.service import Service

FRAMINGS: Final = ("line", "packet")
MAX_PACKET: Final = 0xFFFF  #: the most a 2-byte length prefix can say
MAX_NAMES_SHOWN: Final = 20  #: names listed in a "no such service" error


@attrs.frozen
class GateConfig:
    """How a gate listens to its clients."""

    target: str = "SIMPLEDB"
    framing: str = "line"
    max_clients: int = 1000
    max_request: int = 4096  #: bytes in one line or packet
    max_in_flight: int = 64  #: requests of one client awaiting replies before we stop reading
    timeout: float | None = None  #: per request (None: the node's default call timeout)
    idle_timeout: float = 300.0  #: seconds without a request or a reply before we close


def request_payload(text: str) -> list[str]:
    """``SET k some value`` -> ``["SET", "k", "some value"]``.

    Split at the first two single spaces; the rest is kept exactly (its spaces, tabs and
    control characters are part of a value)."""
    command, space, rest = text.partition(" ")
    if not space:
        return [command]
    argument, space, tail = rest.partition(" ")
    return [command, argument, tail] if space else [command, argument]


def error_line(failure: Failure, known_names: Iterable[str] | None = None) -> str:
    """The ERROR reply for a failed request: short, one line, never silent. A missing
    service's error lists ``known_names`` (the names that do exist), when given."""
    error = failure.value
    if isinstance(error, RemoteError):
        reason = error.message
    elif isinstance(error, NoSuchService):
        reason = f"no such service: {error}"
        if known_names is not None:
            reason += f" ({_name_list(known_names)})"
    elif isinstance(error, CallTimeout):
        reason = f"timeout: {error}"
    elif isinstance(error, HarborDown | MasterUnavailable | QueueFull):
        reason = f"unavailable: {error}"
    else:
        reason = f"{type(error).__name__}: {error}"
    return "ERROR " + " ".join(str(reason).split())


def _name_list(names: Iterable[str]) -> str:
    """``names: A, B, C`` (the first few, sorted), or that there are none."""
    ordered = sorted(set(names))
    if not ordered:
        return "no names are known"
    shown = ", ".join(ordered[:MAX_NAMES_SHOWN])
    more = len(ordered) - MAX_NAMES_SHOWN
    return f"names: {shown}" + (f" and {more} more" if more > 0 else "")


def describe_peer(address: IAddress) -> str:
    """``host (port=N)`` for a log line (the form tests/test_abuse.py looks for); other
    addresses as text."""
    if isinstance(address, IPv4Address | IPv6Address):
        return f"{address.host} (port={address.port})"
    return str(address)


class Agent(Service):
    """One client's service inside the cluster: its requests come from this handle."""


@implementer(IPushProducer)
class _Backpressure:
    """Registered on the client's transport: pauses reading while its replies pile up."""

    def __init__(self, client: GateClient) -> None:
        self.client = client

    def pauseProducing(self) -> None:
        self.client._hold("replies")

    def resumeProducing(self) -> None:
        self.client._release("replies")

    def stopProducing(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class GateClient:
    """What both framings share: the agent, in-order replies, limits and backpressure.

    Reading stops while any hold is on: ``"replies"`` (the client does not read its
    replies), ``"in flight"`` (too many requests await replies), ``"cluster"`` (a harbor
    link this node sends to is congested)."""

    log = Logger()
    transport: Any
    # from the receiver classes (LineReceiver, Int16StringReceiver): pausing them also stops
    # handling requests already buffered, not just reading more
    paused: bool
    pauseProducing: Callable[[], None]
    resumeProducing: Callable[[], None]
    dataReceived: Callable[[bytes], None]

    def __init__(self, factory: GateFactory) -> None:
        super().__init__()
        self.factory = factory
        self.peer = "a client"
        self.last_active = factory.node.reactor.seconds()
        self.holds: set[str] = set()
        self.replies: deque[list[Any]] = deque()  # [reply text or None] per request, in order
        self.read_closed = False  # the client half-closed: no more requests will come
        self.lost = False
        self.receiving = 0  # inside the framing's dataReceived (which may re-enter)
        self.agent_handle = 0
        self._unsubscribe: Callable[[], None] | None = None

    def client_connected(self) -> None:
        """A client connected: start its idle timer, give it its own agent service (the source of
        its calls) and watch its transport's backpressure."""
        clock = self.factory.node.reactor
        self.peer = describe_peer(self.transport.getPeer())
        self.last_active = clock.seconds()
        self.idle = clock.callLater(self.factory.config.idle_timeout, self._idle)
        self.agent = Agent()
        self.agent_handle = self.factory.node.spawn(self.agent)
        self.transport.registerProducer(_Backpressure(self), True)
        self._unsubscribe = self.factory.node.flow.subscribe(self._cluster_congested)
        self.log.debug("gate client {peer} connected", peer=self.peer)

    def _cluster_congested(self, congested: bool) -> None:
        """From the node's flow control: a congested cluster stops us reading requests."""
        if congested:
            self._hold("cluster")
        else:
            self._release("cluster")

    def _active(self) -> None:
        self.last_active = self.factory.node.reactor.seconds()
        if self.idle.active():
            self.idle.reset(self.factory.config.idle_timeout)

    def _idle(self) -> None:
        if self.replies:  # still waiting on the cluster for it: not idle
            self.idle = self.factory.node.reactor.callLater(
                self.factory.config.idle_timeout, self._idle)
            return
        self.refuse(f"idle for {self.factory.config.idle_timeout:g} s")

    def _receive(self, framing: Callable[[bytes], object], data: bytes) -> None:
        """Hand ``data`` to the framing's dataReceived, then close if the client is done."""
        if self.receiving and not data:
            # resumeProducing from inside a request: the running loop goes on by itself
            # (Int16StringReceiver, re-entered, would handle its buffered packets twice)
            return
        self.receiving += 1
        try:
            framing(data)
        finally:
            self.receiving -= 1
        self._finish_if_done()

    def request(self, raw: bytes) -> None:
        """One request from the client (a line or a packet): parse it, call the gate service, and
        queue its reply in order."""
        self._active()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._answer("ERROR requests are UTF-8 text")
            return
        text = text.lstrip(" ")  # a command has no spaces; the value's are kept
        if not text:
            self._answer("ERROR empty request")
            return
        slot: list[Any] = [None]
        self.replies.append(slot)
        config = self.factory.config
        node = self.factory.node
        call: Deferred[Any]
        if config.target not in node.names and config.target not in node.membership.names \
                and node.group_members(config.target):
            # --gate-service names a group: each request to one member, in turn
            call = node.call_group(config.target, request_payload(text),
                                   timeout=config.timeout, source=self.agent_handle)
        else:
            call = self.agent.call(config.target, request_payload(text),
                                   timeout=config.timeout)
        call.addCallbacks(self._replied, self._failed, callbackArgs=(slot,),
                          errbackArgs=(slot,))
        if len(self.replies) >= config.max_in_flight:
            self._hold("in flight")

    def _answer(self, text: str) -> None:
        """A reply known at once (a malformed request), in its place after earlier ones."""
        self.factory.requests_malformed += 1
        self.replies.append([text])
        self._flush()

    def _replied(self, reply: Any, slot: list[Any]) -> None:
        self.factory.requests_answered += 1
        slot[0] = reply if isinstance(reply, str) else f"ERROR unexpected reply {reply!r}"
        self._flush()

    def _failed(self, failure: Failure, slot: list[Any]) -> None:
        self.factory.requests_failed += 1
        names = None
        if failure.check(NoSuchService):
            node = self.factory.node
            names = [*node.names, *node.membership.names]
        slot[0] = error_line(failure, names)
        self._flush()

    def _flush(self) -> None:
        self._active()
        while self.replies and self.replies[0][0] is not None:
            text = self.replies.popleft()[0]
            if not self.lost and not self.transport.disconnecting:
                self.send_reply(text)
        if len(self.replies) < self.factory.config.max_in_flight:
            self._release("in flight")
        self._finish_if_done()

    def refuse(self, reason: str) -> None:
        """Tell the client why, and close: too long a request, or other abuse."""
        self.log.debug("closing gate client {peer}: {reason}", peer=self.peer, reason=reason)
        if not self.lost and not self.transport.disconnecting:
            self.send_reply(f"ERROR {reason}")
            self.transport.loseConnection()

    def _hold(self, why: str) -> None:
        if not self.holds and not self.lost:
            self.pauseProducing()
        self.holds.add(why)

    def _release(self, why: str) -> None:
        if why not in self.holds:
            return
        self.holds.discard(why)
        if self.holds or self.lost:
            return
        if self.read_closed:
            # handle the requests read before the half-close; asking a half-closed TCP
            # transport to read again would only report the close a second time
            self.paused = False
            self.dataReceived(b"")
        else:
            self.resumeProducing()  # also handles the requests that were buffered
        self._finish_if_done()

    def readConnectionLost(self) -> None:
        """The client closed its write side (``nc -N``): answer what it sent, then close."""
        if self.read_closed:
            return
        self.read_closed = True
        self.log.debug("gate client {peer} closed its side: finishing its requests",
                       peer=self.peer)
        self._finish_if_done()

    def writeConnectionLost(self) -> None:
        """Replies can no longer be sent: nothing left to do."""
        self.transport.loseConnection()

    def _finish_if_done(self) -> None:
        """After a half-close, close once every request read has been answered."""
        if (not self.read_closed or self.lost or self.receiving or self.replies
                or self.transport.disconnecting):
            return
        if self.has_unread():
            if self.holds:
                return  # requests read before the close: handled when the hold ends
            # not paused and done reading, so what is left is a last, unterminated request
            self.unterminated(self.take_unread())
            return
        self.transport.loseConnection()

    def client_lost(self) -> None:
        """The client went away: stop its idle timer and its subscription, and kill its agent
        service."""
        self.lost = True
        self.factory.clients.discard(self)
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        idle = getattr(self, "idle", None)
        if idle is not None and idle.active():
            idle.cancel()
        if self.agent_handle:
            with contextlib.suppress(NoSuchService):  # the node may have stopped first
                self.factory.node.kill(self.agent_handle)
        self.log.debug("gate client {peer} left", peer=self.peer)

    def send_reply(self, text: str) -> None:
        """Write one reply in the client's framing (a line or a packet); each subclass frames it."""
        raise NotImplementedError

    def has_unread(self) -> bool:
        """Whether bytes received are still in the framing's buffer."""
        raise NotImplementedError

    def take_unread(self) -> bytes:
        """The framing's buffered bytes, which it forgets."""
        raise NotImplementedError

    def unterminated(self, data: bytes) -> None:
        """What to do with a last, incomplete request when the client half-closed."""
        raise NotImplementedError


class LineClient(GateClient, LineReceiver):
    """Newline-terminated UTF-8 lines (one CR right before the newline is dropped)."""

    delimiter = b"\n"

    def connectionMade(self) -> None:
        """Take the configured request limit as the line limit, then start the client."""
        self.MAX_LENGTH = self.factory.config.max_request
        self.client_connected()

    def dataReceived(self, data: bytes) -> None:
        """Bytes from the client, read while the gate is not paused for backpressure."""
        self._receive(super().dataReceived, data)

    def lineReceived(self, line: bytes) -> None:
        """A whole line is one request (a trailing CR is dropped, for telnet-style clients)."""
        self.request(line[:-1] if line.endswith(b"\r") else line)

    def lineLengthExceeded(self, line: bytes) -> None:
        """A line over the request limit: refuse it and close the connection."""
        self.refuse(f"request longer than {self.MAX_LENGTH} bytes")

    def send_reply(self, text: str) -> None:
        """One reply as one line (a newline inside it is replaced by a space)."""
        # a newline inside a reply would read as two replies
        self.sendLine(text.replace("\n", " ").encode("utf-8"))  # type: ignore[no-untyped-call]

    def has_unread(self) -> bool:
        """Whether part of a line is still buffered."""
        return bool(self._buffer)

    def take_unread(self) -> bytes:
        """The buffered part of a line, removed from the buffer."""
        unread: bytes = self.clearLineBuffer()  # type: ignore[no-untyped-call]
        return unread

    def unterminated(self, data: bytes) -> None:
        """The input ended without a final newline: what came is still one request."""
        self.lineReceived(data)  # ``printf 'GET k' | nc -N``: the end of input ends it

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        """The connection ended: the client goes."""
        self.client_lost()


class PacketClient(GateClient, Int16StringReceiver):
    """Packets with a 2-byte big-endian length, as skynet's gate frames them."""

    def connectionMade(self) -> None:
        """Take the configured request limit as the packet limit, then start the client."""
        self.MAX_LENGTH = self.factory.config.max_request
        self.client_connected()

    def dataReceived(self, data: bytes) -> None:
        """Bytes from the client, read while the gate is not paused for backpressure."""
        self._receive(super().dataReceived, data)

    def stringReceived(self, string: bytes) -> None:
        """A whole length-prefixed packet is one request."""
        self.request(string)

    def lengthLimitExceeded(self, length: int) -> None:
        """A packet over the request limit: refuse it and close the connection."""
        self.refuse(f"request longer than {self.MAX_LENGTH} bytes")

    def send_reply(self, text: str) -> None:
        """One reply as one packet; a reply too large for the 16-bit length becomes an ERROR."""
        data = text.encode("utf-8")
        if len(data) > MAX_PACKET:
            data = (f"ERROR reply too large for packet framing ({len(data)} bytes, "
                    f"at most {MAX_PACKET})").encode()
        self.sendString(data)  # type: ignore[no-untyped-call]

    def has_unread(self) -> bool:
        """Whether part of a packet is still buffered."""
        return bool(self._unprocessed)

    def take_unread(self) -> bytes:
        """The buffered part of a packet, removed from the buffer."""
        unread, self._unprocessed = self._unprocessed, b""
        return unread

    def unterminated(self, data: bytes) -> None:
        """The input ended inside a packet: answer with an ERROR."""
        self._answer("ERROR the input ended inside a packet")

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        """The connection ended: the client goes."""
        self.client_lost()


class _Busy(Protocol):
    """Answers a client over the limit, then closes."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.reply)
        self.transport.loseConnection()


class GateFactory(Factory):
    """Accepts clients for ``node`` with ``config``.

    Counts clients (``accepted``, ``evicted`` to make room, ``refused`` because the gate
    was full of busy clients) rather than logging each: anyone can open thousands."""

    log = Logger()
    noisy = False

    def __init__(self, node: Node, config: GateConfig) -> None:
        if config.framing not in FRAMINGS:
            raise ValueError(f"framing must be one of {', '.join(FRAMINGS)}")
        self.node = node
        self.config = config
        self.clients: set[GateClient] = set()
        self.accepted = 0
        self.evicted = 0
        self.refused = 0
        #: requests by outcome: answered (a reply), failed (the call failed), malformed
        self.requests_answered = 0
        self.requests_failed = 0
        self.requests_malformed = 0
        self._told_full = False

    def buildProtocol(self, addr: Any) -> Protocol:
        """A client in the gate's framing; when ``max_clients`` are connected, the least recently
        active one that awaits no reply makes room (or the newcomer is refused)."""
        if len(self.clients) >= self.config.max_clients:
            self._full()
            # Make room by closing the least recently active client that awaits no reply
            # (idle connections need no secret to open); never lose a reply in flight.
            victim = min((client for client in self.clients if not client.replies),
                         key=lambda client: client.last_active, default=None)
            if victim is None:
                self.refused += 1
                self.log.debug("gate full, every client awaits replies: refusing {peer}",
                               peer=describe_peer(addr))
                return _Busy(self._framed(b"ERROR too many clients"))
            self.evicted += 1
            self.log.debug("gate full: closing the least active client, {peer}",
                           peer=victim.peer)
            self.clients.discard(victim)
            victim.refuse("the gate is full and this connection was the least active")
        client: GateClient = (LineClient(self) if self.config.framing == "line"
                              else PacketClient(self))
        self.accepted += 1
        self.clients.add(client)
        return client  # type: ignore[return-value]

    def _full(self) -> None:
        """Say once that the gate filled up; later evictions and refusals are only counted."""
        if not self._told_full:
            self._told_full = True
            self.log.warn("the gate is full ({count} clients): idle clients are closed for "
                          "newcomers, and newcomers refused while all await replies",
                          count=self.config.max_clients)

    def _framed(self, message: bytes) -> bytes:
        if self.config.framing == "packet":
            return len(message).to_bytes(2, "big") + message
        return message + b"\n"
