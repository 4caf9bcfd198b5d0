"""One suite, every store: the in-memory registry and the etcd registry answer alike.

Each case runs through :class:`~skyproto.interfaces.IRegistry` only (the interface the
master's server uses). The etcd cases run against a real three-member etcd cluster (each
test on a prefix of its own) and skip, saying why, when ``etcd`` is not on PATH.
Sequence numbers differ between the stores (etcd's are its revisions): the suite checks
only that every event has its own, growing, and that a snapshot covers what it shows.
Service groups (issue 13) follow the same rules in both: memberships are first-class
records, with events, that die with their harbor.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from skyproto.interfaces import IRegistry, IRegistryListener
from skyproto.master.etcd_client import EtcdClient
from skyproto.master.etcd_store import EtcdRegistry
from skyproto.master.records import (
    GroupJoined,
    GroupLeft,
    HarborHeld,
    HarborJoined,
    HarborLeft,
    NameBound,
    NameUnbound,
    RegistryRefusal,
)
from skyproto.master.registry import InMemoryRegistry
from skyproto.master.server import MasterService

from .cluster import SECRET
from .etcd import ETCD, NO_ETCD

TIMEOUT = 20.0


@implementer(IRegistryListener)
class Recorder:
    def __init__(self) -> None:
        self.events: list[Any] = []
        self.lost: list[tuple[int, int, str]] = []

    def registry_changed(self, events: Any) -> None:
        self.events.extend(events)

    def registry_lost(self, harbor: int, incarnation: int, reason: str) -> None:
        self.lost.append((harbor, incarnation, reason))


def etcd_store(urls: list[str], prefix: str, **kwargs: Any) -> EtcdRegistry:
    return EtcdRegistry(EtcdClient.over_treq(urls, reactor), reactor, prefix=prefix, **kwargs)


async def close(registry: Any) -> None:
    await registry.stop()
    if isinstance(registry, EtcdRegistry):
        await registry.client.close()


@pytest_twisted.async_yield_fixture(params=["memory", "etcd"])
async def registry(request: Any) -> AsyncIterator[Any]:
    if request.param == "memory":
        store: Any = InMemoryRegistry()
    else:
        if ETCD is None:
            pytest.skip(NO_ETCD)
        cluster = request.getfixturevalue("etcd_cluster")
        store = etcd_store(cluster.urls, f"/conformance-{uuid.uuid4().hex[:8]}/")
    await store.start().addTimeout(TIMEOUT, reactor)
    try:
        yield store
    finally:
        await close(store)


def bounded(d: Any) -> Any:
    """Every await in these tests is bounded (a Deferred that fired already passes)."""
    return d.addTimeout(TIMEOUT, reactor)


async def joined(registry: Any, harbor: int = 1, incarnation: int = 10,
                 names: dict[str, int] | None = None, node: str | None = None) -> Any:
    return await bounded(registry.admit(harbor, node or f"n{harbor}@h",
                                        f"tcp:127.0.0.1:{7000 + harbor}", incarnation,
                                        names or {}, 5.0))


async def refusal(d: Any) -> BaseException:
    try:
        await bounded(d)
    except RegistryRefusal as e:
        return e
    raise AssertionError("not refused")


def test_the_master_is_a_registry_listener() -> None:
    service = MasterService(InMemoryRegistry(), Clock(), SECRET)
    assert verifyObject(IRegistryListener, service)


def increasing(events: Any) -> bool:
    sequences = [e.sequence for e in events]
    return all(a < b for a, b in itertools.pairwise(sequences))


@pytest_twisted.ensureDeferred
async def test_provides_the_interface(registry):
    assert verifyObject(IRegistry, registry)
    assert registry.kind in ("memory", "etcd")


@pytest_twisted.ensureDeferred
async def test_admit_records_the_harbor_and_each_event_has_its_own_sequence(registry):
    result = await joined(registry, names={"DB": 0x01000002})
    assert result.harbor == 1
    assert [type(e) for e in result.events] == [HarborJoined, NameBound]
    assert increasing(result.events)
    table = registry.snapshot()
    assert table.sequence >= result.events[-1].sequence == registry.sequence
    assert table.harbors[0].endpoint == "tcp:127.0.0.1:7001"
    assert table.harbors[0].up_since == 5.0
    assert table.names == {"DB": 0x01000002}
    assert registry.harbor(1) == table.harbors[0]


@pytest_twisted.ensureDeferred
async def test_subscribers_are_told_every_change_before_its_answer(registry):
    recorder = Recorder()
    unsubscribe = registry.subscribe(recorder)
    told_before: list[int] = []
    result = await bounded(registry.admit(1, "n1@h", "tcp:127.0.0.1:7001", 10,
                                          {"DB": 0x01000002}, 5.0).addCallback(
        lambda joined: (told_before.append(len(recorder.events)), joined)[1]))
    assert told_before == [2] and recorder.events == list(result.events)
    events = await bounded(registry.claim_name("CACHE", 0x01000003, 1))
    assert recorder.events[-1:] == list(events)
    events = await bounded(registry.depart(1, 10, "gone"))
    assert [type(e) for e in events] == [HarborLeft, NameUnbound, NameUnbound]
    assert events[0].reason == "gone"
    assert recorder.events[-3:] == list(events)
    assert increasing(recorder.events)
    unsubscribe()
    await joined(registry, harbor=2)
    assert len(recorder.events) == 6


@pytest_twisted.ensureDeferred
async def test_a_live_harbor_id_is_refused_whatever_the_incarnation(registry):
    await joined(registry, incarnation=10)
    before = registry.snapshot()
    error = await refusal(registry.admit(1, "n1@h", "tcp:127.0.0.1:7001", 11, {}, 5.0))
    assert isinstance(error, HarborHeld)
    assert "harbor 1 is held by live node n1@h (incarnation 10)" in str(error)
    assert (error.node, error.incarnation) == ("n1@h", 10)
    error = await refusal(registry.admit(1, "other@h", "tcp:127.0.0.1:7001", 10, {}, 5.0))
    assert isinstance(error, HarborHeld)
    assert registry.snapshot() == before  # nothing changed


@pytest_twisted.ensureDeferred
async def test_a_departed_harbor_id_is_free_at_once_and_its_names_with_it(registry):
    await joined(registry, incarnation=10, names={"DB": 0x01000002})
    events = await bounded(registry.depart(1, 10, "connection closed"))
    assert [type(e) for e in events] == [HarborLeft, NameUnbound]
    assert registry.lookup("DB") is None and registry.harbor(1) is None
    result = await joined(registry, incarnation=11, names={"DB": 0x01000002})
    assert result.harbor == 1
    assert registry.lookup("DB") == 0x01000002  # the name comes back with its harbor


@pytest_twisted.ensureDeferred
async def test_depart_of_an_old_incarnation_changes_nothing(registry):
    await joined(registry, incarnation=10)
    assert await bounded(registry.depart(1, 9, "stale")) == ()
    assert registry.harbor(1) is not None


@pytest_twisted.ensureDeferred
async def test_auto_ids_come_from_the_top_avoiding_ids_fixed_nodes_used(registry):
    await joined(registry, harbor=1)
    await joined(registry, harbor=255)
    assert (await joined(registry, harbor=0, node="a@h")).harbor == 254
    # a fixed-id node that left: its id is avoided while others are free
    await joined(registry, harbor=253, node="fixed@h")
    await bounded(registry.depart(253, 10, "crashed"))
    assert (await joined(registry, harbor=0, node="b@h")).harbor == 252
    assert registry.harbor(253) is None


@pytest_twisted.ensureDeferred
async def test_auto_takes_an_id_of_a_fixed_node_only_when_nothing_else_is_free(registry):
    for harbor in range(1, 256):
        await joined(registry, harbor=harbor)
    error = await refusal(registry.admit(0, "auto@h", "tcp:127.0.0.1:1", 1, {}, 5.0))
    assert "all 255 harbor ids are held by live nodes" in str(error)
    await bounded(registry.depart(200, 10, "crashed"))
    assert (await joined(registry, harbor=0, node="auto@h")).harbor == 200


@pytest_twisted.ensureDeferred
async def test_out_of_range_harbor(registry):
    error = await refusal(registry.admit(256, "n@h", "tcp:127.0.0.1:1", 1, {}, 5.0))
    assert "out of range" in str(error)


@pytest_twisted.ensureDeferred
async def test_first_writer_wins_and_the_same_binding_again_changes_nothing(registry):
    await joined(registry, harbor=1)
    await joined(registry, harbor=2)
    (bound,) = await bounded(registry.claim_name("DB", 0x01000002, 1))
    assert (type(bound), bound.name, bound.handle) == (NameBound, "DB", 0x01000002)
    error = await refusal(registry.claim_name("DB", 0x02000002, 2))
    assert "name DB is already taken by :01000002" in str(error)
    assert await bounded(registry.claim_name("DB", 0x01000002, 1)) == ()
    assert registry.lookup("DB") == 0x01000002


@pytest_twisted.ensureDeferred
async def test_conflicting_names_in_a_join_are_refused_one_by_one(registry):
    await joined(registry, harbor=1, names={"DB": 0x01000002})
    result = await joined(registry, harbor=2, names={"DB": 0x02000002, "CACHE": 0x02000003})
    assert result.refused_names == ("DB",)
    assert registry.lookup("CACHE") == 0x02000003
    assert registry.lookup("DB") == 0x01000002


@pytest_twisted.ensureDeferred
async def test_names_must_be_global_and_on_the_requesters_harbor(registry):
    await joined(registry)
    for name in [".local", "", "two words"]:
        error = await refusal(registry.claim_name(name, 0x01000002, 1))
        assert "is not a global name" in str(error)
    error = await refusal(registry.claim_name("X", 0x02000002, 1))
    assert "cannot name a handle on another harbor" in str(error)


@pytest_twisted.ensureDeferred
async def test_release_name(registry):
    await joined(registry, harbor=1, names={"DB": 0x01000002})
    await joined(registry, harbor=2)
    error = await refusal(registry.release_name("DB", 2))
    assert "name DB belongs to harbor 1" in str(error)
    (unbound,) = await bounded(registry.release_name("DB", 1))
    assert (type(unbound), unbound.name, unbound.handle) == (NameUnbound, "DB", 0x01000002)
    assert registry.lookup("DB") is None
    error = await refusal(registry.release_name("DB", 1))
    assert "name DB is not registered" in str(error)


@pytest_twisted.ensureDeferred
async def test_snapshot_is_a_copy(registry):
    await joined(registry, names={"DB": 0x01000002})
    table = registry.snapshot()
    await bounded(registry.release_name("DB", 1))
    assert table.names == {"DB": 0x01000002}
    assert registry.snapshot().sequence > table.sequence


@pytest_twisted.ensureDeferred
async def test_a_refused_change_fails_its_deferred_and_tells_nobody(registry):
    recorder = Recorder()
    registry.subscribe(recorder)
    await joined(registry, harbor=1, names={"DB": 0x01000002})
    await joined(registry, harbor=2)
    told = len(recorder.events)
    failed: list[Failure] = []
    await bounded(registry.claim_name("DB", 0x02000002, 2).addErrback(failed.append))
    assert failed and failed[0].check(RegistryRefusal)
    assert len(recorder.events) == told


# --- service groups ----------------------------------------------------------------------

A1, A2, B1 = 0x01000002, 0x01000003, 0x02000002


def group_events(events: Any) -> list[tuple[str, str, int]]:
    return [(type(e).__name__, e.group, e.handle) for e in events
            if isinstance(e, GroupJoined | GroupLeft)]


@pytest_twisted.ensureDeferred
async def test_join_and_leave_a_group_tell_their_events_and_show_in_the_snapshot(registry):
    recorder = Recorder()
    registry.subscribe(recorder)
    await joined(registry, harbor=1)
    await joined(registry, harbor=2)
    (event,) = await bounded(registry.join_group("workers", A1, 1))
    assert (type(event), event.group, event.handle) == (GroupJoined, "workers", A1)
    assert recorder.events[-1] == event  # told before the answer
    await bounded(registry.join_group("workers", B1, 2))
    assert registry.members("workers") == (A1, B1)
    table = registry.snapshot()
    assert table.groups == {"workers": (A1, B1)}
    assert table.sequence >= registry.sequence >= event.sequence
    (left,) = await bounded(registry.leave_group("workers", A1, 1))
    assert (type(left), left.group, left.handle) == (GroupLeft, "workers", A1)
    assert recorder.events[-1] == left
    assert registry.members("workers") == (B1,)
    assert table.groups == {"workers": (A1, B1)}  # a snapshot is a copy
    await bounded(registry.leave_group("workers", B1, 2))
    assert registry.snapshot().groups == {} and registry.members("workers") == ()
    assert increasing(recorder.events)


@pytest_twisted.ensureDeferred
async def test_joining_again_or_leaving_as_a_non_member_changes_nothing(registry):
    recorder = Recorder()
    registry.subscribe(recorder)
    await joined(registry, harbor=1)
    assert len(await bounded(registry.join_group("workers", A1, 1))) == 1
    told = len(recorder.events)
    assert await bounded(registry.join_group("workers", A1, 1)) == ()
    assert await bounded(registry.leave_group("workers", A2, 1)) == ()
    assert await bounded(registry.leave_group("nobody", A1, 1)) == ()
    assert len(recorder.events) == told
    assert registry.snapshot().groups == {"workers": (A1,)}


@pytest_twisted.ensureDeferred
async def test_a_handle_in_many_groups_and_a_group_across_harbors(registry):
    await joined(registry, harbor=1)
    await joined(registry, harbor=2)
    for group, handle, harbor in [("workers", A1, 1), ("cache", A1, 1), ("workers", A2, 1),
                                  ("workers", B1, 2), ("a/b", A1, 1), ("größe", B1, 2)]:
        await bounded(registry.join_group(group, handle, harbor))
    assert registry.snapshot().groups == {
        "workers": (A1, A2, B1), "cache": (A1,), "a/b": (A1,), "größe": (B1,)}


@pytest_twisted.ensureDeferred
async def test_group_names_and_handles_are_checked(registry):
    await joined(registry, harbor=1)
    await joined(registry, harbor=2)
    for group in ["", "two words", "tab\there", "line\n"]:
        for change in (registry.join_group, registry.leave_group):
            error = await refusal(change(group, A1, 1))
            assert f"{group!r} is not a group name" in str(error)
    error = await refusal(registry.join_group("x" * 256, A1, 1))
    assert "a group name of 256 bytes is longer than 255" in str(error)
    error = await refusal(registry.join_group("é" * 128, A1, 1))  # 256 bytes of UTF-8
    assert "a group name of 256 bytes is longer than 255" in str(error)
    await bounded(registry.join_group("x" * 255, A1, 1))  # exactly 255 bytes
    error = await refusal(registry.join_group("workers", B1, 1))
    assert str(error) == "harbor 1 cannot add :02000002 to a group: the handle is on harbor 2"
    await bounded(registry.join_group("workers", B1, 2))
    error = await refusal(registry.leave_group("workers", B1, 1))
    assert str(error) == ("harbor 1 cannot remove :02000002 from a group: the handle is on "
                          "harbor 2")
    assert registry.snapshot().groups == {"x" * 255: (A1,), "workers": (B1,)}


@pytest_twisted.ensureDeferred
async def test_a_harbor_that_is_not_joined_cannot_join_a_group(registry):
    error = await refusal(registry.join_group("workers", A1, 1))
    assert "harbor 1 is not joined" in str(error)
    assert registry.snapshot().groups == {}


@pytest_twisted.ensureDeferred
async def test_memberships_die_with_their_harbor_after_its_names(registry):
    recorder = Recorder()
    registry.subscribe(recorder)
    await joined(registry, harbor=1, names={"DB": A1})
    await joined(registry, harbor=2)
    for group, handle, harbor in [("workers", A1, 1), ("workers", A2, 1), ("cache", A1, 1),
                                  ("workers", B1, 2)]:
        await bounded(registry.join_group(group, handle, harbor))
    told = len(recorder.events)
    events = await bounded(registry.depart(1, 10, "gone"))
    assert [type(e) for e in events] == [HarborLeft, NameUnbound, GroupLeft, GroupLeft,
                                         GroupLeft]
    assert group_events(events) == [("GroupLeft", "cache", A1), ("GroupLeft", "workers", A1),
                                    ("GroupLeft", "workers", A2)]  # in (group, handle) order
    assert increasing(events) and recorder.events[told:] == list(events)
    assert registry.snapshot().groups == {"workers": (B1,)}  # the other harbor's stays
    # back with a new incarnation: no membership comes back by itself
    await joined(registry, harbor=1, incarnation=11)
    assert registry.snapshot().groups == {"workers": (B1,)}
