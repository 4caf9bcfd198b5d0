"""Masters over the etcd registry, in this process, with nodes over TCP: what the server
does with a registry that answers later (a real etcd cluster; skips without ``etcd``).

The same MasterService code as over the in-memory store; here it must wait for claims,
release what was granted to a session that ended meanwhile, and end a session whose
registration the store lost.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import formatEvent

from skyproto.errors import NameConflict
from skyproto.master.client import JoinInfo, MasterClient
from skyproto.master.etcd_client import EtcdClient
from skyproto.master.etcd_store import EtcdRegistry
from skyproto.master.records import GroupLeft, HarborLeft
from skyproto.master.server import MasterService
from skyproto.node.node import Node
from skyproto.services import Echo
from skyproto.testing import wait_for

from .cluster import SECRET
from .etcd import ETCD, NO_ETCD, EtcdCluster, faulty_client
from .test_master_groups import A1, A2, B1
from .test_master_timeouts import Listener

pytestmark = pytest.mark.skipif(ETCD is None, reason=NO_ETCD)
TIMEOUT = 20.0


def until(condition: Any, what: str, timeout: float = 10.0) -> Any:
    return wait_for(condition, what, timeout, clock=reactor, interval=0.02)


class Cluster:
    """Masters sharing one prefix, and nodes joined to them; all stopped at the end."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.prefix = f"/masters-{uuid.uuid4().hex[:8]}/"
        self.masters: list[tuple[MasterService, Any, str]] = []
        self.nodes: list[Node] = []

    async def master(self, client: EtcdClient | None = None) -> tuple[MasterService, str]:
        registry = EtcdRegistry(client or EtcdClient.over_treq(self.urls, reactor), reactor,
                                prefix=self.prefix)
        await registry.start().addTimeout(TIMEOUT, reactor)
        service = MasterService(registry, reactor, SECRET, auto_grace=0)
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(service)
        address = f"tcp:127.0.0.1:{port.getHost().port}"
        self.masters.append((service, port, address))
        return service, address

    def node(self, harbor: int, master: str | list[str], **join: Any) -> Node:
        node = Node(harbor, reactor, SECRET, default_timeout=5)
        node.listen("tcp:0:interface=127.0.0.1")
        node.join_master(master, f"n{harbor}@test", **join)
        self.nodes.append(node)
        return node

    async def close(self) -> None:
        for node in self.nodes:
            await node.stop()
        for service, port, _ in self.masters:
            await maybeDeferred(port.stopListening)  # (a test may have stopped it already)
            service.close_all()
            registry = service.registry
            await registry.stop()
            assert isinstance(registry, EtcdRegistry)
            await registry.client.close()


@pytest_twisted.async_yield_fixture
async def cluster(etcd_cluster: EtcdCluster) -> AsyncIterator[Cluster]:
    made = Cluster(etcd_cluster.urls)
    try:
        yield made
    finally:
        await made.close()


def table_of(node: Node) -> tuple[list[int], dict[str, int]]:
    assert node.master is not None
    return sorted(node.master.harbors), dict(node.master.names)


@pytest_twisted.ensureDeferred
async def test_nodes_of_two_masters_see_one_table_and_call_across(cluster):
    (a, at_a), (b, at_b) = await cluster.master(), await cluster.master()
    nodes = [cluster.node(h, (at_a, at_b)[h % 2]) for h in (1, 2, 3, 4)]
    for node in nodes:
        node.spawn(Echo(), f"ECHO{node.harbor}")  # bound through the node's own master
    want = ([1, 2, 3, 4], {f"ECHO{h}": (h << 24) | 2 for h in (1, 2, 3, 4)})
    await until(lambda: all(table_of(n) == want for n in nodes), "one table everywhere")
    assert a.registry.snapshot() == b.registry.snapshot()
    # node 1 (master b) calls the service node 2 (master a) registered, by name
    reply = await nodes[0].call("ECHO2", "across masters")
    assert reply == "across masters"
    # a node that leaves through one master leaves the table of the other's nodes
    await nodes[1].stop()
    await until(lambda: table_of(nodes[0])[0] == [1, 3, 4] and
                "ECHO2" not in table_of(nodes[0])[1], "harbor 2 to leave everywhere")


