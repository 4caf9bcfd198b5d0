"""The embedded registry: harbor id -> node, global name -> handle, group -> members.

:class:`InMemoryRegistry` is two things. Its ``join``, ``leave``, ``bind``, ``unbind``,
``add_member`` and ``remove_member`` are the pure table (no I/O, no reactor, no subscriber
told): every change bumps the sequence number and comes back as events. Its
:class:`skyproto.interfaces.IRegistry` methods (``admit``, ``depart``, ``claim_name``,
``release_name``, ``join_group``, ``leave_group``), which the master uses, run the same
change, tell every subscriber its events, and answer with a Deferred that has already
fired, so tests over it stay deterministic. The etcd store
(:mod:`skyproto.master.etcd_store`) implements the same interface over several masters.
Rules: a harbor id held by a live node is refused; a dead node's id is free at once; the
first writer of a name wins; names and group memberships die with their harbor (a group
is a name with a set of member handles anywhere in the cluster, like Erlang's ``pg``; a
node changes only the memberships of handles on its own harbor). ``--harbor auto`` ids
come from the top of the range (255 downward), never an id a fixed-id node has used while
another is free, so auto nodes do not take the ids of fixed nodes that crashed or start
later. The result and event classes live in :mod:`skyproto.master.records` (and are
importable from here as before).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from ..address import harbor_of
from ..interfaces import IRegistry, IRegistryListener
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

__all__ = [
    "Event", "GroupJoined", "GroupLeft", "HarborHeld", "HarborJoined", "HarborLeft",
    "HarborRecord", "InMemoryRegistry", "Joined", "NameBound", "NameUnbound",
    "RegistryRefusal", "RegistryUnavailable", "Table",
]


@implementer(IRegistry)
class InMemoryRegistry:
    """The embedded default registry: everything in dicts."""

    kind = "memory"

    def __init__(self) -> None:
        self.sequence = 0
        self._harbors: dict[int, HarborRecord] = {}
        self._names: dict[str, int] = {}
        #: group -> its members (a group with none is removed)
        self._groups: dict[str, set[int]] = {}
        #: ids that nodes asked for by number: auto nodes get them only when nothing else is free
        self._fixed: set[int] = set()
        self._listeners: list[IRegistryListener] = []

    # --- queries -----------------------------------------------------------------------

    def snapshot(self) -> Table:
        """The whole table now."""
        return Table(self.sequence, tuple(sorted(self._harbors.values(),
                                                 key=lambda r: r.harbor)), dict(self._names),
                     groups_table(self._groups))

    def harbor(self, harbor: int) -> HarborRecord | None:
        """The live record of ``harbor``, or None."""
        return self._harbors.get(harbor)

    def lookup(self, name: str) -> int | None:
        """The handle bound to ``name``, or None."""
        return self._names.get(name)

    def members(self, group: str) -> tuple[int, ...]:
        """The member handles of ``group``, sorted."""
        return tuple(sorted(self._groups.get(group, ())))

    # --- IRegistry: what the master uses -------------------------------------------------

    def subscribe(self, listener: IRegistryListener) -> Callable[[], None]:
        """Tell ``listener`` every change from now on; returns the function that unsubscribes."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def start(self) -> Deferred[None]:
        """Nothing to load: ready at once."""
        return succeed(None)

    def stop(self) -> Deferred[None]:
        """Nothing to release."""
        return succeed(None)

    def admit(self, harbor: int, node: str, endpoint: str, incarnation: int,
              names: Mapping[str, int], now: float) -> Deferred[Joined]:
        """Admit a node (see :meth:`join`), telling the listeners; a refusal errbacks."""
        try:
            joined = self.join(harbor, node, endpoint, incarnation, names, now)
        except RegistryRefusal as e:
            return fail(e)
        self._tell(joined.events)
        return succeed(joined)

    def depart(self, harbor: int, incarnation: int, reason: str) -> Deferred[tuple[Event, ...]]:
        """A harbor left (see :meth:`leave`), telling the listeners."""
        return self._told(self.leave, harbor, incarnation, reason)

    def claim_name(self, name: str, handle: int,
                   requester: int) -> Deferred[tuple[Event, ...]]:
        """Bind a name (see :meth:`bind`), telling the listeners; a refusal errbacks."""
        return self._told(self.bind, name, handle, requester)

    def release_name(self, name: str, requester: int) -> Deferred[tuple[Event, ...]]:
        """Unbind a name (see :meth:`unbind`), telling the listeners; a refusal errbacks."""
        return self._told(self.unbind, name, requester)

    def join_group(self, group: str, handle: int,
                   requester: int) -> Deferred[tuple[Event, ...]]:
        """Add a group member (see :meth:`add_member`), telling the listeners."""
        return self._told(self.add_member, group, handle, requester)

    def leave_group(self, group: str, handle: int,
                    requester: int) -> Deferred[tuple[Event, ...]]:
        """Remove a group member (see :meth:`remove_member`), telling the listeners."""
        return self._told(self.remove_member, group, handle, requester)

    def _told(self, change: Callable[..., tuple[Event, ...]],
              *args: Any) -> Deferred[tuple[Event, ...]]:
        """Run a pure change; a refusal fails the Deferred, anything else raises here."""
        try:
            events = change(*args)
        except RegistryRefusal as e:
            return fail(e)
        self._tell(events)
        return succeed(events)

    def _tell(self, events: tuple[Event, ...]) -> None:
        if events:
            for listener in list(self._listeners):
                listener.registry_changed(events)

    # --- the pure table: changes that tell nobody ----------------------------------------

    def join(self, harbor: int, node: str, endpoint: str, incarnation: int,
             names: Mapping[str, int], now: float) -> Joined:
        """Admit a node (``harbor`` 0: assign a free id) with the names it holds."""
        if harbor == 0:
            harbor = self._free_harbor()
        else:
            check_harbor_id(harbor)
            self._fixed.add(harbor)
        live = self._harbors.get(harbor)
        if live is not None:
            raise HarborHeld(harbor, live.node, live.incarnation)
        record = HarborRecord(harbor, node, endpoint, incarnation, now)
        self._harbors[harbor] = record
        events: list[Event] = [HarborJoined(self._next(), record)]
        refused = []
        for name, handle in sorted(names.items()):
            try:
                events.extend(self.bind(name, handle, harbor))
            except RegistryRefusal:
                refused.append(name)
        return Joined(harbor, tuple(refused), tuple(events))

    def leave(self, harbor: int, incarnation: int, reason: str) -> tuple[Event, ...]:
        """Remove a dead harbor, every name and every group membership on it (only if
        ``incarnation`` is the live one)."""
        record = self._harbors.get(harbor)
        if record is None or record.incarnation != incarnation:
            return ()
        del self._harbors[harbor]
        events: list[Event] = [HarborLeft(self._next(), harbor, incarnation, reason)]
        for name, handle in sorted(self._names.items()):
            if harbor_of(handle) == harbor:
                del self._names[name]
                events.append(NameUnbound(self._next(), name, handle))
        for group in sorted(self._groups):
            for handle in sorted(self._groups[group]):
                if harbor_of(handle) == harbor:
                    events.extend(self._remove(group, handle))
        return tuple(events)

    def bind(self, name: str, handle: int, requester: int) -> tuple[Event, ...]:
        """Bind a global name to a handle on the requester's own harbor; first writer wins."""
        check_binding(name, handle, requester)
        current = self._names.get(name)
        if current == handle:
            return ()
        if current is not None:
            raise RegistryRefusal(taken_message(name, current))
        self._names[name] = handle
        return (NameBound(self._next(), name, handle),)

    def unbind(self, name: str, requester: int) -> tuple[Event, ...]:
        """Remove a global name; only its own harbor may."""
        current = self._names.get(name)
        if current is None:
            raise RegistryRefusal(f"name {name} is not registered")
        if harbor_of(current) != requester:
            raise RegistryRefusal(f"name {name} belongs to harbor {harbor_of(current)}")
        del self._names[name]
        return (NameUnbound(self._next(), name, current),)

    def add_member(self, group: str, handle: int, requester: int) -> tuple[Event, ...]:
        """Make a handle on the requester's own (live) harbor a member of ``group``; a
        member joining again changes nothing."""
        check_group(group, handle, requester)
        if requester not in self._harbors:
            raise RegistryRefusal(f"harbor {requester} is not joined")
        members = self._groups.setdefault(group, set())
        if handle in members:
            return ()
        members.add(handle)
        return (GroupJoined(self._next(), group, handle),)

    def remove_member(self, group: str, handle: int, requester: int) -> tuple[Event, ...]:
        """Take a handle on the requester's own harbor out of ``group``; one that is not a
        member changes nothing."""
        check_group(group, handle, requester, joining=False)
        return self._remove(group, handle)

    def _remove(self, group: str, handle: int) -> tuple[Event, ...]:
        members = self._groups.get(group)
        if members is None or handle not in members:
            return ()
        members.discard(handle)
        if not members:
            del self._groups[group]
        return (GroupLeft(self._next(), group, handle),)

    def _free_harbor(self) -> int:
        """The highest free id no fixed-id node has used; else the highest free one."""
        free = free_harbors(self._harbors, self._fixed)
        if not free:
            raise RegistryRefusal(ALL_TAKEN)
        return free[0]

    def _next(self) -> int:
        self.sequence += 1
        return self.sequence
