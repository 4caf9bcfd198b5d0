"""The node's side of the name service: stay connected, stay joined, keep the table.

A Twisted ClientService keeps one connection to the master and reconnects with jittered
exponential backoff (capped at ``retry_max``); every attempt, connect and handshake, is
bounded by ``connect_timeout`` on the injected clock. On top of it the join life cycle is
an explicit state machine (automat): idle, connecting, handshaking, joining, up,
resyncing, refused, stopped. Every (re)connection runs the pure
:class:`skyproto.master.handshake.NodeHandshake` and joins again with the node's harbor,
incarnation, endpoint and the global names a master granted it, so a restarted master
rebuilds its table from the nodes. Names the node claimed but no master granted yet are
asked for with BindName after the welcome. Service group memberships
(``groups_to_assert``) travel in every Join too; any the welcome's table lacks are asked
for with JoinGroup. The client keeps the master's view of the table (``groups`` included),
applies pushed events in sequence, and fetches the whole table on a gap.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.application.internet import ClientService
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError
from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from ..auth import check_secret
from ..endpoints import is_node_name
from ..errors import (
    AuthenticationFailed,
    ConfigurationError,
    JoinRefused,
    MasterUnavailable,
    NameConflict,
    ProtocolError,
    ServicesUnavailable,
)
from ..interfaces import IMasterClient, IMasterListener
from ..mapper.extra import ROLE_MASTER
from ..node.resolver import NodeEndpoint, NodeNotFound, NodeResolver
from ..session import SessionTable
from ..wire.framing import DEFAULT_MAX_FRAME, FrameProtocol
from ..wire.heartbeat import HeartbeatTimer, HeartbeatTiming
from .handshake import Authenticated, JoinInfo, NodeHandshake, Refusal, Welcomed
from .messages import (
    MASTER_CODEC,
    BindName,
    GetTable,
    JoinGroup,
    LeaveGroup,
    ListServices,
    LookupName,
    MasterHeartbeat,
    QueryServices,
    Refused,
    Reply,
    ServiceInfo,
    ServicesReply,
    ServicesReport,
    TableReply,
    UnbindName,
    Watch,
    Welcome,
)
from .records import groups_table
from .registry import (
    Event,
    GroupJoined,
    GroupLeft,
    HarborJoined,
    HarborLeft,
    HarborRecord,
    NameBound,
    NameUnbound,
    Table,
)

_BEAT = MASTER_CODEC.encode(MasterHeartbeat())
NameRefused = Callable[[str, int, str], object]
#: what a node answers the master's QueryServices with (``skyproto services``)
DescribeServices = Callable[[], Sequence[ServiceInfo]]


class _QuietFactory(Factory):
    noisy = False  # it reconnects often; the client logs what matters


@implementer(ILogObserver)
def _warnings_only(event: LogEvent) -> None:
    """ClientService's own log, minus its info lines: ``Scheduling retry N to connect
    <... object at 0x...>`` once per attempt says neither where nor why (the client logs
    each series of failed attempts itself); its warnings still reach the global log."""
    if event.get("log_level", LogLevel.info) >= LogLevel.warn:
        globalLogPublisher(event)


class _QuietClientService(ClientService):
    """A ClientService whose logger drops its per-attempt info lines (this class only:
    every other ClientService logs as usual)."""

    _log = Logger(namespace="twisted.application.internet.ClientService",
                  observer=_warnings_only)


#: log a series of failed attempts again at every this many attempts
SERIES_EVERY = 10


@implementer(IProtocolFactory)
class _AttemptFactory:
    """Tells the client which attempt a protocol belongs to while it is built."""

    def __init__(self, factory: IProtocolFactory, client: MasterClient, attempt: int) -> None:
        self._factory = factory
        self._client = client
        self._attempt = attempt

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        self._client._building = self._attempt
        try:
            return self._factory.buildProtocol(addr)
        finally:
            self._client._building = 0

    def doStart(self) -> None:
        self._factory.doStart()

    def doStop(self) -> None:
        self._factory.doStop()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._factory, name)


@implementer(IStreamClientEndpoint)
class BoundedEndpoint:
    """Connects to one of several masters, the next one at each attempt (a node talks to
    one at a time and moves on when it loses it); each connect fails after ``bound``
    seconds on ``clock``."""

    def __init__(self, masters: Sequence[tuple[str, IStreamClientEndpoint]],
                 clock: IReactorTime, bound: float, client: MasterClient) -> None:
        if not masters:
            raise ConfigurationError("no master endpoint given")
        self.masters = list(masters)
        self.clock = clock
        self.bound = bound
        self._client = client
        self._next = 0
        #: the description of the master of the latest attempt
        self.current = self.masters[0][0]

    @property
    def endpoint(self) -> IStreamClientEndpoint:
        """The endpoint the next attempt dials."""
        return self.masters[self._next % len(self.masters)][1]

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        """Dial the next master, failing after ``bound`` seconds; a failed attempt is logged with
        its series."""
        attempt = self._client._new_attempt()
        self.current, endpoint = self.masters[self._next % len(self.masters)]
        self._next += 1
        connecting: Deferred[IProtocol] = endpoint.connect(
            _AttemptFactory(factory, self._client, attempt))
        connecting.addTimeout(self.bound, self.clock)
        return connecting.addErrback(self._client._connect_failed, self.current, self.bound,
                                     endpoint)


def _master_endpoints(reactor: Any, endpoint: str | IStreamClientEndpoint | Sequence[str],
                      resolver: NodeResolver | None = None,
                      ) -> list[tuple[str, IStreamClientEndpoint]]:
    """(description, endpoint) of every master: an endpoint string, or ``name@host``, a
    :class:`NodeEndpoint` that asks ``host``'s mapper (through ``resolver``; default one
    on the mapper port 4369) at every attempt."""
    if isinstance(endpoint, str):
        descriptions: Sequence[str] = [endpoint]
    elif isinstance(endpoint, Sequence):
        descriptions = endpoint
    else:
        return [(type(endpoint).__name__, endpoint)]
    masters: list[tuple[str, IStreamClientEndpoint]] = []
    for description in descriptions:
        try:
            if is_node_name(description):
                if resolver is None:
                    resolver = NodeResolver(reactor)
                masters.append((description, NodeEndpoint(reactor, resolver, description,
                                                          role=ROLE_MASTER)))
                continue
            masters.append((description, clientFromString(reactor, description)))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigurationError(f"bad master endpoint {description!r}: {e}") from None
    return masters


class MasterClientProtocol(FrameProtocol):
    """One connection to the master: the handshake, then events and replies."""

    def __init__(self, client: MasterClient) -> None:
        super().__init__(client.max_frame, max_frame_before_auth=4096)
        self.client = client
        #: which connection attempt built this protocol (0: made by hand)
        self.attempt = client._building
        self.handshake = NodeHandshake(client.secret, client.timing, client.join,
                                       client.names_for_join, client.groups_for_join)
        #: the master proved the secret on this connection
        self.proven = False
        #: seconds after which this connection was dropped for want of an answer
        self._timed_out: float | None = None
        timing = client.timing
        self._heartbeat = HeartbeatTimer(client.clock, timing.interval, timing.timeout,
                                         self._beat, self._silent)
        self._deadline: Any = None

    def connectionMade(self) -> None:
        """Start the heartbeat and the attempt's deadline, and send MasterHello (unless the attempt
        was given up meanwhile)."""
        super().connectionMade()
        if not self.client._attempt_alive(self.attempt):
            self.drop("connected after the attempt was given up", quiet=True)
            return
        self._heartbeat.start()
        self._deadline = self.client.clock.callLater(
            self.client.attempt_left(self.attempt), self._late)
        self.client._feed(self.client._machine.connected, self)
        self.send(self.handshake.start())

    def send(self, message: object) -> None:
        """Encode and send one master protocol message."""
        self.send_frame(MASTER_CODEC.encode(message))

    def dataReceived(self, data: bytes) -> None:
        """Bytes from the master: a sign of life."""
        self._heartbeat.heard()  # every byte is a sign of life, not just whole frames
        super().dataReceived(data)

    def frame_received(self, frame: bytes) -> None:
        """One message from the master: the handshake, replies to requests, pushed events, or a
        QueryServices to answer."""
        message = MASTER_CODEC.decode(frame)
        if isinstance(message, MasterHeartbeat):
            return
        client = self.client
        if not self.handshake.done or isinstance(message, Refused):
            step = self.handshake.receive(message)
            for reply in step.send:
                self.send(reply)
            if step.keys is not None:
                self.start_sealing(step.keys, initiator=True)
            for reply in step.sealed:
                self.send(reply)
            outcome = step.outcome
            if isinstance(outcome, Refusal):
                self._stop_deadline()
                client._from(self, client._machine.refused, outcome.reason)
                if self.transport is not None:
                    self.close_connection()
            elif isinstance(outcome, Authenticated):
                self._stop_deadline()
                self.proven = True
                self.authenticated()  # the master proved the secret: its table may be large
                self._heartbeat.retime(outcome.timing)
                if outcome.observing:
                    client._from(self, client._machine.observing)
                else:
                    client._from(self, client._machine.proven)
            elif isinstance(outcome, Welcomed):
                client._from(self, client._machine.welcomed, outcome.welcome)
        elif isinstance(message, Reply | TableReply | ServicesReply):
            if isinstance(message, TableReply):
                client.store = message.store
            client._requests.resolve(message.request, message)
        elif isinstance(message, QueryServices) and client.join is not None:
            self.send(ServicesReport(message.query, client.services_now()))
        elif isinstance(message, HarborJoined | HarborLeft | NameBound | NameUnbound |
                        GroupJoined | GroupLeft):
            if self is client.current and client.state == "up":
                # What the machine would do (a loop in "up"), without its search for the
                # transition: automat scans all of them, over 100 here, for every input,
                # and a joining cluster pushes every node an event per join and name.
                client._feed(client.pushed, message)
            else:
                client._from(self, client._machine.event, message)
        else:
            raise ProtocolError(f"unexpected {type(message).__name__} from the master")

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _late(self) -> None:
        self._deadline = None
        if self.drop_reason is None and self.transport is not None:
            self._timed_out = self.client.connect_timeout
            self.drop(f"no handshake with the master within "
                      f"{self.client.connect_timeout:g} s")

    def _beat(self) -> None:
        self.send_frame(_BEAT)

    def _silent(self, quiet: float) -> None:
        if self.transport is not None and self.drop_reason is None:
            self._timed_out = self.client.heartbeat_timeout
            self.drop(f"the master is silent for {quiet:.1f} s")

    def drop(self, reason: str, quiet: bool = False) -> None:
        """Abort the connection, logging why (quietly before the master proved the secret: the
        attempt's series is logged instead)."""
        # before the master proved the secret, the attempt's failure is logged with its
        # series (connectionLost), not once per attempt
        super().drop(reason, quiet or not self.proven)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        """The connection ended: an attempt that never got a welcome is counted as failed, and the
        client reconnects."""
        self._heartbeat.stop()
        self._stop_deadline()
        client = self.client
        why = self.drop_reason or reason.getErrorMessage()
        if self is client.current and client.state in ("handshaking", "joining"):
            client._attempt_failed(client.endpoint_description, *self._unwelcomed(why))
        client._from(self, client._machine.lost, why)

    def _unwelcomed(self, why: str) -> tuple[str, str]:
        """Why this connection ended before a welcome, in words: (kind, reason)."""
        if self.proven:
            return "lost", f"the connection was lost during the join ({why})"
        if self._timed_out is not None:
            return "timeout", (f"no handshake within {self._timed_out:g} s: not a skyproto "
                               "master, or an overloaded one")
        if self.drop_reason is None:
            return "closed", f"it closed the connection before the handshake ({why})"
        return "not-master", f"not a skyproto master ({why})"


class _ClientInputs(Protocol):
    """What can happen to a master client."""

    def start(self) -> None:
        """Start connecting (and keep connected)."""

    def stop(self) -> None:
        """Stop for good (the node is stopping)."""

    def connected(self, protocol: MasterClientProtocol) -> None:
        """A connection is made; its handshake begins."""

    def proven(self) -> None:
        """The master proved the secret; our Join is on its way."""

    def observing(self) -> None:
        """The master proved the secret; we only read (no Join)."""

    def welcomed(self, welcome: Welcome) -> None:
        """The master admitted this node."""

    def event(self, event: Event) -> None:
        """A pushed change."""

    def gap(self) -> None:
        """Events were missed: the table is being fetched."""

    def resynced(self, table: Table) -> None:
        """The fetched table arrived."""

    def resync_failed(self) -> None:
        """The fetch failed (the connection went)."""

    def refused(self, reason: str) -> None:
        """The master refused this node (or we refused the master): stop for good."""

    def lost(self, reason: str) -> None:
        """The current connection is gone."""


@implementer(IMasterClient)
class MasterClient:
    """Keeps one node joined to the master (or, with ``join=None``, just reads the table).

    ``endpoint`` may list several masters sharing one store: the client talks to one at a
    time and, when it loses it, joins the next with the same harbor, incarnation and names.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        endpoint: str | IStreamClientEndpoint | Sequence[str],
        secret: bytes,
        listener: IMasterListener,
        join: JoinInfo | None = None,
        names_to_assert: Callable[[], Mapping[str, int]] = dict,
        request_timeout: float = 5.0,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 3.0,
        retry_initial: float = 0.1,
        retry_max: float = 0.5,
        max_frame: int = DEFAULT_MAX_FRAME,
        rng: random.Random | None = None,
        connect_timeout: float = 5.0,
        resolver: NodeResolver | None = None,
        on_name_refused: NameRefused | None = None,
        groups_to_assert: Callable[[], Mapping[str, Collection[int]]] = dict,
        describe_services: DescribeServices | None = None,
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        masters = _master_endpoints(reactor, endpoint, resolver)
        self.secret = check_secret(secret)
        self.listener = listener
        self.join = join
        #: the global names the node holds now (granted or only claimed)
        self.names_to_assert = names_to_assert
        self.on_name_refused = on_name_refused
        #: the node's service group memberships now (group -> handles on its harbor)
        self.groups_to_assert = groups_to_assert
        #: the node's services now, for the master's QueryServices (none if not given)
        self.describe_services = describe_services
        self.request_timeout = request_timeout
        #: each attempt (connect and handshake) must be done within this many seconds
        self.connect_timeout = connect_timeout
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.timing = HeartbeatTiming(heartbeat_interval, heartbeat_timeout)
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.max_frame = max_frame
        self.rng = rng or random.Random()
        self.endpoint = BoundedEndpoint(masters, reactor, self.connect_timeout, self)
        self._service = _QuietClientService(
            self.endpoint, _QuietFactory.forProtocol(lambda: MasterClientProtocol(self)),
            retryPolicy=self.retry_delay, clock=reactor)
        self._requests = SessionTable(reactor, request_timeout)
        self._ready: list[Deferred[MasterClientProtocol]] = []
        #: the connection being handshaken or joined (None between connections)
        self.current: MasterClientProtocol | None = None
        self.state = "idle"
        self.harbor = join.harbor if join is not None else 0
        self.sequence = 0
        #: the master's sequence numbers have no holes: a skip is a missed event
        self.dense = True
        #: what keeps the master's state, as its last TableReply said
        self.store = "memory"
        self.harbors: dict[int, HarborRecord] = {}
        self.names: dict[str, int] = {}
        #: service groups as the master's table has them: group -> member handles
        self.groups: dict[str, set[int]] = {}
        self.welcomes = 0
        self.refusal: str | None = None
        #: names with a BindName of ours in flight
        self._binding: set[str] = set()
        #: memberships with a JoinGroup of ours in flight (how many)
        self._group_joining: Counter[tuple[str, int]] = Counter()
        self._attempts = 0
        #: attempts since the last welcome: a connection that is made and then fails (TLS
        #: refused, handshake failed) resets ClientService's count, not this one
        self._unwelcomed = 0
        self._attempt_started: dict[int, float] = {}
        self._building = 0
        #: the master and reason of the latest failed attempt ("tcp:...: connection
        #: refused"); None once a master answered
        self.last_failure: str | None = None
        #: failed attempts since the last welcome, and the kind of failure last logged for
        #: each master: a series is logged at its first failure, every SERIES_EVERY
        #: failures and whenever a master fails for another reason
        self._failures = 0
        self._logged_kinds: dict[str, str] = {}
        self._machine = ClientMachine(self)

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start connecting, and keep connected (reconnecting with backoff)."""
        self._feed(self._machine.start)

    def stop(self) -> Deferred[None]:
        """Stop for good: close the connection, fail what waits for the master."""
        self._feed(self._machine.stop)
        if self.current is not None:  # closed our way first: see close_connection
            self.current.close_connection()
        stopped: Deferred[None] = self._service.stopService()
        return stopped

    @property
    def endpoint_description(self) -> str:
        """The master this client talks to now (or last tried)."""
        return self.endpoint.current

    @property
    def masters(self) -> list[str]:
        """Every master this client may talk to, in the order it tries them."""
        return [description for description, _ in self.endpoint.masters]

    @property
    def connected(self) -> bool:
        """Joined (or observing) on a live connection."""
        return self.state in ("up", "resyncing")

    @property
    def protocol(self) -> MasterClientProtocol | None:
        """The joined connection, if any."""
        return self.current if self.connected else None

    def retry_delay(self, attempt: int) -> float:
        """The wait before the next attempt: doubling from ``retry_initial``, capped at
        ``retry_max``, then 50 to 100 % of that at random."""
        attempt = max(attempt, self._unwelcomed - 1)
        delay = min(self.retry_max, self.retry_initial * 2.0 ** min(attempt, 30))
        return delay * self.rng.uniform(0.5, 1.0)

    # --- IMasterClient -----------------------------------------------------------------

    def register_name(self, name: str, handle: int,
                      timeout: float | None = None) -> Deferred[None]:
        """Fires once the master granted ``name``; NameConflict if someone else holds it,
        MasterUnavailable if no master answered within ``timeout`` (default: request
        timeout, covering the wait for a connection too)."""
        self._binding.add(name)

        def done(result: object) -> object:
            self._binding.discard(name)
            return result

        return self._request(lambda request: BindName(request, name, handle),
                             timeout).addBoth(done).addCallback(lambda reply: None)

    def unregister_name(self, name: str, timeout: float | None = None) -> Deferred[None]:
        """Fires once the master removed ``name`` (ours); NameConflict if it refused."""
        return self._request(lambda request: UnbindName(request, name), timeout).addCallback(
            lambda reply: None)

    def lookup_name(self, name: str, timeout: float | None = None) -> Deferred[int | None]:
        """The cached handle, else the master's answer (None if nobody holds the name),
        within ``timeout`` in all (default: the request timeout)."""
        cached = self.names.get(name)
        if cached is not None:
            return succeed(cached)
        return self._request(lambda request: LookupName(request, name), timeout).addCallback(
            lambda reply: reply.handle or None)

    def get_table(self, timeout: float | None = None) -> Deferred[Table]:
        """The master's whole table, as it answers now."""
        return self._request(lambda request: GetTable(request), timeout).addCallback(
            lambda reply: reply.table)

    def join_group(self, group: str, handle: int,
                   timeout: float | None = None) -> Deferred[None]:
        """Fires once the master has ``handle`` (on our harbor) in service group ``group``
        (its GroupJoined is in ``groups`` by then; joining again changes nothing);
        NameConflict with the master's reason if it refused (not a group name, a handle on
        another harbor), MasterUnavailable if no master answered within ``timeout``."""
        key = (group, handle)
        self._group_joining[key] += 1

        def done(result: object) -> object:
            self._group_joining[key] -= 1
            if self._group_joining[key] <= 0:
                del self._group_joining[key]
            return result

        return self._request(lambda request: JoinGroup(request, group, handle),
                             timeout).addBoth(done).addCallback(lambda reply: None)

    def leave_group(self, group: str, handle: int,
                    timeout: float | None = None) -> Deferred[None]:
        """Fires once the master took ``handle`` out of ``group`` (also when it was not
        in it); NameConflict if it refused, MasterUnavailable as for ``join_group``."""
        return self._request(lambda request: LeaveGroup(request, group, handle),
                             timeout).addCallback(lambda reply: None)

    def list_services(self, harbor: int, timeout: float | None = None,
                      ) -> Deferred[ServicesReply]:
        """Harbor ``harbor``'s services, as its node tells the master (an observer's
        request: ``skyproto services``). ServicesUnavailable with the master's reason if
        the harbor is not in its table or its node did not answer, MasterUnavailable if no
        master answered within ``timeout`` (default: the request timeout). The master
        waits for the node for at most 80 % of what is left, so its answer comes first."""
        budget = self.request_timeout if timeout is None else timeout
        deadline = self.clock.seconds() + budget

        def ask(request: int) -> ListServices:
            return ListServices(request, harbor,
                                max(0.0, (deadline - self.clock.seconds()) * 0.8))

        return self._request(ask, budget)

    def watch(self, timeout: float | None = None) -> Deferred[Table]:
        """Ask the master (as an observer) for the whole table and then every change: each
        arrives at the listener's ``master_event`` (in sequence; a gap fetches the table
        again, which arrives at ``master_table``). Fires with the table."""
        def watching(reply: TableReply) -> Table:
            self.dense = reply.store == "memory"  # etcd's revisions have holes
            self._replace(reply.table)
            return reply.table

        watched: Deferred[Table] = self._request(Watch, timeout).addCallback(watching)
        return watched

    def services_now(self) -> tuple[ServiceInfo, ...]:
        """What this node answers a QueryServices with: its services as described now."""
        if self.describe_services is None:
            return ()
        return tuple(self.describe_services())

    def table(self) -> Table:
        """The master's view as this client knows it now."""
        return Table(self.sequence, tuple(self.harbors[h] for h in sorted(self.harbors)),
                     dict(self.names), groups_table(self.groups))

    def granted(self) -> dict[str, int]:
        """The names the master's table (as we know it) gives to handles on our harbor."""
        harbor = self.harbor
        return {name: handle for name, handle in self.names.items()
                if harbor and handle >> 24 == harbor}

    def names_for_join(self) -> dict[str, int]:
        """What a Join re-asserts: names we hold that a master granted us."""
        granted = self.granted()
        return {name: handle for name, handle in self.names_to_assert().items()
                if granted.get(name) == handle}

    def groups_for_join(self) -> dict[str, tuple[int, ...]]:
        """What a Join re-asserts of the groups: every membership the node holds now
        (a group has no owner to conflict with, so granted or not)."""
        return groups_table(self.groups_to_assert())

    # --- requests ----------------------------------------------------------------------

    def when_up(self, timeout: float | None = None) -> Deferred[MasterClientProtocol]:
        """The joined connection, waiting at most ``timeout`` (default: request timeout)."""
        protocol = self.protocol
        if protocol is not None:
            return succeed(protocol)
        waiter: Deferred[MasterClientProtocol] = Deferred()
        self._ready.append(waiter)
        bound = self.request_timeout if timeout is None else timeout

        def unavailable(failure: Failure) -> Failure:
            if waiter in self._ready:
                self._ready.remove(waiter)
            if failure.check(TimeoutError):
                why = f": {self.refusal}" if self.refusal else ""
                return Failure(MasterUnavailable(
                    f"no master at {self.endpoint_description} within {bound:g} s{why}"))
            return failure

        return waiter.addTimeout(bound, self.clock).addErrback(unavailable)

    def _request(self, make: Callable[[int], object], timeout: float | None) -> Deferred[Any]:
        """One request with one deadline, covering the wait for a connection and the reply."""
        budget = self.request_timeout if timeout is None else timeout
        deadline = self.clock.seconds() + budget

        def send(protocol: MasterClientProtocol) -> Deferred[Any]:
            left = deadline - self.clock.seconds()
            if left <= 0:
                raise MasterUnavailable(
                    f"no master at {self.endpoint_description} within {budget:g} s")
            request, reply = self._requests.new(left)
            protocol.send(make(request))
            return reply

        return self.when_up(budget).addCallback(send).addCallback(self._check_reply)

    @staticmethod
    def _check_reply(reply: Reply | TableReply | ServicesReply,
                     ) -> Reply | TableReply | ServicesReply:
        if isinstance(reply, Reply) and reply.error:
            raise NameConflict(reply.error)
        if isinstance(reply, ServicesReply) and reply.error:
            raise ServicesUnavailable(reply.error)
        return reply

    # --- attempts ----------------------------------------------------------------------

    def _new_attempt(self) -> int:
        self._attempts += 1
        self._unwelcomed += 1
        self._attempt_started = {self._attempts: self.clock.seconds()}
        return self._attempts

    def _attempt_alive(self, attempt: int) -> bool:
        """False for a protocol whose attempt timed out (its endpoint could not cancel)."""
        if attempt == 0 or attempt not in self._attempt_started:
            return attempt == 0
        return self.attempt_left(attempt) > 0

    def attempt_left(self, attempt: int) -> float:
        """What is left of an attempt's time (connect and handshake share one bound)."""
        started = self._attempt_started.get(attempt)
        if started is None:
            return self.connect_timeout
        return started + self.connect_timeout - self.clock.seconds()

    def _connect_failed(self, failure: Failure, master: str, bound: float,
                        endpoint: object = None) -> Failure:
        """An attempt that did not even connect: say why, with its series (for a
        ``name@host`` master, what the mapper said, or where it pointed)."""
        stage = endpoint.stage if isinstance(endpoint, NodeEndpoint) else None
        resolved = endpoint.resolved if isinstance(endpoint, NodeEndpoint) else None
        if failure.check(NodeNotFound):
            kind = f"mapper: {getattr(failure.value, 'kind', '?')}"
            reason = failure.getErrorMessage()
        elif failure.check(ConnectionRefusedError):
            kind, reason = "refused", "connection refused"
            if resolved is not None:
                reason += f" at {resolved}, where the mapper said it listens"
        elif failure.check(TimeoutError, ConnectingCancelledError, CancelledError):
            if not self._service.running:
                return failure  # stopping: not a failure of the master
            kind, reason = "timeout", f"no connection within {bound:g} s (timed out)"
            if stage is not None:
                reason = f"no connection within {bound:g} s (timed out {stage})"
        else:
            kind, reason = type(failure.value).__name__, failure.getErrorMessage()
        self._attempt_failed(master, kind, reason)
        return failure

    def _attempt_failed(self, master: str, kind: str, reason: str) -> None:
        """One more failed attempt: logged when it starts a series, every SERIES_EVERY
        attempts, and when its kind (refused, timeout, not-master, ...) changes."""
        if self.state in ("refused", "stopped"):
            return
        self._failures += 1
        self.last_failure = f"{master}: {reason}"
        if self._failures == 1 or self._failures % SERIES_EVERY == 0 or \
                self._logged_kinds.get(master) != kind:
            self._logged_kinds[master] = kind
            self.log.warn("no master at {master}: {reason} (attempt {attempt}; retrying)",
                          master=master, reason=reason, attempt=self._failures, kind=kind)

    # --- events into the machine -------------------------------------------------------

    def _from(self, protocol: MasterClientProtocol, event: Callable[..., None],
              *args: object) -> None:
        """An event from a connection: only the current one counts."""
        if protocol is self.current:
            self._feed(event, *args)

    def _feed(self, event: Callable[..., None], *args: object) -> None:
        """One event; an exception in it is logged and drops the current connection."""
        try:
            event(*args)
        except Exception:
            self.log.failure("the master client failed on an event; dropping the connection")
            current = self.current
            if current is not None and current.transport is not None and \
                    current.drop_reason is None:
                current.drop("internal error in the master client")

    # --- what the machine's behaviours do ----------------------------------------------

    def _welcome(self, welcome: Welcome) -> None:
        self._unwelcomed = 0
        self.dense = welcome.dense
        first = self.welcomes == 0
        self.welcomes += 1
        self.harbor = welcome.harbor
        if self.join is not None and self.join.harbor != welcome.harbor:
            self.join = JoinInfo(welcome.harbor, self.join.incarnation, self.join.node,
                                 self.join.endpoint)  # keep it on every re-join
        self._replace(welcome.table)
        held = self.names_to_assert()
        for name in welcome.refused_names:
            self.log.warn("the master refused name {name}: another node holds it", name=name)
            if name in held:
                self._name_refused(name, held[name], "another node holds it")
        self.log.info("joined the master at {master} as harbor {harbor} (table {sequence})",
                      master=self.endpoint_description, harbor=welcome.harbor,
                      sequence=welcome.table.sequence)
        self._up()
        self.listener.master_table(welcome.table, first)
        self._claim()
        self._claim_groups()

    def _claim(self) -> None:
        """Ask for the names we hold that no master granted yet (claimed before joining)."""
        granted = self.granted()
        for name, handle in sorted(self.names_to_assert().items()):
            if granted.get(name) == handle or name in self._binding:
                continue
            self.register_name(name, handle).addErrback(self._claim_failed, name, handle)

    def _claim_failed(self, failure: Failure, name: str, handle: int) -> None:
        if failure.check(NameConflict):
            self.log.warn("the master refused name {name}: {why}", name=name,
                          why=failure.getErrorMessage())
            self._name_refused(name, handle, failure.getErrorMessage())
        # otherwise the connection went: the next welcome claims it again

    def _claim_groups(self) -> None:
        """Ask for the memberships we hold that the welcome's table lacks (joined while no
        master was there, or not decided when the Join re-asserted them)."""
        for group, handles in sorted(self.groups_to_assert().items()):
            members = self.groups.get(group, set())
            for handle in sorted(handles):
                if handle in members or (group, handle) in self._group_joining:
                    continue
                self.join_group(group, handle).addErrback(self._group_claim_failed, group,
                                                          handle)

    def _group_claim_failed(self, failure: Failure, group: str, handle: int) -> None:
        if failure.check(NameConflict):
            self.log.warn("the master refused membership of :{handle:08x} in group {group}: "
                          "{why}", handle=handle, group=group, why=failure.getErrorMessage())
        # otherwise the connection went: the next welcome asks again

    def _name_refused(self, name: str, handle: int, why: str) -> None:
        if self.on_name_refused is not None:
            self.on_name_refused(name, handle, why)

    def _up(self) -> None:
        self.refusal = None
        self.last_failure = None
        self._failures = 0
        self._logged_kinds = {}
        waiters, self._ready = self._ready, []
        protocol = self.current
        assert protocol is not None
        for waiter in waiters:
            waiter.callback(protocol)

    def pushed(self, event: Event) -> None:
        """A pushed event while up: apply it, or fetch the table if it shows a gap."""
        if not self._apply(event):
            self._machine.gap()

    def _apply(self, event: Event) -> bool:
        """Apply one pushed event; False if it shows a gap (the caller fetches the table)."""
        if event.sequence <= self.sequence:
            return True  # already in our table
        if event.sequence != self.sequence + 1 and self.dense:
            self.log.info("missed events {first}..{last}: fetching the table",
                          first=self.sequence + 1, last=event.sequence - 1)
            return False
        self.sequence = event.sequence
        if isinstance(event, HarborJoined):
            self.harbors[event.record.harbor] = event.record
        elif isinstance(event, HarborLeft):
            record = self.harbors.get(event.harbor)
            if record is not None and record.incarnation == event.incarnation:
                del self.harbors[event.harbor]
        elif isinstance(event, NameBound):
            self.names[event.name] = event.handle
        elif isinstance(event, NameUnbound):
            if self.names.get(event.name) == event.handle:
                del self.names[event.name]
        elif isinstance(event, GroupJoined):
            self.groups.setdefault(event.group, set()).add(event.handle)
        else:
            members = self.groups.get(event.group)
            if members is not None:
                members.discard(event.handle)
                if not members:
                    del self.groups[event.group]
        self.listener.master_event(event)
        return True

    def _fetch_table(self) -> None:
        # The master answers on this same connection, so its reply covers every event
        # pushed before it: events meanwhile are ignored.
        self.get_table().addCallbacks(
            lambda table: self._feed(self._machine.resynced, table),
            lambda failure: self._feed(self._machine.resync_failed))

    def _resynced(self, table: Table) -> None:
        if table.sequence > self.sequence:
            self._replace(table)
            self.listener.master_table(table, False)

    def _replace(self, table: Table) -> None:
        self.sequence = table.sequence
        self.harbors = {record.harbor: record for record in table.harbors}
        self.names = dict(table.names)
        self.groups = {group: set(members) for group, members in table.groups.items()}

    def _refused(self, reason: str) -> None:
        self.refusal = reason
        self.log.error("the master at {master} refused this node: {reason}",
                       master=self.endpoint_description, reason=reason)
        self._service.stopService()
        self._fail_waiters(JoinRefused(reason))
        self.listener.master_refused(reason)

    def _went_down(self, reason: str) -> None:
        self._requests.fail_all(MasterUnavailable(f"connection to the master lost: {reason}"))
        if self._service.running:
            self.log.info("lost the master at {master}: {reason}; reconnecting",
                          master=self.endpoint_description, reason=reason)
        self.listener.master_lost(reason)

    def _stopping(self) -> None:
        self._fail_waiters(MasterUnavailable("the master client is stopping"))
        self._requests.fail_all(MasterUnavailable("the master client is stopping"))

    def _fail_waiters(self, error: Exception) -> None:
        waiters, self._ready = self._ready, []
        for waiter in waiters:
            if not waiter.called:
                waiter.errback(error)


def _build_client_machine() -> Callable[[MasterClient], _ClientInputs]:
    machine = TypeMachineBuilder(_ClientInputs, MasterClient)
    idle = machine.state("idle")
    connecting = machine.state("connecting")
    handshaking = machine.state("handshaking")
    joining = machine.state("joining")
    up = machine.state("up")
    resyncing = machine.state("resyncing")
    refused = machine.state("refused")
    stopped = machine.state("stopped")
    live = (connecting, handshaking, joining, up, resyncing)
    every = (idle, *live, refused, stopped)
    I = _ClientInputs  # noqa: E741, N806

    @idle.upon(I.start).to(connecting)
    @stopped.upon(I.start).to(connecting)
    def start(c: _ClientInputs, s: MasterClient) -> None:
        s.state = "connecting"
        s._service.startService()

    @idle.upon(I.stop).to(stopped)
    @connecting.upon(I.stop).to(stopped)
    @handshaking.upon(I.stop).to(stopped)
    @joining.upon(I.stop).to(stopped)
    @up.upon(I.stop).to(stopped)
    @resyncing.upon(I.stop).to(stopped)
    def stop(c: _ClientInputs, s: MasterClient) -> None:
        s.state = "stopped"
        s._stopping()

    @idle.upon(I.connected).to(handshaking)
    @connecting.upon(I.connected).to(handshaking)
    def connected(c: _ClientInputs, s: MasterClient, protocol: MasterClientProtocol) -> None:
        s.state = "handshaking"
        s.current = protocol

    @handshaking.upon(I.connected).loop()
    @joining.upon(I.connected).to(handshaking)
    @up.upon(I.connected).to(handshaking)
    @resyncing.upon(I.connected).to(handshaking)
    def replaced(c: _ClientInputs, s: MasterClient, protocol: MasterClientProtocol) -> None:
        old, s.current = s.current, protocol
        was_up = s.state in ("up", "resyncing")
        s.state = "handshaking"
        if old is not None and old is not protocol and old.transport is not None:
            old.drop("replaced by a newer connection to the master")
        if was_up:
            s._went_down("replaced by a newer connection")

    @refused.upon(I.connected).loop()
    @stopped.upon(I.connected).loop()
    def unwanted(c: _ClientInputs, s: MasterClient, protocol: MasterClientProtocol) -> None:
        protocol.close_connection()

    @handshaking.upon(I.proven).to(joining)
    def proven(c: _ClientInputs, s: MasterClient) -> None:
        s.state = "joining"

    @handshaking.upon(I.observing).to(up)
    def observing(c: _ClientInputs, s: MasterClient) -> None:
        s.state = "up"
        s._unwelcomed = 0
        s._up()

    @handshaking.upon(I.welcomed).to(up)
    @joining.upon(I.welcomed).to(up)
    def welcomed(c: _ClientInputs, s: MasterClient, welcome: Welcome) -> None:
        s.state = "up"
        s._welcome(welcome)

    @up.upon(I.event).loop()
    def event(c: _ClientInputs, s: MasterClient, event: Event) -> None:
        s.pushed(event)

    @up.upon(I.gap).to(resyncing)
    def gap(c: _ClientInputs, s: MasterClient) -> None:
        s.state = "resyncing"
        s._fetch_table()

    @resyncing.upon(I.resynced).to(up)
    def resynced(c: _ClientInputs, s: MasterClient, table: Table) -> None:
        s.state = "up"
        s._resynced(table)

    @resyncing.upon(I.resync_failed).to(up)
    def resync_failed(c: _ClientInputs, s: MasterClient) -> None:
        s.state = "up"  # the connection went: the next welcome brings the table

    for state in (idle, *live):
        state.upon(I.refused).to(refused)(_refused)

    @handshaking.upon(I.lost).to(connecting)
    @joining.upon(I.lost).to(connecting)
    def lost_joining(c: _ClientInputs, s: MasterClient, reason: str) -> None:
        s.state = "connecting"
        s.current = None

    @up.upon(I.lost).to(connecting)
    @resyncing.upon(I.lost).to(connecting)
    def lost_up(c: _ClientInputs, s: MasterClient, reason: str) -> None:
        s.state = "connecting"
        s.current = None
        s._went_down(reason)

    @refused.upon(I.lost).loop()
    @stopped.upon(I.lost).loop()
    def lost_after(c: _ClientInputs, s: MasterClient, reason: str) -> None:
        s.current = None

    ignored: dict[Callable[..., None], tuple[object, ...]] = {
        I.start: (connecting, handshaking, joining, up, resyncing, refused),
        I.stop: (refused, stopped),
        I.proven: (idle, connecting, joining, up, resyncing, refused, stopped),
        I.observing: (idle, connecting, joining, up, resyncing, refused, stopped),
        I.welcomed: (idle, connecting, up, resyncing, refused, stopped),
        I.event: (idle, connecting, handshaking, joining, resyncing, refused, stopped),
        I.gap: (idle, connecting, handshaking, joining, resyncing, refused, stopped),
        I.resynced: (idle, connecting, handshaking, joining, up, refused, stopped),
        I.resync_failed: (idle, connecting, handshaking, joining, up, refused, stopped),
        I.refused: (refused, stopped),
        I.lost: (idle, connecting),
    }
    for input_, states in ignored.items():
        for state in every:
            if state in states:
                state.upon(input_).loop()(_ignore)
    return machine.build()


def _ignore(c: _ClientInputs, s: MasterClient, *args: object) -> None:
    """An event that cannot apply in this state (a stray table, a late event)."""


def _refused(c: _ClientInputs, s: MasterClient, reason: str) -> None:
    s.state = "refused"
    s._refused(reason)


ClientMachine = _build_client_machine()

__all__ = ["AuthenticationFailed", "BoundedEndpoint", "JoinInfo", "MasterClient",
           "MasterClientProtocol"]
