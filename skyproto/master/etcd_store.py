"""The registry on etcd: any number of masters, one truth.

Key layout under the prefix ``P`` (``--store-prefix``, default ``/skyproto/``), values JSON:

``P harbors/NNN`` (NNN: the id, 3 digits)
    ``{"node", "endpoint", "incarnation", "up_since"}``, on a lease of its own.
``P names/NAME``
    ``{"handle", "claim"}``, on a lease of its own; ``claim`` is the create revision of the
    harbor key it was bound under (so a name left over from a harbor's previous session is
    recognised as such and may be replaced).
``P groups/GROUP/HHHHHHHH`` (HHHHHHHH: the member handle, 8 lowercase hex digits)
    ``{"claim"}``, on a lease of its own: one service group membership (``claim`` as for
    names); a handle may be in many groups, a group has members on many harbors.
``P fixed/NNN``
    empty, no lease: a node once asked for id NNN by number (``--harbor auto`` avoids it).

Every harbor id and name is created by a transaction that succeeds only if the key does not
exist (first writer wins across all masters), attached to a lease that this master renews
while the node's session lasts (a membership key too, taken over if it exists: only its
handle's harbor may hold it). One lease per key, not per node or per master: a lease
that ends deletes its keys in one revision, and every change a node sees must have a
revision of its own (its sequence number; it drops a second event with the same one). All
leases are renewed together, one keep-alive request for all of them every ``lease_ttl /
3`` seconds. A node's departure revokes its leases (the harbor first, then its names, then
its group memberships, as the in-memory store orders its events); a master that dies or is
cut off stops renewing, and etcd deletes its nodes' keys when their TTL runs out. A
master that stops cleanly revokes nothing: its nodes, re-joining another master within the
TTL with the same incarnation, take their keys over (compare-and-set onto the new master's
leases) without ever leaving the table.

Every master watches the prefix and turns each change into the registry's events, the
sequence number being etcd's revision; its own changes reach its nodes the same way, and
a change's Deferred fires once the watch brought it. A watch that ends (its member died,
lost quorum, or the request failed) starts again on the next member from the last
revision + 1; one found compacted re-reads the whole prefix and tells the difference as
events. A watch that is silent is checked: every ``liveness_interval`` without a message
the master reads the prefix (keys only) from the watch's member; a difference from its
view that is still there at the next check means the watch has stopped delivering, and
it is started again elsewhere.

A write that times out (a leader election) is retried: each is a compare-and-set whose
failure branch reads the key back, and a key found on the lease this very attempt used is
our own earlier success. A master that cannot reach etcd answers claims with
:class:`skyproto.master.records.RegistryUnavailable` (after ``write_timeout``) rather
than grant what it cannot store.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Final, TypeVar

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredLock, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..address import harbor_of
from ..interfaces import IRegistry, IRegistryListener
from .etcd_client import (
    EtcdClient,
    EtcdError,
    EtcdWatch,
    KeyValue,
    WatchEvent,
    WatchResponse,
    absent,
    created_at,
    delete,
    get,
    modified_at,
    prefix_end,
    put,
)
from .records import (
    ALL_TAKEN,
    Event,
    GroupJoined,
    GroupLeft,
    HarborHeld,
    HarborJoined,
    HarborLeft,
    HarborRecord,
    Joined,
    NameBound,
    NameUnbound,
    RegistryRefusal,
    RegistryUnavailable,
    Table,
    check_binding,
    check_group,
    check_harbor_id,
    free_harbors,
    groups_table,
    taken_message,
)

T = TypeVar("T")
DEFAULT_PREFIX: Final = "/skyproto/"
DEFAULT_LEASE_TTL: Final = 10
#: the reason of a HarborLeft this master did not cause
ENDED_ELSEWHERE: Final = "its registration ended (through another master, or its lease ran out)"


@attrs.define(eq=False)
class _Holding:
    """What this store registered for one harbor's session."""

    harbor: int
    incarnation: int
    node: str
    claim: int  # the harbor key's create revision
    lease: int
    names: dict[str, int] = attrs.field(factory=dict)  # name -> its lease
    #: (group, handle) -> the lease of that membership
    groups: dict[tuple[str, int], int] = attrs.field(factory=dict)

    def leases(self) -> list[int]:
        return [self.lease, *self.names.values(), *self.groups.values()]


@attrs.define(eq=False)
class _Waiter:
    ready: Callable[[], bool]
    deferred: Deferred[None]


class _WatchCanceled(Exception):
    """etcd canceled the watch (compacted, or no leader)."""


