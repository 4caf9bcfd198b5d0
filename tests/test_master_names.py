"""Global names across master outages: granted before they count, and kept by their holders."""

from __future__ import annotations

import pytest

from skyproto.errors import NameConflict
from skyproto.services import Echo

from .cluster import failure_of, network, result_of
from .test_master import Cluster


def waiting(d) -> bool:
    """True while ``d`` has no result (chained Deferreds count as called too early)."""
    box: list[object] = []

    def record(result: object) -> object:
        box.append(result)
        return result

    d.addBoth(record)
    return not box


def test_register_name_fires_only_once_the_master_granted_it():
    cluster = Cluster(settled=False)  # the master just started: it is in its grace
    a = cluster.node(1)
    handle = a.spawn(Echo(), ".db")
    registering = a.register_name("DB", handle)
    cluster.settle(1.5)
    assert waiting(registering)  # held back for holders that may be coming back
    assert a.global_names() == {}  # not granted: a re-join would not assert it
    assert cluster.master.registry.lookup("DB") is None
    cluster.settle(0.6)  # the grace (2 s) is over: nobody came back for it
    assert result_of(registering) is None
    assert a.global_names() == {"DB": handle}
    assert cluster.master.registry.lookup("DB") == handle


@pytest.mark.parametrize("first", ["a", "b"])
def test_names_claimed_during_an_outage_stay_with_their_holders(first):
    """While the master is down, A claims B's name and B claims A's; whoever re-joins the
    restarted master first, A keeps A's names and B keeps B's."""
    cluster = Cluster(listen=("master", "master-b"), auto_grace=5.0)
    a = cluster.node(1, request_timeout=10.0)
    b = cluster.node(2, master="loopback:master-b", request_timeout=10.0)
    ha, hb = a.spawn(Echo(), ".a"), b.spawn(Echo(), ".b")
    granted = [a.register_name("A1", ha), a.register_name("A2", ha),
               b.register_name("B1", hb), b.register_name("B2", hb)]
    cluster.settle()
    assert [result_of(d) for d in granted] == [None] * 4

    cluster.kill_master()
    steals = {a: [a.register_name("B1", ha), a.register_name("B2", ha)],
              b: [b.register_name("A1", hb), b.register_name("A2", hb)]}
    cluster.settle(0.5)
    assert a.global_names() == {"A1": ha, "A2": ha}  # a claim is not re-asserted
    assert b.global_names() == {"B1": hb, "B2": hb}

    one, other = (a, b) if first == "a" else (b, a)
    held_off = "master-b" if first == "a" else "master"
    net = network(cluster.clock)
    net.refuse(held_off)  # the other node comes back later
    cluster.start_master()
    assert one.master is not None and other.master is not None
    cluster.settle_until(lambda: one.master.connected, 3.0)
    cluster.settle(0.2)  # its claims reach the master (which holds them back)
    net.refuse(held_off, False)
    cluster.settle_until(lambda: other.master.connected, 3.0)
    cluster.settle(0.2)

    registry = cluster.master.registry
    assert registry.snapshot().names == {"A1": ha, "A2": ha, "B1": hb, "B2": hb}
    for node in (a, b):
        for claim in steals[node]:
            assert "already taken" in str(failure_of(claim, NameConflict).value)
    assert a.global_names() == {"A1": ha, "A2": ha}
    assert b.global_names() == {"B1": hb, "B2": hb}
    assert set(a.names) == {".a", "A1", "A2"} and set(b.names) == {".b", "B1", "B2"}
    cluster.settle(6.0)  # past the grace: nothing changes any more
    assert registry.snapshot().names == {"A1": ha, "A2": ha, "B1": hb, "B2": hb}
    assert a.membership.names == b.membership.names == registry.snapshot().names


def test_names_registered_before_joining_are_claimed_after_the_welcome():
    cluster = Cluster()
    a = cluster.node(1)
    ha = a.spawn(Echo(), ".a")
    taken = a.register_name("TAKEN", ha)
    cluster.settle()
    assert result_of(taken) is None
    # b registers names while it has no master yet (as twistd skynode does at start-up)
    from skyproto.node.node import Node

    from .cluster import SECRET

    b = Node(2, cluster.clock, SECRET)
    b.listen("loopback:b")
    hb = b.spawn(Echo(), ".b")
    assert result_of(b.register_name("MINE", hb)) is None  # no master: known here only
    assert result_of(b.register_name("TAKEN", hb)) is None
    b.join_master("loopback:master", "b@test", "loopback:b")
    cluster.settle(0.5)
    registry = cluster.master.registry
    assert registry.lookup("MINE") == hb and registry.lookup("TAKEN") == ha
    assert "TAKEN" not in b.names and b.global_names() == {"MINE": hb}
    assert b.resolve("TAKEN") == ha


def test_a_name_unbound_while_it_waits_for_the_grace_is_never_granted():
    cluster = Cluster(settled=False)
    a = cluster.node(1)
    handle = a.spawn(Echo(), ".db")
    registering = a.register_name("DB", handle)
    cluster.settle(0.5)
    a.kill(handle)  # unregisters DB before the master granted it
    cluster.settle(2.0)
    assert "unbound before it was granted" in str(failure_of(registering, NameConflict).value)
    assert cluster.master.registry.lookup("DB") is None
    assert "DB" not in a.names and a.global_names() == {}
