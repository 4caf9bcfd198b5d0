"""Heartbeats on the master connection: negotiated (the slower side governs), and every byte
counts as a sign of life."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from skyproto.master.client import JoinInfo, MasterClient
from skyproto.master.messages import LookupName, MasterHeartbeat, Reply, TableReply
from skyproto.master.registry import HarborLeft, HarborRecord, InMemoryRegistry, Table
from skyproto.master.server import MasterService

from .cluster import SECRET
from .test_master import Cluster, MasterPeer
from .test_master_timeouts import Listener


def test_a_slow_beating_node_stays_joined_to_a_fast_master():
    cluster = Cluster()  # the master beats every 1 s and drops after 3 s of silence
    other = cluster.node(2)
    left: list[Any] = []
    other.subscribe(lambda event: left.append(event) if isinstance(event, HarborLeft) else None)
    slow = cluster.node(1, heartbeat_interval=5.0, heartbeat_timeout=15.0)
    assert slow.master is not None and slow.master.connected
    for _ in range(60 * 20):
        cluster.clock.advance(0.05)
    assert slow.master.connected and slow.master.welcomes == 1
    assert left == []
    assert cluster.master.connected() == 2
    session = cluster.master.joined[1].session
    assert (session.timing.interval, session.timing.timeout) == (5.0, 15.0)


def test_the_governing_timing_is_the_slower_one_on_both_ends():
    cluster = Cluster(heartbeat_interval=2.0, heartbeat_timeout=8.0)
    node = cluster.node(1, heartbeat_interval=1.0, heartbeat_timeout=3.0)
    protocol = node.master.protocol
    assert protocol is not None
    assert (protocol._heartbeat.interval, protocol._heartbeat.timeout) == (2.0, 8.0)
    session = cluster.master.joined[1]
    protocol.transport.connection.pause()
    for _ in range(int(7.5 / 0.05)):
        cluster.clock.advance(0.05)
    assert node.master.connected
    for _ in range(20):
        cluster.clock.advance(0.05)
    # 8 s of silence: dropped on both ends (and the node is back on a new connection)
    assert session.state == "closed" and node.master.protocol is not protocol


def test_a_large_frame_arriving_slowly_keeps_the_node_alive_at_the_master():
    clock = Clock()
    service = MasterService(InMemoryRegistry(), clock, SECRET, auto_grace=0)
    peer = MasterPeer(service)
    peer.join(1)
    data = peer.wire.encode(LookupName(1, "N" * 60_000))
    pieces = [data[i:i + 6_000] for i in range(0, len(data), 6_000)]
    for piece in pieces:  # 11 s for one frame; the timeout is 3 s
        clock.advance(1.0)
        peer.connection.dataReceived(piece)
    replies = [m for m in peer.received() if not isinstance(m, MasterHeartbeat)]
    assert not peer.transport.disconnecting
    assert replies == [Reply(1, "", 0)]


def test_a_large_frame_arriving_slowly_keeps_the_master_alive_at_the_node():
    from .test_master import FakeMaster

    reactor = MemoryReactorClock()
    client = MasterClient(reactor, "tcp:127.0.0.1:1", SECRET, Listener(),
                          JoinInfo(1, 5, "n1@test", "tcp:127.0.0.1:2"), request_timeout=30)
    master = FakeMaster(client)
    master.welcome()
    table = client.get_table()
    request = master.received()[-1].request
    records = tuple(HarborRecord(h, f"n{h}@test", "tcp:127.0.0.1:7" + "0" * 300, 1, 0.0)
                    for h in range(1, 200))
    data = master.wire.encode(TableReply(request, Table(1, records, {})))
    pieces = [data[i:i + 5_000] for i in range(0, len(data), 5_000)]
    assert len(pieces) >= 10
    for piece in pieces:
        reactor.advance(1.0)
        master.protocol.dataReceived(piece)
    assert not master.transport.disconnecting
    box: list[Any] = []
    table.addBoth(box.append)
    assert isinstance(box[0], Table) and len(box[0].harbors) == 199


def test_a_beat_that_crossed_the_challenge_arrives_in_the_clear_and_is_no_fault():
    """The node beats from the moment it connects; one beat may leave before the challenge
    arrives, and reaches the master after it switched to sealed records."""
    from skyproto.master.messages import MASTER_CODEC, Join, Welcome

    from .sealed import frame

    service = MasterService(InMemoryRegistry(), Clock(), SECRET, auto_grace=0)
    peer = MasterPeer(service)
    _, proof = peer.authenticate()
    peer.connection.dataReceived(frame(MASTER_CODEC.encode(MasterHeartbeat())))
    assert not peer.transport.disconnecting
    peer.send(Join(proof, 1, 7, "n1@test", "tcp:127.0.0.1:7001", {}, 1.0, 3.0))
    assert any(isinstance(m, Welcome) for m in peer.received())
    # anything else in the clear is still refused
    other = MasterPeer(service)
    other.authenticate()
    other.connection.dataReceived(frame(MASTER_CODEC.encode(LookupName(1, "X"))))
    assert other.transport.disconnecting
