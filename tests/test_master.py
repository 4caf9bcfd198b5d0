"""The master and its clients over loopback, driven by a Clock: every rule of issue 4."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface.verify import verifyObject

from skyproto.errors import HarborDown, MasterUnavailable, NameConflict
from skyproto.interfaces import IMasterClient, IMasterListener, IMasterService
from skyproto.master.messages import (
    MASTER_CODEC,
    Join,
    MasterChallenge,
    MasterHello,
    Welcome,
)
from skyproto.master.registry import (
    HarborJoined,
    HarborLeft,
    InMemoryRegistry,
    NameBound,
    NameUnbound,
)
from skyproto.master.server import MasterService
from skyproto.node.node import Node
from skyproto.services import Echo

from .cluster import SECRET, Parked, failure_of, network, result_of
from .sealed import MasterNodeSide, Wire, master_challenge


def build(cls: Any, **fields: Any) -> Any:
    """A message with the fields its class has (the heartbeat fields are new in version 2)."""
    names = {f.name for f in attrs.fields(cls)}
    return cls(**{name: value for name, value in fields.items() if name in names})


class MasterPeer:
    """One connection to a MasterService driven by hand, on a StringTransport."""

    def __init__(self, service: MasterService) -> None:
        self.service = service
        self.connection = service.buildProtocol(None)
        self.transport = StringTransport()
        self.connection.makeConnection(self.transport)
        self.wire = Wire(MASTER_CODEC)

    def send(self, message: object) -> None:
        self.connection.dataReceived(self.wire.encode(message))

    def received(self) -> list[Any]:
        data = self.transport.value()
        self.transport.clear()
        return self.wire.decode(data)

    def authenticate(self, secret: bytes = SECRET) -> tuple[MasterChallenge, bytes]:
        """Hello, then the challenge: seals this side and returns the proof to send."""
        side = MasterNodeSide(secret)
        self.send(side.hello())
        challenge, = self.received()
        assert isinstance(challenge, MasterChallenge)
        keys, proof = side.answer(challenge)
        self.wire.seal(keys, initiator=True)
        return challenge, proof

    def join(self, harbor: int, node: str = "n1@test", incarnation: int = 7,
             secret: bytes = SECRET, names: dict[str, int] | None = None,
             interval: float = 1.0, timeout: float = 3.0) -> list[Any]:
        _, proof = self.authenticate(secret)
        self.send(build(Join, proof=proof, harbor=harbor, incarnation=incarnation, node=node,
                        endpoint=f"tcp:127.0.0.1:{7000 + harbor}", names=names or {},
                        heartbeat_interval=interval, heartbeat_timeout=timeout))
        return self.received()


class FakeMaster:
    """The master's side of one MasterClientProtocol, driven by hand on a StringTransport."""

    def __init__(self, client: Any, interval: float = 1.0, timeout: float = 3.0) -> None:
        from skyproto.master.client import MasterClientProtocol

        self.client = client
        self.protocol = MasterClientProtocol(client)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.wire = Wire(MASTER_CODEC)
        hello, = self.received()
        assert isinstance(hello, MasterHello)
        keys, challenge = master_challenge(SECRET, hello, interval, timeout)
        self.send(challenge)
        self.wire.seal(keys, initiator=False)
        self.join, = self.received()

    def send(self, message: object) -> None:
        self.protocol.dataReceived(self.wire.encode(message))

    def received(self) -> list[Any]:
        data = self.transport.value()
        self.transport.clear()
        return self.wire.decode(data)

    def welcome(self, harbor: int = 1) -> None:
        from skyproto.master.registry import Table

        self.send(Welcome(harbor, (), Table(0, (), {})))


