"""The master protocol's messages: handshake, join, pushed events, requests and replies.

Encoded by :data:`MASTER_CODEC` (a CBOR array ``[code, field, ...]``), one per frame. The
registry's own event and table classes (:mod:`skyproto.master.records`) travel as they are.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Final

import attrs

from ..wire.codec import MessageCodec
from .records import (
    GroupJoined,
    GroupLeft,
    HarborJoined,
    HarborLeft,
    HarborRecord,
    NameBound,
    NameUnbound,
    Table,
)

#: 2: the handshake carries each side's heartbeat timing (MasterChallenge, Join, Observe)
#: 3: X25519 keys instead of nonces; Join/Observe and everything after them sealed
#: 4: service groups (JoinGroup, LeaveGroup, GroupJoined, GroupLeft, Join.groups,
#: Table.groups): a version 3 peer could not decode the new fields
#: 5: ``skyproto services`` and ``skyproto status --watch`` (ListServices, QueryServices,
#: ServicesReport, ServicesReply, Watch): a version 4 node would drop a QueryServices
PROTOCOL_VERSION: Final = 5
MASTER_CODEC = MessageCodec("master")
NODE_ROLE: Final = b"master-node"
MASTER_ROLE: Final = b"master-server"


_TRANSCRIPT_TAIL: Final = struct.Struct(">Hdd")


def transcript(version: int, node_key: bytes, master_key: bytes,
               heartbeat_interval: float, heartbeat_timeout: float) -> bytes:
    """What both proofs of the master handshake cover: both keys, the version, and the
    master's heartbeat timing (the node's travels sealed, in its Join or Observe)."""
    return node_key + master_key + _TRANSCRIPT_TAIL.pack(version, heartbeat_interval,
                                                         heartbeat_timeout)


@MASTER_CODEC.message(1)
@attrs.frozen
class MasterHello:
    """Node -> master: protocol version and a fresh X25519 public key (also the nonce)."""

    version: int
    key: bytes


@MASTER_CODEC.message(2)
@attrs.frozen
class MasterChallenge:
    """Master -> node: its fresh X25519 key, its proof, and its heartbeat timing."""

    version: int
    key: bytes
    proof: bytes
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 3.0


@MASTER_CODEC.message(3)
@attrs.frozen
class Join:
    """Node -> master, the first sealed record: its proof, who it is, the names it holds.

    ``harbor`` 0 asks the master to assign one. ``names`` are the global names a master
    granted the node, re-asserted at every join (so a restarted master gets them back);
    ``groups`` the node's service group memberships (group -> handles on its harbor), also
    re-asserted at every join. The heartbeat fields are the node's own timing; the slower
    side's governs both.
    """

    proof: bytes
    harbor: int
    incarnation: int
    node: str
    endpoint: str
    names: dict[str, int]
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 3.0
    groups: dict[str, tuple[int, ...]] = attrs.field(factory=dict)


@MASTER_CODEC.message(4)
@attrs.frozen
class Observe:
    """Node -> master, sealed: its proof, to read the table without joining
    (``skyproto status``)."""

    proof: bytes
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 3.0


@MASTER_CODEC.message(5)
@attrs.frozen
class Welcome:
    """Master -> node: accepted as ``harbor``; the whole table; names refused to it."""

    harbor: int
    refused_names: tuple[str, ...]
    table: Table
    #: the master's sequence numbers have no holes (the in-memory registry); etcd's
    #: revisions do (other keys use some), so a skipped number there is no lost event
    dense: bool = True


@MASTER_CODEC.message(6)
@attrs.frozen
class Refused:
    """Master -> node: why not (bad secret, version, harbor held by a live node)."""

    reason: str


@MASTER_CODEC.message(7)
@attrs.frozen
class BindName:
    """Node -> master: bind global name ``name`` to ``handle`` (on the node's harbor)."""

    request: int
    name: str
    handle: int


@MASTER_CODEC.message(8)
@attrs.frozen
class UnbindName:
    """Node -> master: remove the node's global name ``name``."""

    request: int
    name: str


@MASTER_CODEC.message(9)
@attrs.frozen
class LookupName:
    """Node or observer -> master: which handle holds ``name``?"""

    request: int
    name: str


@MASTER_CODEC.message(10)
@attrs.frozen
class GetTable:
    """Node or observer -> master: send the whole table."""

    request: int


@MASTER_CODEC.message(11)
@attrs.frozen
class Reply:
    """The answer to a request (names and groups): ``error`` empty on success; ``handle``
    0 if none."""

    request: int
    error: str
    handle: int


@MASTER_CODEC.message(12)
@attrs.frozen
class TableReply:
    """Master -> node or observer: the whole table, in answer to GetTable or Watch."""

    request: int
    table: Table
    #: what keeps the master's state: "memory" or "etcd"
    store: str = "memory"


@MASTER_CODEC.message(13)
@attrs.frozen
class MasterHeartbeat:
    """Both ways, every heartbeat interval."""


@MASTER_CODEC.message(14)
@attrs.frozen
class JoinGroup:
    """Node -> master: make ``handle`` (on the node's harbor) a member of ``group``."""

    request: int
    group: str
    handle: int


@MASTER_CODEC.message(15)
@attrs.frozen
class LeaveGroup:
    """Node -> master: take ``handle`` out of ``group``."""

    request: int
    group: str
    handle: int


#: the longest a master waits for a node's ServicesReport, whatever the observer asked
MAX_RELAY_TIMEOUT: Final = 60.0


def _seconds(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    """A wait in seconds: finite and not negative."""
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{attribute.name} must be a finite number of seconds >= 0, "
                         f"not {value!r}")


def _not_negative(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    """A count: 0 or more."""
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, not {value!r}")


@attrs.frozen
class ServiceInfo:
    """One service of a node as ``skyproto services`` shows it: its handle, its class
    name, the names (global and ``.local``) and groups it holds on its node, and how many
    messages wait in the node's run queue for it."""

    handle: int
    kind: str
    names: tuple[str, ...]
    groups: tuple[str, ...]
    queue: int = attrs.field(validator=_not_negative)


@MASTER_CODEC.message(16)
@attrs.frozen
class Watch:
    """Observer -> master: answer with the whole table (a TableReply), then push every
    change to this connection as to a joined node (``skyproto status --watch``)."""

    request: int


@MASTER_CODEC.message(17)
@attrs.frozen
class ListServices:
    """Observer -> master: list the services of ``harbor``. The master asks that node
    over its own connection and waits at most ``timeout`` seconds (capped at
    MAX_RELAY_TIMEOUT) for its answer."""

    request: int
    harbor: int
    timeout: float = attrs.field(validator=_seconds)


@MASTER_CODEC.message(18)
@attrs.frozen
class QueryServices:
    """Master -> joined node: describe your services; ``query`` comes back in the
    ServicesReport."""

    query: int


@MASTER_CODEC.message(19)
@attrs.frozen
class ServicesReport:
    """Joined node -> master: its services, in answer to QueryServices ``query``."""

    query: int
    services: tuple[ServiceInfo, ...]


@MASTER_CODEC.message(26)
@attrs.frozen
class ServicesReply:
    """Master -> observer, in answer to ListServices: ``error`` empty and the node's
    services, or why there are none (no such harbor, the node did not answer)."""

    request: int
    error: str
    harbor: int
    node: str
    services: tuple[ServiceInfo, ...]


MASTER_CODEC.message(20)(HarborJoined)
MASTER_CODEC.message(21)(HarborLeft)
MASTER_CODEC.message(22)(NameBound)
MASTER_CODEC.message(23)(NameUnbound)
MASTER_CODEC.message(24)(GroupJoined)
MASTER_CODEC.message(25)(GroupLeft)

__all__ = [
    "MASTER_CODEC", "MAX_RELAY_TIMEOUT", "BindName", "GetTable", "GroupJoined", "GroupLeft",
    "HarborJoined", "HarborLeft", "HarborRecord", "Join", "JoinGroup", "LeaveGroup",
    "ListServices", "LookupName", "MasterChallenge", "MasterHeartbeat", "MasterHello",
    "NameBound", "NameUnbound", "Observe", "QueryServices", "Refused", "Reply",
    "ServiceInfo", "ServicesReply", "ServicesReport", "Table", "TableReply", "UnbindName",
    "Watch", "Welcome",
]