@pytest_twisted.ensureDeferred
async def test_ten_claimants_through_two_masters_one_winner_everyone_agrees(cluster):
    (_, at_a), (_, at_b) = await cluster.master(), await cluster.master()
    nodes = [cluster.node(h, (at_a, at_b)[h % 2]) for h in range(1, 11)]
    await until(lambda: all(len(table_of(n)[0]) == 10 for n in nodes), "ten joined")
    handles = [n.spawn(Echo(), f".e{n.harbor}") for n in nodes]
    outcomes = await DeferredList([n.register_name("ONE", h) for n, h in
                                   zip(nodes, handles, strict=True)],
                                  consumeErrors=True).addTimeout(TIMEOUT, reactor)
    winners = [n for n, (ok, _) in zip(nodes, outcomes, strict=True) if ok]
    assert len(winners) == 1
    assert all(f.check(NameConflict) for ok, f in outcomes if not ok)
    owner = winners[0].names["ONE"]
    await until(lambda: all(table_of(n)[1].get("ONE") == owner for n in nodes),
                "everyone to agree on the winner")


@pytest_twisted.ensureDeferred
async def test_a_session_that_ends_while_its_claim_is_in_flight_is_released(cluster, events):
    client, faulty = faulty_client(cluster.urls, reactor)
    slow, at_slow = await cluster.master(client)
    _, at_other = await cluster.master()
    watcher = cluster.node(9, at_other)
    await until(lambda: table_of(watcher)[0] == [9], "the watcher to join")
    faulty.delay["/v3/kv/txn"] = 1.0  # etcd answers the harbor claim a second late
    leaver = cluster.node(1, at_slow)
    await until(lambda: any(c.state == "handshaking" and c.session.claim is not None
                            for c in slow.connections), "the claim to be in flight")
    await leaver.stop()  # its connection ends before the welcome
    # the claim lands (the watcher sees harbor 1 come) and is given back at once
    await until(lambda: not any(c.session.claim for c in slow.connections),
                "the claim to come back")
    await until(lambda: 1 not in table_of(watcher)[0] and slow.registry.harbor(1) is None,
                "harbor 1 to be released")
    assert slow.joined == {}
    assert any("left before its join was decided" in formatEvent(e) for e in events)


@pytest_twisted.ensureDeferred
async def test_a_registration_the_store_lost_ends_the_session_and_the_node_rejoins(cluster):
    master, at = await cluster.master()
    node = cluster.node(1, at)
    await until(lambda: 1 in master.joined, "the node to join")
    first = master.joined[1]
    registry = master.registry
    await registry.client.revoke(registry._held[1].lease).addTimeout(TIMEOUT, reactor)
    # the store reports it lost; the session ends; the node re-joins and registers again
    await until(lambda: master.joined.get(1) not in (None, first), "the node to re-join")
    await until(lambda: registry.harbor(1) is not None and table_of(node)[0] == [1],
                "harbor 1 back in the table")


@pytest_twisted.ensureDeferred
async def test_a_restarted_node_waits_for_its_old_incarnation_held_through_another_master(
        cluster, events):
    a, _ = await cluster.master()
    b, at_b = await cluster.master()
    # its previous incarnation, registered through master a (its session there, say, hung)
    await a.registry.admit(5, "n5@test", "tcp:127.0.0.1:1", 1, {}, 0.0).addTimeout(
        TIMEOUT, reactor)
    node = cluster.node(5, at_b)
    await until(lambda: any("waits up to" in formatEvent(e) and "still registered" in
                            formatEvent(e) for e in events), "the newcomer to wait")
    assert 5 not in b.joined
    await a.registry.depart(5, 1, "its session ended").addTimeout(TIMEOUT, reactor)
    # b sees it leave through its watch and lets the new incarnation in at once
    await until(lambda: 5 in b.joined, "the restarted node to join", timeout=3)
    assert b.registry.harbor(5) is not None
    assert b.registry.harbor(5).incarnation == node.incarnation


