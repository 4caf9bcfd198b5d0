"""Service groups: the pick policies driven directly, load on heartbeats, and groups across
a cluster on loopback with a Clock (membership through the master, calls to a group, retry
on harbor loss, membership after a master restart)."""

from __future__ import annotations

import random
from typing import Any

import pytest
from twisted.internet.task import Clock

from skyproto.errors import ConfigurationError, HarborDown, NoSuchService
from skyproto.node.groups import GroupPicker
from skyproto.node.node import Node
from skyproto.node.service import Service
from skyproto.services import Echo
from skyproto.testing import crash, settle

from .cluster import Parked, failure_of, result_of
from .test_master import Cluster

A1, A2, B1, C1 = 0x01000002, 0x01000003, 0x02000002, 0x03000002


# --------------------------------------------------------------------------- policies


def test_round_robin_takes_each_member_in_turn_per_group() -> None:
    picker = GroupPicker(random.Random(1))
    members = [A1, B1, C1]
    picks = [picker.pick("g", members, "round_robin", 1, lambda m: 0) for _ in range(6)]
    assert picks == [A1, B1, C1, A1, B1, C1]
    assert picker.pick("other", members, "round_robin", 1, lambda m: 0) == A1


def test_random_uses_the_injected_source() -> None:
    first = [GroupPicker(random.Random(7)).pick("g", [A1, B1, C1], "random", 1, lambda m: 0)
             for _ in range(3)]
    assert len(set(first)) == 1  # the same seed picks the same
    many = {GroupPicker(random.Random(seed)).pick("g", [A1, B1, C1], "random", 1,
                                                  lambda m: 0) for seed in range(30)}
    assert many == {A1, B1, C1}


def test_local_first_prefers_this_harbor_then_falls_back() -> None:
    picker = GroupPicker(random.Random(1))
    assert [picker.pick("g", [A1, A2, B1], "local_first", 1, lambda m: 0)
            for _ in range(4)] == [A1, A2, A1, A2]
    assert picker.pick("h", [B1, C1], "local_first", 1, lambda m: 0) in (B1, C1)


def test_least_loaded_steers_around_the_busy_member() -> None:
    picker = GroupPicker(random.Random(1))
    loads = {A1: 5.0, B1: 0.0, C1: 0.0}
    picks = [picker.pick("g", [A1, B1, C1], "least_loaded", 9, loads.__getitem__)
             for _ in range(4)]
    assert A1 not in picks and set(picks) == {B1, C1}  # ties go round robin


def test_an_unknown_policy_is_one_clear_error() -> None:
    with pytest.raises(ConfigurationError, match="unknown pick policy 'fastest'"):
        GroupPicker(random.Random(1)).pick("g", [A1], "fastest", 1, lambda m: 0)


# --------------------------------------------------------------------------- load


class Slow(Service):
    """Answers only when told: its requests stay in progress."""

    def __init__(self) -> None:
        self.waiting: list[Any] = []

    def receive(self, source: int, session: int, payload: Any) -> Any:
        from twisted.internet.defer import Deferred

        answer: Deferred[Any] = Deferred()
        self.waiting.append(answer)
        return answer


def test_a_nodes_load_travels_on_its_heartbeats() -> None:
    cluster = Cluster()
    a, b = cluster.node(1), cluster.node(2)
    slow = Slow()
    handle = b.spawn(slow)
    for _ in range(3):
        a.call(handle, "wait", timeout=60)
    cluster.settle()
    assert b.load() == 3
    for _ in range(30):
        cluster.clock.advance(0.05)  # a heartbeat or two
    link: Any = a.router.peers[2].link
    assert link.peer_load == 3
    for answer in slow.waiting:
        answer.callback("done")
    for _ in range(30):
        cluster.clock.advance(0.05)
    assert b.load() == 0 and link.peer_load == 0


# --------------------------------------------------------------------------- a cluster


def grouped(cluster: Cluster, *harbors: int, group: str = "workers") -> list[Node]:
    nodes = [cluster.node(h) for h in harbors]
    for node in nodes:
        node.join_group(group, node.spawn(Echo()))
    cluster.settle()
    return nodes


def test_membership_goes_through_the_master_to_every_node() -> None:
    cluster = Cluster()
    a, b, c = grouped(cluster, 1, 2, 3)
    watcher = cluster.node(4)
    cluster.settle()
    for node in (a, b, c, watcher):
        assert node.group_members("workers") == [A1, B1, C1]
    b.leave_group("workers", B1)
    cluster.settle()
    assert watcher.group_members("workers") == [A1, C1]


def test_a_call_to_a_group_reaches_every_member_in_turn() -> None:
    cluster = Cluster()
    grouped(cluster, 1, 2, 3)
    caller = cluster.node(4)
    cluster.settle()
    served: list[int] = []
    for _ in range(6):
        d = caller.call_group("workers", "hi")
        cluster.settle()
        assert result_of(d) == "hi"
        served.append(caller._picker._turn["workers"])
    assert served == [1, 2, 3, 4, 5, 6]


