"""The node: a harbor id, its services and names, and call/send to anywhere in the cluster.

A local destination is dispatched in-process through one FIFO run queue, drained by the
reactor (asynchronous, per-sender order kept, no socket touched); a remote one goes to the
router. Replies find their call by session id in the node's SessionTable.
"""

from __future__ import annotations

import inspect
import os
import random
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..address import (
    LOCAL_MAX,
    NodeName,
    check_handle,
    format_handle,
    harbor_of,
    local_of,
    make_handle,
)
from ..endpoints import listener_client_endpoint
from ..errors import (
    CallError,
    ConfigurationError,
    HarborDown,
    NameConflict,
    NoSuchService,
    QueueFull,
    RemoteError,
)
from ..harbor.link import HarborLinkFactory, LinkConfig
from ..interfaces import IHarborLink, IServiceBehaviour
from ..master.client import JoinInfo, MasterClient
from ..master.messages import ServiceInfo
from ..session import SESSION_MAX, SessionTable
from ..transports.loopback import LoopbackAddress
from ..wire.codec import PayloadType, encode_data_message
from ..wire.framing import DEFAULT_MAX_FRAME, DEFAULT_MAX_OUTBOUND
from ..wire.pieces import DEFAULT_MAX_MESSAGE, DEFAULT_PIECE_SIZE
from .cluster import ClusterMembership
from .flow import FlowControl
from .groups import GroupPicker
from .monitors import Monitors
from .resolver import NodeResolver
from .router import Router
from .stats import CallStats

_NORMAL = PayloadType.NORMAL
_ERROR = PayloadType.ERROR
_SYSTEM = PayloadType.SYSTEM
NODE_LOCAL_ID = 1  #: the node's own handle (replies to ``node.call`` come back to it)


def error_payload(error: BaseException) -> list[str]:
    """How a failed handler's reply travels: ["remote", exception type, message]."""
    if isinstance(error, RemoteError):
        return ["remote", error.remote_type, error.message]
    return ["remote", type(error).__name__, str(error)]


def error_from_payload(payload: Any) -> CallError:
    """The exception a caller sees for a failed reply."""
    if isinstance(payload, list) and len(payload) == 3 and all(
        isinstance(p, str) for p in payload
    ):
        kind, remote_type, message = payload
        if kind == "nosuchservice":
            return NoSuchService(message)
        return RemoteError(remote_type, message)
    return RemoteError("ProtocolError", f"malformed error reply {payload!r}")