@pytest_twisted.ensureDeferred
async def test_a_node_whose_master_stops_moves_to_another_and_never_leaves_the_table(cluster):
    a, at_a = await cluster.master()
    _, at_b = await cluster.master()
    watcher = cluster.node(9, at_b)
    mover = cluster.node(1, [at_a, at_b])
    mover.spawn(Echo(), "DB")
    await until(lambda: table_of(watcher) == ([1, 9], {"DB": 0x01000002}), "DB everywhere")
    seen: list[Any] = []
    watcher.subscribe(seen.append)
    # master a stops as twistd stops it: the store first (nothing released), then its port
    await a.registry.stop()
    for service, port, _ in cluster.masters[:1]:
        await port.stopListening()
        service.close_all()
    await until(lambda: mover.master is not None and mover.master.connected and
                mover.master.endpoint_description == at_b, "the node to re-join through b")
    assert table_of(watcher) == ([1, 9], {"DB": 0x01000002})
    assert seen == []  # no HarborLeft, no NameUnbound: its keys were taken over
    assert await watcher.call("DB", "still here") == "still here"


@pytest_twisted.ensureDeferred
async def test_group_memberships_through_two_masters_move_with_their_node(cluster):
    """Service groups over etcd: memberships granted through either master reach every
    node, and a node whose master stops re-asserts its own through the other one, its keys
    taken over: nobody sees them leave, but the one it gave up meanwhile."""
    a, at_a = await cluster.master()
    b, at_b = await cluster.master()

    class Recording(Listener):
        def __init__(self) -> None:
            self.events: list[Any] = []

        def master_event(self, event: Any) -> None:
            self.events.append(event)

    held: dict[int, dict[str, set[int]]] = {1: {"workers": {A1, A2}, "cache": {A1}},
                                            2: {"workers": {B1}}}
    listeners = {1: Recording(), 2: Recording()}
    clients = {harbor: MasterClient(reactor, masters, SECRET, listeners[harbor],
                                    JoinInfo(harbor, 7, f"n{harbor}@test", "tcp:127.0.0.1:1"),
                                    groups_to_assert=lambda h=harbor: held[h])
               for harbor, masters in ((1, [at_a, at_b]), (2, [at_b]))}
    try:
        for client in clients.values():
            client.start()
        await until(lambda: all(c.connected for c in clients.values()), "both to join")
        await DeferredList([clients[1].join_group("workers", A1),
                            clients[1].join_group("workers", A2),
                            clients[1].join_group("cache", A1),
                            clients[2].join_group("workers", B1)],
                           fireOnOneErrback=True).addTimeout(TIMEOUT, reactor)
        want = {"workers": {A1, A2, B1}, "cache": {A1}}
        await until(lambda: all(c.groups == want for c in clients.values()),
                    "every membership everywhere")
        assert a.registry.snapshot().groups == b.registry.snapshot().groups
        seen = len(listeners[2].events)
        held[1]["cache"].clear()  # given up while its master goes (no LeaveGroup sent)
        # master a stops as twistd stops it: the store first (nothing released), then its port
        await a.registry.stop()
        for service, port, _ in cluster.masters[:1]:
            await port.stopListening()
            service.close_all()
        mover = clients[1]
        await until(lambda: mover.connected and mover.endpoint_description == at_b and
                    mover.welcomes == 2, "the node to re-join through b")
        await until(lambda: b.registry._held.get(1) is not None and
                    len(b.registry._held[1].groups) == 2, "b to hold its memberships")
        want = {"workers": {A1, A2, B1}}
        await until(lambda: clients[2].groups == mover.groups == want, "cache to go")
        left = [(type(e), getattr(e, "group", None)) for e in listeners[2].events[seen:]
                if isinstance(e, GroupLeft | HarborLeft)]
        assert left == [(GroupLeft, "cache")]  # the others never left
        # and leaving goes through the new master too
        await clients[1].leave_group("workers", A2).addTimeout(TIMEOUT, reactor)
        await until(lambda: clients[2].groups == {"workers": {A1, B1}},
                    "the leave to reach node 2")
    finally:
        for client in clients.values():
            await client.stop()
