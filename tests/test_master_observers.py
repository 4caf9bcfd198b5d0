"""Observers of the master (issue 15): ``skyproto services`` relayed to a node over its own
connection, and ``skyproto status --watch`` (the table, then every change pushed)."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock
from zope.interface import implementer

from skyproto import cli
from skyproto.errors import MasterUnavailable, ProtocolError, ServicesUnavailable
from skyproto.interfaces import IMasterListener
from skyproto.master.client import MasterClient
from skyproto.master.messages import (
    MASTER_CODEC,
    ListServices,
    MasterHeartbeat,
    QueryServices,
    ServiceInfo,
    ServicesReply,
    ServicesReport,
    Watch,
)
from skyproto.master.registry import (
    GroupJoined,
    GroupLeft,
    HarborJoined,
    HarborLeft,
    HarborRecord,
    NameBound,
    NameUnbound,
    Table,
)
from skyproto.services import Echo
from skyproto.wire.codec import encode_cbor

from .cluster import SECRET, Parked, failure_of, result_of
from .test_master import Cluster, MasterPeer

ECHO_INFO = ServiceInfo(0x01000002, "Echo", (".echo", "ECHO"), ("workers",), 3)


# --- codec ------------------------------------------------------------------------------

@pytest.mark.parametrize("message", [
    Watch(7),
    ListServices(1, 3, 2.5),
    QueryServices(0x7FFFFFFF),
    ServicesReport(4, (ECHO_INFO, ServiceInfo(0x01000003, "Parked", (), (), 0))),
    ServicesReport(4, ()),
    ServicesReply(1, "", 1, "alpha@db1", (ECHO_INFO,)),
    ServicesReply(2, "harbor 9 is not in the master's table", 9, "", ()),
])
def test_new_messages_round_trip(message: object) -> None:
    assert MASTER_CODEC.decode(MASTER_CODEC.encode(message)) == message


def test_a_services_reply_is_the_documented_array() -> None:
    assert MASTER_CODEC.encode(ServicesReport(4, (ECHO_INFO,))) == encode_cbor(
        [19, 4, [[0x01000002, "Echo", [".echo", "ECHO"], ["workers"], 3]]])


@pytest.mark.parametrize("item", [
    [16],  # Watch without its request
    [16, "1"],
    [17, 1, 3, float("nan")],
    [17, 1, 3, float("inf")],
    [17, 1, 3, -1.0],
    [17, 1, "3", 1.0],
    [18, 1, 2],
    [19, 4, [[0x01000002, "Echo", [".echo"], ["workers"], -1]]],  # a negative queue
    [19, 4, [[0x01000002, "Echo", [".echo"], ["workers"]]]],  # a field short
    [19, 4, [[0x01000002, "Echo", ".echo", [], 0]]],  # names not an array
    [19, 4, {"a": 1}],
    [26, 1, "", 1, "n@h"],
    [26, 1, 0, 1, "n@h", []],
])
def test_malformed_new_messages_are_protocol_errors(item: list[Any]) -> None:
    with pytest.raises(ProtocolError):
        MASTER_CODEC.decode(encode_cbor(item))


# --- the node's side ----------------------------------------------------------------------

def test_a_node_describes_its_services_names_groups_and_queue() -> None:
    cluster = Cluster()
    node = cluster.node(1)
    echo = node.spawn(Echo())  # ECHO, global
    node.register_name(".echo", echo)
    parked = node.spawn(Parked(), ".parked")
    node.join_group("workers", echo)
    node.join_group("idle", parked)
    cluster.settle()
    for n in range(3):
        node.send(echo, n)  # waiting in the run queue until the reactor turns
    described = node.describe_services()
    assert described == [ECHO_INFO, ServiceInfo(parked, "Parked", (".parked",), ("idle",), 0)]
    cluster.settle()
    assert [s.queue for s in node.describe_services()] == [0, 0]


# --- the relay through the master ---------------------------------------------------------

def observer(cluster: Cluster, listener: Any = None, timeout: float = 5.0) -> MasterClient:
    client = MasterClient(cluster.clock, "loopback:master", SECRET, listener or cli._Observer(),
                          request_timeout=timeout)
    client.start()
    cluster.settle()
    assert client.connected
    return client


def test_the_master_relays_a_list_of_services_from_the_node() -> None:
    cluster = Cluster()
    node = cluster.node(1, name="alpha@db1")
    echo = node.spawn(Echo())
    node.register_name(".echo", echo)
    node.join_group("workers", echo)
    cluster.settle()
    client = observer(cluster)
    asked = client.list_services(1)
    cluster.settle()
    reply = result_of(asked)
    assert reply == ServicesReply(1, "", 1, "alpha@db1",
                                  (ServiceInfo(echo, "Echo", (".echo", "ECHO"), ("workers",),
                                               0),))
    assert not cluster.master.queries
    assert cli.services_lines(reply) == [
        "harbor 1 (alpha@db1): 1 service",
        "handle    service names      groups  queue",
        ":01000002 Echo    .echo,ECHO workers 0",
    ]
    assert cli.services_object(reply) == {
        "harbor": 1, "node": "alpha@db1",
        "services": [{"handle": echo, "service": "Echo", "names": [".echo", "ECHO"],
                      "groups": ["workers"], "queue": 0}]}


def test_an_unknown_harbor_is_one_clear_error() -> None:
    cluster = Cluster()
    cluster.node(1)
    client = observer(cluster)
    asked = client.list_services(7)
    cluster.settle()
    error = failure_of(asked, ServicesUnavailable).value
    assert str(error) == "harbor 7 is not in the master's table"


def fired(d: Any) -> list[Any]:
    """What ``d`` fires with, once it does (it passes on unchanged)."""
    box: list[Any] = []

    def keep(result: Any) -> Any:
        box.append(result)
        return result

    d.addBoth(keep)
    return box


def silent_node(cluster: Cluster, harbor: int = 3) -> MasterPeer:
    """A joined node driven by hand: it answers nothing unless told."""
    peer = MasterPeer(cluster.master)
    peer.join(harbor, node="mute@db1")
    assert cluster.master.joined[harbor] is peer.connection
    return peer


def test_a_silent_node_times_out_and_its_late_report_is_dropped() -> None:
    cluster = Cluster()
    peer = silent_node(cluster)
    client = observer(cluster)
    asked = client.list_services(3, timeout=2.5)  # the master waits 80 %: 2 s
    outcome = fired(asked)
    cluster.settle()
    (query,) = peer.received()
    assert isinstance(query, QueryServices)
    cluster.clock.advance(1.9)
    peer.send(MasterHeartbeat())  # alive, just not answering
    cluster.settle()
    assert not outcome
    cluster.clock.advance(0.2)
    cluster.settle()
    error = failure_of(asked, ServicesUnavailable).value
    assert str(error) == "harbor 3 (mute@db1) did not answer within 2 s"
    assert not cluster.master.queries
    peer.send(ServicesReport(query.query, ()))  # too late: nobody waits for it
    cluster.settle()
    assert peer.connection.state == "joined"


def test_a_node_that_leaves_before_answering_fails_the_request() -> None:
    cluster = Cluster()
    peer = silent_node(cluster)
    client = observer(cluster)
    asked = client.list_services(3)
    cluster.settle()
    peer.transport.loseConnection()
    peer.connection.connectionLost()
    cluster.settle()
    assert str(failure_of(asked, ServicesUnavailable).value) == \
        "harbor 3 left before it answered"


def test_a_report_for_another_nodes_query_is_ignored() -> None:
    cluster = Cluster()
    asked_peer = silent_node(cluster, 3)
    other = silent_node(cluster, 4)
    client = observer(cluster)
    asked = client.list_services(3)
    outcome = fired(asked)
    cluster.settle()
    (query,) = [m for m in asked_peer.received() if isinstance(m, QueryServices)]
    other.send(ServicesReport(query.query, (ECHO_INFO,)))
    cluster.settle()
    assert not outcome
    asked_peer.send(ServicesReport(query.query, ()))
    cluster.settle()
    assert result_of(asked) == ServicesReply(1, "", 3, "mute@db1", ())


def test_an_observer_that_goes_forgets_its_queries() -> None:
    cluster = Cluster()
    peer = silent_node(cluster)
    client = observer(cluster)
    client.list_services(3).addErrback(lambda _: None)
    cluster.settle()
    assert cluster.master.queries
    client.stop()
    cluster.settle()
    assert not cluster.master.queries
    (query,) = peer.received()
    peer.send(ServicesReport(query.query, ()))  # answers nobody, harms nothing
    cluster.settle()
    assert peer.connection.state == "joined"


def test_only_observers_ask_for_services_and_watch() -> None:
    for message in (ListServices(1, 3, 1.0), Watch(1)):
        cluster = Cluster()
        peer = silent_node(cluster)
        peer.send(message)
        cluster.settle()
        assert peer.connection.state == "closing"
        assert peer.connection.drop_reason == \
            f"protocol error: unexpected {type(message).__name__}"
        assert peer.transport.disconnecting


# --- watching -----------------------------------------------------------------------------

@implementer(IMasterListener)
class Recorder:
    """Every notification an observer's client gives."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.tables: list[Table] = []
        self.lost: list[str] = []

    def master_table(self, table: Any, first: bool) -> None:
        self.tables.append(table)

    def master_event(self, event: Any) -> None:
        self.events.append(event)

    def master_refused(self, reason: str) -> None:
        raise AssertionError(reason)

    def master_lost(self, reason: str) -> None:
        self.lost.append(reason)


