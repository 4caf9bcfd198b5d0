"""The master handshake's pure state machine, both sides, with no network."""

from __future__ import annotations

import pytest

from skyproto.errors import ProtocolError
from skyproto.master.handshake import (
    Authenticated,
    JoinInfo,
    JoinRequest,
    MasterHandshake,
    NodeHandshake,
    ObserveRequest,
    Refusal,
    Step,
    Welcomed,
)
from skyproto.master.messages import (
    PROTOCOL_VERSION,
    GetTable,
    Join,
    MasterChallenge,
    MasterHello,
    Observe,
    Refused,
    Welcome,
)
from skyproto.master.registry import Table
from skyproto.wire.heartbeat import HeartbeatTiming

SECRET = b"handshake-secret"
ALPHA = JoinInfo(1, 10, "alpha@db1", "tcp:127.0.0.1:7001")


def pair(node_timing: HeartbeatTiming = HeartbeatTiming(1.0, 3.0),  # noqa: B008
         master_timing: HeartbeatTiming = HeartbeatTiming(1.0, 3.0),  # noqa: B008
         join: JoinInfo | None = ALPHA, node_secret: bytes = SECRET,
         names: dict[str, int] | None = None) -> tuple[NodeHandshake, MasterHandshake]:
    node = NodeHandshake(node_secret, node_timing, join, lambda: names or {})
    return node, MasterHandshake(SECRET, master_timing)


def run(node: NodeHandshake, master: MasterHandshake) -> tuple[Step, Step, Step]:
    """Hello -> challenge -> join/observe; returns the three steps."""
    challenged = master.receive(node.start())
    assert len(challenged.send) == 1
    answered = node.receive(challenged.send[0])
    assert not answered.send  # the node's answer travels sealed
    decided = master.receive(answered.sealed[0]) if answered.sealed else Step()
    return challenged, answered, decided


A_KEY = NodeHandshake(SECRET, HeartbeatTiming(), None).start().key


def test_a_join_authenticates_both_sides_and_names_the_node():
    node, master = pair(names={"DB": 0x01000002})
    challenged, answered, decided = run(node, master)
    challenge = challenged.send[0]
    assert isinstance(challenge, MasterChallenge) and challenge.version == PROTOCOL_VERSION
    assert answered.outcome == Authenticated(HeartbeatTiming(1.0, 3.0), observing=False)
    join = answered.sealed[0]
    assert isinstance(join, Join)
    assert (join.harbor, join.incarnation, join.node, join.names) == (
        1, 10, "alpha@db1", {"DB": 0x01000002})
    assert decided == Step(outcome=JoinRequest(join, HeartbeatTiming(1.0, 3.0)))
    assert master.done and not node.done
    welcomed = node.receive(Welcome(1, (), Table(3, (), {})))
    assert welcomed.outcome == Welcomed(Welcome(1, (), Table(3, (), {})))
    assert node.done


def test_an_observer_authenticates_without_joining():
    node, master = pair(join=None)
    _, answered, decided = run(node, master)
    assert isinstance(answered.sealed[0], Observe)
    assert answered.outcome == Authenticated(HeartbeatTiming(1.0, 3.0), observing=True)
    assert decided.outcome == ObserveRequest(HeartbeatTiming(1.0, 3.0))
    assert node.done and master.done


def test_the_slower_timing_governs_both_sides():
    node, master = pair(node_timing=HeartbeatTiming(5.0, 15.0),
                        master_timing=HeartbeatTiming(1.0, 20.0))
    _, answered, decided = run(node, master)
    governing = HeartbeatTiming(5.0, 20.0)
    assert isinstance(answered.outcome, Authenticated)
    assert answered.outcome.timing == governing
    assert isinstance(decided.outcome, JoinRequest) and decided.outcome.timing == governing


def test_a_wrong_secret_is_caught_by_the_node_first():
    node, master = pair(node_secret=b"another secret, 16+")
    _, answered, _ = run(node, master)
    assert answered == Step(outcome=Refusal(
        "authentication failed: the master does not know our cluster secret", False))
    assert node.done


def test_both_sides_derive_the_same_keys_and_seal_from_the_challenge_on():
    node, master = pair()
    challenged, answered, _ = run(node, master)
    assert challenged.keys is not None and challenged.keys == answered.keys
    other_node, other_master = pair()
    again, _, _ = run(other_node, other_master)
    assert again.keys != challenged.keys  # fresh keys every connection