class Cluster:
    """A master and nodes on one Clock, over the loopback transport.

    ``settled``: the master has been up past its start-up grace (2 s, in which it holds
    back new names and auto ids for returning nodes) before the first node joins.
    ``listen``: the loopback names the master listens on (a node may use any of them).
    """

    def __init__(self, settled: bool = True, listen: tuple[str, ...] = ("master",),
                 **master: Any) -> None:
        self.clock = Clock()
        self.refusals: dict[int, list[str]] = {}
        self.listen = listen
        self.master_kwargs = master
        self.master_ports: list[Any] = []
        self.start_master()
        if settled:
            self.settle(master.get("auto_grace", 2.0) + 0.1)

    @property
    def master_port(self) -> Any:
        return self.master_ports[0] if self.master_ports else None

    def start_master(self) -> MasterService:
        self.master = MasterService(InMemoryRegistry(), self.clock, SECRET, **self.master_kwargs)
        for name in self.listen:
            serverFromString(self.clock, f"loopback:{name}").listen(self.master).addCallback(
                self.master_ports.append)
        self.settle()
        return self.master

    def kill_master(self) -> None:
        """Like SIGKILL: the port goes, every connection is cut."""
        ports, self.master_ports = self.master_ports, []
        for port in ports:
            port.stopListening()
        for name in self.listen:
            for connection in network(self.clock).connections_to(name):
                connection.cut("master killed")
        self.settle()

    def node(self, harbor: int, secret: bytes = SECRET, name: str | None = None,
             master: str = "loopback:master", request_timeout: float = 5.0,
             **kwargs: Any) -> Node:
        node = Node(harbor, self.clock, secret, **kwargs)
        node.listen(f"loopback:h{harbor}-{node.incarnation}")
        endpoint = f"loopback:h{harbor}-{node.incarnation}"
        node.join_master(master, name or f"n{harbor}@test", endpoint,
                         request_timeout=request_timeout,
                         on_refused=self.refusals.setdefault(harbor, []).append)
        self.settle()
        return node

    def settle_until(self, condition: Any, limit: float, step: float = 0.05) -> float:
        """Advance in steps until ``condition()``; the seconds it took (fails after limit)."""
        start = self.clock.seconds()
        self.clock.advance(0)
        while not condition():
            assert self.clock.seconds() - start < limit, f"not within {limit} s"
            self.clock.advance(step)
        return self.clock.seconds() - start

    def kill_node(self, node):
        node.router.stopping = True
        for port in node._ports:
            port.stopListening()
        node.master._service.stopService()  # the process is gone: no reconnecting
        node.master.protocol.transport.connection.cut("node killed")
        for link in list(node.router.links):
            link.transport.connection.cut("node killed")
        self.settle()

    def settle(self, seconds: float = 0.0) -> None:
        self.clock.advance(0)
        step = 0.05
        for _ in range(int(seconds / step)):
            self.clock.advance(step)
        self.clock.advance(0)


def test_interfaces():
    cluster = Cluster()
    node = cluster.node(1)
    assert verifyObject(IMasterService, cluster.master)
    assert verifyObject(IMasterClient, node.master)
    assert verifyObject(IMasterListener, node.membership)


def test_nodes_join_and_form_a_full_mesh():
    cluster = Cluster()
    nodes = [cluster.node(h) for h in (1, 2, 3, 4)]
    cluster.settle(0.5)
    assert cluster.master.connected() == 4
    table = cluster.master.registry.snapshot()
    assert [r.harbor for r in table.harbors] == [1, 2, 3, 4]
    for node in nodes:
        assert set(node.membership.harbors) == {1, 2, 3, 4} - {node.harbor}
        assert all(node.router.state(h) == "up" for h in node.membership.harbors)
    links = [c for c in network(cluster.clock).connections if c.name != "master"]
    assert len(links) == 4 * 3 // 2


def test_global_names_are_known_everywhere_and_callable_by_name():
    cluster = Cluster()
    a, b = cluster.node(1), cluster.node(2)
    b.spawn(Echo())  # registers ECHO globally
    cluster.settle()
    assert a.membership.names == {"ECHO": 0x02000002}
    d = a.call("ECHO", "hi")
    cluster.settle()
    assert result_of(d) == "hi"


def test_first_writer_wins_and_loser_is_told():
    cluster = Cluster()
    a, b = cluster.node(1), cluster.node(2)
    first = a.register_name("DB", a.spawn(Echo(), ".db"))
    cluster.settle()
    assert result_of(first) is None
    second = b.register_name("DB", b.spawn(Echo(), ".db"))
    cluster.settle()
    assert "already taken by :01000002" in str(failure_of(second, NameConflict).value)
    assert "DB" not in b.names
    assert b.membership.names["DB"] == 0x01000002


def test_unregister_reaches_everyone():
    cluster = Cluster()
    a, b = cluster.node(1), cluster.node(2)
    a.register_name("DB", a.spawn(Echo(), ".db"))
    cluster.settle()
    d = a.unregister_name("DB")
    cluster.settle()
    assert result_of(d) is None
    assert "DB" not in b.membership.names
    assert cluster.master.registry.lookup("DB") is None


def test_a_cache_miss_asks_the_master():
    cluster = Cluster()
    a, b = cluster.node(1), cluster.node(2)
    b.spawn(Echo())
    cluster.settle()
    a.membership.names.clear()
    d = a.call("ECHO", "looked up")
    cluster.settle()
    assert result_of(d) == "looked up"
    missing = a.call("NOBODY", 1)
    cluster.settle()
    assert "NOBODY" in str(failure_of(missing, Exception).value)