class Node:
    """One harbor of the cluster. The reactor is passed in; nothing here imports it."""

    log = Logger()

    def __init__(
        self,
        harbor: int,
        reactor: Any,
        secret: bytes,
        incarnation: int | None = None,
        default_timeout: float | None = 10.0,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 3.0,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_message: int = DEFAULT_MAX_MESSAGE,
        piece_size: int = DEFAULT_PIECE_SIZE,
        max_queue_bytes: int = 1024 * 1024,
        resolver: NodeResolver | None = None,
        max_outbound: int = DEFAULT_MAX_OUTBOUND,
        rng: random.Random | None = None,
    ) -> None:
        self.reactor = reactor
        #: 0 until the master assigns one (``--harbor auto``); see :meth:`assign_harbor`
        self.harbor = harbor
        self.handle = make_handle(harbor, NODE_LOCAL_ID) if harbor else 0
        #: new at every start; microseconds of wall time, so a restart always compares newer
        self.incarnation = incarnation if incarnation is not None else time.time_ns() // 1000
        # Each incarnation starts its session ids at a random point, so that a reply a peer
        # still owes a previous incarnation of this node is unlikely to match a new call.
        self.rng = rng or random.Random()
        #: calls and sends by outcome, call latency: read by the metrics (skyproto.web)
        self.stats = CallStats(reactor)
        self.sessions = SessionTable(reactor, default_timeout,
                                     first_id=self.rng.randrange(SESSION_MAX) + 1,
                                     finished=self.stats.call_finished)
        self._max_message = max_message
        self.config = LinkConfig(harbor, self.incarnation, secret, heartbeat_interval,
                                 heartbeat_timeout, max_frame=max_frame,
                                 max_message=max_message, piece_size=piece_size,
                                 max_outbound=max_outbound)
        #: tells feeders (gate clients) to stop reading while a link is congested
        self.flow = FlowControl()
        self.router = Router(reactor, self.config, self._deliver, self._harbor_lost,
                             self._undeliverable, self._expected_incarnation,
                             max_queue_bytes=max_queue_bytes, rng=self.rng, resolver=resolver,
                             flow=self.flow, pending_to=self.sessions.pending_to,
                             load=self.load, reply_received=self.sessions.resolve)
        self.services: dict[int, IServiceBehaviour] = {}
        #: names this node bound itself: local (``.x``) ones, and global ones it holds
        self.names: dict[str, int] = {}
        self.master: MasterClient | None = None
        self.membership = ClusterMembership(self)
        #: who watches which service (:meth:`monitor`)
        self.monitors = Monitors(lambda: self.harbor, self._has_service, self._send_system)
        #: the groups this node's services are in (group -> handles), re-asserted at joins
        self.groups: dict[str, set[int]] = {}
        self._picker = GroupPicker(self.rng)
        #: requests whose handler has not answered yet (part of the load told to peers)
        self._in_progress = 0
        self._next_local = NODE_LOCAL_ID + 1
        self._inbox: deque[tuple[None, int, int, int, int, Any]] = deque()
        self._draining = False
        self._ports: list[IListeningPort] = []
        #: the endpoint string of each listening port (what join_master advertises)
        self._listened: dict[IListeningPort, str] = {}
        self._link_factories: list[HarborLinkFactory] = []

    # --- services and names ------------------------------------------------------------

    def assign_harbor(self, harbor: int) -> None:
        """Take the harbor id the master assigned (a node started with harbor 0)."""
        if self.harbor:
            raise RuntimeError(f"this node is already harbor {self.harbor}")
        self.harbor = harbor
        self.handle = make_handle(harbor, NODE_LOCAL_ID)
        self.config = attrs.evolve(self.config, harbor=harbor)
        self.router.config = self.config
        for factory in self._link_factories:
            factory.config = self.config

    def spawn(self, service: IServiceBehaviour, name: str | None = None) -> int:
        """Give ``service`` a handle (and ``name``, or its ``default_name``); return it."""
        if not self.harbor:
            raise RuntimeError("the master has not assigned this node's harbor id yet")
        local = self._next_local
        for _ in range(LOCAL_MAX):
            if local > LOCAL_MAX:
                local = NODE_LOCAL_ID + 1
            if local not in self.services:
                break
            local += 1
        else:
            raise RuntimeError("every local id of this node is in use")
        self._next_local = local + 1
        handle = make_handle(self.harbor, local)
        self.services[local] = service
        if hasattr(service, "handle"):
            service.node = self  # type: ignore[attr-defined]
            service.handle = handle
        name = name if name is not None else getattr(service, "default_name", None)
        if name is not None:
            self.register_name(name, handle).addErrback(
                lambda f: self.log.error("name {name} for {handle}: {why}", name=name,
                                         handle=format_handle(handle), why=f.getErrorMessage()))
        self.log.info("service {service} is {handle}{named}", service=type(service).__name__,
                      handle=format_handle(handle), named=f" ({name})" if name else "")
        return handle

    def kill(self, handle: int, reason: str = "killed") -> None:
        """End a local service: its names go with it, and its monitors fire with ``reason``."""
        service = self.services.get(local_of(handle)) if harbor_of(handle) == self.harbor else None
        if service is None or local_of(handle) == NODE_LOCAL_ID:
            raise NoSuchService(f"no service {format_handle(handle)} on harbor {self.harbor}")
        del self.services[local_of(handle)]
        for name in [n for n, h in self.names.items() if h == handle]:
            del self.names[name]
            if self.master is not None and not name.startswith("."):
                self.master.unregister_name(name).addErrback(self._unregister_failed, name)
        for group in [g for g, members in self.groups.items() if handle in members]:
            self._forget_membership(group, handle)
        stopped = getattr(service, "stopped", None)
        if stopped is not None:
            stopped()
        self.monitors.service_exited(handle, reason)

    def monitor(self, handle: int | str) -> Deferred[str]:
        """Like Erlang's ``erlang:monitor/2``: a Deferred that fires, once, with the reason
        the service ``handle`` (or the one a name resolves to now) went away: it was killed
        (``kill``'s reason), its harbor went down or restarted, or it never existed (``"no
        such service"``). :meth:`demonitor` (or cancelling it) stops watching."""
        return self.monitors.monitor(self.resolve(handle))

    def demonitor(self, watching: Deferred[str]) -> bool:
        """Stop a monitor; False if it had already fired or been stopped."""
        return self.monitors.demonitor(watching)

    # --- service groups ------------------------------------------------------------------

    def join_group(self, group: str, service: Any) -> Deferred[None]:
        """Put a local service (the object, its handle or a name it has) in ``group``, a
        name for a set of services across the cluster, like Erlang's ``pg``. Through the
        master like names: every node learns it, it is re-asserted at every join, and it
        ends with the service or its harbor. Fires once the master has it."""
        handle = self._local_service(service)
        if not group or len(group.encode()) > 255 or any(c.isspace() for c in group):
            return _failed(ConfigurationError(
                f"a group name is 1 to 255 bytes with no spaces: {group!r}"))
        self.groups.setdefault(group, set()).add(handle)
        if self.master is None:
            return succeed(None)
        joined: Deferred[None] = self.master.join_group(group, handle)
        return joined

    def leave_group(self, group: str, service: Any) -> Deferred[None]:
        """Take a local service out of ``group``."""
        handle = self._local_service(service)
        if handle not in self.groups.get(group, ()):
            return succeed(None)
        return self._forget_membership(group, handle)

    def _forget_membership(self, group: str, handle: int) -> Deferred[None]:
        members = self.groups.get(group, set())
        members.discard(handle)
        if not members:
            self.groups.pop(group, None)
        if self.master is None:
            return succeed(None)
        left: Deferred[None] = self.master.leave_group(group, handle)
        return left.addErrback(self._leave_failed, group)

    def _leave_failed(self, failure: Failure, group: str) -> None:
        self.log.info("membership of group {group} stays at the master until its harbor "
                      "leaves: {why}", group=group, why=failure.getErrorMessage())

    def _local_service(self, service: Any) -> int:
        handle = getattr(service, "handle", service)
        handle = self.resolve(handle) if isinstance(handle, str) else handle
        if not isinstance(handle, int) or not self._has_service(handle) or \
                harbor_of(handle) != self.harbor:
            raise NoSuchService(f"no local service {service!r} on harbor {self.harbor}")
        return handle

    def group_members(self, group: str) -> list[int]:
        """The group's members as this node knows them now (the master's table, and this
        node's own memberships), sorted."""
        members = set(self.groups.get(group, ()))
        if self.master is not None:
            members |= set(self.master.groups.get(group, ()))
        return sorted(members)

    def _live_members(self, group: str, besides: int = 0) -> list[int]:
        """Members whose harbor is not known to be down (all of them if none is). A harbor
        the router does not know counts as down: the master's HarborLeft comes before the
        GroupLeft events of its members, and whoever reacts to the calls it failed calls
        in between."""
        members = [m for m in self.group_members(group) if m != besides]
        peers = self.router.peers
        up = [m for m in members if harbor_of(m) == self.harbor
              or (harbor_of(m) in peers and not self.router.is_down(harbor_of(m)))]
        return up or members

    def load(self) -> int:
        """Requests in progress and queued here: what heartbeats tell peers."""
        return self._in_progress + len(self._inbox)

    def _load_of(self, handle: int) -> float:
        harbor = harbor_of(handle)
        if harbor == self.harbor:
            return float(self.load())
        peer = self.router.peers.get(harbor)
        reported = getattr(peer.link, "peer_load", 0) if peer is not None else 0
        return float(reported + self.sessions.pending_to(harbor))

    def call_group(self, group: str, payload: Any, pick: str = "round_robin",
                   timeout: float | None = None, retry: bool = False,
                   source: int | None = None) -> Deferred[Any]:
        """Call one live member of ``group``, chosen by ``pick`` (``round_robin``,
        ``random``, ``local_first``, ``least_loaded``; see :mod:`skyproto.node.groups`).
        An empty group fails at once with NoSuchService. ``retry``: the call is idempotent,
        so if the member's harbor goes down, or the call is refused before any reply
        (QueueFull, NoSuchService), it is sent once more to another member."""
        members = self._live_members(group)
        if not members:
            return _failed(NoSuchService(f"group {group!r} has no members"))
        try:
            target = self._picker.pick(group, members, pick, self.harbor, self._load_of)
        except ConfigurationError as e:
            return _failed(e)
        started = self.reactor.seconds()
        called = self.call(target, payload, timeout, source)
        if not retry:
            return called

        def again(failure: Failure) -> Any:
            if not failure.check(HarborDown, QueueFull, NoSuchService):
                return failure
            others = [m for m in self._live_members(group, besides=target)
                      if harbor_of(m) != harbor_of(target)] or \
                self._live_members(group, besides=target)
            if not others:
                return failure
            budget = timeout if timeout is not None else self.sessions.default_timeout
            left = None if budget is None else budget - (self.reactor.seconds() - started)
            if left is not None and left <= 0:
                return failure
            second = self._picker.pick(group, others, pick, self.harbor, self._load_of)
            self.log.debug("call to group {group} member {first} failed ({why}); "
                           "retrying on {second}", group=group,
                           first=format_handle(target), why=failure.getErrorMessage(),
                           second=format_handle(second))
            return self.call(second, payload, left, source)

        return called.addErrback(again)

    def send_group(self, group: str, payload: Any) -> int:
        """One-way to every member of ``group``; how many it went to (a member whose
        harbor is down is skipped, and logged)."""
        sent = 0
        for member in self.group_members(group):
            try:
                self.send(member, payload)
            except (HarborDown, QueueFull, NoSuchService) as e:
                self.log.info("group {group} message to {member} not sent: {why}",
                              group=group, member=format_handle(member), why=str(e))
            else:
                sent += 1
        return sent

    def _has_service(self, handle: int) -> bool:
        local = local_of(handle)
        return local != NODE_LOCAL_ID and local in self.services

    def _send_system(self, harbor: int, payload: list[Any]) -> None:
        node = make_handle(harbor, NODE_LOCAL_ID)
        self.router.send_frame(harbor, encode_data_message(
            self.handle, node, 0, _SYSTEM, payload, self._max_message))

    def _unregister_failed(self, failure: Failure, name: str) -> None:
        self.log.info("name {name} stays at the master until its harbor leaves: {why}",
                      name=name, why=failure.getErrorMessage())

    def register_name(self, name: str, handle: int,
                      timeout: float | None = None) -> Deferred[None]:
        """Bind ``name`` to ``handle``; fires when done, fails with NameConflict if taken.

        Names starting with ``.`` never leave this node. Other names are global: with a
        master, the master decides (first writer wins) and every node learns them; this
        fires only once the master granted the name (while the master is away it waits, at
        most ``timeout``, default the master client's request timeout, then fails with
        MasterUnavailable). The node re-asserts granted names whenever it joins a
        (restarted) master. Without a master they are known on this node only, and asked
        for when it joins one.
        """
        if not name or any(c.isspace() for c in name):
            return _failed(ConfigurationError(
                f"a service name is non-empty with no spaces: {name!r}"))
        check_handle(handle)
        existing = self.names.get(name)
        if existing is not None and existing != handle:
            return _failed(NameConflict(f"name {name} is already {format_handle(existing)}"))
        self.names[name] = handle
        if name.startswith(".") or self.master is None:
            return succeed(None)

        def refused(failure: Failure) -> Failure:
            if self.names.get(name) == handle:
                del self.names[name]
            return failure

        return self.master.register_name(name, handle, timeout).addErrback(refused)

    def unregister_name(self, name: str) -> Deferred[None]:
        """Remove a name this node bound (globally too, when it is a global name)."""
        handle = self.names.pop(name, None)
        if handle is None:
            return _failed(NameConflict(f"name {name} is not bound on this node"))
        if name.startswith(".") or self.master is None:
            return succeed(None)
        return self.master.unregister_name(name)

    def _expected_incarnation(self, harbor: int) -> int | None:
        record = self.membership.harbors.get(harbor)
        return record.incarnation if record is not None else None

    def global_names(self) -> dict[str, int]:
        """The global names this node holds that the master granted (all of them without a
        master): what every join re-asserts."""
        held = {name: handle for name, handle in self.names.items()
                if not name.startswith(".") and handle >> 24 == self.harbor}
        if self.master is None:
            return held
        granted = self.master.granted()
        return {name: handle for name, handle in held.items() if granted.get(name) == handle}

    def join_master(self, endpoint: str | Sequence[str], node_name: str | None = None,
                    harbor_endpoint: str | None = None,
                    request_timeout: float = 5.0,
                    on_refused: Callable[[str], object] | None = None,
                    on_joined: Callable[[int], object] | None = None) -> MasterClient:
        """Join the master at ``endpoint`` and keep joined (reconnecting with backoff).

        ``endpoint`` may be a list of masters that share one store (``--store etcd:``): the
        node talks to one at a time and moves to the next when it loses it. Each may be an
        endpoint string or ``NAME@HOST`` (``skymaster@hosta``): HOST's mapper is asked
        where NAME listens at every attempt (through this node's resolver).

        ``node_name`` defaults to ``harborN@<short host name>`` (``node<pid>@...`` for a
        node still without a harbor id), ``harbor_endpoint`` (where other nodes dial us)
        to the address of the first port this node listens on (:meth:`listen` first).
        A node made with harbor 0 asks the master for one; ``on_joined(harbor)`` is called
        after the first welcome, ``on_refused(reason)`` if the master refuses the node."""
        if node_name is None:
            node_name = str(NodeName.parse(
                f"harbor{self.harbor}" if self.harbor else f"node{os.getpid()}"))
        if harbor_endpoint is None:
            if not self._ports:
                raise ConfigurationError(
                    "join_master needs the harbor endpoint other nodes dial: listen first "
                    "(node.listen(...)), or pass harbor_endpoint")
            first = self._ports[0]
            harbor_endpoint = _advertised(first, self._listened.get(first))
        self.membership.on_refused = on_refused
        self.membership.on_joined = on_joined

        def held() -> dict[str, int]:  # granted or only claimed: the client sorts them out
            return {name: handle for name, handle in self.names.items()
                    if not name.startswith(".") and handle >> 24 == self.harbor}

        self.master = MasterClient(
            self.reactor, endpoint, self.config.secret, self.membership,
            JoinInfo(self.harbor, self.incarnation, node_name, harbor_endpoint),
            names_to_assert=held, request_timeout=request_timeout,
            groups_to_assert=lambda: {g: sorted(h) for g, h in self.groups.items() if h},
            heartbeat_interval=self.config.heartbeat_interval,
            heartbeat_timeout=self.config.heartbeat_timeout, max_frame=self.config.max_frame,
            on_name_refused=self.membership.name_refused, rng=self.rng,
            resolver=self.router.resolver,  # a NAME@HOST master: asked at every attempt
            describe_services=self.describe_services)
        self.master.start()
        return self.master

    def describe_services(self) -> list[ServiceInfo]:
        """This node's services as ``skyproto services`` lists them (through the master):
        by handle, each with its class name, the names and groups it holds here, and how
        many messages wait in the run queue for it."""
        queued: dict[int, int] = {}
        for item in self._inbox:
            queued[item[2]] = queued.get(item[2], 0) + 1
        names: dict[int, list[str]] = {}
        for name, handle in sorted(self.names.items()):
            names.setdefault(handle, []).append(name)
        groups: dict[int, list[str]] = {}
        for group, members in sorted(self.groups.items()):
            for handle in members:
                groups.setdefault(handle, []).append(group)
        described = []
        for local, service in sorted(self.services.items()):
            handle = make_handle(self.harbor, local)
            described.append(ServiceInfo(handle, type(service).__name__,
                                         tuple(names.get(handle, ())),
                                         tuple(groups.get(handle, ())), queued.get(handle, 0)))
        return described

    def subscribe(self, callback: Callable[[Any], object]) -> Callable[[], None]:
        """Be told of every harbor up/down and global name change (Erlang's monitor_nodes)."""
        return self.membership.subscribe(callback)

    def resolve(self, destination: int | str) -> int:
        """The handle for a handle or a name; NoSuchService if the name is unknown."""
        if isinstance(destination, int):
            return destination
        handle = self.names.get(destination)
        if handle is None:
            handle = self.membership.names.get(destination)
        if handle is None:
            raise NoSuchService(f"no service is named {destination!r}")
        return handle

    # --- call and send -----------------------------------------------------------------

    def call(self, destination: int | str, payload: Any, timeout: float | None = None,
             source: int | None = None) -> Deferred[Any]:
        """Request/response: a Deferred of the reply, or of a CallError."""
        # Each call is counted once, when it ends (by outcome, with its latency): by the
        # session table once it has a session, else here (see CallStats).
        if type(destination) is int:
            handle = destination
        else:
            try:
                handle = self.resolve(destination)
            except NoSuchService as e:
                if (self.master is None or not isinstance(destination, str)
                        or destination[:1] == "."):
                    self.stats.call_finished(e, self.reactor.seconds())
                    return _failed(e)
                return self._call_after_lookup(destination, payload, timeout, source)
        session, deferred = self.sessions.new(timeout, handle >> 24)
        try:
            self._send_request(source or self.handle, handle, -session, payload)
        except Exception as e:
            self.sessions.fail(session, e)
        return deferred

    def _call_after_lookup(self, name: str, payload: Any, timeout: float | None,
                           source: int | None) -> Deferred[Any]:
        """A name missing from the cache: ask the master, then call, within one deadline
        (``timeout``, else the node's default): the lookup's time comes off the call's."""
        from ..errors import CallTimeout

        assert self.master is not None
        budget = timeout if timeout is not None else self.sessions.default_timeout
        started = self.reactor.seconds()

        def found(handle: int | None) -> Deferred[Any]:
            error: Exception
            if handle is None:
                error = NoSuchService(f"no service is named {name!r}")
            elif not budget:
                return self.call(handle, payload, timeout, source)
            else:
                left = budget - (self.reactor.seconds() - started)
                if left > 0:
                    return self.call(handle, payload, left, source)
                error = CallTimeout(f"no reply within {budget:g} s (looking {name} up took it)")
            self.stats.call_finished(error, started)
            raise error

        return self.master.lookup_name(name, budget or None).addCallbacks(
            found, self.stats.call_failed, errbackArgs=(started,))

    def send(self, destination: int | str, payload: Any, source: int | None = None) -> None:
        """One-way (session 0). Raises at once if the destination is unknown or down."""
        try:
            self._send_request(source or self.handle, self.resolve(destination), 0, payload)
        except Exception as e:
            self.stats.sent(e)
            raise
        self.stats.sent()

    def _send_request(self, source: int, destination: int, session: int, payload: Any) -> None:
        """A request or one-way message: in-process if local, else encoded now (once: the
        caller may change its object afterwards) and handed to the router."""
        harbor = destination >> 24
        if harbor == self.harbor:
            if (destination & 0xFFFFFF) not in self.services:
                raise NoSuchService(f"no service :{destination:08x}")
            self._local(source, destination, session, _NORMAL, payload)
        else:
            self.router.send_frame(harbor, encode_data_message(
                source, destination, session, _NORMAL, payload, self._max_message))

    def _local(self, source: int, destination: int, session: int, ptype: int,
               payload: Any) -> None:
        self._inbox.append((None, source, destination, session, ptype, payload))
        if not self._draining:
            self._draining = True
            self.reactor.callLater(0, self._drain)

    def _drain(self) -> None:
        inbox = self._inbox
        deliver = self._deliver
        for _ in range(len(inbox)):  # what arrives meanwhile waits for the next turn
            deliver(*inbox.popleft())
        if inbox:
            self.reactor.callLater(0, self._drain)
        else:
            self._draining = False

    # --- receiving ---------------------------------------------------------------------

    def _deliver(self, link: IHarborLink | None, source: int, destination: int,
                 session: int, ptype: int, payload: Any) -> None:
        # ``link``: the link a remote message came in on (None for local ones); a reply
        # goes back on it, to the process that asked and no other.
        if ptype == _SYSTEM:
            if link is not None and not session and local_of(destination) == NODE_LOCAL_ID:
                self.monitors.system_message(source >> 24, payload)
            return
        if session > 0:
            harbor = source >> 24  # a reply only completes a call that went to its harbor
            if ptype == _ERROR:
                self.sessions.fail(session, error_from_payload(payload), harbor)
            else:
                self.sessions.resolve(session, payload, harbor)
            return
        service = self.services.get(destination & 0xFFFFFF)
        if service is None or destination >> 24 != self.harbor:
            error = NoSuchService(f"no service :{destination:08x}")  # may be malformed
            if session:
                self._reply(destination, source, -session, _ERROR,
                            ["nosuchservice", "NoSuchService", str(error)], link)
            else:
                self.log.info("dropping message to {error}", error=str(error))
            return
        self.stats.handled += 1
        try:
            result = service.receive(source, -session, payload)
        except Exception as e:
            self._handler_failed(Failure(e), destination, source, session, link)
            return
        if type(result) not in _PLAIN_RESULTS:
            self._later_result(result, destination, source, session, link)
        elif session:
            self._reply(destination, source, -session, _NORMAL, result, link)

    def _later_result(self, result: Any, destination: int, source: int, session: int,
                      link: IHarborLink | None) -> None:
        """A handler's result that is not a plain value: a Deferred or a coroutine is
        replied to when it finishes; anything else at once."""
        if inspect.iscoroutine(result):
            result = Deferred.fromCoroutine(result)
        if isinstance(result, Deferred):
            self._in_progress += 1
            result.addBoth(self._handler_finished)
            result.addCallbacks(
                self._handler_done, self._handler_failed,
                callbackArgs=(destination, source, session, link),
                errbackArgs=(destination, source, session, link),
            )
        elif session:
            self._reply(destination, source, -session, _NORMAL, result, link)

    def _undeliverable(self, link: IHarborLink, source: int, destination: int, session: int,
                       error: Exception) -> None:
        """A message whose payload could not be read: fail it alone, not the link."""
        remote = RemoteError("ProtocolError", f"unreadable payload: {error}")
        if session < 0:
            self._reply(destination, source, -session, _ERROR, error_payload(remote), link)
        elif session > 0:
            self.sessions.fail(session, remote, source >> 24)

    def _handler_finished(self, result: Any) -> Any:
        self._in_progress -= 1
        return result

    def _handler_done(self, result: Any, me: int, caller: int, session: int,
                      link: IHarborLink | None) -> None:
        if session:
            self._reply(me, caller, -session, _NORMAL, result, link)

    def _handler_failed(self, failure: Failure, me: int, caller: int, session: int,
                        link: IHarborLink | None) -> None:
        self.stats.handler_errors += 1
        if session:
            self._reply(me, caller, -session, _ERROR,
                        error_payload(failure.value or Exception()), link)
        else:
            self.log.failure("service {handle} failed on a one-way message", failure,
                             handle=format_handle(me))

    def _reply(self, source: int, destination: int, session: int, ptype: int,
               payload: Any, link: IHarborLink | None) -> None:
        """Answer a request: in-process for a local caller, else on the link that asked."""
        if link is None and destination >> 24 == self.harbor:
            self._local(source, destination, session, ptype, payload)
            return
        try:
            try:
                frame = encode_data_message(source, destination, session, ptype, payload,
                                            self._max_message)
            except (TypeError, ValueError) as e:  # CBOR cannot carry it, or it is too large
                frame = encode_data_message(source, destination, session, _ERROR,
                                            error_payload(e), self._max_message)
            if link is None:  # a local request made with a remote ``source``
                self.router.send_frame(destination >> 24, frame)
            elif link.up and not link.retired:  # the usual case, in line: back on the link
                link.write_frame(frame, True)
            else:
                self.router.reply_frame(link, frame)  # a replaced link's, or lost
        except Exception as e:
            # The caller's link is gone, so its calls failed there with HarborDown.
            # ``destination`` came off the wire: written as it is, even if it is no handle
            self.log.info("reply to {caller} lost: {error}", caller=f":{destination:08x}",
                          error=str(e))

    def _harbor_lost(self, harbor: int, reason: BaseException) -> None:
        self.membership.link_lost(harbor)
        error = reason if isinstance(reason, HarborDown) else HarborDown(str(reason))
        self.monitors.harbor_lost(harbor, str(error))
        failed = self.sessions.fail_all(error, harbor)
        if failed:
            self.log.info("{count} pending calls to harbor {harbor} failed: {error}",
                          count=failed, harbor=harbor, error=error)

    # --- network -----------------------------------------------------------------------

    def listen(self, endpoint: str) -> Deferred[IListeningPort]:
        """Accept harbor links on an endpoint description string."""
        try:
            server = serverFromString(self.reactor, endpoint)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigurationError(f"bad listen endpoint {endpoint!r}: {e}") from None
        factory = self.router.link_factory()
        self._link_factories.append(factory)
        listening: Deferred[IListeningPort] = server.listen(factory)
        return listening.addCallback(self._listening, endpoint)

    def _listening(self, port: IListeningPort, endpoint: str) -> IListeningPort:
        self._ports.append(port)
        self._listened[port] = endpoint
        return port

    def add_peer(self, harbor: int, endpoint: str) -> None:
        """A static peer: where ``harbor`` listens. The router dials it and keeps it linked."""
        if harbor == self.harbor:
            raise ConfigurationError(f"harbor {harbor} is this node itself")
        self.router.add_peer(harbor, endpoint)

    def abort(self) -> None:
        """Stop at once, as a killed process would (for fault tests and ``skyproto.testing``):
        every connection aborted with no goodbye, every timer and dial cancelled, calls failed."""
        if self.master is not None:
            self.master.stop()
        self.router.abort()
        ports, self._ports = self._ports, []
        for port in ports:
            port.stopListening()
        self.sessions.fail_all(HarborDown("the node crashed"))
        self.monitors.stop()

    def stop(self) -> Deferred[Any]:
        """Stop listening, close every link, fail every pending call."""
        stopping: list[Deferred[Any]] = []
        if self.master is not None:
            stopping.append(self.master.stop())
        self.router.stop()
        self.sessions.fail_all(HarborDown("the node is stopping"))
        for local in list(self.services):
            self.kill(make_handle(self.harbor, local), "the node is stopping")
        self.monitors.stop()
        ports, self._ports = self._ports, []
        stopping.extend(maybeDeferred(port.stopListening) for port in ports)
        return DeferredList(stopping)