@implementer(IRegistry)
class EtcdRegistry:
    """The registry in etcd, shared by every master that uses the same prefix."""

    kind = "etcd"
    log = Logger()

    def __init__(self, client: EtcdClient, clock: IReactorTime, prefix: str = DEFAULT_PREFIX,
                 lease_ttl: int = DEFAULT_LEASE_TTL, write_timeout: float = 5.0,
                 liveness_interval: float = 3.0) -> None:
        if lease_ttl < 2:
            raise ValueError("etcd leases last at least 2 s")
        self.client = client
        self.clock = clock
        self.prefix = prefix
        self.lease_ttl = lease_ttl
        self.write_timeout = write_timeout
        self.liveness_interval = liveness_interval
        self._p = prefix.encode()
        self._end = prefix_end(self._p)
        #: the last revision the view includes (the sequence number nodes see)
        self.sequence = 0
        self._kvs: dict[bytes, KeyValue] = {}  # every key under the prefix, as last seen
        self._harbors: dict[int, HarborRecord] = {}
        self._names: dict[str, int] = {}
        self._claims: dict[str, int] = {}  # name -> the harbor claim it was bound under
        self._groups: dict[str, set[int]] = {}  # group -> its members (none: no entry)
        #: one change at a time per membership key (a leave waits for a join in flight)
        self._group_locks: dict[bytes, DeferredLock] = {}
        self._fixed: set[int] = set()
        self._held: dict[int, _Holding] = {}
        self._pending: set[int] = set()  # leases granted, not yet in a holding
        self._reasons: dict[int, str] = {}  # harbors we are removing, and why
        self._recent: dict[bytes, Event] = {}  # the last event of each key
        self._listeners: list[IRegistryListener] = []
        self._waiters: list[_Waiter] = []
        self._ready_waiters: list[Deferred[None]] = []
        self._loaded = False
        self._loading = False
        self._stopped = False
        self._last_error = "not loaded yet"
        self._watch: EtcdWatch | None = None
        self._watch_member = 0
        self._watch_failures = 0
        self._compacted = 0
        self._heard = 0.0
        self._suspects: set[tuple[bytes, int | None]] = set()
        self._timers: dict[str, IDelayedCall] = {}
        self._renewing = False
        self._renew_failing = False

    # --- reads -------------------------------------------------------------------------

    def snapshot(self) -> Table:
        """The table as this master's copy of etcd has it now."""
        return Table(self.sequence, tuple(self._harbors[h] for h in sorted(self._harbors)),
                     dict(self._names), groups_table(self._groups))

    def lookup(self, name: str) -> int | None:
        """The handle bound to ``name``, or None."""
        return self._names.get(name)

    def members(self, group: str) -> tuple[int, ...]:
        """The member handles of ``group``, sorted."""
        return tuple(sorted(self._groups.get(group, ())))

    def harbor(self, harbor: int) -> HarborRecord | None:
        """The live record of ``harbor``, or None."""
        return self._harbors.get(harbor)

    @property
    def ready(self) -> bool:
        """Whether the table has been loaded from etcd (and can decide)."""
        return self._loaded

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopped

    def subscribe(self, listener: IRegistryListener) -> Callable[[], None]:
        """Tell ``listener`` every change from now on; returns the function that unsubscribes."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    # --- life ----------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Load the prefix (retrying until etcd answers), then watch and renew."""
        if self._loaded:
            return succeed(None)
        if self._stopped:
            raise RegistryUnavailable("the registry is stopped")
        if not self._loading:
            self._loading = True
            self._run(self._load(), "loading the table")
        waiter: Deferred[None] = Deferred()
        self._ready_waiters.append(waiter)
        return waiter

    def stop(self) -> Deferred[None]:
        """Stop watching and renewing; requests still waiting fail with RegistryUnavailable."""
        self._stopped = True
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        if self._watch is not None:
            watch, self._watch = self._watch, None
            watch.cancel()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.deferred.called:
                waiter.deferred.errback(RegistryUnavailable("the registry is stopping"))
        ready, self._ready_waiters = self._ready_waiters, []
        for ready_waiter in ready:
            ready_waiter.errback(RegistryUnavailable("the registry stopped before it loaded"))
        return succeed(None)

    async def _load(self) -> None:
        delay = 0.1
        while not self._stopped:
            try:
                revision, kvs = await self.client.range(self._p, self._end,
                                                        timeout=self.write_timeout)
            except EtcdError as e:
                if self._last_error != str(e):
                    self.log.warn("cannot load the registry from etcd: {why}; trying again",
                                  why=str(e))
                self._last_error = str(e)
                await deferLater(self.clock, delay)
                delay = min(delay * 2, 2.0)
                continue
            if self.stopped:
                return
            for kv in kvs:
                self._apply_put(kv, quiet=True)
            self.sequence = revision
            self._loaded = True
            self.log.info("the registry loaded {harbors} harbors and {names} names from etcd "
                          "at revision {revision} (prefix {prefix})",
                          harbors=len(self._harbors), names=len(self._names),
                          revision=revision, prefix=self.prefix)
            self._start_watch()
            self._schedule("renew", self.lease_ttl / 3, self._renew)
            self._schedule("liveness", self.liveness_interval, self._check_watch)
            ready, self._ready_waiters = self._ready_waiters, []
            for waiter in ready:
                waiter.callback(None)
            return

    def _schedule(self, name: str, delay: float, what: Callable[[], object]) -> None:
        if self._stopped:
            return
        old = self._timers.get(name)
        if old is not None and old.active():
            old.cancel()
        self._timers[name] = self.clock.callLater(delay, what)

    def _run(self, work: Coroutine[Any, Any, Any], what: str) -> None:
        """Background work: a failure is logged, never left unhandled."""
        def failed(failure: Failure) -> None:
            if not self._stopped:
                self.log.failure("the etcd registry failed while {what}", failure, what=what)

        Deferred.fromCoroutine(work).addErrback(failed)

    # --- IRegistry changes ---------------------------------------------------------------

    def admit(self, harbor: int, node: str, endpoint: str, incarnation: int,
              names: Mapping[str, int], now: float) -> Deferred[Joined]:
        """Admit a node: its harbor record and its names, under a lease; fires with the outcome."""
        return Deferred.fromCoroutine(self._admit(harbor, node, endpoint, incarnation,
                                                  dict(names), now))

    def depart(self, harbor: int, incarnation: int, reason: str) -> Deferred[tuple[Event, ...]]:
        """A harbor left: remove its record, names and memberships (if still that incarnation)."""
        return Deferred.fromCoroutine(self._depart(harbor, incarnation, reason))

    def claim_name(self, name: str, handle: int,
                   requester: int) -> Deferred[tuple[Event, ...]]:
        """Bind ``name`` to ``handle`` for harbor ``requester`` (first writer wins)."""
        return Deferred.fromCoroutine(self._claim_name(name, handle, requester))

    def release_name(self, name: str, requester: int) -> Deferred[tuple[Event, ...]]:
        """Unbind ``name``, if harbor ``requester`` holds it."""
        return Deferred.fromCoroutine(self._release_name(name, requester))

    def join_group(self, group: str, handle: int,
                   requester: int) -> Deferred[tuple[Event, ...]]:
        """Add ``handle`` to ``group`` for harbor ``requester``."""
        return Deferred.fromCoroutine(self._join_group(group, handle, requester))

    def leave_group(self, group: str, handle: int,
                    requester: int) -> Deferred[tuple[Event, ...]]:
        """Remove ``handle`` from ``group`` for harbor ``requester``."""
        return Deferred.fromCoroutine(self._leave_group(group, handle, requester))

    # --- keys and values -----------------------------------------------------------------

    def harbor_key(self, harbor: int) -> bytes:
        """The etcd key of a harbor's record."""
        return self._p + b"harbors/%03d" % harbor

    def name_key(self, name: str) -> bytes:
        """The etcd key of a global name."""
        return self._p + b"names/" + name.encode()

    def fixed_key(self, harbor: int) -> bytes:
        """The etcd key that marks a harbor id as used by a fixed-id node."""
        return self._p + b"fixed/%03d" % harbor

    def group_key(self, group: str, handle: int) -> bytes:
        """The etcd key of one group membership."""
        return self._p + b"groups/" + group.encode() + b"/%08x" % handle

    def _parse_key(self, key: bytes) -> tuple[str, Any]:
        rest = key[len(self._p):]
        kind, _, ident = rest.partition(b"/")
        try:
            if kind in (b"harbors", b"fixed") and len(ident) == 3 and ident.isdigit():
                return kind.decode(), int(ident)
            if kind == b"names" and ident:
                return "names", ident.decode()
            group, _, member = ident.rpartition(b"/")
            if kind == b"groups" and group and len(member) == 8 and \
                    all(c in b"0123456789abcdef" for c in member):
                return "groups", (group.decode(), int(member, 16))
        except UnicodeDecodeError:
            pass
        return "other", None

    @staticmethod
    def _encode(value: Mapping[str, Any]) -> bytes:
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()

    @staticmethod
    def _decode_harbor(harbor: int, value: bytes) -> HarborRecord:
        data = json.loads(value)
        return HarborRecord(harbor, str(data["node"]), str(data["endpoint"]),
                            int(data["incarnation"]), float(data["up_since"]))

    @staticmethod
    def _decode_name(value: bytes) -> tuple[int, int]:
        data = json.loads(value)
        return int(data["handle"]), int(data.get("claim", 0))

    # --- the view, from the watch ----------------------------------------------------------

    def _apply_put(self, kv: KeyValue, quiet: bool = False) -> Event | None:
        self._kvs[kv.key] = kv
        kind, ident = self._parse_key(kv.key)
        event: Event | None = None
        try:
            if kind == "harbors":
                record = self._decode_harbor(ident, kv.value)
                if self._harbors.get(ident) != record:
                    event = HarborJoined(kv.mod_revision, record)
                self._harbors[ident] = record
            elif kind == "names":
                handle, claim = self._decode_name(kv.value)
                if self._names.get(ident) != handle:
                    event = NameBound(kv.mod_revision, ident, handle)
                self._names[ident] = handle
                self._claims[ident] = claim
            elif kind == "groups":
                group, handle = ident
                members = self._groups.setdefault(group, set())
                if handle not in members:
                    event = GroupJoined(kv.mod_revision, group, handle)
                members.add(handle)
            elif kind == "fixed":
                self._fixed.add(ident)
        except (ValueError, KeyError, TypeError) as e:
            self.log.warn("ignoring the malformed etcd key {key}: {why}",
                          key=kv.key.decode("utf-8", "replace"), why=str(e))
            return None
        if event is not None and not quiet:
            self._recent[kv.key] = event
            return event
        return None

    def _apply_delete(self, key: bytes, revision: int) -> Event | None:
        self._kvs.pop(key, None)
        kind, ident = self._parse_key(key)
        event: Event | None = None
        if kind == "harbors":
            record = self._harbors.pop(ident, None)
            reason = self._reasons.pop(ident, ENDED_ELSEWHERE)
            if record is not None:
                event = HarborLeft(revision, ident, record.incarnation, reason)
        elif kind == "names":
            handle = self._names.pop(ident, None)
            self._claims.pop(ident, None)
            if handle is not None:
                event = NameUnbound(revision, ident, handle)
        elif kind == "groups":
            group, member = ident
            members = self._groups.get(group)
            if members is not None and member in members:
                members.discard(member)
                if not members:
                    del self._groups[group]
                event = GroupLeft(revision, group, member)
        if event is not None:
            self._recent[key] = event
        return event

    def _apply_events(self, changes: list[WatchEvent]) -> None:
        events: list[Event] = []
        lost: list[tuple[_Holding, str]] = []
        for change in changes:
            previous = self._kvs.get(change.kv.key)
            if change.kind == "DELETE":
                event = self._apply_delete(change.kv.key, change.kv.mod_revision)
                now = None
            else:
                event = self._apply_put(change.kv)
                now = change.kv
            if previous is not None:
                lost.extend(self._lost_by(previous, now))
            if event is not None:
                events.append(event)
            self.sequence = max(self.sequence, change.kv.mod_revision)
        self._tell(tuple(events))
        for hold, why in lost:
            self._lose(hold, why)
        self._check_waiters()

    def _lost_by(self, previous: KeyValue, now: KeyValue | None) -> list[tuple[_Holding, str]]:
        """Did a change take away what one of our sessions holds?"""
        if now is not None and (now.lease == previous.lease or now.lease in self._pending):
            return []
        why = "its lease ran out" if now is None else "another master took it over"
        kind, ident = self._parse_key(previous.key)
        if kind == "harbors":
            hold = self._held.get(ident)
            if hold is not None and hold.lease == previous.lease:
                return [(hold, f"harbor {ident}: {why}")]
        elif kind == "names":
            for hold in self._held.values():
                if hold.names.get(ident) == previous.lease:
                    return [(hold, f"name {ident}: {why}")]
        elif kind == "groups":
            for hold in self._held.values():
                if hold.groups.get(ident) == previous.lease:
                    group, handle = ident
                    return [(hold, f"membership of :{handle:08x} in group {group}: {why}")]
        return []

    def _lose(self, hold: _Holding, why: str) -> None:
        if self._held.get(hold.harbor) is not hold:
            return
        del self._held[hold.harbor]
        self.log.warn("harbor {harbor}: what this master registered for it is gone: {why}",
                      harbor=hold.harbor, why=why)
        # Its leases are no longer renewed; nothing is revoked: what is left of it (names
        # not taken over by the master the node moved to) runs out with its TTL.
        for listener in list(self._listeners):
            try:
                listener.registry_lost(hold.harbor, hold.incarnation, why)
            except Exception:
                self.log.failure("a registry listener failed")

    def _tell(self, events: tuple[Event, ...]) -> None:
        if not events:
            return
        for listener in list(self._listeners):
            try:
                listener.registry_changed(events)
            except Exception:
                self.log.failure("a registry listener failed")

    def _check_waiters(self) -> None:
        if not self._waiters:
            return
        done = [w for w in self._waiters if w.ready()]
        if done:
            self._waiters = [w for w in self._waiters if w not in done]
            for waiter in done:
                if not waiter.deferred.called:
                    waiter.deferred.callback(None)

    def _until(self, ready: Callable[[], bool], what: str) -> Deferred[None]:
        """Fires once ``ready()`` holds after the watch brought a change (bounded)."""
        if ready():
            return succeed(None)
        if self._stopped:
            raise RegistryUnavailable("the registry is stopping")
        waiter = _Waiter(ready, Deferred())
        self._waiters.append(waiter)

        def late(failure: Failure) -> None:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            if failure.check(DeferredTimeout, CancelledError):
                self._restart_watch("it did not bring a change within the write timeout")
                raise RegistryUnavailable(f"etcd stored {what}, but this master's watch did "
                                          f"not bring it within {self.write_timeout:g} s")
            failure.raiseException()

        return waiter.deferred.addTimeout(self.write_timeout, self.clock).addErrback(late)

    # --- the watch -------------------------------------------------------------------------

    def _start_watch(self) -> None:
        if self._stopped or self._watch is not None:
            return
        member = self._watch_member % len(self.client.urls)
        watch = self.client.watch(self._p, self._end, self.sequence + 1, self._on_watch, member)
        self._watch = watch
        self._heard = self.clock.seconds()
        self._suspects = set()
        watch.done.addBoth(self._watch_ended, watch)

    def _on_watch(self, response: WatchResponse) -> None:
        self._heard = self.clock.seconds()
        if response.canceled:
            if response.compact_revision:
                self._compacted = response.compact_revision
            raise _WatchCanceled(response.cancel_reason or
                                 f"compacted at revision {response.compact_revision}")
        if response.created:
            if self._watch_failures > 1:
                self.log.info("the registry watches etcd again from revision {revision}",
                              revision=self.sequence + 1)
            self._watch_failures = 0
        if response.events:
            self._apply_events(list(response.events))

    def _watch_ended(self, result: object, watch: EtcdWatch) -> None:
        if watch is not self._watch:
            return  # one we replaced (and canceled) ourselves
        self._watch = None
        if self._stopped:
            return
        why = result.getErrorMessage() if isinstance(result, Failure) else "the stream ended"
        self._watch_failures += 1
        self._watch_member += 1
        delay = 0.0 if self._watch_failures == 1 else min(
            0.1 * 2 ** min(self._watch_failures, 5), 2.0)
        if self._compacted:
            self.log.warn("the registry's watch on {url} found revision {revision} compacted: "
                          "reading the whole table again", url=watch.url,
                          revision=self.sequence + 1)
            self._compacted = 0
            self._run(self._resync(), "reading the table again")
            return
        # the first failure in a row at info, the others (etcd still away) at debug
        log = self.log.info if self._watch_failures == 1 else self.log.debug
        log("the registry's watch on {url} ended ({why}); watching from revision {revision} "
            "on {next}", url=watch.url, why=why, revision=self.sequence + 1,
            next=self.client.urls[self._watch_member % len(self.client.urls)])
        self._schedule("watch", delay, self._start_watch)

    def _restart_watch(self, why: str) -> None:
        watch = self._watch
        if watch is None or self._stopped:
            return
        self.log.warn("the registry's watch on {url} looks stuck ({why}): watching again "
                      "elsewhere", url=watch.url, why=why)
        self._watch = None
        watch.cancel()
        self._watch_member += 1
        self._schedule("watch", 0, self._start_watch)

    async def _resync(self) -> None:
        """After a compaction: read everything and tell the difference as events."""
        delay = 0.1
        while not self._stopped:
            try:
                revision, kvs = await self.client.range(self._p, self._end,
                                                        timeout=self.write_timeout)
                break
            except EtcdError as e:
                self.log.warn("cannot read the registry from etcd: {why}", why=str(e))
                await deferLater(self.clock, delay)
                delay = min(delay * 2, 2.0)
        else:
            return
        listed = {kv.key: kv for kv in kvs}
        changes: list[WatchEvent] = [WatchEvent("PUT", kv) for key, kv in listed.items()
                                     if self._kvs.get(key) != kv]
        used = {change.kv.mod_revision for change in changes}
        # A deletion's revision is unknown: give each one a revision of its own that no
        # other change has, between the view's and the new one (there are enough: every
        # change took one).
        slot = self.sequence
        for key in sorted(k for k in self._kvs if k not in listed):
            slot += 1
            while slot in used and slot < revision:
                slot += 1
            changes.append(WatchEvent("DELETE", KeyValue(key, mod_revision=min(slot, revision))))
        changes.sort(key=lambda change: change.kv.mod_revision)
        self._apply_events(changes)
        self.sequence = max(self.sequence, revision)
        self._check_waiters()
        self._start_watch()

    def _check_watch(self) -> None:
        self._schedule("liveness", self.liveness_interval, self._check_watch)
        watch = self._watch
        if watch is None or self.clock.seconds() - self._heard < self.liveness_interval:
            self._suspects = set()
            return
        self._run(self._probe(watch), "checking the watch")

    async def _probe(self, watch: EtcdWatch) -> None:
        member = self.client.urls.index(watch.url)
        try:
            _, kvs = await self.client.range(self._p, self._end, keys_only=True, member=member,
                                             timeout=self.liveness_interval)
        except EtcdError as e:
            if watch is self._watch:
                self._restart_watch(f"its member does not answer: {e}")
            return
        if watch is not self._watch:
            return
        listed = {kv.key: kv.mod_revision for kv in kvs}
        differences: set[tuple[bytes, int | None]] = {
            (key, revision) for key, revision in listed.items()
            if (seen := self._kvs.get(key)) is None or seen.mod_revision != revision}
        differences |= {(key, None) for key in self._kvs if key not in listed}
        if differences & self._suspects:
            self._restart_watch(f"{len(differences)} changes missing from it")
        else:
            self._suspects = differences

    # --- leases ----------------------------------------------------------------------------

    def _renew(self) -> None:
        self._schedule("renew", self.lease_ttl / 3, self._renew)
        if not self._renewing:
            self._renewing = True
            self._run(self._renew_all(), "renewing leases")

    async def _renew_all(self) -> None:
        try:
            holds = list(self._held.values())
            leases = [lease for hold in holds for lease in hold.leases()] + sorted(self._pending)
            if not leases:
                return
            try:
                ttls = await self.client.keepalive(leases, timeout=self.lease_ttl / 3)
            except EtcdError as e:
                if not self._renew_failing:
                    self.log.warn("cannot renew this master's etcd leases: {why}", why=str(e))
                self._renew_failing = True
                self._last_error = str(e)
                return
            if self._renew_failing:
                self.log.info("renewing this master's etcd leases again")
            self._renew_failing = False
            for hold in holds:
                for lease in hold.leases():
                    if ttls.get(lease, 1) <= 0:
                        self._lose(hold, "its lease ran out")
                        break
        finally:
            self._renewing = False

    def _revoke_later(self, lease: int) -> None:
        def failed(failure: Failure) -> None:
            failure.trap(EtcdError)  # it runs out by itself: nobody renews it

        self.client.revoke(lease, timeout=self.write_timeout).addErrback(failed)

    async def _etcd(self, work: Deferred[T]) -> T:
        try:
            return await work
        except EtcdError as e:
            self._last_error = str(e)
            raise RegistryUnavailable(f"cannot reach etcd: {e}") from None

    def _left(self, deadline: float) -> float:
        left = deadline - self.clock.seconds()
        if left <= 0:
            raise RegistryUnavailable(f"the registry could not decide within "
                                      f"{self.write_timeout:g} s: {self._last_error}")
        return left

    async def _until_ready(self) -> None:
        if self._loaded:
            return
        if self._stopped:
            raise RegistryUnavailable("the registry is stopping")
        waiter: Deferred[None] = Deferred()
        self._ready_waiters.append(waiter)
        try:
            await waiter.addTimeout(self.write_timeout, self.clock)
        except (DeferredTimeout, CancelledError):
            raise RegistryUnavailable(f"the registry has not loaded its table from etcd yet: "
                                      f"{self._last_error}") from None
        finally:
            if waiter in self._ready_waiters:
                self._ready_waiters.remove(waiter)

    async def _new_lease(self, deadline: float) -> int:
        lease = self.client.new_lease_id()
        self._pending.add(lease)
        try:
            await self._etcd(self.client.grant(lease, self.lease_ttl, timeout=self._left(deadline)))
        except BaseException:
            self._pending.discard(lease)
            raise
        return lease

    # --- admit and depart --------------------------------------------------------------------

    async def _admit(self, harbor: int, node: str, endpoint: str, incarnation: int,
                     names: dict[str, int], now: float) -> Joined:
        if harbor:
            check_harbor_id(harbor)
        await self._until_ready()
        deadline = self.clock.seconds() + self.write_timeout
        if harbor:
            hold, revision = await self._claim_harbor(harbor, node, endpoint, incarnation, now,
                                                      deadline)
        else:
            tried: set[int] = set()
            while True:
                candidates = free_harbors(self._harbors, self._fixed, tried)
                if not candidates:
                    raise RegistryRefusal(ALL_TAKEN)
                try:
                    hold, revision = await self._claim_harbor(
                        candidates[0], node, endpoint, incarnation, now, deadline, fixed=False)
                    break
                except HarborHeld:
                    tried.add(candidates[0])  # another master was quicker
        events: list[Event] = self._since(self.harbor_key(hold.harbor), revision)
        refused = []
        try:
            for name, handle in sorted(names.items()):
                try:
                    events.extend(await self._claim_name(name, handle, hold.harbor))
                except RegistryRefusal:
                    refused.append(name)
        except BaseException:
            # the join as a whole failed: what it registered must not outlive it
            self._depart_now(hold, "its join failed")
            raise
        return Joined(hold.harbor, tuple(refused), tuple(events))

    async def _claim_harbor(self, harbor: int, node: str, endpoint: str, incarnation: int,
                            now: float, deadline: float,
                            fixed: bool = True) -> tuple[_Holding, int]:
        key = self.harbor_key(harbor)
        lease = await self._new_lease(deadline)
        value = self._encode({"node": node, "endpoint": endpoint, "incarnation": incarnation,
                              "up_since": now})
        writes = [put(key, value, lease)]
        if fixed and harbor not in self._fixed:
            writes.append(put(self.fixed_key(harbor), b""))
        try:
            while True:
                result = await self._etcd(self.client.txn(
                    [absent(key)], writes, [get(key)], timeout=self._left(deadline)))
                if result.succeeded:
                    claim = revision = result.revision
                    break
                found = result.ranges()[0]
                if not found:
                    continue  # gone meanwhile: try again
                kv = found[0]
                if kv.lease == lease:  # our own earlier attempt got through
                    claim, revision = kv.create_revision, kv.mod_revision
                    break
                holder = self._decode_harbor(harbor, kv.value)
                if (holder.node, holder.incarnation) != (node, incarnation):
                    raise HarborHeld(harbor, holder.node, holder.incarnation,
                                     await self._expires_in(kv.lease, deadline))
                # The same node and incarnation, registered through another session (another
                # master, or a connection that ended before its welcome): take it over.
                moved = self._encode({"node": node, "endpoint": endpoint,
                                      "incarnation": incarnation, "up_since": holder.up_since})
                result = await self._etcd(self.client.txn(
                    [modified_at(key, kv.mod_revision)], [put(key, moved, lease)], [get(key)],
                    timeout=self._left(deadline)))
                found = result.ranges()[0] if not result.succeeded else []
                if result.succeeded or (found and found[0].lease == lease):
                    claim = kv.create_revision
                    revision = result.revision if result.succeeded else found[0].mod_revision
                    break
        except BaseException:
            self._pending.discard(lease)
            self._revoke_later(lease)
            raise
        previous = self._held.get(harbor)
        hold = _Holding(harbor, incarnation, node, claim, lease)
        if previous is not None:
            if previous.incarnation == incarnation:
                hold.names.update(previous.names)  # still ours, renewed with this session
                hold.groups.update(previous.groups)
            self._revoke_later(previous.lease)
        self._held[harbor] = hold
        self._pending.discard(lease)
        self._reasons.pop(harbor, None)
        try:
            await self._until(lambda: self.sequence >= revision, f"harbor {harbor}")
        except RegistryUnavailable:
            self._depart_now(hold, "its registration was not confirmed")
            raise
        return hold, revision

    async def _expires_in(self, lease: int, deadline: float) -> float | None:
        if not lease:
            return None
        try:
            ttl = await self.client.time_to_live(lease, timeout=self._left(deadline))
        except (EtcdError, RegistryUnavailable):
            return None
        return float(max(ttl, 0))

    def _since(self, key: bytes, revision: int) -> list[Event]:
        event = self._recent.get(key)
        return [event] if event is not None and event.sequence >= revision else []

    def _depart_now(self, hold: _Holding, reason: str) -> None:
        self._run(self._depart(hold.harbor, hold.incarnation, reason), "removing a harbor")

    async def _depart(self, harbor: int, incarnation: int, reason: str) -> tuple[Event, ...]:
        hold = self._held.get(harbor)
        if hold is None or hold.incarnation != incarnation:
            return ()
        del self._held[harbor]
        if self._stopped:
            return ()  # the keys live on for their TTL: the node may re-join elsewhere
        self._reasons[harbor] = reason
        key = self.harbor_key(harbor)
        before = self._kvs.get(key)
        names = {name: self._kvs.get(self.name_key(name)) for name in hold.names}
        groups = {membership: self._kvs.get(self.group_key(*membership))
                  for membership in hold.groups}
        deadline = self.clock.seconds() + self.write_timeout
        try:
            await self._etcd(self.client.revoke(hold.lease, timeout=self._left(deadline)))
            for name in sorted(hold.names):
                await self._etcd(self.client.revoke(hold.names[name],
                                                    timeout=self._left(deadline)))
            for membership in sorted(hold.groups):
                await self._etcd(self.client.revoke(hold.groups[membership],
                                                    timeout=self._left(deadline)))
        except RegistryUnavailable as e:
            self.log.warn("harbor {harbor} left, but its keys stay in etcd until their leases "
                          "run out: {why}", harbor=harbor, why=str(e))
            raise

        def gone() -> bool:
            # only keys on the leases we revoked (another master may hold one by now)
            if before is not None and before.lease == hold.lease and \
                    self._kvs.get(key) == before:
                return False
            return all(self._kvs.get(self.name_key(name)) != kv for name, kv in names.items()
                       if kv is not None and kv.lease == hold.names[name]) and \
                all(self._kvs.get(self.group_key(*membership)) != kv
                    for membership, kv in groups.items()
                    if kv is not None and kv.lease == hold.groups[membership])

        await self._until(gone, f"the departure of harbor {harbor}")
        events = self._since(key, before.mod_revision + 1) if before is not None else []
        for name, kv in sorted(names.items()):
            if kv is not None:
                events.extend(self._since(self.name_key(name), kv.mod_revision + 1))
        for membership, kv in sorted(groups.items()):
            if kv is not None:
                events.extend(self._since(self.group_key(*membership), kv.mod_revision + 1))
        return tuple(sorted(events, key=lambda e: e.sequence))

    # --- names -------------------------------------------------------------------------------

    async def _claim_name(self, name: str, handle: int, requester: int) -> tuple[Event, ...]:
        check_binding(name, handle, requester)
        await self._until_ready()
        hold = self._held.get(requester)
        if hold is None:
            raise RegistryRefusal(f"harbor {requester} is not joined through this master")
        key = self.name_key(name)
        seen = self._kvs.get(key)
        current = self._names.get(name)
        if current == handle and seen is not None and seen.lease == hold.names.get(name):
            return ()  # ours already
        # Anything else is decided by etcd, not by this view (which may be behind).
        deadline = self.clock.seconds() + self.write_timeout
        lease = await self._new_lease(deadline)
        value = self._encode({"handle": handle, "claim": hold.claim})
        try:
            revision = await self._write_name(name, handle, requester, key, value, lease,
                                              deadline)
        except BaseException:
            self._pending.discard(lease)
            self._revoke_later(lease)
            raise
        if self._held.get(requester) is not hold:
            self._pending.discard(lease)
            self._revoke_later(lease)
            raise RegistryRefusal(f"harbor {requester} left before name {name} was stored")
        replaced = hold.names.get(name)
        hold.names[name] = lease
        self._pending.discard(lease)
        if replaced is not None and replaced != lease:
            self._revoke_later(replaced)
        await self._until(lambda: self.sequence >= revision, f"name {name}")
        return tuple(self._since(key, revision))

    async def _put_on_lease(self, key: bytes, value: bytes, lease: int,
                            compare: list[Any], deadline: float) -> int | KeyValue | None:
        """One guarded put of ``key`` on ``lease``: its revision if it went through, or if
        an earlier attempt of ours did (the key is on our lease: a retried write); else
        the key as it is now (None: it is gone, so try again)."""
        result = await self._etcd(self.client.txn(
            compare, [put(key, value, lease)], [get(key)], timeout=self._left(deadline)))
        if result.succeeded:
            return int(result.revision)
        found = result.ranges()[0]
        if not found:
            return None
        if found[0].lease == lease:
            return int(found[0].mod_revision)
        return found[0]

    async def _write_name(self, name: str, handle: int, requester: int, key: bytes,
                          value: bytes, lease: int, deadline: float) -> int:
        while True:
            kv = await self._put_on_lease(key, value, lease, [absent(key)], deadline)
            if kv is None:
                continue
            if isinstance(kv, int):
                return kv
            held_by, claim = self._decode_name(kv.value)
            owner = harbor_of(held_by)
            if held_by == handle:
                # the same binding through another session (the node moved): take it over
                compare = [modified_at(key, kv.mod_revision)]
            else:
                # left over from a harbor session that is over? Only if still so in etcd.
                owner_key = self.harbor_key(owner)
                known = self._kvs.get(owner_key)
                if known is not None and known.create_revision == claim:
                    raise RegistryRefusal(taken_message(name, held_by))
                compare = [modified_at(key, kv.mod_revision),
                           created_at(owner_key, claim, equal=False)]
            now = await self._put_on_lease(key, value, lease, compare, deadline)
            if isinstance(now, int):
                return now
            if held_by != handle and now is not None and now.mod_revision == kv.mod_revision:
                raise RegistryRefusal(taken_message(name, held_by))  # its harbor is live

    async def _release_name(self, name: str, requester: int) -> tuple[Event, ...]:
        await self._until_ready()
        current = self._names.get(name)
        if current is None:
            raise RegistryRefusal(f"name {name} is not registered")
        if harbor_of(current) != requester:
            raise RegistryRefusal(f"name {name} belongs to harbor {harbor_of(current)}")
        key = self.name_key(name)
        seen = self._kvs[key]
        hold = self._held.get(requester)
        lease = hold.names.pop(name, None) if hold is not None else None
        deadline = self.clock.seconds() + self.write_timeout
        if lease is not None and lease == seen.lease:
            await self._etcd(self.client.revoke(lease, timeout=self._left(deadline)))
        else:
            # bound through another session: delete it if it is still what we saw
            await self._etcd(self.client.txn([modified_at(key, seen.mod_revision)],
                                             [delete(key)], timeout=self._left(deadline)))
            if lease is not None:
                self._revoke_later(lease)
        await self._until(lambda: self._kvs.get(key) != seen, f"the removal of name {name}")
        return tuple(self._since(key, seen.mod_revision + 1))


    # --- service groups --------------------------------------------------------------------

    async def _serialized(self, key: bytes, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run ``work`` when no other change of the same membership key is in flight."""
        lock = self._group_locks.setdefault(key, DeferredLock())
        await lock.acquire()
        try:
            return await work()
        finally:
            lock.release()
            if not lock.locked and not lock.waiting and self._group_locks.get(key) is lock:
                del self._group_locks[key]

    async def _join_group(self, group: str, handle: int, requester: int) -> tuple[Event, ...]:
        check_group(group, handle, requester)
        await self._until_ready()
        key = self.group_key(group, handle)
        return await self._serialized(key, lambda: self._store_member(group, handle,
                                                                      requester, key))

    async def _store_member(self, group: str, handle: int, requester: int,
                            key: bytes) -> tuple[Event, ...]:
        hold = self._held.get(requester)
        if hold is None:
            raise RegistryRefusal(f"harbor {requester} is not joined through this master")
        membership = (group, handle)
        seen = self._kvs.get(key)
        if seen is not None and seen.lease == hold.groups.get(membership):
            return ()  # ours already
        deadline = self.clock.seconds() + self.write_timeout
        lease = await self._new_lease(deadline)
        value = self._encode({"claim": hold.claim})
        try:
            revision = await self._write_member(key, value, lease, deadline)
        except BaseException:
            self._pending.discard(lease)
            self._revoke_later(lease)
            raise
        if self._held.get(requester) is not hold:
            self._pending.discard(lease)
            self._revoke_later(lease)
            raise RegistryRefusal(f"harbor {requester} left before its membership of group "
                                  f"{group} was stored")
        replaced = hold.groups.get(membership)
        hold.groups[membership] = lease
        self._pending.discard(lease)
        if replaced is not None and replaced != lease:
            self._revoke_later(replaced)
        await self._until(lambda: self.sequence >= revision,
                          f"the membership of :{handle:08x} in group {group}")
        return tuple(self._since(key, revision))

    async def _write_member(self, key: bytes, value: bytes, lease: int,
                            deadline: float) -> int:
        """Put a membership key on ``lease``: created if absent, else taken over from the
        session that put it (a previous one of this harbor, or one through another master:
        a membership has no other owner than its handle's harbor)."""
        while True:
            kv = await self._put_on_lease(key, value, lease, [absent(key)], deadline)
            if kv is None:
                continue
            if isinstance(kv, int):
                return kv
            now = await self._put_on_lease(key, value, lease,
                                           [modified_at(key, kv.mod_revision)], deadline)
            if isinstance(now, int):
                return now
            # changed meanwhile: look again

    async def _leave_group(self, group: str, handle: int, requester: int) -> tuple[Event, ...]:
        check_group(group, handle, requester, joining=False)
        await self._until_ready()
        key = self.group_key(group, handle)
        return await self._serialized(key, lambda: self._remove_member(group, handle,
                                                                       requester, key))

    async def _remove_member(self, group: str, handle: int, requester: int,
                             key: bytes) -> tuple[Event, ...]:
        hold = self._held.get(requester)
        lease = hold.groups.pop((group, handle), None) if hold is not None else None
        seen = self._kvs.get(key)
        if seen is None:
            if lease is not None:
                self._revoke_later(lease)
            return ()  # not a member: nothing to do
        deadline = self.clock.seconds() + self.write_timeout
        if lease is not None and lease == seen.lease:
            await self._etcd(self.client.revoke(lease, timeout=self._left(deadline)))
        else:
            # joined through another session: delete it if it is still what we saw
            await self._etcd(self.client.txn([modified_at(key, seen.mod_revision)],
                                             [delete(key)], timeout=self._left(deadline)))
            if lease is not None:
                self._revoke_later(lease)
        await self._until(lambda: self._kvs.get(key) != seen,
                          f"the removal of :{handle:08x} from group {group}")
        return tuple(self._since(key, seen.mod_revision + 1))
