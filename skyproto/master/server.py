"""The master's side of the name service: per-node sessions over one registry.

Each connection is a :class:`MasterConnection` (a thin adapter: frames in, frames out) and
a session state machine (automat): handshaking, waiting, joined, observing, closing,
closed. The handshake itself is the pure :class:`skyproto.master.handshake.MasterHandshake`.
A join may have to wait: ``--harbor auto`` during the start-up grace, and a restarted
node (same node name, newer incarnation) until its previous incarnation's session drops.
After a (re)start the master also holds back names nobody holds for the same grace, so
that returning holders get theirs back first. A join re-asserts the node's names, then its
service group memberships. When a joined connection ends, its harbor, its names and its
group memberships leave the table at once.

The registry is any :class:`skyproto.interfaces.IRegistry` (in memory, or etcd shared by
several masters): its changes answer with Deferreds, and the changes it reports, whoever
made them, are what the master pushes to its nodes.

Failures before authentication are counted (:attr:`MasterService.preauth_failures`) and
logged at debug only: anyone can open connections, and a line each would flood the log.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Final, Protocol

import attrs
from automat import TypeMachineBuilder
from twisted.internet.defer import Deferred, FirstError, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..address import harbor_of
from ..auth import check_secret
from ..errors import ProtocolError, QueueFull
from ..interfaces import IMasterService, IRegistry, IRegistryListener
from ..wire.framing import DEFAULT_MAX_FRAME, FrameProtocol, describe_peer
from ..wire.heartbeat import HeartbeatTimer, HeartbeatTiming
from .handshake import (
    MAX_ENDPOINT,
    JoinRequest,
    MasterHandshake,
    ObserveRequest,
    Refusal,
)
from .messages import (
    MASTER_CODEC,
    MAX_RELAY_TIMEOUT,
    BindName,
    GetTable,
    Join,
    JoinGroup,
    LeaveGroup,
    ListServices,
    LookupName,
    MasterHeartbeat,
    QueryServices,
    Refused,
    Reply,
    ServicesReply,
    ServicesReport,
    TableReply,
    UnbindName,
    Watch,
    Welcome,
)
from .records import (
    Event,
    HarborHeld,
    HarborLeft,
    Joined,
    NameBound,
    RegistryRefusal,
    RegistryUnavailable,
)

_BEAT = MASTER_CODEC.encode(MasterHeartbeat())
#: a Join carries the node's names and group memberships: room for a few thousand before
#: the proof is checked
JOIN_MAX_FRAME: Final = 256 * 1024
#: a restarted node waits this long beyond its old session's heartbeat timeout
TAKEOVER_MARGIN: Final = 1.0

__all__ = ["JOIN_MAX_FRAME", "MAX_ENDPOINT", "MasterConnection", "MasterService"]


class _SessionInputs(Protocol):
    """What can happen to one session."""

    def message(self, message: object) -> None:
        """A decoded frame from the peer (heartbeats are filtered out)."""

    def late(self) -> None:
        """No valid Join or Observe within the handshake timeout."""

    def silent(self, quiet: float) -> None:
        """The peer sent no byte for the heartbeat timeout."""

    def drop(self, reason: str) -> None:
        """Abort the connection (a protocol error, a slow reader, an internal error)."""

    def lost(self, reason: str) -> None:
        """The connection is gone."""

    def admit(self) -> None:
        """Try to admit the node that asked to join (again, after a wait)."""

    def observe(self) -> None:
        """The handshake ended as an observer."""

    def wait(self, seconds: float, why: str) -> None:
        """The join cannot be decided yet: try again in ``seconds`` (or when told)."""

    def welcome(self, joined: Joined) -> None:
        """The registry admitted the node."""

    def refused(self, reason: str, authenticated: bool) -> None:
        """Refused has been sent: close after it."""

    def bind(self, request: int, name: str, handle: int) -> None:
        """A held-back BindName's turn has come."""


@attrs.define(eq=False)
class _Session:
    """The core of one session: what the machine's behaviours work on."""

    service: MasterService
    connection: MasterConnection
    handshake: MasterHandshake
    state: str = "handshaking"
    authenticated: bool = False
    #: the Join being decided (handshaking, waiting)
    request: Join | None = None
    harbor: int = 0
    incarnation: int = 0
    node: str = ""
    timing: HeartbeatTiming = attrs.field(factory=HeartbeatTiming)
    timer: IDelayedCall | None = None
    #: a restarted node's wait for its previous incarnation ends here (clock seconds)
    takeover_deadline: float | None = None
    #: the registry is deciding this session's join (its answer may come later)
    claim: Deferred[Joined] | None = None

    def cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def send(self, message: object) -> None:
        self.connection.send_frame(MASTER_CODEC.encode(message))

    def abort(self, reason: str) -> None:
        self.connection.abort(reason, quiet=not self.authenticated)
        if not self.authenticated:
            self.service.preauth_failures[_kind(reason)] += 1