#: what a handler returns that is its reply as it is (neither a Deferred nor a coroutine):
#: checked by exact type first, since isinstance on Deferred (an ABC) costs a frame
_PLAIN_RESULTS: Final = frozenset({type(None), bool, int, float, str, bytes, list, dict, tuple})


def _failed(error: BaseException) -> Deferred[Any]:
    deferred: Deferred[Any] = Deferred()
    deferred.errback(error)
    return deferred


def _advertised(port: IListeningPort, listen: str | None) -> str:
    """Where other nodes dial a listening port (``listen``: its endpoint string), as a
    client endpoint string: its address, in the scheme it listens with (``tcp:``, ``ssl:``,
    ``skytls:``), or the host's name when it listens on every interface."""
    host = port.getHost()
    if isinstance(host, IPv4Address | IPv6Address):
        address = socket.getfqdn() if host.host in ("0.0.0.0", "::") else host.host
        return listener_client_endpoint(listen, address, host.port)
    if isinstance(host, UNIXAddress):
        name = host.name.decode() if isinstance(host.name, bytes) else host.name
        return f"unix:{name}"
    if isinstance(host, LoopbackAddress):
        return f"loopback:{host.name}"
    raise ConfigurationError(
        f"cannot tell other nodes how to reach a {type(host).__name__}: pass "
        f"harbor_endpoint to join_master")