def test_the_challenge_timing_is_covered_by_the_proof():
    # A relay that rewrites the master's heartbeat timing breaks the master's proof.
    node, master = pair()
    challenge = master.receive(node.start()).send[0]
    altered = MasterChallenge(challenge.version, challenge.key, challenge.proof, 60.0, 600.0)
    assert node.receive(altered).outcome == Refusal(
        "authentication failed: the master does not know our cluster secret", False)


def test_the_master_refuses_a_wrong_proof():
    node, master = pair()
    master.receive(node.start())
    bad = Join(bytes(32), 1, 10, "alpha@db1", "tcp:127.0.0.1:7001", {}, 1.0, 3.0)
    step = master.receive(bad)
    reason = "authentication failed: wrong cluster secret"
    assert step == Step(send=(Refused(reason),), outcome=Refusal(reason, False))


def test_versions_must_match():
    master = MasterHandshake(SECRET, HeartbeatTiming())
    step = master.receive(MasterHello(PROTOCOL_VERSION + 1, bytes(32)))
    reason = (f"protocol version {PROTOCOL_VERSION + 1} is not supported "
              f"(the master speaks {PROTOCOL_VERSION})")
    assert step == Step(send=(Refused(reason),), outcome=Refusal(reason, False))
    node = NodeHandshake(SECRET, HeartbeatTiming(), ALPHA)
    node.start()
    step = node.receive(MasterChallenge(9, bytes(32), bytes(32), 1.0, 3.0))
    assert step.outcome == Refusal(f"the master speaks protocol 9, this node "
                                   f"{PROTOCOL_VERSION}", False)


def test_refused_ends_the_node_side_at_any_time():
    node, master = pair()
    run(node, master)
    assert node.receive(Refused("harbor 1 is held")) == Step(
        outcome=Refusal("harbor 1 is held", True))


@pytest.mark.parametrize("endpoint", ["", "x" * 1025, "tcp:1\n"])
def test_an_unusable_endpoint_is_refused_after_authentication(endpoint):
    node, master = pair(join=JoinInfo(1, 10, "alpha@db1", endpoint))
    _, _, decided = run(node, master)
    assert isinstance(decided.outcome, Refusal) and decided.outcome.authenticated
    assert decided.outcome.reason.startswith("unusable harbor endpoint")


@pytest.mark.parametrize("interval,timeout", [(0.0, 3.0), (3.0, 3.0), (1.0, float("inf")),
                                              (float("nan"), 3.0), (1.0, 1e9)])
def test_an_unusable_heartbeat_timing_is_refused(interval, timeout):
    node, master = pair(node_timing=HeartbeatTiming(interval, timeout))
    _, _, decided = run(node, master)
    assert isinstance(decided.outcome, Refusal)
    assert decided.outcome.reason.startswith("unusable heartbeat timing")


def test_messages_out_of_place_are_protocol_errors():
    master = MasterHandshake(SECRET, HeartbeatTiming())
    with pytest.raises(ProtocolError, match="expected MasterHello, got GetTable"):
        master.receive(GetTable(1))
    with pytest.raises(ProtocolError, match="key of 5 bytes"):
        master.receive(MasterHello(PROTOCOL_VERSION, b"short"))
    with pytest.raises(ProtocolError, match="not a usable X25519"):
        master.receive(MasterHello(PROTOCOL_VERSION, bytes(32)))
    master = MasterHandshake(SECRET, HeartbeatTiming())
    master.receive(MasterHello(PROTOCOL_VERSION, A_KEY))
    with pytest.raises(ProtocolError, match="expected Join or Observe, got MasterHello"):
        master.receive(MasterHello(PROTOCOL_VERSION, A_KEY))
    node, master = pair()
    run(node, master)
    with pytest.raises(ProtocolError, match="unexpected GetTable"):
        master.receive(GetTable(1))
    with pytest.raises(ProtocolError, match="expected Welcome, got GetTable"):
        node.receive(GetTable(1))
    with pytest.raises(ProtocolError, match="welcomed as harbor 2"):
        node.receive(Welcome(2, (), Table(0, (), {})))
    fresh = NodeHandshake(SECRET, HeartbeatTiming(), ALPHA)
    fresh.start()
    with pytest.raises(ProtocolError, match="expected MasterChallenge"):
        fresh.receive(Welcome(1, (), Table(0, (), {})))