def _kind(reason: str) -> str:
    """The counter a pre-auth drop goes to."""
    if reason.startswith("protocol error"):
        return "protocol error"
    if reason.startswith("no handshake"):
        return "handshake timeout"
    if reason.startswith("sealed record"):  # keys from another secret: the Join never opened
        return "authentication failed"
    return "dropped"


def _build_session_machine() -> Callable[[_Session], _SessionInputs]:
    machine = TypeMachineBuilder(_SessionInputs, _Session)
    handshaking = machine.state("handshaking")
    waiting = machine.state("waiting")
    joined = machine.state("joined")
    observing = machine.state("observing")
    closing = machine.state("closing")
    closed = machine.state("closed")
    every = (handshaking, waiting, joined, observing, closing, closed)

    # --- handshaking ------------------------------------------------------------------

    @handshaking.upon(_SessionInputs.message).loop()
    def handshake_message(c: _SessionInputs, s: _Session, message: object) -> None:
        try:
            step = s.handshake.receive(message)
        except ProtocolError as e:
            c.drop(f"protocol error: {e}")
            return
        for reply in step.send:
            s.send(reply)
        if step.keys is not None:
            s.connection.start_sealing(step.keys, initiator=False)
        for reply in step.sealed:
            s.send(reply)
        outcome = step.outcome
        if isinstance(outcome, Refusal):
            c.refused(outcome.reason, outcome.authenticated)
        elif isinstance(outcome, JoinRequest | ObserveRequest):
            s.cancel_timer()
            s.authenticated = True
            s.timing = outcome.timing
            s.connection.authenticated()
            s.connection.start_heartbeat(outcome.timing)
            if isinstance(outcome, ObserveRequest):
                c.observe()
            else:
                s.request = outcome.join
                c.admit()

    @handshaking.upon(_SessionInputs.observe).to(observing)
    def observer(c: _SessionInputs, s: _Session) -> None:
        s.state = "observing"

    @handshaking.upon(_SessionInputs.admit).loop()
    @waiting.upon(_SessionInputs.admit).loop()
    def admit(c: _SessionInputs, s: _Session) -> None:
        s.cancel_timer()
        s.service.admission(c, s)

    @handshaking.upon(_SessionInputs.wait).to(waiting)
    @waiting.upon(_SessionInputs.wait).loop()
    def wait(c: _SessionInputs, s: _Session, seconds: float, why: str) -> None:
        s.state = "waiting"
        s.cancel_timer()
        s.timer = s.service.clock.callLater(max(0.0, seconds), s.connection.feed, c.admit)
        s.service.log.info("harbor {harbor} ({node}) waits up to {seconds:.1f} s: {why}",
                           harbor=s.request.harbor if s.request else 0,
                           node=s.request.node if s.request else "?", seconds=seconds, why=why)

    @handshaking.upon(_SessionInputs.welcome).to(joined)
    @waiting.upon(_SessionInputs.welcome).to(joined)
    def welcome(c: _SessionInputs, s: _Session, joined: Joined) -> None:
        s.state = "joined"
        s.cancel_timer()
        assert s.request is not None
        service = s.service
        s.harbor, s.incarnation, s.node = joined.harbor, s.request.incarnation, s.request.node
        service.joined[s.harbor] = s.connection
        service.log.info(
            "harbor {harbor} joined: {node} at {endpoint} (incarnation {incarnation})",
            harbor=s.harbor, node=s.node, endpoint=s.request.endpoint,
            incarnation=s.incarnation)
        s.request = None
        registry = service.registry
        s.send(Welcome(joined.harbor, joined.refused_names, registry.snapshot(),
                       dense=registry.kind == "memory"))
        # everyone else was told as the registry changed; the joiner's own events follow
        # its Welcome (and are not above its table's sequence)
        service.push(joined.events, (s.connection,))
        service.names_granted()

    @handshaking.upon(_SessionInputs.refused).to(closing)
    @waiting.upon(_SessionInputs.refused).to(closing)
    def refused(c: _SessionInputs, s: _Session, reason: str, authenticated: bool) -> None:
        s.state = "closing"
        s.cancel_timer()
        peer = describe_peer(s.connection.transport)
        if authenticated:
            s.service.log.warn("refusing {peer}: {reason}", peer=peer, reason=reason)
        else:
            s.service.preauth_failures["refused"] += 1
            s.service.log.debug("refusing {peer}: {reason}", peer=peer, reason=reason)
        s.connection.close()

    @handshaking.upon(_SessionInputs.late).to(closing)
    def late(c: _SessionInputs, s: _Session) -> None:
        s.state = "closing"
        s.timer = None
        s.abort(f"no handshake within {s.service.handshake_timeout:g} s")

    # --- after the handshake ----------------------------------------------------------

    @waiting.upon(_SessionInputs.message).loop()
    def message_while_waiting(c: _SessionInputs, s: _Session, message: object) -> None:
        c.drop(f"protocol error: unexpected {type(message).__name__} before the welcome")

    @joined.upon(_SessionInputs.message).loop()
    def joined_message(c: _SessionInputs, s: _Session, message: object) -> None:
        service = s.service
        if isinstance(message, BindName):
            if service.holds_back(message.name):
                service.hold_back(s.connection, message)
            else:
                service.answer_bind(s, message.request, message.name, message.handle)
        elif isinstance(message, UnbindName):
            if service.withdraw(s, message.name):
                s.send(Reply(message.request, "", 0))
            else:
                service.answer(s, message.request,
                               lambda: service.registry.release_name(message.name, s.harbor))
        elif isinstance(message, JoinGroup):
            service.answer_join_group(s, message.request, message.group, message.handle)
        elif isinstance(message, LeaveGroup):
            group, handle, harbor = message.group, message.handle, s.harbor
            service.answer(s, message.request,
                           lambda: service.registry.leave_group(group, handle, harbor))
        elif isinstance(message, LookupName | GetTable):
            read(c, s, message)
        elif isinstance(message, ServicesReport):
            service.services_reported(s.connection, message)
        else:
            c.drop(f"protocol error: unexpected {type(message).__name__}")

    @observing.upon(_SessionInputs.message).loop()
    def observer_message(c: _SessionInputs, s: _Session, message: object) -> None:
        if isinstance(message, LookupName | GetTable):
            read(c, s, message)
        elif isinstance(message, Watch):
            s.service.watch(s.connection, message.request)
        elif isinstance(message, ListServices):
            s.service.list_services(s.connection, message)
        else:
            c.drop(f"protocol error: unexpected {type(message).__name__}")

    def read(c: _SessionInputs, s: _Session, message: LookupName | GetTable) -> None:
        registry = s.service.registry
        if isinstance(message, LookupName):
            s.send(Reply(message.request, "", registry.lookup(message.name) or 0))
        else:
            s.send(TableReply(message.request, registry.snapshot(), registry.kind))

    @joined.upon(_SessionInputs.bind).loop()
    def bind(c: _SessionInputs, s: _Session, request: int, name: str, handle: int) -> None:
        s.service.answer_bind(s, request, name, handle)

    # --- the end: every state ---------------------------------------------------------

    @handshaking.upon(_SessionInputs.drop).to(closing)
    @waiting.upon(_SessionInputs.drop).to(closing)
    @joined.upon(_SessionInputs.drop).to(closing)
    @observing.upon(_SessionInputs.drop).to(closing)
    @closing.upon(_SessionInputs.drop).loop()
    def drop(c: _SessionInputs, s: _Session, reason: str) -> None:
        s.state = "closing"
        s.cancel_timer()
        if s.connection.drop_reason is None:
            s.abort(reason)

    @handshaking.upon(_SessionInputs.silent).to(closing)
    @waiting.upon(_SessionInputs.silent).to(closing)
    @joined.upon(_SessionInputs.silent).to(closing)
    @observing.upon(_SessionInputs.silent).to(closing)
    def silent(c: _SessionInputs, s: _Session, quiet: float) -> None:
        c.drop(f"harbor {s.harbor or '?'} silent for {quiet:.1f} s")

    for state in (handshaking, waiting, joined, observing, closing):
        state.upon(_SessionInputs.lost).to(closed)(_lost)
    closed.upon(_SessionInputs.lost).loop()(_ignore_lost)

    # --- everything else is ignored where it cannot apply -----------------------------

    ignored: dict[Callable[..., None], tuple[object, ...]] = {
        _SessionInputs.message: (closing, closed),
        _SessionInputs.late: (waiting, joined, observing, closing, closed),
        _SessionInputs.silent: (closing, closed),
        _SessionInputs.drop: (closed,),
        _SessionInputs.admit: (joined, observing, closing, closed),
        _SessionInputs.observe: (waiting, joined, observing, closing, closed),
        _SessionInputs.wait: (joined, observing, closing, closed),
        _SessionInputs.welcome: (joined, observing, closing, closed),
        _SessionInputs.refused: (joined, observing, closing, closed),
        _SessionInputs.bind: (handshaking, waiting, observing, closing, closed),
    }
    for event, states in ignored.items():
        for state in every:
            if state in states:
                state.upon(event).loop()(_ignore)
    return machine.build()


