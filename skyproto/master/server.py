"""The master's side of the name service: a thin adapter over the registry.

Each node connection authenticates (mutual HMAC proof of the cluster secret), joins, and
then receives every change as it happens. When a node's connection closes or its
heartbeats stop, its harbor and its names leave the table at once.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..auth import NONCE_SIZE, new_nonce, prove, verify
from ..errors import ProtocolError, QueueFull
from ..interfaces import IMasterService, IRegistry
from ..wire.framing import DEFAULT_MAX_FRAME, FrameProtocol
from ..wire.heartbeat import HeartbeatTimer
from .messages import (
    MASTER_CODEC,
    MASTER_ROLE,
    NODE_ROLE,
    PROTOCOL_VERSION,
    BindName,
    GetTable,
    Join,
    LookupName,
    MasterChallenge,
    MasterHeartbeat,
    MasterHello,
    Observe,
    Refused,
    Reply,
    TableReply,
    UnbindName,
    Welcome,
    transcript,
)
from .registry import Event, RegistryRefusal

_BEAT = MASTER_CODEC.encode(MasterHeartbeat())
#: a Join carries the node's names: room for a few thousand before the proof is checked
JOIN_MAX_FRAME = 256 * 1024
#: the longest harbor endpoint the master accepts and pushes to every node
MAX_ENDPOINT = 1024


class MasterConnection(FrameProtocol):
    """One node (or observer) connected to the master."""

    def __init__(self, service: MasterService) -> None:
        super().__init__(service.max_frame, max_frame_before_auth=JOIN_MAX_FRAME)
        self.service = service
        self.state = "hello"
        self.nonce = new_nonce()
        self.node_nonce = b""
        self.harbor = 0
        self.incarnation = 0
        self.node = ""
        self._timer: IDelayedCall | None = None
        self._heartbeat = HeartbeatTimer(service.clock, service.heartbeat_interval,
                                         service.heartbeat_timeout, self._beat, self._silent)

    def connectionMade(self) -> None:
        super().connectionMade()
        self.service.connections.add(self)
        self._timer = self.service.clock.callLater(self.service.handshake_timeout, self._late)

    def frame_received(self, frame: bytes) -> None:
        self._heartbeat.heard()
        message = MASTER_CODEC.decode(frame)
        if isinstance(message, MasterHeartbeat):
            return
        handler = getattr(self, f"_on_{self.state}")
        handler(message)

    # --- states ------------------------------------------------------------------------

    def _on_hello(self, message: object) -> None:
        if not isinstance(message, MasterHello):
            raise ProtocolError(f"expected MasterHello, got {type(message).__name__}")
        if message.version != PROTOCOL_VERSION:
            self._refuse(f"protocol version {message.version} is not supported "
                         f"(the master speaks {PROTOCOL_VERSION})")
            return
        if len(message.nonce) != NONCE_SIZE:
            raise ProtocolError("bad nonce")
        self.node_nonce = message.nonce
        proof = prove(self.service.secret, MASTER_ROLE, self._transcript())
        self._send(MasterChallenge(PROTOCOL_VERSION, self.nonce, proof))
        self.state = "proof"

    def _on_proof(self, message: object) -> None:
        if not isinstance(message, Join | Observe):
            raise ProtocolError(f"expected Join or Observe, got {type(message).__name__}")
        if not verify(self.service.secret, NODE_ROLE, self._transcript(), message.proof):
            self._refuse("authentication failed: wrong cluster secret")
            return
        self._handshake_done()
        self.authenticated()
        if isinstance(message, Observe):
            self.state = "observing"
            return
        wait = self.service.auto_grace_left() if message.harbor == 0 else 0.0
        if wait > 0:
            # Just after a (re)start the table lacks live nodes that have not re-joined yet;
            # assigning now could hand out one of their ids. Answer once they are back.
            self.state = "waiting"
            self._timer = self.service.clock.callLater(wait, self._join, message)
            return
        self._join(message)

    def _on_waiting(self, message: object) -> None:
        raise ProtocolError(f"unexpected {type(message).__name__} before the welcome")

    def _join(self, message: Join) -> None:
        self._timer = None
        if self.transport is None or self.state == "closing":
            return
        endpoint = message.endpoint
        if not endpoint or len(endpoint) > MAX_ENDPOINT or not endpoint.isprintable():
            self._refuse(f"unusable harbor endpoint {endpoint[:80]!r}")
            return
        try:
            joined = self.service.registry.join(
                message.harbor, message.node, message.endpoint, message.incarnation,
                message.names, self.service.clock.seconds())
        except RegistryRefusal as e:
            self._refuse(str(e))
            return
        self.harbor, self.incarnation, self.node = joined.harbor, message.incarnation, message.node
        self.service.joined[self.harbor] = self
        self.state = "joined"
        self.log.info("harbor {harbor} joined: {node} at {endpoint} (incarnation {incarnation})",
                      harbor=self.harbor, node=message.node, endpoint=message.endpoint,
                      incarnation=message.incarnation)
        self._send(Welcome(joined.harbor, joined.refused_names,
                           self.service.registry.snapshot()))
        self.service.push(joined.events)

    def _on_joined(self, message: object) -> None:
        registry = self.service.registry
        if isinstance(message, BindName):
            self._answer(message.request, lambda: registry.bind(message.name, message.handle,
                                                                self.harbor))
        elif isinstance(message, UnbindName):
            self._answer(message.request, lambda: registry.unbind(message.name, self.harbor))
        else:
            self._on_observing(message)

    def _on_observing(self, message: object) -> None:
        if isinstance(message, LookupName):
            self._send(Reply(message.request, "",
                             self.service.registry.lookup(message.name) or 0))
        elif isinstance(message, GetTable):
            self._send(TableReply(message.request, self.service.registry.snapshot()))
        else:
            raise ProtocolError(f"unexpected {type(message).__name__}")

    def _on_closing(self, message: object) -> None:
        pass

    # --- helpers -----------------------------------------------------------------------

    def _answer(self, request: int, change: Any) -> None:
        try:
            events = change()
        except RegistryRefusal as e:
            self._send(Reply(request, str(e), 0))
            return
        self.service.push(events)  # the requester's cache has it before its reply arrives
        self._send(Reply(request, "", 0))

    def _transcript(self) -> bytes:
        return transcript(PROTOCOL_VERSION, self.node_nonce, self.nonce)

    def _handshake_done(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._heartbeat.start()

    def _send(self, message: object) -> None:
        self.send_frame(MASTER_CODEC.encode(message))

    def _refuse(self, reason: str) -> None:
        self.log.warn("refusing {peer}: {reason}", peer=self.transport.getPeer(),  # type: ignore[union-attr]
                      reason=reason)
        self._send(Refused(reason))
        self.state = "closing"
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _beat(self) -> None:
        self.send_frame(_BEAT)

    def _silent(self, quiet: float) -> None:
        self.drop(f"harbor {self.harbor or '?'} silent for {quiet:.1f} s")

    def _late(self) -> None:
        self._timer = None
        self.drop(f"no handshake within {self.service.handshake_timeout:g} s")

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._heartbeat.stop()
        self.service.connections.discard(self)
        if self.state == "joined" and self.service.joined.get(self.harbor) is self:
            del self.service.joined[self.harbor]
            why = self.drop_reason or reason.getErrorMessage()
            self.log.info("harbor {harbor} left: {why}", harbor=self.harbor, why=why)
            self.service.push(self.service.registry.leave(self.harbor, self.incarnation, why))


@implementer(IMasterService)
class MasterService(Factory):
    """The master: one registry, every node connection, and the push of every change."""

    log = Logger()
    noisy = False

    def __init__(self, registry: IRegistry, clock: IReactorTime, secret: bytes,
                 heartbeat_interval: float = 1.0, heartbeat_timeout: float = 3.0,
                 handshake_timeout: float = 5.0, max_frame: int = DEFAULT_MAX_FRAME,
                 auto_grace: float = 2.0) -> None:
        self.registry = registry
        #: after start, how long ``--harbor auto`` joins wait for live nodes to re-join
        self.auto_grace = auto_grace
        self.started_at = clock.seconds()
        self.clock = clock
        self.secret = secret
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.handshake_timeout = handshake_timeout
        self.max_frame = max_frame
        self.connections: set[MasterConnection] = set()
        self.joined: dict[int, MasterConnection] = {}

    def buildProtocol(self, addr: object) -> MasterConnection:
        return MasterConnection(self)

    def auto_grace_left(self) -> float:
        return self.started_at + self.auto_grace - self.clock.seconds()

    def connected(self) -> int:
        return len(self.joined)

    def push(self, events: tuple[Event, ...]) -> None:
        """Send each event to every joined node, in order (the originator included)."""
        for event in events:
            frame = MASTER_CODEC.encode(event)
            for connection in list(self.joined.values()):
                try:
                    connection.send_frame(frame)
                except QueueFull as e:
                    # It will reconnect and get the whole table; the others must not wait.
                    connection.drop(f"harbor {connection.harbor} cannot keep up: {e}")

    def close_all(self) -> None:
        for connection in list(self.connections):
            connection.transport.loseConnection()  # type: ignore[union-attr]
