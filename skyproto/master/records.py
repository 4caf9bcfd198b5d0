"""What every registry store answers with: records, tables, change events, refusals.

Shared by the in-memory store (:mod:`skyproto.master.registry`), the etcd store
(:mod:`skyproto.master.etcd_store`), the master's server and the node's client: the
protocol code knows these classes and :class:`skyproto.interfaces.IRegistry`, never a
store's own. The pure rules both stores apply (what a global name is, what a group name
is, which id ``--harbor auto`` gets) are here too, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Collection, Container, Mapping
from typing import Final

import attrs

from ..address import HARBOR_MAX, HARBOR_MIN, harbor_of
from ..errors import SkyprotoError


class RegistryRefusal(SkyprotoError):
    """A join or a name operation the registry refuses; the message says why."""


class HarborHeld(RegistryRefusal):
    """The harbor id is held by a live node (``node``, ``incarnation``).

    ``expires_in``: when a store knows the holder's registration ends by itself unless
    renewed (a lease served by another master), the seconds left; None otherwise.
    """

    def __init__(self, harbor: int, node: str, incarnation: int,
                 expires_in: float | None = None) -> None:
        super().__init__(f"harbor {harbor} is held by live node {node} "
                         f"(incarnation {incarnation})")
        self.harbor = harbor
        self.node = node
        self.incarnation = incarnation
        self.expires_in = expires_in


class RegistryUnavailable(SkyprotoError):
    """The store cannot decide now (etcd unreachable, no quorum, still loading).

    Nothing was granted: the master refuses the request with this message rather than
    grant what it cannot store. Not a :class:`RegistryRefusal`: trying again later may work.
    """


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
    #: service groups: group name -> its member handles, sorted (groups with none are absent)
    groups: dict[str, tuple[int, ...]] = attrs.field(factory=dict)


@attrs.frozen
class HarborJoined:
    """A harbor joined (or re-joined with a new incarnation): its record."""

    sequence: int
    record: HarborRecord


@attrs.frozen
class HarborLeft:
    """A harbor's incarnation left the table, and why."""

    sequence: int
    harbor: int
    incarnation: int
    reason: str


@attrs.frozen
class NameBound:
    """Global name ``name`` is now bound to ``handle``."""

    sequence: int
    name: str
    handle: int


@attrs.frozen
class NameUnbound:
    """Global name ``name`` is no longer bound to ``handle``."""

    sequence: int
    name: str
    handle: int


@attrs.frozen
class GroupJoined:
    """``handle`` is now a member of service group ``group``."""

    sequence: int
    group: str
    handle: int


@attrs.frozen
class GroupLeft:
    """``handle`` is no longer a member of ``group`` (it left, or its harbor did)."""

    sequence: int
    group: str
    handle: int


Event = HarborJoined | HarborLeft | NameBound | NameUnbound | GroupJoined | GroupLeft


@attrs.frozen
class Joined:
    """The outcome of an accepted join: the harbor id, names refused, events it caused."""

    harbor: int
    refused_names: tuple[str, ...]
    events: tuple[Event, ...]


def check_harbor_id(harbor: int) -> None:
    """Refuse an id outside 1..255 (0 means "assign one" and is decided elsewhere)."""
    if not HARBOR_MIN <= harbor <= HARBOR_MAX:
        raise RegistryRefusal(f"harbor id {harbor} is out of range 1..255")


def check_binding(name: str, handle: int, requester: int) -> None:
    """Refuse a name that is not global, or a handle on another harbor than the requester's."""
    if not name or name.startswith(".") or any(c.isspace() for c in name):
        raise RegistryRefusal(f"{name!r} is not a global name")
    if harbor_of(handle) != requester:
        raise RegistryRefusal(f"harbor {requester} cannot name a handle on another harbor")


#: the longest group name, in bytes of UTF-8
MAX_GROUP: Final = 255


def check_group(group: str, handle: int, requester: int, joining: bool = True) -> None:
    """Refuse a group name that is empty, has whitespace or is longer than 255 bytes of
    UTF-8, or a handle on another harbor than the requester's (``joining``: for the words)."""
    try:
        size = len(group.encode())
    except UnicodeEncodeError:  # a lone surrogate: no UTF-8 for it
        size = 0
    if not size or any(c.isspace() for c in group):
        raise RegistryRefusal(f"{group[:80]!r} is not a group name")
    if size > MAX_GROUP:
        raise RegistryRefusal(f"a group name of {size} bytes is longer than {MAX_GROUP}")
    owner = harbor_of(handle)
    if owner != requester:
        change = f"add :{handle:08x} to" if joining else f"remove :{handle:08x} from"
        raise RegistryRefusal(f"harbor {requester} cannot {change} a group: "
                              f"the handle is on harbor {owner}")


def groups_table(groups: Mapping[str, Collection[int]]) -> dict[str, tuple[int, ...]]:
    """The ``Table.groups`` form: each group's members sorted, groups with none left out."""
    return {group: tuple(sorted(members)) for group, members in sorted(groups.items())
            if members}


def taken_message(name: str, handle: int) -> str:
    """The refusal of a name another handle holds (both stores word it the same)."""
    return f"name {name} is already taken by :{handle:08x}"


def free_harbors(live: Container[int], fixed: Container[int],
                 skip: Collection[int] = ()) -> list[int]:
    """The ids ``--harbor auto`` may get, best first: from 255 downward, ids no fixed-id
    node has used before the others (so auto nodes do not take the ids of fixed nodes
    that crashed or start later); ``skip``: ids already tried and found taken."""
    free = [h for h in range(HARBOR_MAX, HARBOR_MIN - 1, -1) if h not in live and h not in skip]
    return [h for h in free if h not in fixed] + [h for h in free if h in fixed]


ALL_TAKEN = "all 255 harbor ids are held by live nodes"
