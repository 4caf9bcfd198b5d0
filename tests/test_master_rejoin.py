"""Who gets a harbor id: auto ids stay clear of fixed ones; a restarted node takes its id over."""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from skyproto.master.messages import MasterHeartbeat, Welcome
from skyproto.master.registry import InMemoryRegistry
from skyproto.master.server import MasterService
from skyproto.node.node import Node

from .cluster import SECRET, network
from .test_master import Cluster, MasterPeer


def freeze(cluster: Cluster, node: Node) -> None:
    """Like SIGSTOP or a dead host: nothing of the node runs any more, and its connections
    stay open but silent (the master is not told)."""
    for connection in network(cluster.clock).connections:
        protocols = [getattr(t.protocol, "_protocol", t.protocol) for t in connection.transports]
        if node.master in [getattr(p, "client", None) for p in protocols]:
            connection.pause()
    assert node.master is not None
    node.master.stop()  # its client never runs again (the close it starts is stalled too)


def test_auto_nodes_at_a_cold_start_leave_the_fixed_ids_alone():
    cluster = Cluster(settled=False)
    autos = []
    for index in range(5):
        auto = Node(0, cluster.clock, SECRET)
        auto.listen(f"loopback:auto{index}")
        auto.join_master("loopback:master", f"auto{index}@test", f"loopback:auto{index}")
        autos.append(auto)
    cluster.settle(2.5)  # the master's start-up grace is over: the auto nodes have ids
    fixed = [cluster.node(harbor) for harbor in range(1, 6)]  # they start a little later
    cluster.settle(0.5)
    assert not any(cluster.refusals.values()), cluster.refusals
    assert sorted(auto.harbor for auto in autos) == [251, 252, 253, 254, 255]
    harbors = [r.harbor for r in cluster.master.registry.snapshot().harbors]
    assert harbors == [1, 2, 3, 4, 5, 251, 252, 253, 254, 255]
    assert all(node.master is not None and node.master.connected for node in fixed + autos)


def test_a_restarted_node_waits_for_its_old_session_then_takes_its_id():
    cluster = Cluster()
    old = cluster.node(1)
    frozen_at = cluster.clock.seconds()
    freeze(cluster, old)
    new = cluster.node(1, incarnation=old.incarnation + 1)  # same harbor, same node name
    assert not cluster.refusals.get(1)  # not refused: it waits
    assert new.master is not None and new.master.state == "joining"
    took = cluster.settle_until(lambda: new.master.connected, 5.0)
    assert not cluster.refusals.get(1)
    # the old session is dropped when its heartbeats have been missing for 3 s
    assert 2.9 <= cluster.clock.seconds() - frozen_at <= 3.3, took
    record = cluster.master.registry.snapshot().harbors[0]
    assert (record.harbor, record.incarnation) == (1, new.incarnation)
    assert new.master.welcomes == 1


def test_a_newer_incarnation_of_a_node_that_is_still_alive_is_refused_after_the_wait():
    cluster = Cluster()
    alive = cluster.node(1)
    cluster.node(1, incarnation=alive.incarnation + 1)  # e.g. started twice by mistake
    cluster.settle(3.9)  # its old session's heartbeat timeout (3 s) plus a margin (1 s)
    assert cluster.refusals[1] == []
    cluster.settle(0.2)
    assert len(cluster.refusals[1]) == 1
    assert f"held by live node n1@test (incarnation {alive.incarnation})" in \
        cluster.refusals[1][0]
    assert alive.master is not None and alive.master.connected


def test_an_older_incarnation_or_another_node_name_is_refused_at_once():
    cluster = Cluster()
    alive = cluster.node(1)
    cluster.node(1, incarnation=alive.incarnation - 1)
    cluster.node(1, name="other@test", incarnation=alive.incarnation + 1)
    assert len(cluster.refusals[1]) == 2
    assert all("held by live node n1@test" in reason for reason in cluster.refusals[1])


def test_a_reconnection_of_the_same_incarnation_takes_the_session_over_at_once():
    """The node gave up on a connection the master still holds: no leave, no refusal."""
    service = MasterService(InMemoryRegistry(), Clock(), SECRET, auto_grace=0)
    bystander = MasterPeer(service)
    bystander.join(2, node="n2@test")
    stale = MasterPeer(service)
    stale.join(1, names={"DB": 0x01000002})
    bystander.received()
    again = MasterPeer(service)
    welcome, *_ = again.join(1, names={"DB": 0x01000002})
    assert isinstance(welcome, Welcome) and welcome.harbor == 1
    assert welcome.table.names == {"DB": 0x01000002}
    assert stale.transport.disconnecting and service.joined[1] is again.connection
    stale.connection.connectionLost(Failure(ConnectionDone()))
    assert [m for m in bystander.received() if not isinstance(m, MasterHeartbeat)] == []
    assert [r.harbor for r in service.registry.snapshot().harbors] == [1, 2]