def _ignore(c: _SessionInputs, s: _Session, *args: object) -> None:
    """An event that cannot apply in this state (a late timer, a stray message)."""


def _ignore_lost(c: _SessionInputs, s: _Session, reason: str) -> None:
    pass


def _lost(c: _SessionInputs, s: _Session, reason: str) -> None:
    was = s.state
    s.state = "closed"
    s.cancel_timer()
    service = s.service
    why = s.connection.drop_reason or reason
    if s.harbor and service.joined.get(s.harbor) is s.connection:
        del service.joined[s.harbor]
        service.forget(s.connection)
        service.log.info("harbor {harbor} left: {why}", harbor=s.harbor, why=why)
        service.depart(s.harbor, s.incarnation, why)
        return
    service.forget(s.connection)
    if not s.authenticated and was == "handshaking" and s.connection.drop_reason is None:
        service.preauth_failures["closed before the handshake"] += 1


SessionMachine = _build_session_machine()


class MasterConnection(FrameProtocol):
    """One node (or observer) connected to the master: frames to and from its session."""

    def __init__(self, service: MasterService) -> None:
        super().__init__(service.max_frame, max_frame_before_auth=JOIN_MAX_FRAME)
        self.service = service
        self.session = _Session(service, self, MasterHandshake(service.secret, service.timing))
        self.machine = SessionMachine(self.session)
        timing = service.timing
        self._heartbeat = HeartbeatTimer(service.clock, timing.interval, timing.timeout,
                                         self._beat, self._silent)

    @property
    def state(self) -> str:
        """The session's state: handshaking, waiting, joined, observing, closing, closed."""
        return self.session.state

    @property
    def harbor(self) -> int:
        """The harbor id of the joined node (0 before the welcome, and for observers)."""
        return self.session.harbor

    @property
    def incarnation(self) -> int:
        """The joined node's incarnation (0 before the welcome)."""
        return self.session.incarnation

    @property
    def node(self) -> str:
        """The joined node's name (empty before the welcome)."""
        return self.session.node

    def connectionMade(self) -> None:
        """Count the connection and start its handshake timer."""
        super().connectionMade()
        self.service.connections.add(self)
        self.session.timer = self.service.clock.callLater(
            self.service.handshake_timeout, self.feed, self.machine.late)

    def dataReceived(self, data: bytes) -> None:
        """Bytes from the peer: a sign of life."""
        self._heartbeat.heard()  # every byte is a sign of life, not just whole frames
        super().dataReceived(data)

    def frame_received(self, frame: bytes) -> None:
        """Decode one message and give it to the session (heartbeats only count as life)."""
        message = MASTER_CODEC.decode(frame)
        if not isinstance(message, MasterHeartbeat):
            self.feed(self.machine.message, message)

    def plain_frame_before_sealed(self, frame: bytes) -> None:
        """A plain heartbeat the node sent before it had our challenge is harmless; any other plain
        frame drops the connection."""
        # The node beats from the moment it connects; a beat sent before our challenge
        # reached it arrives in the clear after we switched. It changes nothing.
        if frame != _BEAT:
            super().plain_frame_before_sealed(frame)

    def feed(self, event: Callable[..., None], *args: object) -> None:
        """Give the session one event; an exception in it is logged and drops the connection."""
        try:
            event(*args)
        except Exception:
            self.log.failure("the master session with {peer} failed; dropping it",
                             peer=describe_peer(self.transport))
            if self.transport is not None and self.drop_reason is None:
                self.abort("internal error in the master session",
                           quiet=not self.session.authenticated)

    def drop(self, reason: str, quiet: bool = False) -> None:
        """What the framing layer calls on a bad frame: the session decides."""
        self.feed(self.machine.drop, reason)

    def abort(self, reason: str, quiet: bool) -> None:
        """Abort the connection now, logging why (at debug when ``quiet``)."""
        super().drop(reason, quiet=quiet)

    def close(self) -> None:
        """Close after what has been written (a Refused) is delivered."""
        if self.transport is not None:
            self.close_connection()

    def start_heartbeat(self, timing: HeartbeatTiming) -> None:
        """Beat and watch for silence at the negotiated timing."""
        self._heartbeat.retime(timing)
        self._heartbeat.start()

    def _beat(self) -> None:
        self.send_frame(_BEAT)

    def _silent(self, quiet: float) -> None:
        self.feed(self.machine.silent, quiet)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        """The connection ended: the session ends (a joined harbor leaves the table)."""
        self._heartbeat.stop()
        self.feed(self.machine.lost, reason.getErrorMessage())
        self.service.forget(self)  # whatever the session managed to do