def test_a_live_harbor_id_is_refused_with_the_reason_and_nothing_changes():
    cluster = Cluster()
    cluster.node(1)
    before = cluster.master.registry.snapshot()
    impostor = cluster.node(1, name="impostor@test", incarnation=10**15)
    assert cluster.refusals[1] and "held by live node n1@test" in cluster.refusals[1][0]
    assert cluster.master.registry.snapshot() == before
    assert impostor.master is not None and impostor.master.state == "refused"


def test_wrong_secret_is_refused_and_nothing_registered():
    cluster = Cluster()
    cluster.node(1)
    cluster.node(2, secret=b"not the secret, 16+")
    assert "authentication failed" in cluster.refusals[2][0]
    assert [r.harbor for r in cluster.master.registry.snapshot().harbors] == [1]


def test_a_dead_nodes_id_is_free_at_once_and_its_calls_fail_and_names_die():
    cluster = Cluster()
    a, b = cluster.node(1), cluster.node(2)
    parked = b.spawn(Parked(), "PARKED")
    cluster.settle()
    events: list[Any] = []
    a.subscribe(events.append)
    pending = a.call(parked, "x")
    cluster.settle()
    cluster.kill_node(b)
    failure_of(pending, HarborDown)
    assert 2 not in a.membership.harbors
    assert "PARKED" not in a.membership.names
    assert {type(e) for e in events} == {HarborLeft, NameUnbound}
    b2 = cluster.node(2)  # a new incarnation takes the id at once
    assert not cluster.refusals.get(2)
    b2.spawn(Echo())
    cluster.settle(0.5)
    d = a.call("ECHO", "reborn")
    cluster.settle()
    assert result_of(d) == "reborn"
    assert any(isinstance(e, HarborJoined) and e.record.harbor == 2 for e in events)
    assert any(isinstance(e, NameBound) and e.name == "ECHO" for e in events)


def test_master_death_leaves_links_and_calls_alone_and_everyone_rejoins():
    cluster = Cluster()
    a, b = cluster.node(1), cluster.node(2)
    echo = b.spawn(Echo())
    cluster.settle()
    cluster.kill_master()
    d = a.call("ECHO", "no master needed")
    cluster.settle()
    assert result_of(d) == "no master needed"
    assert a.router.state(2) == "up"

    away = a.register_name("LATE", a.spawn(Echo(), ".late"))
    cluster.settle(5.1)  # the bounded wait (the master client's request timeout)
    assert "within 5 s" in str(failure_of(away, MasterUnavailable).value)

    cluster.start_master()
    cluster.settle(1.5)  # reconnect backoff is capped at 0.5 s (plus jitter)
    table = cluster.master.registry.snapshot()
    assert [r.harbor for r in table.harbors] == [1, 2]
    assert table.names == {"ECHO": echo}
    assert a.router.state(2) == "up"

    late = cluster.node(3)  # joined after the restart: reaches the old node by name
    d = late.call("ECHO", "late joiner")
    cluster.settle()
    assert result_of(d) == "late joiner"


def test_silent_node_is_dropped_by_the_master_heartbeat_then_rejoins():
    cluster = Cluster()
    a, b = cluster.node(1), cluster.node(2)
    seen: list[tuple[float, Any]] = []
    a.subscribe(lambda event: seen.append((cluster.clock.seconds(), event)))
    paused_at = cluster.clock.seconds()
    b.master.protocol.transport.connection.pause()
    cluster.settle(4.0)
    left = [t for t, e in seen if isinstance(e, HarborLeft) and e.harbor == 2]
    assert left and 3.0 <= left[0] - paused_at <= 3.1
    # b noticed the silence too, reconnected and joined again; its link to a never dropped
    assert any(isinstance(e, HarborJoined) and e.record.harbor == 2 for _, e in seen)
    assert 2 in [r.harbor for r in cluster.master.registry.snapshot().harbors]
    assert a.router.state(2) == "up"


def test_a_gap_in_the_sequence_fetches_the_table():
    cluster = Cluster()
    a, b = cluster.node(1), cluster.node(2)
    cluster.settle()
    # Skip one event on a's connection only: bind a name without pushing it to a.
    registry = cluster.master.registry
    registry.bind("HIDDEN", 0x02000002, 2)
    b.register_name("SEEN", b.spawn(Echo(), ".seen"))  # pushed with sequence + 2
    cluster.settle()
    assert a.membership.names.get("HIDDEN") == 0x02000002
    assert a.master.sequence == registry.sequence


def test_events_are_encodable():
    cluster = Cluster()
    cluster.node(1)
    table = cluster.master.registry.snapshot()
    for event in (HarborJoined(1, table.harbors[0]), HarborLeft(2, 1, 5, "x"),
                  NameBound(3, "A", 0x01000002), NameUnbound(4, "A", 0x01000002)):
        assert MASTER_CODEC.decode(MASTER_CODEC.encode(event)) == event


