"""The gate (skynet's gate): external clients into the cluster, one agent service each.

A client speaks newline-terminated UTF-8 lines (so ``nc`` and telnet work) or, as an
option, packets with a 2-byte big-endian length (skynet's client framing). A request
``COMMAND ARG REST...`` becomes the payload ``[COMMAND, ARG, REST]`` (the last part keeps
its spaces) for the gate's target service, called from the client's own agent; the reply,
a string, goes back as one line or packet, in request order. Every failure becomes
``ERROR <reason>`` at once. Limits: clients, line/packet length, and requests in flight per
client; a client whose replies pile up (it does not read) is no longer read from.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
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
    """``SET k some value`` -> ``["SET", "k", "some value"]``."""
    command, _, rest = text.strip().partition(" ")
    argument, _, tail = rest.strip().partition(" ")
    return [part for part in (command, argument, tail) if part]


def error_line(failure: Failure) -> str:
    """The ERROR reply for a failed request: short, one line, never silent."""
    error = failure.value
    if isinstance(error, RemoteError):
        reason = error.message
    elif isinstance(error, NoSuchService):
        reason = f"no such service: {error}"
    elif isinstance(error, CallTimeout):
        reason = f"timeout: {error}"
    elif isinstance(error, HarborDown | MasterUnavailable | QueueFull):
        reason = f"unavailable: {error}"
    else:
        reason = f"{type(error).__name__}: {error}"
    return "ERROR " + " ".join(str(reason).split())


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


class GateClient:
    """What both framings share: the agent, in-order replies, limits and backpressure."""

    log = Logger()
    factory: GateFactory
    transport: Any
    # from the receiver classes (LineReceiver, Int16StringReceiver): pausing them also stops
    # handling requests already buffered, not just reading more
    pauseProducing: Callable[[], None]
    resumeProducing: Callable[[], None]

    def client_connected(self) -> None:
        clock = self.factory.node.reactor
        self.last_active = clock.seconds()
        self.idle = clock.callLater(self.factory.config.idle_timeout, self._idle)
        self.holds: set[str] = set()
        self.replies: deque[list[Any]] = deque()  # [reply text or None] per request, in order
        self.agent = Agent()
        self.agent_handle = self.factory.node.spawn(self.agent)
        self.transport.registerProducer(_Backpressure(self), True)

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

    def request(self, raw: bytes) -> None:
        self._active()
        slot: list[Any] = [None]
        self.replies.append(slot)
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            slot[0] = "ERROR requests are UTF-8 text"
            self._flush()
            return
        if not text:
            slot[0] = "ERROR empty request"
            self._flush()
            return
        config = self.factory.config
        call: Deferred[Any] = self.agent.call(config.target, request_payload(text),
                                              timeout=config.timeout)
        call.addCallbacks(self._replied, self._failed, callbackArgs=(slot,),
                          errbackArgs=(slot,))
        if len(self.replies) >= config.max_in_flight:
            self._hold("in flight")

    def _replied(self, reply: Any, slot: list[Any]) -> None:
        slot[0] = reply if isinstance(reply, str) else f"ERROR unexpected reply {reply!r}"
        self._flush()

    def _failed(self, failure: Failure, slot: list[Any]) -> None:
        slot[0] = error_line(failure)
        self._flush()

    def _flush(self) -> None:
        self._active()
        while self.replies and self.replies[0][0] is not None:
            text = self.replies.popleft()[0]
            if self.transport is not None and not self.transport.disconnecting:
                self.send_reply(" ".join(text.splitlines()).encode("utf-8"))
        if len(self.replies) < self.factory.config.max_in_flight:
            self._release("in flight")

    def refuse(self, reason: str) -> None:
        """Tell the client why, and close: too long a request, or other abuse."""
        self.log.info("gate client {peer}: {reason}", peer=self.transport.getPeer(),
                      reason=reason)
        self.send_reply(f"ERROR {reason}".encode())
        self.transport.loseConnection()

    def _hold(self, why: str) -> None:
        if not self.holds:
            self.pauseProducing()
        self.holds.add(why)

    def _release(self, why: str) -> None:
        if why in self.holds:
            self.holds.discard(why)
            if not self.holds and self.transport is not None:
                self.resumeProducing()  # also handles the requests that were buffered

    def client_lost(self) -> None:
        self.factory.clients.discard(self)
        idle = getattr(self, "idle", None)
        if idle is not None and idle.active():
            idle.cancel()
        handle = getattr(self, "agent_handle", 0)
        if handle:
            with contextlib.suppress(NoSuchService):  # the node may have stopped first
                self.factory.node.kill(handle)

    def send_reply(self, data: bytes) -> None:
        raise NotImplementedError


class LineClient(GateClient, LineReceiver):
    """Newline-terminated UTF-8 lines (a trailing CR is dropped)."""

    delimiter = b"\n"

    def connectionMade(self) -> None:
        self.MAX_LENGTH = self.factory.config.max_request
        self.client_connected()

    def lineReceived(self, line: bytes) -> None:
        self.request(line.rstrip(b"\r"))

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse(f"request longer than {self.MAX_LENGTH} bytes")

    def send_reply(self, data: bytes) -> None:
        self.sendLine(data)  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self.client_lost()


class PacketClient(GateClient, Int16StringReceiver):
    """Packets with a 2-byte big-endian length, as skynet's gate frames them."""

    def connectionMade(self) -> None:
        self.MAX_LENGTH = self.factory.config.max_request
        self.client_connected()

    def stringReceived(self, string: bytes) -> None:
        self.request(string)

    def lengthLimitExceeded(self, length: int) -> None:
        self.refuse(f"request longer than {self.MAX_LENGTH} bytes")

    def send_reply(self, data: bytes) -> None:
        self.sendString(data[:65535])  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
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
    """Accepts clients for ``node`` with ``config``."""

    log = Logger()
    noisy = False

    def __init__(self, node: Node, config: GateConfig) -> None:
        if config.framing not in FRAMINGS:
            raise ValueError(f"framing must be one of {', '.join(FRAMINGS)}")
        self.node = node
        self.config = config
        self.clients: set[GateClient] = set()

    def buildProtocol(self, addr: Any) -> Protocol:
        if len(self.clients) >= self.config.max_clients:
            # Full: make room by closing the least recently active client. Idle
            # connections (which need no secret to open) go first; busy clients stay.
            victim = min(self.clients, key=lambda client: client.last_active, default=None)
            if victim is None:
                return _Busy(self._framed(b"ERROR too many clients"))
            self.log.warn("gate full ({count} clients): closing the least active, {peer}",
                          count=len(self.clients), peer=victim.transport.getPeer())
            self.clients.discard(victim)
            victim.refuse("the gate is full and this connection was the least active")
        client: GateClient = LineClient() if self.config.framing == "line" else PacketClient()
        client.factory = self
        self.clients.add(client)
        return client  # type: ignore[return-value]

    def _framed(self, message: bytes) -> bytes:
        if self.config.framing == "packet":
            return len(message).to_bytes(2, "big") + message
        return message + b"\n"
