"""The master protocol's messages: handshake, join, pushed events, requests and replies.

Encoded by :data:`MASTER_CODEC` (a CBOR array ``[code, field, ...]``), one per frame. The
registry's own event and table classes (:mod:`skyproto.master.records`) travel as they are.
"""

from __future__ import annotations

import struct
from typing import Final

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
PROTOCOL_VERSION: Final = 4
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
    request: int
    name: str
    handle: int


@MASTER_CODEC.message(8)
@attrs.frozen
class UnbindName:
    request: int
    name: str


@MASTER_CODEC.message(9)
@attrs.frozen
class LookupName:
    request: int
    name: str


@MASTER_CODEC.message(10)
@attrs.frozen
class GetTable:
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


MASTER_CODEC.message(20)(HarborJoined)
MASTER_CODEC.message(21)(HarborLeft)
MASTER_CODEC.message(22)(NameBound)
MASTER_CODEC.message(23)(NameUnbound)
MASTER_CODEC.message(24)(GroupJoined)
MASTER_CODEC.message(25)(GroupLeft)

__all__ = [
    "MASTER_CODEC", "BindName", "GetTable", "GroupJoined", "GroupLeft", "HarborJoined",
    "HarborLeft", "HarborRecord", "Join", "JoinGroup", "LeaveGroup", "LookupName",
    "MasterChallenge", "MasterHeartbeat", "MasterHello", "NameBound", "NameUnbound",
    "Observe", "Refused", "Reply", "Table", "TableReply", "UnbindName", "Welcome",
]
