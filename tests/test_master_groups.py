"""Service groups through the master (issue 13 item 1), on loopback with a Clock.

A group is a name with a set of member handles across the cluster (Erlang's ``pg``). The
master keeps memberships like names: each change is an event pushed to every node, each
node re-asserts its memberships at every (re)join, and a harbor's memberships go with it.
Here the nodes are bare :class:`MasterClient` objects (what a node's membership of the
cluster is made of), holding their memberships themselves (``groups_to_assert``).
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent
from zope.interface import implementer
from zope.interface.verify import verifyObject

from skyproto.errors import NameConflict
from skyproto.interfaces import IMasterClient, IMasterListener
from skyproto.master.client import JoinInfo, MasterClient
from skyproto.master.messages import (
    GetTable,
    Join,
    JoinGroup,
    LeaveGroup,
    MasterHeartbeat,
    Observe,
    Reply,
    TableReply,
    Welcome,
)
from skyproto.master.registry import (
    GroupJoined,
    GroupLeft,
    HarborJoined,
    HarborLeft,
    InMemoryRegistry,
    NameBound,
    Table,
)
from skyproto.master.server import MasterService
from skyproto.node.cluster import ClusterMembership
from skyproto.node.node import Node

from .cluster import SECRET, failure_of, result_of
from .test_master import Cluster, FakeMaster, MasterPeer
from .test_master_timeouts import Listener

A1, A2, B1 = 0x01000002, 0x01000003, 0x02000002


@implementer(IMasterListener)
class Member:
    """A node as the master sees it: a MasterClient, the memberships it holds (what it
    re-asserts at every join), and what it was told."""

    def __init__(self, cluster: Cluster, harbor: int, incarnation: int = 7) -> None:
        self.cluster = cluster
        self.held: dict[str, set[int]] = {}
        self.events: list[Any] = []
        self.refusals: list[str] = []
        self.client = MasterClient(
            cluster.clock, "loopback:master", SECRET, self,
            JoinInfo(harbor, incarnation, f"n{harbor}@test", f"loopback:h{harbor}"),
            groups_to_assert=lambda: self.held, rng=random.Random(harbor))
        self.client.start()
        cluster.settle()
        assert self.client.connected

    def join(self, group: str, handle: int) -> Deferred[None]:
        self.held.setdefault(group, set()).add(handle)
        return self.client.join_group(group, handle)

    def leave(self, group: str, handle: int) -> Deferred[None]:
        self.held.get(group, set()).discard(handle)
        return self.client.leave_group(group, handle)

    def told(self, *kinds: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kinds)]

    def kill(self) -> None:
        """Like SIGKILL of its process: the connection cut, no reconnecting."""
        self.client._service.stopService()
        protocol = self.client.protocol
        assert protocol is not None and protocol.transport is not None
        protocol.transport.connection.cut("node killed")  # type: ignore[attr-defined]
        self.cluster.settle()

    # IMasterListener

    def master_table(self, table: Any, first: bool) -> None:
        pass

    def master_event(self, event: Any) -> None:
        self.events.append(event)

    def master_refused(self, reason: str) -> None:
        self.refusals.append(reason)

    def master_lost(self, reason: str) -> None:
        pass


def test_the_client_still_provides_its_interface() -> None:
    cluster = Cluster()
    assert verifyObject(IMasterClient, Member(cluster, 1).client)


def test_a_membership_reaches_every_node_before_the_joiners_reply() -> None:
    cluster = Cluster()
    a, b = Member(cluster, 1), Member(cluster, 2)
    seen_at_reply: list[dict[str, set[int]]] = []
    joining = a.join("workers", A1)
    joining.addCallback(lambda _: seen_at_reply.append({g: set(m) for g, m in
                                                        a.client.groups.items()}))
    cluster.settle()
    assert result_of(joining) is None
    assert seen_at_reply == [{"workers": {A1}}]  # the GroupJoined came first
    assert a.client.groups == b.client.groups == {"workers": {A1}}
    assert cluster.master.registry.snapshot().groups == {"workers": (A1,)}
    assert [(e.group, e.handle) for e in b.told(GroupJoined)] == [("workers", A1)]

    b.join("workers", B1)
    cluster.settle()
    assert a.client.groups == b.client.groups == {"workers": {A1, B1}}
    assert a.client.table().groups == {"workers": (A1, B1)}

    leaving = a.leave("workers", A1)
    cluster.settle()
    assert result_of(leaving) is None
    assert a.client.groups == b.client.groups == {"workers": {B1}}
    assert [(e.group, e.handle) for e in b.told(GroupLeft)] == [("workers", A1)]
    b.leave("workers", B1)
    cluster.settle()
    assert a.client.groups == b.client.groups == {}  # an empty group is no group
    assert cluster.master.registry.snapshot().groups == {}


def test_joining_again_and_leaving_as_a_non_member_change_nothing() -> None:
    cluster = Cluster()
    a, b = Member(cluster, 1), Member(cluster, 2)
    a.join("workers", A1)
    cluster.settle()
    again = a.join("workers", A1)
    not_in = a.client.leave_group("cache", A1)
    cluster.settle()
    assert result_of(again) is None and result_of(not_in) is None
    assert len(b.told(GroupJoined, GroupLeft)) == 1
    assert b.client.groups == {"workers": {A1}}


def test_a_handle_in_many_groups_and_a_group_on_many_harbors() -> None:
    cluster = Cluster()
    a, b = Member(cluster, 1), Member(cluster, 2)
    for member, group, handle in [(a, "workers", A1), (a, "cache", A1), (a, "workers", A2),
                                  (b, "workers", B1)]:
        member.join(group, handle)
    cluster.settle()
    expected = {"workers": {A1, A2, B1}, "cache": {A1}}
    assert a.client.groups == b.client.groups == expected
    late = Member(cluster, 3)  # a newcomer gets them in its welcome's table
    assert late.client.groups == expected


def test_refusals_another_harbors_handle_and_bad_group_names() -> None:
    cluster = Cluster()
    a, b = Member(cluster, 1), Member(cluster, 2)
    b.join("workers", B1)
    cluster.settle()
    refused = [a.client.join_group("workers", B1), a.client.leave_group("workers", B1),
               a.client.join_group("two words", A1), a.client.join_group("x" * 256, A1)]
    cluster.settle()
    assert [str(failure_of(d, NameConflict).value) for d in refused] == [
        "harbor 1 cannot add :02000002 to a group: the handle is on harbor 2",
        "harbor 1 cannot remove :02000002 from a group: the handle is on harbor 2",
        "'two words' is not a group name",
        "a group name of 256 bytes is longer than 255",
    ]
    assert b.client.groups == {"workers": {B1}}
    assert len(b.told(GroupJoined, GroupLeft)) == 1
    assert a.client.connected  # a refusal is an answer, not a fault


def test_memberships_die_with_their_harbor_and_leave_every_cache() -> None:
    cluster = Cluster()
    a, b = Member(cluster, 1), Member(cluster, 2)
    a.join("workers", A1)
    a.join("cache", A1)
    b.join("workers", B1)
    cluster.settle()
    told = len(b.events)
    a.kill()
    gone = b.events[told:]
    assert [type(e) for e in gone] == [HarborLeft, GroupLeft, GroupLeft]
    assert [(e.group, e.handle) for e in gone[1:]] == [("cache", A1), ("workers", A1)]
    assert b.client.groups == {"workers": {B1}}
    assert cluster.master.registry.snapshot().groups == {"workers": (B1,)}


def test_memberships_are_re_asserted_after_a_master_restart() -> None:
    cluster = Cluster()
    a, b = Member(cluster, 1), Member(cluster, 2)
    a.join("workers", A1)
    a.join("cache", A1)
    a.join("cache", A2)
    b.join("workers", B1)
    cluster.settle()
    cluster.kill_master()
    late = a.join("late", A1)  # while the master is away: waits for the next welcome
    a.held.setdefault("quiet", set()).add(A2)  # held, never asked for: the Join has it
    cluster.start_master()
    assert cluster.master.registry.snapshot().groups == {}
    cluster.settle(1.5)  # reconnect backoff is capped at 1 s (plus jitter)
    expected = {"workers": (A1, B1), "cache": (A1, A2), "late": (A1,), "quiet": (A2,)}
    assert cluster.master.registry.snapshot().groups == expected
    assert result_of(late) is None
    for member in (a, b):  # in the welcome's table, or pushed as the other re-joined
        assert member.client.table().groups == expected
    assert a.client.welcomes == b.client.welcomes == 2


def test_the_join_carries_every_held_membership_and_the_rest_is_asked_for_again() -> None:
    held = {"workers": {A2, A1}, "cache": {A1}, "empty": set()}
    client = MasterClient(Clock(), "tcp:127.0.0.1:1", SECRET, Listener(),
                          JoinInfo(1, 5, "n1@test", "tcp:127.0.0.1:2"),
                          groups_to_assert=lambda: held)
    master = FakeMaster(client)
    join = master.join
    assert isinstance(join, Join)
    assert join.groups == {"cache": (A1,), "workers": (A1, A2)}  # sorted, no empty group
    # the master did not grant A2 at the join (undecided, say): the client asks again
    master.send(Welcome(1, (), Table(3, (), {}, {"workers": (A1,)})))
    asked = [m for m in master.received() if not isinstance(m, MasterHeartbeat)]
    assert [(type(m), m.group, m.handle) for m in asked] == [
        (JoinGroup, "cache", A1), (JoinGroup, "workers", A2)]
    assert client.groups == {"workers": {A1}}
    master.send(GroupJoined(4, "cache", A1))
    master.send(Reply(asked[0].request, "", 0))
    master.send(Reply(asked[1].request, "a group name of 300 bytes is longer than 255", 0))
    assert client.groups == {"workers": {A1}, "cache": {A1}}
    # a leave is a request like any other
    leaving = client.leave_group("cache", A1)
    (request,) = [m for m in master.received() if isinstance(m, LeaveGroup)]
    assert (request.group, request.handle) == ("cache", A1)
    master.send(GroupLeft(5, "cache", A1))
    master.send(Reply(request.request, "", 0))
    assert result_of(leaving) is None and client.groups == {"workers": {A1}}


def test_a_table_fetched_after_a_gap_replaces_the_cached_groups() -> None:
    client = MasterClient(Clock(), "tcp:127.0.0.1:1", SECRET, Listener(),
                          JoinInfo(1, 5, "n1@test", "tcp:127.0.0.1:2"))
    master = FakeMaster(client)
    master.send(Welcome(1, (), Table(3, (), {}, {"workers": (A1,)})))
    master.received()
    master.send(GroupJoined(9, "workers", B1))  # 4..8 missed
    (fetch,) = [m for m in master.received() if isinstance(m, GetTable)]
    assert client.groups == {"workers": {A1}}  # the event showing the gap is not applied
    master.send(TableReply(fetch.request, Table(9, (), {}, {"workers": (B1,), "cache": (A1,)})))
    assert client.groups == {"workers": {B1}, "cache": {A1}}
    assert client.sequence == 9


def join_with_groups(peer: MasterPeer, harbor: int, groups: dict[str, tuple[int, ...]],
                     names: dict[str, int] | None = None, node: str = "n1@test") -> list[Any]:
    _, proof = peer.authenticate()
    peer.send(Join(proof, harbor, 7, node, f"tcp:127.0.0.1:{7000 + harbor}", names or {},
                   1.0, 3.0, groups))
    return peer.received()


def test_the_master_adds_a_joins_memberships_after_its_names(events: list[LogEvent]) -> None:
    service = MasterService(InMemoryRegistry(), Clock(), SECRET, auto_grace=0)
    bystander = MasterPeer(service)
    join_with_groups(bystander, 2, {"workers": (B1,)}, node="n2@test")
    peer = MasterPeer(service)
    welcome, *pushed = join_with_groups(
        peer, 1, {"workers": (A2, A1), "cache": (A1,), "theirs": (B1,), "two words": (A1,)},
        names={"DB": A1})
    assert isinstance(welcome, Welcome)
    assert welcome.table.groups == {"cache": (A1,), "workers": (A1, A2, B1)}
    assert [type(e) for e in pushed] == [HarborJoined, NameBound, GroupJoined, GroupJoined,
                                         GroupJoined]
    assert [(e.group, e.handle) for e in pushed[2:]] == [
        ("cache", A1), ("workers", A1), ("workers", A2)]
    assert all(e.sequence <= welcome.table.sequence for e in pushed)
    assert [m for m in bystander.received() if not isinstance(m, MasterHeartbeat)] == pushed
    # the refused ones are left out and logged; the join went on
    logged = [formatEvent(e) for e in events if "group" in formatEvent(e)]
    assert any("harbor 1: membership of :02000002 in group theirs refused: harbor 1 cannot "
               "add :02000002 to a group" in line for line in logged), logged
    assert any("membership of :01000002 in group two words refused" in line
               for line in logged), logged


def test_a_takeover_by_the_same_incarnation_makes_the_joins_memberships_the_harbors() -> None:
    """The node gave up on a connection the master still holds: its harbor never leaves,
    and its Join states its memberships now (it left "old" while it was away)."""
    service = MasterService(InMemoryRegistry(), Clock(), SECRET, auto_grace=0)
    bystander = MasterPeer(service)
    join_with_groups(bystander, 2, {"old": (B1,)}, node="n2@test")
    stale = MasterPeer(service)
    join_with_groups(stale, 1, {"workers": (A1,), "old": (A2, A1)})
    bystander.received()
    again = MasterPeer(service)
    welcome, *_ = join_with_groups(again, 1, {"workers": (A1,), "cache": (A2,)})
    assert isinstance(welcome, Welcome) and service.joined[1] is again.connection
    assert welcome.table.groups == {"cache": (A2,), "old": (B1,), "workers": (A1,)}
    told = [m for m in bystander.received() if not isinstance(m, MasterHeartbeat)]
    assert [(type(m), m.group, m.handle) for m in told] == [
        (GroupJoined, "cache", A2), (GroupLeft, "old", A1), (GroupLeft, "old", A2)]


def test_an_observer_cannot_change_groups() -> None:
    peer = MasterPeer(MasterService(InMemoryRegistry(), Clock(), SECRET))
    _, proof = peer.authenticate()
    peer.send(Observe(proof, 1.0, 3.0))
    peer.send(JoinGroup(1, "workers", A1))
    assert peer.connection.drop_reason == "protocol error: unexpected JoinGroup"
    assert peer.service.registry.snapshot().groups == {}


def test_a_nodes_cluster_membership_takes_group_events_without_failing() -> None:
    """The node's listener (node/cluster.py) passes events it has no use for on to its
    subscribers, group events included."""
    node = Node(1, Clock(), SECRET)
    membership = ClusterMembership(node)
    seen: list[Any] = []
    membership.subscribe(seen.append)
    events = [GroupJoined(1, "workers", B1), GroupLeft(2, "workers", B1)]
    for event in events:
        membership.master_event(event)
    assert seen == events
