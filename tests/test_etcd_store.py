"""The etcd registry against a real etcd cluster: several stores (several masters) on one
prefix, leases, retried writes, watches that end, stall or find their revision compacted,
a leader killed, and etcd gone altogether. No mock of etcd here.

Each test uses a prefix of its own on the shared cluster, or a cluster of its own when it
kills members. Every await is bounded.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, gatherResults
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from skyproto.address import harbor_of
from skyproto.master.etcd_client import EtcdClient, prefix_end, put
from skyproto.master.etcd_store import ENDED_ELSEWHERE, EtcdRegistry
from skyproto.master.records import (
    GroupJoined,
    GroupLeft,
    HarborHeld,
    HarborJoined,
    HarborLeft,
    NameBound,
    NameUnbound,
    RegistryRefusal,
    RegistryUnavailable,
)
from skyproto.testing import wait_for

from .etcd import ETCD, NO_ETCD, EtcdCluster, faulty_client
from .test_registry_conformance import Recorder

pytestmark = pytest.mark.skipif(ETCD is None, reason=NO_ETCD)
TIMEOUT = 20.0


def bounded(d: Any, timeout: float = TIMEOUT) -> Any:
    return d.addTimeout(timeout, reactor)


def until(condition: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    return wait_for(condition, what, timeout, clock=reactor, interval=0.02)


class Stores:
    """Stores (masters) made by a test, all stopped and closed at its end."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.prefix = f"/store-{uuid.uuid4().hex[:8]}/"
        self.made: list[EtcdRegistry] = []

    async def make(self, client: EtcdClient | None = None, **kwargs: Any) -> EtcdRegistry:
        client = client or EtcdClient.over_treq(self.urls, reactor)
        store = EtcdRegistry(client, reactor, prefix=self.prefix, **kwargs)
        store.recorder = Recorder()  # type: ignore[attr-defined]
        store.subscribe(store.recorder)  # type: ignore[attr-defined]
        self.made.append(store)
        await bounded(store.start())
        return store

    async def close(self) -> None:
        for store in self.made:
            await store.stop()
            await store.client.close()


@pytest_twisted.async_yield_fixture
async def stores(etcd_cluster: EtcdCluster) -> AsyncIterator[Stores]:
    made = Stores(etcd_cluster.urls)
    try:
        yield made
    finally:
        await made.close()


@pytest_twisted.async_yield_fixture
async def own_stores(fresh_etcd: EtcdCluster) -> AsyncIterator[Stores]:
    made = Stores(fresh_etcd.urls)
    made.cluster = fresh_etcd  # type: ignore[attr-defined]
    try:
        yield made
    finally:
        await made.close()


async def admit(store: EtcdRegistry, harbor: int, incarnation: int = 10,
                names: dict[str, int] | None = None, node: str | None = None) -> Any:
    return await bounded(store.admit(harbor, node or f"n{harbor}@h",
                                     f"tcp:127.0.0.1:{7000 + harbor}", incarnation,
                                     names or {}, 5.0))


# --- several masters ---------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_two_masters_see_one_table_numbered_by_etcd_revisions(stores):
    a = await stores.make()
    b = await stores.make()
    joined = await admit(a, 1, names={"DB": 0x01000002})
    await admit(b, 2, names={"CACHE": 0x02000003})
    await until(lambda: a.snapshot() == b.snapshot() and len(a.snapshot().harbors) == 2,
                "both views to agree")
    table = a.snapshot()
    assert table.names == {"DB": 0x01000002, "CACHE": 0x02000003}
    # both were told the same events, numbered by etcd's revisions
    assert a.recorder.events == b.recorder.events
    assert [type(e) for e in a.recorder.events] == [HarborJoined, NameBound] * 2
    revision, kvs = await bounded(a.client.range(a.harbor_key(1)))
    assert kvs[0].create_revision == joined.events[0].sequence
    assert table.sequence == a.recorder.events[-1].sequence <= revision