def test_auto_harbor_is_assigned_by_the_master_and_kept_across_a_restart():
    cluster = Cluster(settled=False)
    cluster.node(1)
    auto = Node(0, cluster.clock, SECRET)
    auto.listen("loopback:auto")
    joined: list[int] = []
    auto.join_master("loopback:master", "auto@test", "loopback:auto",
                     on_joined=lambda harbor: (joined.append(harbor), auto.spawn(Echo())))
    cluster.settle(1.9)
    assert joined == []  # the master waits out its start-up grace before assigning
    cluster.settle(0.2)
    assert joined == [255] and auto.harbor == 255  # auto ids come from the top
    assert cluster.master.registry.lookup("ECHO") == 0xFF000002
    cluster.kill_master()
    cluster.start_master()
    cluster.settle(1.5)
    assert auto.harbor == 255 and joined == [255]  # re-joined with the id it was given
    assert cluster.master.registry.lookup("ECHO") == 0xFF000002


def test_an_auto_newcomer_right_after_a_master_restart_takes_no_live_id():
    cluster = Cluster()
    a = cluster.node(1)
    cluster.settle(2.1)
    cluster.kill_master()
    cluster.settle(3)  # a's reconnect backoff reaches its 0.5 s cap
    cluster.start_master()
    newcomer = Node(0, cluster.clock, SECRET)
    newcomer.listen("loopback:newcomer")
    newcomer.join_master("loopback:master", "new@test", "loopback:newcomer")
    cluster.settle(3)
    assert newcomer.harbor == 255
    assert not cluster.refusals.get(1)
    assert [r.harbor for r in cluster.master.registry.snapshot().harbors] == [1, 255]
    assert a.master.connected


def test_a_name_refused_at_join_is_dropped_by_the_loser():
    cluster = Cluster()
    a, b = cluster.node(1), cluster.node(2)
    a.register_name("DB", a.spawn(Echo(), ".a"))
    cluster.settle()
    cluster.kill_master()
    b.names["DB"] = b.spawn(Echo(), ".b")  # b claims DB while the master is away
    cluster.start_master()
    cluster.settle(1.5)
    owner = cluster.master.registry.lookup("DB")
    loser = b if owner == a.names.get("DB") else a
    assert "DB" not in loser.names
    assert loser.resolve("DB") == owner


def test_killing_a_service_unregisters_its_global_name():
    cluster = Cluster()
    a, b = cluster.node(1), cluster.node(2)
    handle = a.spawn(Echo())
    cluster.settle()
    assert b.membership.names.get("ECHO") == handle
    a.kill(handle)
    cluster.settle()
    assert cluster.master.registry.lookup("ECHO") is None
    assert "ECHO" not in b.membership.names


def test_a_master_with_sparse_sequences_is_not_asked_for_the_table_at_each_skip():
    """etcd's revisions have holes (other keys use some): a Welcome that says so makes
    the client apply an event further above its sequence as it comes."""
    from skyproto.master.client import JoinInfo, MasterClient
    from skyproto.master.messages import GetTable
    from skyproto.master.registry import Table

    from .test_master_timeouts import Listener

    for dense in (True, False):
        clock = Clock()
        client = MasterClient(clock, "tcp:127.0.0.1:1", SECRET, Listener(),
                              JoinInfo(1, 5, "n1@test", "tcp:127.0.0.1:2"))
        master = FakeMaster(client)
        master.send(Welcome(1, (), Table(10, (), {}), dense=dense))
        master.received()
        master.send(NameBound(17, "SKIPPED", 0x01000002))  # 11..16 were other keys
        asked = [m for m in master.received() if isinstance(m, GetTable)]
        if dense:
            assert asked and "SKIPPED" not in client.names
        else:
            assert not asked and client.names == {"SKIPPED": 0x01000002}
            assert client.sequence == 17


def test_the_table_reply_names_the_store_and_status_shows_it():
    from skyproto.master.messages import GetTable, Observe, TableReply
    from skyproto.web.status import status_object

    for kind in ("memory", "etcd"):
        registry = InMemoryRegistry()
        registry.kind = kind  # what an EtcdRegistry says of itself
        peer = MasterPeer(MasterService(registry, Clock(), SECRET))
        _, proof = peer.authenticate()
        peer.send(Observe(proof, 1.0, 3.0))
        peer.send(GetTable(7))
        (reply,) = [m for m in peer.received() if isinstance(m, TableReply)]
        assert reply.store == kind
        shown = status_object(reply.table, reply.store)
        assert (shown["store"], shown["revision"]) == (kind, reply.table.sequence)
