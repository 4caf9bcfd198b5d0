"""The master's state: harbor id -> node, global name -> handle. Pure: no I/O, no reactor.

Every change bumps the sequence number and comes back as an event for the protocol layer
to push, so a persistent store or one on a consensus system (etcd) can implement
:class:`~skyproto.interfaces.IRegistry` the same way and the server does not change.
Rules: a harbor id held by a live node is refused; a dead node's id is free at once; the
first writer of a name wins; names die with their harbor. ``--harbor auto`` ids come from
the top of the range (255 downward), never an id a fixed-id node has used while another
is free, so auto nodes do not take the ids of fixed nodes that crashed or start later.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
from zope.interface import implementer

from ..address import HARBOR_MAX, HARBOR_MIN, harbor_of
from ..errors import SkyprotoError
from ..interfaces import IRegistry


class RegistryRefusal(SkyprotoError):
    """A join or a name operation the registry refuses; the message says why."""


@attrs.frozen
class HarborRecord:
    """One live harbor as the master knows it."""

    harbor: int
    node: str
    endpoint: str
    incarnation: int
    up_since: float


@attrs.frozen
class Table:
    """Everything, with the sequence number of the last change it includes."""

    sequence: int
    harbors: tuple[HarborRecord, ...]
    names: dict[str, int]


@attrs.frozen
class HarborJoined:
    sequence: int
    record: HarborRecord


@attrs.frozen
class HarborLeft:
    sequence: int
    harbor: int
    incarnation: int
    reason: str


@attrs.frozen
class NameBound:
    sequence: int
    name: str
    handle: int


@attrs.frozen
class NameUnbound:
    sequence: int
    name: str
    handle: int


Event = HarborJoined | HarborLeft | NameBound | NameUnbound


@attrs.frozen
class Joined:
    """The outcome of an accepted join: the harbor id, names refused, events to push."""

    harbor: int
    refused_names: tuple[str, ...]
    events: tuple[Event, ...]


@implementer(IRegistry)
class InMemoryRegistry:
    """The embedded default registry: everything in two dicts."""

    def __init__(self) -> None:
        self.sequence = 0
        self._harbors: dict[int, HarborRecord] = {}
        self._names: dict[str, int] = {}
        #: ids that nodes asked for by number: auto nodes get them only when nothing else is free
        self._fixed: set[int] = set()

    # --- queries -----------------------------------------------------------------------

    def snapshot(self) -> Table:
        return Table(self.sequence, tuple(sorted(self._harbors.values(),
                                                 key=lambda r: r.harbor)), dict(self._names))

    def harbor(self, harbor: int) -> HarborRecord | None:
        return self._harbors.get(harbor)

    def lookup(self, name: str) -> int | None:
        return self._names.get(name)

    # --- changes -----------------------------------------------------------------------

    def join(self, harbor: int, node: str, endpoint: str, incarnation: int,
             names: Mapping[str, int], now: float) -> Joined:
        """Admit a node (``harbor`` 0: assign a free id) with the names it holds."""
        if harbor == 0:
            harbor = self._free_harbor()
        elif not HARBOR_MIN <= harbor <= HARBOR_MAX:
            raise RegistryRefusal(f"harbor id {harbor} is out of range 1..255")
        else:
            self._fixed.add(harbor)
        live = self._harbors.get(harbor)
        if live is not None:
            raise RegistryRefusal(
                f"harbor {harbor} is held by live node {live.node} "
                f"(incarnation {live.incarnation})"
            )
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
        """Remove a dead harbor and every name on it (only if ``incarnation`` is the live one)."""
        record = self._harbors.get(harbor)
        if record is None or record.incarnation != incarnation:
            return ()
        del self._harbors[harbor]
        events: list[Event] = [HarborLeft(self._next(), harbor, incarnation, reason)]
        for name, handle in sorted(self._names.items()):
            if harbor_of(handle) == harbor:
                del self._names[name]
                events.append(NameUnbound(self._next(), name, handle))
        return tuple(events)

    def bind(self, name: str, handle: int, requester: int) -> tuple[Event, ...]:
        """Bind a global name to a handle on the requester's own harbor; first writer wins."""
        if not name or name.startswith(".") or any(c.isspace() for c in name):
            raise RegistryRefusal(f"{name!r} is not a global name")
        if harbor_of(handle) != requester:
            raise RegistryRefusal(f"harbor {requester} cannot name a handle on another harbor")
        current = self._names.get(name)
        if current == handle:
            return ()
        if current is not None:
            raise RegistryRefusal(f"name {name} is already taken by :{current:08x}")
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

    def _free_harbor(self) -> int:
        """The highest free id no fixed-id node has used; else the highest free one."""
        free = [h for h in range(HARBOR_MAX, HARBOR_MIN - 1, -1) if h not in self._harbors]
        for harbor in free:
            if harbor not in self._fixed:
                return harbor
        if free:
            return free[0]
        raise RegistryRefusal("all 255 harbor ids are held by live nodes")

    def _next(self) -> int:
        self.sequence += 1
        return self.sequence