@pytest_twisted.ensureDeferred
async def test_ten_concurrent_claimants_through_different_masters_exactly_one_wins(stores):
    masters = [await stores.make() for _ in range(5)]
    for harbor in range(1, 11):
        await admit(masters[harbor % 5], harbor)
    outcomes = await bounded(DeferredList([
        masters[harbor % 5].claim_name("ONE", (harbor << 24) | 2, harbor)
        for harbor in range(1, 11)], consumeErrors=True))
    won = [harbor for harbor, (ok, _) in zip(range(1, 11), outcomes, strict=True) if ok]
    lost = [result for ok, result in outcomes if not ok]
    assert len(won) == 1
    assert all(f.check(RegistryRefusal) and "already taken by" in f.getErrorMessage()
               for f in lost)
    await until(lambda: all(m.lookup("ONE") == (won[0] << 24) | 2 for m in masters),
                "every master to know the winner")


@pytest_twisted.ensureDeferred
async def test_concurrent_auto_ids_through_two_masters_never_collide(stores):
    a, b = await stores.make(), await stores.make()
    joins = [m.admit(0, f"auto{i}@h", "tcp:127.0.0.1:1", i, {}, 1.0)
             for i, m in enumerate([a, b] * 6)]
    results = await bounded(gatherResults(joins))
    ids = sorted(r.harbor for r in results)
    assert ids == list(range(244, 256))


@pytest_twisted.ensureDeferred
async def test_the_same_node_moving_to_another_master_takes_its_keys_over(stores):
    a, b = await stores.make(), await stores.make()
    await admit(a, 1, incarnation=7, names={"DB": 0x01000002})
    await until(lambda: b.lookup("DB"), "b to see DB")
    told = len(b.recorder.events)
    # the node lost master a and re-joins b: same incarnation, same names
    joined = await admit(b, 1, incarnation=7, names={"DB": 0x01000002})
    assert joined.harbor == 1 and joined.refused_names == ()
    assert joined.events == ()  # nothing changed in the table: nobody saw it leave
    await until(lambda: a.recorder.lost, "a to learn it lost harbor 1")
    assert a.recorder.lost[0][:2] == (1, 7)
    assert "another master took it over" in a.recorder.lost[0][2]
    assert b.recorder.events[told:] == []
    _, kvs = await bounded(b.client.range(b.name_key("DB")))
    assert kvs[0].lease == b._held[1].names["DB"]  # now renewed by b
    # a's departure of its old session no longer touches what b holds
    assert await bounded(a.depart(1, 7, "old session")) == ()
    assert b.harbor(1) is not None and b.lookup("DB") == 0x01000002


@pytest_twisted.ensureDeferred
async def test_a_newer_incarnation_held_through_another_master_is_told_when_it_runs_out(
        stores):
    a, b = await stores.make(lease_ttl=4), await stores.make()
    await admit(a, 1, incarnation=7)
    error = None
    try:
        await admit(b, 1, incarnation=8)
    except HarborHeld as e:
        error = e
    assert error is not None and (error.node, error.incarnation) == ("n1@h", 7)
    assert error.expires_in is not None and 0 < error.expires_in <= 4


@pytest_twisted.ensureDeferred
async def test_a_master_that_stops_renewing_loses_its_keys_one_revision_each(stores):
    a = await stores.make(lease_ttl=2)
    b = await stores.make()
    await admit(a, 1, names={"A": 0x01000002, "B": 0x01000003})
    await until(lambda: len(b.snapshot().names) == 2, "b to see the names")
    started = time.monotonic()
    await a.stop()  # like a master that died: nothing revoked, nothing renewed
    await until(lambda: not b.snapshot().harbors and not b.snapshot().names,
                "the keys to run out", timeout=15)
    print(f"keys ran out {time.monotonic() - started:.1f} s after the master stopped")
    gone = b.recorder.events[-3:]
    assert sorted(type(e).__name__ for e in gone) == ["HarborLeft", "NameUnbound",
                                                       "NameUnbound"]
    assert len({e.sequence for e in gone}) == 3  # a revision of its own each
    assert next(e for e in gone if isinstance(e, HarborLeft)).reason == ENDED_ELSEWHERE


