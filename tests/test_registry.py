"""The master's registry, tested directly: no network."""

import pytest
from zope.interface.verify import verifyObject

from skyproto.interfaces import IRegistry
from skyproto.master.registry import (
    HarborJoined,
    HarborLeft,
    InMemoryRegistry,
    NameBound,
    NameUnbound,
    RegistryRefusal,
)


def joined(registry, harbor=1, incarnation=10, names=None, node=None):
    return registry.join(harbor, node or f"n{harbor}@h", f"tcp:127.0.0.1:{7000 + harbor}",
                         incarnation, names or {}, now=5.0)


def test_provides_interface():
    assert verifyObject(IRegistry, InMemoryRegistry())


def test_join_records_the_harbor_and_numbers_every_event():
    registry = InMemoryRegistry()
    result = joined(registry, names={"DB": 0x01000002})
    assert result.harbor == 1
    assert [type(e) for e in result.events] == [HarborJoined, NameBound]
    assert [e.sequence for e in result.events] == [1, 2]
    table = registry.snapshot()
    assert table.sequence == 2
    assert table.harbors[0].endpoint == "tcp:127.0.0.1:7001"
    assert table.harbors[0].up_since == 5.0
    assert table.names == {"DB": 0x01000002}


def test_a_live_harbor_id_is_refused_whatever_the_incarnation():
    registry = InMemoryRegistry()
    joined(registry, incarnation=10)
    with pytest.raises(RegistryRefusal, match="held by live node n1@h"):
        joined(registry, incarnation=11)
    assert registry.sequence == 1  # nothing changed


def test_a_dead_harbor_id_is_free_at_once():
    registry = InMemoryRegistry()
    joined(registry, incarnation=10, names={"DB": 0x01000002})
    events = registry.leave(1, 10, "connection closed")
    assert [type(e) for e in events] == [HarborLeft, NameUnbound]
    assert registry.lookup("DB") is None
    result = joined(registry, incarnation=11, names={"DB": 0x01000002})
    assert result.harbor == 1
    assert registry.lookup("DB") == 0x01000002  # the name comes back with its harbor


def test_leave_of_an_old_incarnation_changes_nothing():
    registry = InMemoryRegistry()
    joined(registry, incarnation=10)
    assert registry.leave(1, 9, "stale") == ()
    assert registry.harbor(1) is not None


def test_auto_assignment_takes_ids_from_the_top():
    registry = InMemoryRegistry()
    joined(registry, harbor=1)
    joined(registry, harbor=255)
    assert joined(registry, harbor=0).harbor == 254
    assert joined(registry, harbor=0).harbor == 253


def test_auto_ids_never_take_an_id_a_fixed_node_used_while_another_is_free():
    # Fixed nodes that crashed (or start a little later) must find their ids free.
    registry = InMemoryRegistry()
    for harbor in (1, 2, 3, 200):
        joined(registry, harbor=harbor)
        registry.leave(harbor, 10, "crashed")
    assigned = [joined(registry, harbor=0).harbor for _ in range(251)]
    assert assigned == [h for h in range(255, 0, -1) if h not in (1, 2, 3, 200)]
    # only fixed nodes' ids are left: an auto node may have one rather than nothing
    assert joined(registry, harbor=0).harbor == 200
    for harbor in (1, 2, 3):
        assert joined(registry, harbor=harbor).harbor == harbor


def test_all_ids_taken():
    registry = InMemoryRegistry()
    for harbor in range(1, 256):
        joined(registry, harbor=harbor)
    with pytest.raises(RegistryRefusal, match="all 255"):
        joined(registry, harbor=0)


def test_out_of_range_harbor():
    with pytest.raises(RegistryRefusal, match="out of range"):
        joined(InMemoryRegistry(), harbor=256)


def test_first_writer_wins():
    registry = InMemoryRegistry()
    joined(registry, harbor=1)
    joined(registry, harbor=2)
    assert registry.bind("DB", 0x01000002, 1)[0] == NameBound(3, "DB", 0x01000002)
    with pytest.raises(RegistryRefusal, match="already taken by :01000002"):
        registry.bind("DB", 0x02000002, 2)
    assert registry.bind("DB", 0x01000002, 1) == ()  # idempotent for the owner


def test_conflicting_names_in_a_join_are_refused_individually():
    registry = InMemoryRegistry()
    joined(registry, harbor=1, names={"DB": 0x01000002})
    result = joined(registry, harbor=2, names={"DB": 0x02000002, "CACHE": 0x02000003})
    assert result.refused_names == ("DB",)
    assert registry.lookup("CACHE") == 0x02000003
    assert registry.lookup("DB") == 0x01000002


def test_names_must_be_global_and_on_the_requesters_harbor():
    registry = InMemoryRegistry()
    joined(registry)
    for name in [".local", "", "two words"]:
        with pytest.raises(RegistryRefusal, match="not a global name"):
            registry.bind(name, 0x01000002, 1)
    with pytest.raises(RegistryRefusal, match="another harbor"):
        registry.bind("X", 0x02000002, 1)


def test_unbind():
    registry = InMemoryRegistry()
    joined(registry, harbor=1, names={"DB": 0x01000002})
    joined(registry, harbor=2)
    with pytest.raises(RegistryRefusal, match="belongs to harbor 1"):
        registry.unbind("DB", 2)
    assert registry.unbind("DB", 1) == (NameUnbound(4, "DB", 0x01000002),)
    with pytest.raises(RegistryRefusal, match="not registered"):
        registry.unbind("DB", 1)


def test_snapshot_is_a_copy():
    registry = InMemoryRegistry()
    joined(registry, names={"DB": 0x01000002})
    table = registry.snapshot()
    registry.unbind("DB", 1)
    assert table.names == {"DB": 0x01000002}