@attrs.define(eq=False)
class _Query:
    """A ListServices relayed to a node: who asked, which node must answer, until when."""

    observer: MasterConnection
    request: int
    harbor: int
    node: MasterConnection
    timeout: float
    timer: IDelayedCall | None = None


@attrs.frozen
class _HeldBind:
    connection: MasterConnection
    request: int
    name: str
    handle: int


@implementer(IMasterService, IRegistryListener)
class MasterService(Factory):
    """The master: one registry, every node session, and the push of every change.

    It depends on nothing of the registry but :class:`skyproto.interfaces.IRegistry`:
    changes are asked for and answered with Deferreds (a session may end while its claim
    is in flight: what was granted after it left is released), and every change, made
    here or by another master sharing the store, is pushed from the subscription."""

    log = Logger()
    noisy = False

    def __init__(self, registry: IRegistry, clock: IReactorTime, secret: bytes,
                 heartbeat_interval: float = 1.0, heartbeat_timeout: float = 3.0,
                 handshake_timeout: float = 5.0, max_frame: int = DEFAULT_MAX_FRAME,
                 auto_grace: float = 2.0, name_grace: float | None = None) -> None:
        self.registry = registry
        #: after start, how long ``--harbor auto`` joins wait for live nodes to re-join
        self.auto_grace = auto_grace
        #: after start, how long a BindName for a name nobody holds waits for its holder
        self.name_grace = auto_grace if name_grace is None else name_grace
        self.started_at = clock.seconds()
        self.clock = clock
        self.secret = check_secret(secret)
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.timing = HeartbeatTiming(heartbeat_interval, heartbeat_timeout)
        self.handshake_timeout = handshake_timeout
        self.max_frame = max_frame
        self.connections: set[MasterConnection] = set()
        self.joined: dict[int, MasterConnection] = {}
        #: failures of connections that never authenticated, by kind (logged at debug)
        self.preauth_failures: Counter[str] = Counter()
        self._held: list[_HeldBind] = []
        self._grace_timer: IDelayedCall | None = None
        #: observers that asked to be told every change (Watch)
        self.watchers: set[MasterConnection] = set()
        #: ListServices waiting for their node's ServicesReport, by query id
        self.queries: dict[int, _Query] = {}
        self._last_query = 0
        registry.subscribe(self)

    def buildProtocol(self, addr: object) -> MasterConnection:
        """One node's (or observer's) connection."""
        return MasterConnection(self)

    def auto_grace_left(self) -> float:
        """Seconds left of the start-up grace for ``--harbor auto`` joins (negative once over)."""
        return self.started_at + self.auto_grace - self.clock.seconds()

    def name_grace_left(self) -> float:
        """Seconds left of the start-up grace for names nobody holds (negative once over)."""
        return self.started_at + self.name_grace - self.clock.seconds()

    def connected(self) -> int:
        """How many nodes are joined now."""
        return len(self.joined)

    # --- admission -----------------------------------------------------------------------

    def admission(self, c: _SessionInputs, s: _Session) -> None:
        """Decide a join: welcome, wait, or refuse (Refused sent here); a store that needs
        I/O decides later."""
        join = s.request
        assert join is not None
        if s.claim is not None:
            return  # the registry is deciding already: its answer decides
        now = self.clock.seconds()
        if join.harbor == 0 and (left := self.auto_grace_left()) > 0:
            # Just after a (re)start the table lacks live nodes that have not re-joined yet;
            # assigning now could hand out one of their ids. Answer once they are back.
            c.wait(left, "the master's start-up grace before assigning an id")
            return
        old = self.joined.get(join.harbor) if join.harbor else None
        live = old.session if old is not None else None
        if live is not None and live.node == join.node:
            if join.incarnation == live.incarnation:
                # The same process again: its old connection is dead, whatever the master
                # has noticed. Take it over, without the harbor ever leaving.
                self._resume(c, s, old, join)
                return
            if join.incarnation > live.incarnation:
                # A restart of the node whose old session the master still holds open.
                if s.takeover_deadline is None:
                    s.takeover_deadline = now + live.timing.timeout + TAKEOVER_MARGIN
                if now < s.takeover_deadline:
                    c.wait(s.takeover_deadline - now,
                           f"its previous incarnation {live.incarnation} is still joined")
                    return
        # A store that needs I/O answers later; meanwhile this session waits for it (a
        # second admit, from a timer or a harbor leaving, changes nothing).
        claim: Deferred[Joined] = self.registry.admit(
            join.harbor, join.node, join.endpoint, join.incarnation, join.names, now)
        self._deciding(c, s, join, claim.addCallback(self._with_groups, join))

    def _deciding(self, c: _SessionInputs, s: _Session, join: Join,
                  claim: Deferred[Joined]) -> None:
        s.claim = claim
        claim.addCallbacks(self._admitted, self._not_admitted, callbackArgs=(c, s, join),
                           errbackArgs=(c, s, join))

    def _still_asking(self, s: _Session, join: Join) -> bool:
        return s.request is join and s.state in ("handshaking", "waiting")

    def _admitted(self, joined: Joined, c: _SessionInputs, s: _Session, join: Join) -> None:
        s.claim = None
        if not self._still_asking(s, join):
            # The connection ended while the registry decided: give back what it granted,
            # unless the same node (re-connected) holds or asks for it again.
            if not self._wanted_again(joined.harbor, join, s):
                self.log.info("harbor {harbor} ({node}) left before its join was decided; "
                              "releasing it", harbor=joined.harbor, node=join.node)
                self.depart(joined.harbor, join.incarnation,
                            "its connection ended before the welcome")
            return
        s.connection.feed(c.welcome, joined)

    def _wanted_again(self, harbor: int, join: Join, gone: _Session) -> bool:
        for connection in self.connections:
            other = connection.session
            if other is gone:
                continue
            asked = other.request
            if (other.harbor, other.incarnation) == (harbor, join.incarnation):
                return True
            if asked is not None and (asked.harbor, asked.incarnation) == (
                    harbor, join.incarnation):
                return True
        return False

    def _not_admitted(self, failure: Failure, c: _SessionInputs, s: _Session,
                      join: Join) -> None:
        s.claim = None
        error = failure.value
        if isinstance(error, RegistryUnavailable):
            self.log.warn("cannot admit harbor {harbor} ({node}): {why}",
                          harbor=join.harbor, node=join.node, why=str(error))
        if not self._still_asking(s, join):
            return
        if isinstance(error, HarborHeld) and error.expires_in is not None and \
                error.node == join.node and error.incarnation < join.incarnation:
            # Its previous incarnation is held through another master: that one lets go when
            # it notices the old session's end, or its registration runs out. Wait for that.
            now = self.clock.seconds()
            if s.takeover_deadline is None:
                s.takeover_deadline = now + error.expires_in + TAKEOVER_MARGIN
            if now < s.takeover_deadline:
                s.connection.feed(c.wait, s.takeover_deadline - now,
                                  f"its previous incarnation {error.incarnation} is still "
                                  f"registered")
                return
        if isinstance(error, RegistryRefusal):
            s.send(Refused(str(error)))
            s.connection.feed(c.refused, str(error), True)
        elif isinstance(error, RegistryUnavailable):
            # Not a refusal (that would stop the node for good): it comes back and tries again.
            s.connection.feed(c.drop, f"the registry is unavailable: {error}")
        else:
            self.log.failure("the registry failed to admit harbor {harbor} ({node})",
                             failure, harbor=join.harbor, node=join.node)
            s.connection.feed(c.drop, "internal error in the registry")

    def _resume(self, c: _SessionInputs, s: _Session, old: MasterConnection | None,
                join: Join) -> None:
        assert old is not None
        del self.joined[join.harbor]  # the old connection's end is not the harbor's end
        old.drop("replaced by a new connection from the same node")
        claims = [self._claim_at_join(name, handle, join.harbor)
                  for name, handle in sorted(join.names.items())]

        def outcome(results: list[tuple[str, tuple[Event, ...] | None]]) -> Joined:
            return Joined(join.harbor,
                          tuple(name for name, events in results if events is None),
                          tuple(e for _, events in results for e in events or ()))

        def first(failure: Failure) -> Failure:
            error = failure.value  # gatherResults' FirstError: the first claim that failed
            return error.subFailure if isinstance(error, FirstError) else failure

        joined = gatherResults(claims, consumeErrors=True).addCallbacks(outcome, first)
        self._deciding(c, s, join, joined.addCallback(self._with_groups, join))

    def _claim_at_join(self, name: str, handle: int,
                       harbor: int) -> Deferred[tuple[str, tuple[Event, ...] | None]]:
        """A name a (re-)joining node asserts: its events, or None if it is refused."""
        def refused(failure: Failure) -> tuple[str, None]:
            failure.trap(RegistryRefusal)
            return name, None

        def granted(events: tuple[Event, ...]) -> tuple[str, tuple[Event, ...]]:
            return name, events

        claim: Deferred[tuple[Event, ...]] = self.registry.claim_name(name, handle, harbor)
        return claim.addCallbacks(granted, refused)

    def _with_groups(self, joined: Joined, join: Join) -> Deferred[Joined]:
        """After a join's names, the group memberships it re-asserts: the Join states all
        of the harbor's. One the registry refuses or cannot decide now is logged and left
        out: the node, not finding it in its welcome's table, asks for it again. One the
        registry has for the harbor but the Join does not (left while the node was away
        from this session, or left over from a previous one) is removed."""
        harbor = joined.harbor
        memberships = sorted({(group, handle) for group, handles in join.groups.items()
                              for handle in handles})
        stale = sorted({(group, handle) for group, handles in
                        self.registry.snapshot().groups.items() for handle in handles
                        if harbor_of(handle) == harbor} - set(memberships))
        if not memberships and not stale:
            return succeed(joined)

        def not_joined(failure: Failure, group: str, handle: int) -> tuple[Event, ...]:
            error = failure.value
            if isinstance(error, RegistryRefusal):
                self.log.info("harbor {harbor}: membership of :{handle:08x} in group "
                              "{group} refused: {why}", harbor=harbor, handle=handle,
                              group=group, why=str(error))
            elif isinstance(error, RegistryUnavailable):
                self.log.warn("harbor {harbor}: membership of :{handle:08x} in group {group} "
                              "not decided: {why}", harbor=harbor, handle=handle, group=group,
                              why=str(error))
            else:
                self.log.failure("the registry failed on a group membership of harbor "
                                 "{harbor}", failure, harbor=harbor)
            return ()

        def not_left(failure: Failure, group: str, handle: int) -> tuple[Event, ...]:
            self.log.warn("harbor {harbor}: :{handle:08x} stays in group {group}: {why}",
                          harbor=harbor, handle=handle, group=group,
                          why=failure.getErrorMessage())
            return ()

        claims: list[Deferred[tuple[Event, ...]]] = []
        for group, handle in memberships:
            claim: Deferred[tuple[Event, ...]] = self.registry.join_group(group, handle, harbor)
            claims.append(claim.addErrback(not_joined, group, handle))
        for group, handle in stale:
            self.log.info("harbor {harbor}: :{handle:08x} leaves group {group}: not in its "
                          "join", harbor=harbor, handle=handle, group=group)
            left: Deferred[tuple[Event, ...]] = self.registry.leave_group(group, handle, harbor)
            claims.append(left.addErrback(not_left, group, handle))

        def outcome(results: list[tuple[Event, ...]]) -> Joined:
            events = sorted((e for events in results for e in events), key=lambda e: e.sequence)
            return attrs.evolve(joined, events=(*joined.events, *events))

        return gatherResults(claims).addCallback(outcome)

    def depart(self, harbor: int, incarnation: int, reason: str) -> None:
        """A harbor's session ended: it, its names and its memberships leave the registry."""
        def failed(failure: Failure) -> None:
            if failure.check(RegistryUnavailable):
                self.log.warn("cannot remove harbor {harbor} from the registry: {why}",
                              harbor=harbor, why=failure.getErrorMessage())
            else:
                self.log.failure("the registry failed to remove harbor {harbor}", failure,
                                 harbor=harbor)

        departed = self.registry.depart(harbor, incarnation, reason)
        departed.addCallbacks(lambda _: None, failed)
        departed.addCallback(lambda _: self.harbor_left(harbor))

    def harbor_left(self, harbor: int) -> None:
        """A harbor left the registry: a restarted node waiting for it may come in now."""
        for connection in list(self.connections):
            request = connection.session.request
            if connection.state == "waiting" and request is not None and \
                    request.harbor == harbor:
                connection.feed(connection.machine.admit)

    def forget(self, connection: MasterConnection) -> None:
        """A connection ended: it is nobody's watcher, asker or answerer any more."""
        self.connections.discard(connection)
        self.watchers.discard(connection)
        for query_id, query in list(self.queries.items()):
            if query.observer is connection:
                self._end_query(query_id)
            elif query.node is connection:
                self._answer_query(query_id, f"harbor {query.harbor} left before it answered")
        if self._held:
            self._held = [h for h in self._held if h.connection is not connection]
        harbor = connection.session.harbor
        if harbor and self.joined.get(harbor) is connection:
            del self.joined[harbor]  # the session could not say goodbye itself

    # --- names ---------------------------------------------------------------------------

    def holds_back(self, name: str) -> bool:
        """During the start-up grace a name nobody holds waits for a returning holder."""
        return self.name_grace_left() > 0 and self.registry.lookup(name) is None

    def hold_back(self, connection: MasterConnection, message: BindName) -> None:
        """Keep a BindName until the name grace ends (or its name's holder returns)."""
        self._held.append(_HeldBind(connection, message.request, message.name, message.handle))
        if self._grace_timer is None:
            self._grace_timer = self.clock.callLater(self.name_grace_left(), self._grace_over)

    def withdraw(self, s: _Session, name: str) -> bool:
        """An UnbindName for a name this session still waits for: forget the wait."""
        mine = [h for h in self._held if h.connection is s.connection and h.name == name]
        if not mine:
            return False
        self._held = [h for h in self._held if h not in mine]
        for item in mine:
            s.send(Reply(item.request, f"name {name} was unbound before it was granted", 0))
        return True

    def names_granted(self) -> None:
        """A join bound names: held-back requests for names now held are answered now."""
        now_held = [h for h in self._held if self.registry.lookup(h.name) is not None]
        if now_held:
            self._held = [h for h in self._held if h not in now_held]
            self._release(now_held)

    def _grace_over(self) -> None:
        self._grace_timer = None
        held, self._held = self._held, []
        self._release(held)

    def _release(self, held: list[_HeldBind]) -> None:
        for item in held:
            connection = item.connection
            connection.feed(connection.machine.bind, item.request, item.name, item.handle)

    def answer_bind(self, s: _Session, request: int, name: str, handle: int) -> None:
        """Ask the registry for a name and reply; a name granted after its harbor left is released
        again."""
        harbor = s.harbor

        def undo() -> None:
            self.registry.release_name(name, harbor).addErrback(lambda _: None)

        self.answer(s, request, lambda: self.registry.claim_name(name, handle, harbor), undo)

    def answer_join_group(self, s: _Session, request: int, group: str, handle: int) -> None:
        """Ask the registry for a membership and reply; one granted after its harbor left is removed
        again."""
        harbor = s.harbor

        def undo() -> None:
            self.registry.leave_group(group, handle, harbor).addErrback(lambda _: None)

        self.answer(s, request, lambda: self.registry.join_group(group, handle, harbor), undo)

    def answer(self, s: _Session, request: int,
               change: Callable[[], Deferred[tuple[Event, ...]]],
               undo: Callable[[], object] | None = None) -> None:
        """Ask the registry for a change and reply once it decided. Its events were pushed
        before (the requester's cache has them before its reply arrives)."""
        harbor, connection = s.harbor, s.connection

        def done(events: tuple[Event, ...]) -> None:
            if self.joined.get(harbor) is None:
                if events and undo is not None:
                    undo()  # granted after its harbor left: nobody holds it
                return
            if self.joined.get(harbor) is connection:
                s.send(Reply(request, "", 0))

        def failed(failure: Failure) -> None:
            error = failure.value
            if isinstance(error, RegistryRefusal):
                why = str(error)
            elif isinstance(error, RegistryUnavailable):
                why = f"the registry is unavailable: {error}"
                self.log.warn("harbor {harbor}: request {request} not decided: {why}",
                              harbor=harbor, request=request, why=str(error))
            else:
                why = "internal error in the registry"
                self.log.failure("the registry failed on a request of harbor {harbor}",
                                 failure, harbor=harbor)
            if self.joined.get(harbor) is connection:
                s.send(Reply(request, why, 0))

        change().addCallbacks(done, failed)

    # --- observers: watching the table, listing a node's services ------------------------

    def watch(self, connection: MasterConnection, request: int) -> None:
        """An observer's Watch: the whole table now, then every change (as joined nodes
        get them: in order, and any change after the table's sequence)."""
        registry = self.registry
        connection.send_frame(MASTER_CODEC.encode(
            TableReply(request, registry.snapshot(), registry.kind)))
        if connection not in self.watchers:
            self.watchers.add(connection)
            self.log.info("an observer ({peer}) watches the table",
                          peer=describe_peer(connection.transport))

    def list_services(self, observer: MasterConnection, message: ListServices) -> None:
        """An observer's ListServices: relay it to the harbor's node over the node's own
        connection, and answer when it reports, leaves, or stays silent too long."""
        node = self.joined.get(message.harbor)
        if node is None:
            observer.send_frame(MASTER_CODEC.encode(ServicesReply(
                message.request, f"harbor {message.harbor} is not in the master's table",
                message.harbor, "", ())))
            return
        self._last_query = self._last_query % 0x7FFFFFFF + 1
        query_id = self._last_query
        timeout = min(message.timeout, MAX_RELAY_TIMEOUT)
        query = _Query(observer, message.request, message.harbor, node, timeout)
        self.queries[query_id] = query
        query.timer = self.clock.callLater(timeout, self._query_late, query_id)
        try:
            node.send_frame(MASTER_CODEC.encode(QueryServices(query_id)), must=False)
        except QueueFull:
            self._answer_query(query_id, f"harbor {message.harbor} is not keeping up with "
                                         "the master")

    def services_reported(self, node: MasterConnection, report: ServicesReport) -> None:
        """A node's answer: to the observer that asked (a late one, after the observer
        was told it timed out, is dropped)."""
        query = self.queries.get(report.query)
        if query is None or query.node is not node:
            self.log.debug("harbor {harbor}: ServicesReport {query} answers nothing "
                           "pending (late?)", harbor=node.harbor, query=report.query)
            return
        self._end_query(report.query)
        query.observer.send_frame(MASTER_CODEC.encode(ServicesReply(
            query.request, "", query.harbor, node.node, report.services)))

    def _query_late(self, query_id: int) -> None:
        query = self.queries.get(query_id)
        if query is not None:
            query.timer = None
            self.log.warn("harbor {harbor} did not list its services within {timeout:g} s",
                          harbor=query.harbor, timeout=query.timeout)
            self._answer_query(query_id, f"harbor {query.harbor} ({query.node.node}) did "
                                         f"not answer within {query.timeout:g} s")

    def _answer_query(self, query_id: int, error: str) -> None:
        query = self._end_query(query_id)
        if query is not None:
            query.observer.send_frame(MASTER_CODEC.encode(ServicesReply(
                query.request, error, query.harbor, query.node.node, ())))

    def _end_query(self, query_id: int) -> _Query | None:
        query = self.queries.pop(query_id, None)
        if query is not None and query.timer is not None and query.timer.active():
            query.timer.cancel()
        return query

    # --- what the registry tells ---------------------------------------------------------

    def registry_changed(self, events: tuple[Event, ...]) -> None:
        """Changes in sequence, from this master or another one: push them to every node."""
        self.push(events)
        for event in events:
            if isinstance(event, HarborLeft):
                self.harbor_left(event.harbor)
        if any(isinstance(event, NameBound) for event in events):
            self.names_granted()

    def registry_lost(self, harbor: int, incarnation: int, reason: str) -> None:
        """The store lost what it held for a session: end it, so its node re-joins."""
        connection = self.joined.get(harbor)
        if connection is not None and connection.incarnation == incarnation:
            self.log.warn("harbor {harbor}: its registration was lost: {why}",
                          harbor=harbor, why=reason)
            connection.drop(f"its registration in the registry was lost: {reason}")

    def push(self, events: tuple[Event, ...],
             to: tuple[MasterConnection, ...] | None = None) -> None:
        """Send the events to every joined node and watching observer (or only ``to``), in
        order, in one write to each (a join with a name is two events)."""
        frames = [MASTER_CODEC.encode(event) for event in events]
        targets = (*self.joined.values(), *self.watchers) if to is None else to
        for connection in targets:
            try:
                connection.send_frames(frames, must=False)
            except QueueFull as e:
                # It will reconnect and get the whole table; the others must not wait.
                who = f"harbor {connection.harbor}" if connection.harbor else "an observer"
                connection.drop(f"{who} cannot keep up: {e}")

    def close_all(self) -> None:
        """Close every connection (the master is stopping)."""
        for connection in list(self.connections):
            connection.close()