@pytest_twisted.ensureDeferred
async def test_a_name_left_over_from_a_harbors_previous_session_is_replaced(stores):
    a = await stores.make()
    b = await stores.make()
    await admit(a, 1, incarnation=7, names={"DB": 0x01000002})
    # The harbor's lease ran out before its name's (etcd expires leases one by one).
    await bounded(a.client.revoke(a._held[1].lease))
    await until(lambda: b.harbor(1) is None and b.lookup("DB"), "only the name to be left")
    joined = await admit(b, 1, incarnation=8, names={"DB": 0x01000005})
    assert joined.refused_names == ()
    assert b.lookup("DB") == 0x01000005
    # a live harbor's name is never replaced that way
    await admit(b, 2)
    with pytest.raises(RegistryRefusal, match="already taken by :01000005"):
        await bounded(b.claim_name("DB", 0x02000002, 2))


@pytest_twisted.ensureDeferred
async def test_a_lease_lost_behind_a_masters_back_ends_that_session(stores):
    a = await stores.make()
    await admit(a, 1, incarnation=7)
    await bounded(a.client.revoke(a._held[1].lease))
    await until(lambda: a.recorder.lost, "a to learn it lost harbor 1")
    assert a.recorder.lost[0][:2] == (1, 7) and "ran out" in a.recorder.lost[0][2]
    assert await bounded(a.depart(1, 7, "dropped")) == ()


# --- retries and watches -------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_write_whose_answer_was_lost_is_retried_and_found_to_be_ours(stores):
    client, faulty = faulty_client(stores.urls, reactor, attempt_timeout=0.3)
    a = await stores.make(client)
    faulty.lose_answer["/v3/kv/txn"] = 1  # applied by etcd, answer lost: a timeout
    faulty.lose_answer["/v3/lease/grant"] = 1  # a lease granted twice is one lease
    joined = await admit(a, 1, names={"DB": 0x01000002})
    assert joined.harbor == 1 and joined.refused_names == ()
    assert faulty.requests.count("/v3/kv/txn") >= 3  # harbor twice, then the name
    _, kvs = await bounded(a.client.range(a.harbor_key(1)))
    assert len(kvs) == 1 and kvs[0].version == 1  # written once
    assert [type(e) for e in a.recorder.events] == [HarborJoined, NameBound]


@pytest_twisted.ensureDeferred
async def test_a_compacted_watch_reads_the_table_again_and_tells_the_difference(stores):
    a, b = await stores.make(), await stores.make()
    await admit(b, 1, names={"OLD": 0x01000002})
    await until(lambda: a.lookup("OLD"), "a to see OLD")
    # a's watch goes away and is not started again until told
    start_watch = a._start_watch
    a._start_watch = lambda: None
    assert a._watch is not None
    a._watch.cancel()
    await until(lambda: a._watch is None, "a's watch to end")
    await bounded(b.release_name("OLD", 1))
    await bounded(b.claim_name("NEW", 0x01000003, 1))
    await admit(b, 2)
    revision, _ = await bounded(b.client.range(b.harbor_key(2)))
    await bounded(b.client.compact(revision))
    told = len(a.recorder.events)
    a._start_watch = start_watch
    a._start_watch()
    await until(lambda: a.snapshot() == b.snapshot(), "a to catch up after the compaction")
    changes = a.recorder.events[told:]
    assert sorted(type(e).__name__ for e in changes) == ["HarborJoined", "NameBound",
                                                          "NameUnbound"]
    assert all(x.sequence < y.sequence for x, y in itertools.pairwise(changes))
    assert changes[-1].sequence <= a.sequence == revision


@pytest_twisted.ensureDeferred
async def test_a_watch_that_delivers_nothing_is_noticed_and_replaced(stores):
    client, faulty = faulty_client(stores.urls, reactor)
    faulty.silent_watches = 1
    a = await stores.make(client, liveness_interval=0.3)
    b = await stores.make()
    started = time.monotonic()
    await admit(b, 1)
    await until(lambda: a.harbor(1), "a's second watch to bring harbor 1")
    print(f"a stalled watch was replaced after {time.monotonic() - started:.2f} s")
    assert faulty.requests.count("/v3/watch") >= 2


@pytest_twisted.ensureDeferred
async def test_a_watch_whose_member_dies_goes_on_from_another(own_stores):
    cluster: EtcdCluster = own_stores.cluster
    a = await own_stores.make()
    b = await own_stores.make(EtcdClient.over_treq(cluster.urls[1:], reactor))
    watched = a._watch.url if a._watch is not None else ""
    member = next(m for m in cluster.members if m.client_url == watched)
    member.kill()
    await admit(b, 1, names={"DB": 0x01000002})
    await until(lambda: a.lookup("DB"), "a to see DB through another member")
    assert a._watch is not None and a._watch.url != watched


