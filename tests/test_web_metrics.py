"""/metrics: the collectors read live nodes, gates, masters and mappers; the exposition
parses with prometheus_client's own parser and its counters move under load."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from skyproto.errors import CallTimeout, HarborDown, NoSuchService, RemoteError
from skyproto.gate import GateConfig, GateFactory
from skyproto.mapper.server import MapperServerFactory
from skyproto.node.service import Service
from skyproto.node.stats import LATENCY_BUCKETS, CallStats, outcome_of
from skyproto.services import Echo, SimpleDB
from skyproto.testing import InMemoryCluster
from skyproto.web.metrics import (
    LINK_STATES,
    GateCollector,
    MapperCollector,
    MasterCollector,
    NodeCollector,
    daemon_registry,
)
from skyproto.web.site import master_web, node_web


class Parked(Service):
    """Answers only when told: its calls stay pending."""

    default_name = "PARKED"

    def __init__(self) -> None:
        self.waiting: list[Deferred[Any]] = []

    def receive(self, source: int, session: int, payload: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.waiting.append(d)
        return d


class Broken(Service):
    default_name = "BROKEN"

    def receive(self, source: int, session: int, payload: Any) -> Any:
        raise ValueError("broken on purpose")


def scrape(registry: Any) -> dict[str, Any]:
    """Every family of the text exposition, parsed back by prometheus_client."""
    text = generate_latest(registry).decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert families, text
    return families


def value(families: dict[str, Any], sample: str, **labels: str) -> float:
    """The one sample called ``sample`` with these labels (KeyError if there is none)."""
    family = sample.removesuffix("_total").removesuffix("_bucket").removesuffix(
        "_count").removesuffix("_sum")
    found = [s.value for s in families[family].samples
             if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]
    if len(found) != 1:
        raise KeyError(f"{sample}{labels}: {len(found)} samples")
    return float(found[0])


def outcome(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0]


@pytest.fixture
def cluster() -> InMemoryCluster:
    return InMemoryCluster()


def test_call_stats_count_by_outcome_with_latency_in_buckets() -> None:
    from twisted.internet.task import Clock

    clock = Clock()
    stats = CallStats(clock)
    started = clock.seconds()
    clock.advance(0.003)
    stats.call_finished(None, started)
    failure = Failure(CallTimeout("late"))
    assert stats.call_failed(failure, started) is failure  # an errback: passes it on
    clock.advance(100)
    stats.call_finished(RemoteError("ValueError", "no"), started)
    assert stats.calls == {"ok": 1, "timeout": 1, "remote_error": 1}
    assert stats.calls_finished == 3
    three_ms = LATENCY_BUCKETS.index(0.005)  # 0.003 s lands in the bucket of le=0.005
    assert stats.latency_buckets[three_ms] == 2
    assert stats.latency_buckets[-1] == 1  # over the last bound: +Inf
    assert stats.latency_sum == pytest.approx(0.006 + 100.003)
    stats.sent()
    stats.sent(HarborDown("gone"))
    assert stats.sends == {"ok": 1, "harbor_down": 1}
    assert outcome_of(NoSuchService("x")) == "no_such_service"
    assert outcome_of(KeyError("x")) == "error"


def test_node_metrics_move_with_calls_sends_and_failures(cluster: InMemoryCluster) -> None:
    parked = Parked()
    a = cluster.add_node(1, [Echo()])
    b = cluster.add_node(2, [parked, Broken()])
    registry = daemon_registry(NodeCollector(a))
    before = scrape(registry)
    assert not before["skyproto_calls"].samples  # no call has ended yet
    assert value(before, "skyproto_call_duration_seconds_count") == 0
    assert value(before, "skyproto_node_info", harbor="1", node="n1@testing") == 1
    assert value(before, "skyproto_node_master_connected") == 1
    assert value(before, "skyproto_node_master_joins_total") == 1
    assert value(before, "skyproto_harbor_link_state", harbor="2", state="up") == 1
    for state in LINK_STATES:
        if state != "up":
            assert value(before, "skyproto_harbor_link_state", harbor="2", state=state) == 0

    calls = []
    for n in range(20):  # a local call and a remote one each time
        calls += [a.call("ECHO", n), a.call("PARKED", n, timeout=1)]
    cluster.settle()
    parked.waiting[0].callback("late answer")  # one of the remote ones is answered
    cluster.settle()
    pending = scrape(registry)
    assert value(pending, "skyproto_calls_total", outcome="ok") == 21
    assert value(pending, "skyproto_pending_calls") == 19
    assert value(pending, "skyproto_harbor_pending_calls", harbor="2") == 19
    cluster.settle(1.1)  # the other 19 time out
    assert sum(isinstance(outcome(d), Failure) for d in calls) == 19
    broken, nobody = a.call("BROKEN", "x"), a.call("NOBODY", 1)  # NOBODY: ask the master
    cluster.settle()
    assert outcome(broken).check(RemoteError) and outcome(nobody).check(NoSuchService)
    a.send("ECHO", "one way")
    with pytest.raises(NoSuchService):
        a.send(0x01000077, "to nobody")
    cluster.settle()
    after = scrape(registry)
    assert value(after, "skyproto_calls_total", outcome="ok") == 21
    assert value(after, "skyproto_calls_total", outcome="timeout") == 19
    assert value(after, "skyproto_calls_total", outcome="remote_error") == 1
    assert value(after, "skyproto_calls_total", outcome="no_such_service") == 1
    assert value(after, "skyproto_pending_calls") == 0
    assert value(after, "skyproto_sends_total", outcome="ok") == 1
    assert value(after, "skyproto_sends_total", outcome="no_such_service") == 1
    count = value(after, "skyproto_call_duration_seconds_count")
    assert count == 42 == sum(s.value for s in after["skyproto_calls"].samples)
    assert value(after, "skyproto_call_duration_seconds_bucket", le="+Inf") == count
    assert value(after, "skyproto_call_duration_seconds_bucket", le="0.5") == 23
    assert value(after, "skyproto_call_duration_seconds_sum") >= 19 * 1.0  # the timeouts
    # a's own services handled the 20 local calls and the one-way message
    assert value(after, "skyproto_messages_handled_total") == 21
    assert value(after, "skyproto_handler_errors_total") == 0
    on_b = scrape(daemon_registry(NodeCollector(b), process=False))
    assert value(on_b, "skyproto_messages_handled_total") == 21
    assert value(on_b, "skyproto_handler_errors_total") == 1
    assert value(after, "skyproto_services") == 1
    assert value(after, "skyproto_names", scope="global") == 1
    assert value(after, "skyproto_names", scope="local") == 0
    assert value(after, "skyproto_cluster_harbors") == 1
    assert value(after, "skyproto_cluster_names") == 3  # ECHO, PARKED, BROKEN


def test_every_call_is_counted_once_whichever_way_it_ends(cluster: InMemoryCluster) -> None:
    """The session table counts calls that got a session; the node counts those that ended
    before one (no such name, a lookup that failed); a call by a name looked up first is
    counted once, not by both."""
    parked = Parked()
    a = cluster.add_node(1)
    cluster.add_node(2, [parked, Echo()])
    del a.membership.names["ECHO"]  # the next call asks the master first
    looked_up = a.call("ECHO", "hello")
    cancelled = a.call("PARKED", 1)
    cluster.settle()
    cancelled.cancel()
    a.master = None  # without a master a missing name fails at once
    missing = a.call("NOBODY", 1)
    cluster.settle()
    assert outcome(looked_up) == "hello"
    assert outcome(cancelled).check(CancelledError)
    assert outcome(missing).check(NoSuchService)
    assert a.stats.calls == {"ok": 1, "cancelled": 1, "no_such_service": 1}
    assert sum(a.stats.latency_buckets) == 3
    assert a.sessions.pending == 0


def test_link_silence_grows_while_the_peer_is_quiet(cluster: InMemoryCluster) -> None:
    a = cluster.add_node(1)
    b = cluster.add_node(2)
    registry = daemon_registry(NodeCollector(a), process=False)
    assert value(scrape(registry), "skyproto_harbor_link_silence_seconds", harbor="2") < 1.1
    for connection in cluster.network.connections_to("h1-1"):  # b dialled a
        connection.pause()
    cluster.settle(2)
    quiet = value(scrape(registry), "skyproto_harbor_link_silence_seconds", harbor="2")
    assert 1.9 <= quiet <= 3
    cluster.crash(b)
    gone = scrape(registry)
    assert not [s for s in gone["skyproto_harbor_link_silence_seconds"].samples
                if s.labels["harbor"] == "2"]


def test_a_link_coming_up_shows_its_state_and_queued_bytes(cluster: InMemoryCluster) -> None:
    a = cluster.add_node(1)
    registry = daemon_registry(NodeCollector(a), process=False)
    a.add_peer(7, "loopback:nobody-listens-here")  # dialling now, refused a moment later
    a.send(0x07000002, "x" * 100)
    dialing = scrape(registry)
    assert value(dialing, "skyproto_harbor_link_state", harbor="7", state="dialing") == 1
    assert value(dialing, "skyproto_harbor_link_state", harbor="7", state="up") == 0
    assert value(dialing, "skyproto_outbound_queue_bytes", harbor="7",
                 queue="connecting") > 100
    assert value(dialing, "skyproto_outbound_queue_bytes", harbor="7", queue="link") == 0
    cluster.settle()
    refused = scrape(registry)
    assert value(refused, "skyproto_harbor_link_state", harbor="7", state="backoff") == 1
    assert value(refused, "skyproto_outbound_queue_bytes", harbor="7", queue="connecting") == 0
    with pytest.raises(HarborDown):
        a.send(0x07000002, "y")
    assert value(scrape(registry), "skyproto_sends_total", outcome="harbor_down") == 1


def test_master_metrics_count_nodes_names_and_events(cluster: InMemoryCluster) -> None:
    assert cluster.master is not None
    registry = daemon_registry(MasterCollector(cluster.master), process=False)
    empty = scrape(registry)
    assert value(empty, "skyproto_master_nodes") == 0
    assert value(empty, "skyproto_master_events_total") == 0
    cluster.add_node(1, [Echo()])
    b = cluster.add_node(2)
    joined = scrape(registry)
    assert value(joined, "skyproto_master_nodes") == 2
    assert value(joined, "skyproto_master_connections", state="joined") == 2
    assert value(joined, "skyproto_master_harbors") == 2
    assert value(joined, "skyproto_master_names") == 1
    assert value(joined, "skyproto_master_events_total") == 3  # two joins, one name
    cluster.crash(b)
    left = scrape(registry)
    assert value(left, "skyproto_master_nodes") == 1
    assert value(left, "skyproto_master_events_total") == 4
    assert value(left, "skyproto_master_table_sequence") >= 4


class _LineClient(LineOnlyReceiver):
    delimiter = b"\n"

    def __init__(self) -> None:
        self.lines: list[str] = []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line.decode())


def test_gate_metrics_count_clients_and_requests_by_outcome(cluster: InMemoryCluster) -> None:
    cluster.add_node(1, [SimpleDB()])
    node = cluster.add_node(2)
    gate = GateFactory(node, GateConfig())
    serverFromString(cluster.clock, "loopback:gate").listen(gate)
    registry = daemon_registry(GateCollector(gate), process=False)
    connecting = clientFromString(cluster.clock, "loopback:gate").connect(
        Factory.forProtocol(_LineClient))
    cluster.settle()
    client = outcome(connecting)
    assert value(scrape(registry), "skyproto_gate_clients") == 1
    for line in ("SET k v", "GET k", "", "FROB"):
        client.sendLine(line.encode())
    cluster.settle()
    assert client.lines == ["OK", "VALUE v", "ERROR empty request",
                            "ERROR unknown command FROB"]
    cluster.crash(cluster.nodes[1])
    client.sendLine(b"GET k")
    cluster.settle()
    assert client.lines[-1].startswith("ERROR ")
    families = scrape(registry)
    assert value(families, "skyproto_gate_connections_total", outcome="accepted") == 1
    assert value(families, "skyproto_gate_requests_total", outcome="answered") == 2
    assert value(families, "skyproto_gate_requests_total", outcome="malformed") == 1
    # FROB (SIMPLEDB raised) and the GET whose SIMPLEDB had gone
    assert value(families, "skyproto_gate_requests_total", outcome="failed") == 2
    assert value(families, "skyproto_gate_requests_in_flight") == 0
    client.transport.loseConnection()
    cluster.settle()
    assert value(scrape(registry), "skyproto_gate_clients") == 0


def test_mapper_metrics_read_its_counters() -> None:
    from twisted.internet.task import Clock

    mapper = MapperServerFactory(Clock(), 4369)
    mapper.counters.registrations = 3
    mapper.counters.refused = 1
    families = scrape(daemon_registry(MapperCollector(mapper), process=False))
    assert value(families, "skyproto_mapper_registrations_total") == 3
    assert value(families, "skyproto_mapper_refused_total") == 1
    assert value(families, "skyproto_mapper_registered_names") == 0


def test_each_daemon_has_a_registry_of_its_own(cluster: InMemoryCluster) -> None:
    a = cluster.add_node(1, [Echo()])
    b = cluster.add_node(2)
    assert cluster.master is not None
    webs = [node_web(a, cluster.clock), node_web(b, cluster.clock),
            master_web(cluster.master)]
    echoed = b.call("ECHO", 1)
    cluster.settle()
    assert outcome(echoed) == 1
    first, second, master = (scrape(web.registry) for web in webs)
    assert value(first, "skyproto_node_info", harbor="1") == 1
    assert value(second, "skyproto_node_info", harbor="2") == 1
    assert "skyproto_master_nodes" not in first
    assert value(master, "skyproto_master_nodes") == 2
    assert value(second, "skyproto_calls_total", outcome="ok") == 1
    assert "process_cpu_seconds" in first  # the standard process metrics, in each
    # a standalone node's registry has the master's families beside its own
    both = scrape(node_web(a, cluster.clock, master=cluster.master).registry)
    assert value(both, "skyproto_master_nodes") == 2 and "skyproto_calls" in both
