"""The node's side of the name service: stay connected, stay joined, keep the table.

A Twisted ClientService keeps one connection to the master and reconnects with jittered
exponential backoff. Every (re)connection authenticates and joins again with the node's
harbor, incarnation, endpoint and the global names it holds, so a restarted master rebuilds
its table from the nodes. The client keeps the master's view of the table, applies pushed
events in sequence, and fetches the whole table again when it sees a gap.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..auth import new_nonce, prove, verify
from ..errors import (
    AuthenticationFailed,
    ConfigurationError,
    JoinRefused,
    MasterUnavailable,
    NameConflict,
    ProtocolError,
)
from ..interfaces import IMasterClient, IMasterListener
from ..session import SessionTable
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
from .registry import Event, HarborJoined, HarborLeft, HarborRecord, NameBound, NameUnbound, Table

_BEAT = MASTER_CODEC.encode(MasterHeartbeat())


class _QuietFactory(Factory):
    noisy = False  # it reconnects often; the client logs what matters


@attrs.frozen
class JoinInfo:
    """Who this node is, for every join (``harbor`` 0 asks the master to assign one)."""

    harbor: int
    incarnation: int
    node: str
    endpoint: str


class MasterClientProtocol(FrameProtocol):
    """One connection to the master: handshake, join, then events and replies."""

    def __init__(self, client: MasterClient) -> None:
        super().__init__(client.max_frame, max_frame_before_auth=4096)
        self.client = client
        self.state = "challenge"
        self.nonce = new_nonce()
        self.welcomed = False
        self._heartbeat = HeartbeatTimer(client.clock, client.heartbeat_interval,
                                         client.heartbeat_timeout, self._beat, self._silent)

    def connectionMade(self) -> None:
        super().connectionMade()
        self._heartbeat.start()
        self.send(MasterHello(PROTOCOL_VERSION, self.nonce))

    def send(self, message: object) -> None:
        self.send_frame(MASTER_CODEC.encode(message))

    def frame_received(self, frame: bytes) -> None:
        self._heartbeat.heard()
        message = MASTER_CODEC.decode(frame)
        if isinstance(message, MasterHeartbeat):
            return
        if isinstance(message, Refused):
            self.client._refused(self, message.reason)
            return
        if self.state == "challenge":
            if not isinstance(message, MasterChallenge):
                raise ProtocolError(f"expected MasterChallenge, got {type(message).__name__}")
            if message.version != PROTOCOL_VERSION:
                self.client._refused(self, f"the master speaks protocol {message.version}, "
                                           f"this node {PROTOCOL_VERSION}")
                return
            text = transcript(PROTOCOL_VERSION, self.nonce, message.nonce)
            if not verify(self.client.secret, MASTER_ROLE, text, message.proof):
                self.client._refused(self, "authentication failed: the master does not know "
                                           "our cluster secret")
                return
            proof = prove(self.client.secret, NODE_ROLE, text)
            self.authenticated()  # the master proved the secret: its table may be large
            if self.client.join is None:
                self.send(Observe(proof))
                self.state = "up"
                self.client._observing(self)
            else:
                info = self.client.join
                self.send(Join(proof, info.harbor, info.incarnation, info.node, info.endpoint,
                               self.client.names_to_assert()))
                self.state = "welcome"
        elif self.state == "welcome":
            if not isinstance(message, Welcome):
                raise ProtocolError(f"expected Welcome, got {type(message).__name__}")
            self.state = "up"
            self.client._welcomed(self, message)
        elif isinstance(message, Reply | TableReply):
            self.client._reply(message)
        elif isinstance(message, HarborJoined | HarborLeft | NameBound | NameUnbound):
            self.client._event(self, message)
        else:
            raise ProtocolError(f"unexpected {type(message).__name__} from the master")

    def _beat(self) -> None:
        self.send_frame(_BEAT)

    def _silent(self, quiet: float) -> None:
        self.drop(f"the master is silent for {quiet:.1f} s")

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self._heartbeat.stop()
        self.client._lost(self, self.drop_reason or reason.getErrorMessage())


@implementer(IMasterClient)
class MasterClient:
    """Keeps one node joined to the master (or, with ``join=None``, just reads the table)."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        endpoint: str,
        secret: bytes,
        listener: IMasterListener,
        join: JoinInfo | None = None,
        names_to_assert: Callable[[], dict[str, int]] = dict,
        request_timeout: float = 5.0,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 3.0,
        retry_initial: float = 0.1,
        retry_max: float = 1.0,
        max_frame: int = DEFAULT_MAX_FRAME,
        rng: random.Random | None = None,
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.endpoint_description = endpoint
        try:
            self.endpoint = clientFromString(reactor, endpoint)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigurationError(f"bad master endpoint {endpoint!r}: {e}") from None
        self.secret = secret
        self.listener = listener
        self.join = join
        self.names_to_assert = names_to_assert
        self.request_timeout = request_timeout
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.max_frame = max_frame
        rng = rng or random.Random()
        self._service = ClientService(
            self.endpoint, _QuietFactory.forProtocol(lambda: MasterClientProtocol(self)),
            retryPolicy=backoffPolicy(retry_initial, retry_max, 2.0,
                                      jitter=lambda: rng.uniform(0, retry_initial)),
            clock=reactor,
        )
        self._requests = SessionTable(reactor, request_timeout)
        self._ready: list[Deferred[MasterClientProtocol]] = []
        self.protocol: MasterClientProtocol | None = None
        self.harbor = join.harbor if join is not None else 0
        self.sequence = 0
        self.harbors: dict[int, HarborRecord] = {}
        self.names: dict[str, int] = {}
        self.welcomes = 0
        self.refusal: str | None = None
        self._resyncing = False

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._service.startService()

    def stop(self) -> Deferred[None]:
        self._fail_waiters(MasterUnavailable("the master client is stopping"))
        self._requests.fail_all(MasterUnavailable("the master client is stopping"))
        stopped: Deferred[None] = self._service.stopService()
        return stopped

    @property
    def connected(self) -> bool:
        return self.protocol is not None

    # --- IMasterClient -----------------------------------------------------------------

    def register_name(self, name: str, handle: int) -> Deferred[None]:
        return self._request(lambda request: BindName(request, name, handle)).addCallback(
            lambda reply: None)

    def unregister_name(self, name: str) -> Deferred[None]:
        return self._request(lambda request: UnbindName(request, name)).addCallback(
            lambda reply: None)

    def lookup_name(self, name: str) -> Deferred[int | None]:
        """The cached handle, else the master's answer (None if nobody holds the name)."""
        cached = self.names.get(name)
        if cached is not None:
            return succeed(cached)
        return self._request(lambda request: LookupName(request, name)).addCallback(
            lambda reply: reply.handle or None)

    def get_table(self) -> Deferred[Table]:
        return self._request(lambda request: GetTable(request)).addCallback(
            lambda reply: reply.table)

    def table(self) -> Table:
        """The master's view as this client knows it now."""
        return Table(self.sequence, tuple(self.harbors[h] for h in sorted(self.harbors)),
                     dict(self.names))

    # --- requests ----------------------------------------------------------------------

    def when_up(self, timeout: float | None = None) -> Deferred[MasterClientProtocol]:
        """The joined connection, waiting at most ``timeout`` (default: request timeout)."""
        if self.protocol is not None:
            return succeed(self.protocol)
        waiter: Deferred[MasterClientProtocol] = Deferred()
        self._ready.append(waiter)
        bound = self.request_timeout if timeout is None else timeout

        def unavailable(failure: Failure) -> Failure:
            if failure.check(TimeoutError):
                if waiter in self._ready:
                    self._ready.remove(waiter)
                why = f": {self.refusal}" if self.refusal else ""
                return Failure(MasterUnavailable(
                    f"no master at {self.endpoint_description} within {bound:g} s{why}"))
            return failure

        return waiter.addTimeout(bound, self.clock).addErrback(unavailable)

    def _request(self, make: Callable[[int], object]) -> Deferred[Any]:
        def send(protocol: MasterClientProtocol) -> Deferred[Any]:
            request, reply = self._requests.new()
            protocol.send(make(request))
            return reply

        return self.when_up().addCallback(send).addCallback(self._check_reply)

    @staticmethod
    def _check_reply(reply: Reply | TableReply) -> Reply | TableReply:
        if isinstance(reply, Reply) and reply.error:
            raise NameConflict(reply.error)
        return reply

    # --- from the protocol -------------------------------------------------------------

    def _welcomed(self, protocol: MasterClientProtocol, welcome: Welcome) -> None:
        first = self.welcomes == 0
        self.welcomes += 1
        self.harbor = welcome.harbor
        if self.join is not None and self.join.harbor != welcome.harbor:
            self.join = attrs.evolve(self.join, harbor=welcome.harbor)  # keep it on rejoin
        self._resyncing = False
        self._replace(welcome.table)
        for name in welcome.refused_names:
            self.log.warn("the master refused name {name}: another node holds it", name=name)
        self.log.info("joined the master at {master} as harbor {harbor} (table {sequence})",
                      master=self.endpoint_description, harbor=welcome.harbor,
                      sequence=welcome.table.sequence)
        self._up(protocol)
        self.listener.master_table(welcome.table, first)

    def _observing(self, protocol: MasterClientProtocol) -> None:
        self._up(protocol)

    def _up(self, protocol: MasterClientProtocol) -> None:
        self.protocol = protocol
        self.refusal = None
        waiters, self._ready = self._ready, []
        for waiter in waiters:
            waiter.callback(protocol)

    def _event(self, protocol: MasterClientProtocol, event: Event) -> None:
        if event.sequence <= self.sequence or self._resyncing:
            # Already in our table, or in the one we asked for: the master answers on this
            # same connection, so its reply covers every event pushed before it.
            return
        if event.sequence != self.sequence + 1:
            self.log.info("missed events {first}..{last}: fetching the table",
                          first=self.sequence + 1, last=event.sequence - 1)
            self._resyncing = True
            self.get_table().addCallbacks(self._resync, self._resync_failed)
            return
        self.sequence = event.sequence
        if isinstance(event, HarborJoined):
            self.harbors[event.record.harbor] = event.record
        elif isinstance(event, HarborLeft):
            record = self.harbors.get(event.harbor)
            if record is not None and record.incarnation == event.incarnation:
                del self.harbors[event.harbor]
        elif isinstance(event, NameBound):
            self.names[event.name] = event.handle
        elif self.names.get(event.name) == event.handle:
            del self.names[event.name]
        self.listener.master_event(event)

    def _resync_failed(self, failure: Failure) -> None:
        self._resyncing = False  # the connection went; the next welcome brings the table

    def _resync(self, table: Table) -> None:
        self._resyncing = False
        if table.sequence > self.sequence:
            self._replace(table)
            self.listener.master_table(table, False)

    def _replace(self, table: Table) -> None:
        self.sequence = table.sequence
        self.harbors = {record.harbor: record for record in table.harbors}
        self.names = dict(table.names)

    def _reply(self, reply: Reply | TableReply) -> None:
        self._requests.resolve(reply.request, reply)

    def _refused(self, protocol: MasterClientProtocol, reason: str) -> None:
        self.refusal = reason
        self.log.error("the master at {master} refused this node: {reason}",
                       master=self.endpoint_description, reason=reason)
        self._service.stopService()
        error = JoinRefused(reason)
        self._fail_waiters(error)
        self.listener.master_refused(reason)
        if protocol.transport is not None:
            protocol.transport.loseConnection()

    def _lost(self, protocol: MasterClientProtocol, reason: str) -> None:
        if self.protocol is not protocol:
            return
        self.protocol = None
        self._requests.fail_all(MasterUnavailable(f"connection to the master lost: {reason}"))
        if self._service.running:
            self.log.info("lost the master at {master}: {reason}; reconnecting",
                          master=self.endpoint_description, reason=reason)
        self.listener.master_lost(reason)

    def _fail_waiters(self, error: Exception) -> None:
        waiters, self._ready = self._ready, []
        for waiter in waiters:
            waiter.errback(error)


__all__ = ["AuthenticationFailed", "JoinInfo", "MasterClient", "MasterClientProtocol"]