# --- etcd in trouble -----------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_leader_killed_claims_resume_and_no_name_is_held_twice_then_cut_off(own_stores):
    cluster: EtcdCluster = own_stores.cluster
    a = await own_stores.make(write_timeout=8.0)
    b = await own_stores.make(write_timeout=8.0)
    for harbor in range(1, 5):
        await admit((a, b)[harbor % 2], harbor)
    leader = cluster.leader()
    killed = time.monotonic()
    leader.kill()
    # every harbor claims the same name and one of its own, through both masters at once
    outcomes = await bounded(DeferredList(
        [(a, b)[h % 2].claim_name("CONTESTED", (h << 24) | 2, h) for h in range(1, 5)] +
        [(a, b)[h % 2].claim_name(f"OWN{h}", (h << 24) | 3, h) for h in range(1, 5)],
        consumeErrors=True))
    gap = time.monotonic() - killed
    print(f"claims answered {gap:.2f} s after the etcd leader was killed")
    contested, own = outcomes[:4], outcomes[4:]
    assert all(ok for ok, _ in own), [r for ok, r in own if not ok]
    assert sum(ok for ok, _ in contested) == 1
    revision, kvs = await bounded(a.client.range(a._p + b"names/", prefix_end(a._p + b"names/")))
    names = [kv.key.rsplit(b"/", 1)[1].decode() for kv in kvs]
    assert sorted(names) == ["CONTESTED", "OWN1", "OWN2", "OWN3", "OWN4"]  # each once
    await until(lambda: a.snapshot() == b.snapshot() and a.sequence >= revision,
                "both views to agree")
    assert harbor_of(a.lookup("CONTESTED") or 0) in range(1, 5)

    # and then etcd goes altogether: claims are refused, plainly, not granted
    for member in cluster.members:
        member.kill()
    a.write_timeout = b.write_timeout = 2.0
    started = time.monotonic()
    failures: list[Failure] = []
    await bounded(DeferredList([
        a.claim_name("LATE", 0x02000009, 2).addErrback(failures.append),
        b.admit(9, "late@h", "tcp:127.0.0.1:1", 1, {}, 1.0).addErrback(failures.append)]))
    print(f"cut off: refused after {time.monotonic() - started:.2f} s")
    assert len(failures) == 2
    for failure in failures:
        assert failure.check(RegistryUnavailable)
        assert "cannot reach etcd" in failure.getErrorMessage()
        assert "no etcd member answered" in failure.getErrorMessage()
    assert a.lookup("LATE") is None and b.harbor(9) is None


def test_events_are_only_the_registrys_own_classes() -> None:
    for cls in (HarborJoined, HarborLeft, NameBound, NameUnbound, GroupJoined, GroupLeft):
        assert cls.__module__ == "skyproto.master.records"


# --- service groups --------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_membership_is_one_key_on_a_lease_of_its_own(stores):
    a, b = await stores.make(), await stores.make()
    await admit(a, 1)
    await bounded(a.join_group("work/ers", 0x01000002, 1))
    await bounded(a.join_group("work/ers", 0x0100000a, 1))
    key = a.group_key("work/ers", 0x01000002)
    assert key == a._p + b"groups/work/ers/01000002"
    _, kvs = await bounded(a.client.range(key))
    hold = a._held[1]
    assert kvs[0].lease == hold.groups[("work/ers", 0x01000002)]
    assert kvs[0].lease not in (hold.lease, hold.groups[("work/ers", 0x0100000a)])
    assert json.loads(kvs[0].value) == {"claim": hold.claim}
    await until(lambda: b.members("work/ers") == (0x01000002, 0x0100000a), "b to see both")
    # a key that is not a membership is ignored by every view
    await bounded(a.client.txn([], [put(a._p + b"groups/x/zz", b"{}")]))
    await bounded(a.client.txn([], [put(a._p + b"groups/01000002", b"{}")]))
    await admit(a, 2)  # a later change: both views have seen the odd keys by then
    await until(lambda: b.harbor(2), "b to see harbor 2")
    assert a.snapshot().groups == b.snapshot().groups == {
        "work/ers": (0x01000002, 0x0100000a)}