def test_an_empty_group_fails_at_once() -> None:
    cluster = Cluster()
    caller = cluster.node(1)
    failure = failure_of(caller.call_group("nobody", "hi"), NoSuchService)
    assert "group 'nobody' has no members" in str(failure.value)


def test_retry_sends_once_more_to_another_member_when_the_harbor_goes_down() -> None:
    cluster = Cluster()
    a, b = cluster.node(1), cluster.node(2)
    a.join_group("workers", a.spawn(Parked()))  # takes the call and never answers
    b.join_group("workers", b.spawn(Echo()))
    plain_caller, retrying_caller = cluster.node(3), cluster.node(4)
    cluster.settle()
    # round robin starts at the lowest handle: each caller's first pick is harbor 1's
    plain = plain_caller.call_group("workers", "once", timeout=30)
    retried = retrying_caller.call_group("workers", "again", timeout=30, retry=True)
    cluster.settle()
    assert not plain.called and not retried.called
    crash(a)
    cluster.settle(0.5)
    assert "harbor 1" in str(failure_of(plain, HarborDown).value)
    assert result_of(retried) == "again"  # sent once more, to harbor 2's member


def test_a_member_whose_harbor_just_left_is_not_picked_before_its_group_change() -> None:
    """The master's HarborLeft comes before the GroupLeft events of that harbor's members:
    in between (the callers of the failed calls run in between), the router has forgotten
    the harbor, so the member must count as down, not as a live member with no load."""
    cluster = Cluster()
    a, b = cluster.node(1), cluster.node(2)
    a.join_group("workers", a.spawn(Parked()))
    b.join_group("workers", b.spawn(Echo()))
    elsewhere = b.spawn(Parked())  # not in the group: gives harbor 2 a load of 1
    caller = cluster.node(3)
    cluster.settle()
    caller.call(elsewhere, "wait", timeout=30)
    first = caller.call_group("workers", "first", pick="least_loaded", timeout=30)
    cluster.settle()
    assert not first.called and caller.sessions.pending_to(1) == 1  # harbor 1 took it
    again: list[Any] = []
    first.addErrback(lambda failure: again.append(
        caller.call_group("workers", "second", pick="least_loaded", timeout=30)))
    # what the HarborLeft of harbor 1 does on the caller, its GroupLeft still to come
    caller.router.remove_peer(1, "harbor 1 silent for 3.0 s")
    assert caller.group_members("workers") == [A1, B1]
    cluster.settle()
    assert result_of(again[0]) == "second"  # harbor 2's member, not a HarborDown at once


def test_send_group_reaches_every_member() -> None:
    cluster = Cluster()
    seen: list[tuple[int, Any]] = []

    class Recorder(Service):
        def receive(self, source: int, session: int, payload: Any) -> Any:
            seen.append((self.handle, payload))
            return None

    nodes = [cluster.node(h) for h in (1, 2)]
    for node in nodes:
        node.join_group("all", node.spawn(Recorder()))
    caller = cluster.node(3)
    cluster.settle()
    assert caller.send_group("all", "news") == 2
    cluster.settle()
    assert sorted(seen) == [(A1, "news"), (B1, "news")]


def test_a_killed_service_leaves_its_groups() -> None:
    cluster = Cluster()
    a, b = grouped(cluster, 1, 2)
    a.kill(A1)
    cluster.settle()
    assert b.group_members("workers") == [B1]


def test_memberships_die_with_their_harbor_and_come_back_after_a_master_restart() -> None:
    cluster = Cluster()
    a, b, c = grouped(cluster, 1, 2, 3)
    crash(c)
    cluster.settle(4.0)
    assert a.group_members("workers") == [A1, B1]
    cluster.kill_master()
    cluster.start_master()
    cluster.settle(4.0)
    assert cluster.master.registry.snapshot().groups == {"workers": (A1, B1)}
    assert b.group_members("workers") == [A1, B1]


def test_group_names_are_checked() -> None:
    cluster = Cluster()
    a = cluster.node(1)
    echo = a.spawn(Echo())
    failure_of(a.join_group("has space", echo), ConfigurationError)
    with pytest.raises(NoSuchService):
        a.join_group("g", 0x01000099)


def test_a_group_without_a_master_is_local() -> None:
    node = Node(1, Clock(), b"groups-test-secret!!")
    node.join_group("local", node.spawn(Echo()))
    assert node.group_members("local") == [A1]
    clock = node.reactor
    d = node.call_group("local", "x")
    settle(clock)
    assert result_of(d) == "x"


def test_status_lists_groups_and_their_members() -> None:
    from skyproto.cli import status_lines
    from skyproto.web.status import status_object

    cluster = Cluster()
    grouped(cluster, 1, 2)
    table = cluster.master.registry.snapshot()
    assert status_object(table)["groups"] == {"workers": [A1, B1]}
    assert "  workers :01000002 :02000002" in status_lines(table)