def test_a_watcher_gets_the_table_then_every_change_in_order() -> None:
    cluster = Cluster()
    cluster.node(1, name="alpha@db1")
    recorder = Recorder()
    client = observer(cluster, recorder)
    watching = client.watch()
    cluster.settle()
    table = result_of(watching)
    assert [r.harbor for r in table.harbors] == [1]
    assert recorder.events == []

    beta = cluster.node(2, name="beta@db1")
    echo = beta.spawn(Echo())
    cluster.settle()
    beta.join_group("workers", echo)
    cluster.settle()
    beta.unregister_name("ECHO")
    cluster.settle()
    cluster.kill_node(beta)
    cluster.settle(4)  # the master notices at once (the connection is cut)
    kinds = [(type(e).__name__, getattr(e, "name", getattr(e, "group", None)))
             for e in recorder.events]
    # a harbor's end comes first, then what ended with it (its memberships)
    assert kinds == [("HarborJoined", None), ("NameBound", "ECHO"), ("GroupJoined", "workers"),
                     ("NameUnbound", "ECHO"), ("HarborLeft", None), ("GroupLeft", "workers")]
    sequences = [e.sequence for e in recorder.events]
    assert sequences == list(range(table.sequence + 1, table.sequence + 1 + len(sequences)))
    assert [r.harbor for r in client.table().harbors] == [1]
    assert recorder.lost == []