@pytest_twisted.ensureDeferred
async def test_memberships_run_out_with_a_master_that_stops_renewing(stores):
    a = await stores.make(lease_ttl=2)
    b = await stores.make()
    await admit(a, 1)
    await bounded(a.join_group("workers", 0x01000002, 1))
    await bounded(a.join_group("cache", 0x01000002, 1))
    await until(lambda: len(b.snapshot().groups) == 2, "b to see the memberships")
    await a.stop()  # nothing revoked, nothing renewed
    await until(lambda: not b.snapshot().harbors and not b.snapshot().groups,
                "the keys to run out", timeout=15)
    gone = b.recorder.events[-3:]
    assert sorted(type(e).__name__ for e in gone) == ["GroupLeft", "GroupLeft", "HarborLeft"]
    assert len({e.sequence for e in gone}) == 3  # a revision of its own each


@pytest_twisted.ensureDeferred
async def test_the_same_node_moving_to_another_master_takes_its_memberships_over(stores):
    a, b = await stores.make(), await stores.make()
    await admit(a, 1, incarnation=7)
    await bounded(a.join_group("workers", 0x01000002, 1))
    await until(lambda: b.members("workers"), "b to see the membership")
    told = len(b.recorder.events)
    await admit(b, 1, incarnation=7)
    assert await bounded(b.join_group("workers", 0x01000002, 1)) == ()  # re-asserted
    await until(lambda: a.recorder.lost, "a to learn it lost harbor 1")
    assert b.recorder.events[told:] == []  # nobody saw it leave
    _, kvs = await bounded(b.client.range(b.group_key("workers", 0x01000002)))
    assert kvs[0].lease == b._held[1].groups[("workers", 0x01000002)]  # renewed by b now
    assert await bounded(a.depart(1, 7, "old session")) == ()
    assert b.members("workers") == (0x01000002,)
    # and it can leave through b
    (left,) = await bounded(b.leave_group("workers", 0x01000002, 1))
    assert isinstance(left, GroupLeft) and b.members("workers") == ()
    await until(lambda: a.members("workers") == (), "a to see it leave")


@pytest_twisted.ensureDeferred
async def test_changes_of_one_membership_are_made_in_the_order_asked(stores):
    a = await stores.make()
    await admit(a, 1)
    told = len(a.recorder.events)
    # asked together: the leave must not overtake the join still in flight
    results = await bounded(gatherResults([
        a.join_group("workers", 0x01000002, 1), a.leave_group("workers", 0x01000002, 1),
        a.join_group("workers", 0x01000002, 1), a.leave_group("workers", 0x01000002, 1)]))
    assert [[type(e) for e in events] for events in results] == [
        [GroupJoined], [GroupLeft], [GroupJoined], [GroupLeft]]
    assert [type(e) for e in a.recorder.events[told:]] == [GroupJoined, GroupLeft] * 2
    assert a.members("workers") == () and a._group_locks == {}
    assert a._held[1].groups == {}


@pytest_twisted.ensureDeferred
async def test_a_membership_granted_after_its_harbor_left_is_not_kept(stores):
    a = await stores.make()
    await admit(a, 1, incarnation=7)
    joining = a.join_group("workers", 0x01000002, 1)
    await bounded(a.depart(1, 7, "gone"))
    failures: list[Failure] = []
    await bounded(joining.addErrback(failures.append))
    if failures:  # decided after the departure: refused, and nothing left behind
        assert failures[0].check(RegistryRefusal)
    await until(lambda: a.members("workers") == (), "no membership to be left")
    # A membership stored just as its harbor left has its lease revoked, and the revocation
    # is on its way when the refusal is told (the table may never have seen the key): wait
    # for it, well short of the lease's own expiry (10 s), which would hide a lost revoke.
    deadline = time.monotonic() + 3.0
    while True:
        _, kvs = await bounded(a.client.range(a._p + b"groups/", prefix_end(a._p + b"groups/")))
        if not kvs or time.monotonic() > deadline:
            break
        await bounded(deferLater(reactor, 0.05))
    assert kvs == []