def test_an_observer_that_does_not_watch_is_pushed_nothing() -> None:
    cluster = Cluster()
    recorder = Recorder()
    client = observer(cluster, recorder)
    table = client.get_table()
    cluster.settle()
    result_of(table)
    cluster.node(1)
    cluster.settle()
    assert recorder.events == []
    assert not cluster.master.watchers


def test_a_watcher_hears_when_the_master_goes() -> None:
    cluster = Cluster()
    recorder = Recorder()
    client = observer(cluster, recorder)
    watching = client.watch()
    cluster.settle()
    result_of(watching)
    assert cluster.master.watchers
    cluster.kill_master()
    assert len(recorder.lost) == 1
    client.stop()
    cluster.settle()


def test_the_cli_watcher_prints_each_change_and_fails_when_the_master_goes(
        capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    clock.advance(1_700_000_000.25)
    from twisted.internet.defer import Deferred

    for as_json in (False, True):
        watcher = cli._Watcher(clock, as_json, "loopback:master")
        watcher.done = Deferred()
        record = HarborRecord(2, "beta@db1", "tcp:127.0.0.1:7002", 5, 1.5)
        watcher.master_event(HarborJoined(8, record))
        watcher.master_event(NameBound(9, "ECHO", 0x02000002))
        watcher.master_lost("connection lost")
        error = failure_of(watcher.done, MasterUnavailable).value
        assert str(error) == "lost the master at loopback:master: connection lost"
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [
        "2023-11-14 22:13:20.250 harbor 2 joined: beta@db1 at tcp:127.0.0.1:7002 "
        "(incarnation 5)",
        "2023-11-14 22:13:20.250 name ECHO bound to :02000002",
    ]
    import json

    assert [json.loads(line) for line in lines[2:]] == [
        {"time": 1_700_000_000.25, "event": "harbor_joined", "sequence": 8, "harbor": 2,
         "name": "beta@db1", "endpoint": "tcp:127.0.0.1:7002", "incarnation": 5,
         "up_since": 1.5},
        {"time": 1_700_000_000.25, "event": "name_bound", "sequence": 9, "name": "ECHO",
         "handle": 0x02000002},
    ]


def test_every_event_has_words_and_a_table_diff_gives_the_missed_events() -> None:
    record = HarborRecord(2, "beta@db1", "tcp:127.0.0.1:7002", 5, 1.5)
    assert [cli.event_line(e) for e in (
        HarborLeft(3, 2, 5, "silent"), NameUnbound(4, "X", 0x02000002),
        GroupJoined(5, "g", 0x02000002), GroupLeft(6, "g", 0x02000002))] == [
        "harbor 2 left: silent (incarnation 5)", "name X unbound from :02000002",
        "group g joined by :02000002", "group g left by :02000002"]
    old = Table(1, (record,), {"X": 0x02000002}, {"g": (0x02000002,)})
    new = Table(9, (attrs_evolve(record, harbor=3),), {"Y": 0x03000002}, {"h": (0x03000002,)})
    assert [type(e).__name__ for e in cli.table_changes(old, new)] == [
        "HarborLeft", "HarborJoined", "NameUnbound", "NameBound", "GroupLeft", "GroupJoined"]
    assert cli.table_changes(new, new) == []


def attrs_evolve(record: HarborRecord, **changes: Any) -> HarborRecord:
    import attrs

    return attrs.evolve(record, **changes)
