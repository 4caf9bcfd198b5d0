"""Prometheus collectors that read the daemons' live objects when ``/metrics`` is scraped.

Nothing here is on a hot path: each collector reads counters and state the objects keep
anyway (the node's :class:`skyproto.node.stats.CallStats`, its router's peers, the gate's,
the master's and the mapper's counters) and turns them into metric families. Every
daemon has a ``prometheus_client.CollectorRegistry`` of its own
(:func:`daemon_registry`), so several daemons in one process never collide.

Metric names (all ``skyproto_``; see docs/operations.md for what each means):

* node: ``node_info``, ``calls_total{outcome}``, ``call_duration_seconds`` (histogram),
  ``sends_total{outcome}``, ``pending_calls``, ``messages_handled_total``,
  ``handler_errors_total``, ``services``, ``names{scope}``, ``cluster_harbors``,
  ``cluster_names``, ``harbor_link_state{harbor,state}``, ``harbor_link_silence_seconds
  {harbor}``, ``harbor_pending_calls{harbor}``, ``outbound_queue_bytes{harbor,queue}``,
  ``node_master_connected``, ``node_master_joins_total``, ``host_mapper_registered``,
  ``host_mapper_hosting``;
* gate: ``gate_clients``, ``gate_connections_total{outcome}``, ``gate_evictions_total``,
  ``gate_requests_total{outcome}``, ``gate_requests_in_flight``;
* master: ``master_nodes``, ``master_connections{state}``, ``master_harbors``,
  ``master_names``, ``master_table_sequence``, ``master_events_total``,
  ``master_preauth_failures_total{kind}``;
* mapper (``skymapper``, or a node while it hosts its host's mapper):
  ``mapper_registered_names``, ``mapper_open_connections``, ``mapper_<counter>_total``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Final

import attrs
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..mapper.server import MapperCounters, MapperServerFactory
from ..node.stats import LATENCY_BUCKETS

if TYPE_CHECKING:
    from ..gate import GateFactory
    from ..master.server import MasterService
    from ..node.host_mapper import HostMapper
    from ..node.node import Node

__all__ = [
    "LINK_STATES",
    "GateCollector",
    "MapperCollector",
    "MasterCollector",
    "NodeCollector",
    "daemon_registry",
]

#: the states a harbor link (the router's peer machine) is reported in
LINK_STATES: Final = ("idle", "dialing", "handshaking", "up", "backoff")
#: the states a master session is reported in
MASTER_SESSION_STATES: Final = ("handshaking", "waiting", "joined", "observing", "closing")

_MAPPER_COUNTERS: Final = {
    "connections": "Connections the mapper accepted.",
    "requests": "Complete requests the mapper handled.",
    "registrations": "ALIVE2 registrations the mapper accepted.",
    "unregistrations": "Registrations that ended (connection closed, STOP).",
    "refused": "ALIVE2 requests refused (name taken or invalid).",
    "dropped": "Connections closed without a reply (malformed, forbidden, unknown).",
    "timed_out": "Connections closed by the packet timeout before a whole request.",
    "stopped": "Names removed by STOP_REQ.",
    "kills_refused": "KILL_REQ answered NO.",
    "kills_ignored": "KILL_REQ accepted with nothing to stop.",
}


def daemon_registry(*collectors: Collector, process: bool = True) -> CollectorRegistry:
    """A registry of its own for one daemon, with ``collectors`` and (``process``) the
    standard process, platform and garbage-collector metrics."""
    registry = CollectorRegistry()
    if process:
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            registry.register(standard)
    for collector in collectors:
        registry.register(collector)
    return registry


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _by_label(family: CounterMetricFamily | GaugeMetricFamily,
              values: Iterable[tuple[str, float]]) -> CounterMetricFamily | GaugeMetricFamily:
    for label, value in sorted(values):
        family.add_metric([label], value)
    return family


class NodeCollector(Collector):
    """A node's calls, sends, services, names, links and master connection.

    ``host_mapper`` returns the node's agent for its host's mapper (None without one);
    while that agent hosts the mapper, the mapper's own metrics are included.
    """

    def __init__(self, node: Node,
                 host_mapper: Callable[[], HostMapper | None] = lambda: None) -> None:
        self.node = node
        self.host_mapper = host_mapper

    def collect(self) -> Iterator[Metric]:
        """The node's metrics: identity, calls by outcome and latency, links, queues, services."""
        node = self.node
        stats = node.stats
        info = {"harbor": str(node.harbor), "incarnation": str(node.incarnation)}
        master = node.master
        if master is not None and master.join is not None:
            info["node"] = master.join.node
        yield InfoMetricFamily("skyproto_node", "This node: harbor id, incarnation, name.",
                               value=info)
        yield _by_label(CounterMetricFamily(
            "skyproto_calls", "Calls this node made, by outcome, counted when they end.",
            labels=["outcome"]), stats.calls.items())
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), stats.latency_buckets,
                                strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
        yield HistogramMetricFamily(
            "skyproto_call_duration_seconds",
            "Seconds from a call to its reply or failure, whatever the outcome.",
            buckets=buckets, sum_value=stats.latency_sum)
        yield _by_label(CounterMetricFamily(
            "skyproto_sends", "One-way messages this node sent, by outcome.",
            labels=["outcome"]), stats.sends.items())
        yield _gauge("skyproto_pending_calls", "Calls waiting for their reply.",
                     node.sessions.pending)
        yield _counter("skyproto_messages_handled",
                       "Requests and one-way messages given to this node's services.",
                       stats.handled)
        yield _counter("skyproto_handler_errors",
                       "Messages whose service handler raised or failed.", stats.handler_errors)
        yield _gauge("skyproto_services", "Services running on this node.", len(node.services))
        local = sum(1 for name in node.names if name.startswith("."))
        yield _by_label(GaugeMetricFamily(
            "skyproto_names", "Names this node bound, local (.name) or global.",
            labels=["scope"]), [("local", local), ("global", len(node.names) - local)])
        yield _gauge("skyproto_cluster_harbors",
                     "Other harbors this node knows from the master.",
                     len(node.membership.harbors))
        yield _gauge("skyproto_cluster_names", "Global names this node knows from the master.",
                     len(node.membership.names))
        yield from self._links()
        yield _gauge("skyproto_node_master_connected",
                     "1 while this node is joined to a master, else 0.",
                     1 if master is not None and master.connected else 0)
        yield _counter("skyproto_node_master_joins",
                       "Welcomes from the master (the first join and every re-join).",
                       master.welcomes if master is not None else 0)
        host = self.host_mapper()
        if host is not None:
            yield _gauge("skyproto_host_mapper_registered",
                         "1 while this node is registered with its host's mapper.",
                         1 if host.registered else 0)
            yield _gauge("skyproto_host_mapper_hosting",
                         "1 while this node runs its host's mapper itself.",
                         1 if host.hosting else 0)
            server = host.server
            if server is not None:
                yield from MapperCollector(server).collect()

    def _links(self) -> Iterator[Metric]:
        node = self.node
        now = node.reactor.seconds()
        states = GaugeMetricFamily(
            "skyproto_harbor_link_state",
            "1 for the state each harbor's link is in (idle, dialing, handshaking, up, "
            "backoff), 0 for the others.", labels=["harbor", "state"])
        silence = GaugeMetricFamily(
            "skyproto_harbor_link_silence_seconds",
            "Seconds since the last byte from each linked harbor (heartbeats arrive every "
            "heartbeat interval; the link drops after the heartbeat timeout).",
            labels=["harbor"])
        pending = GaugeMetricFamily("skyproto_harbor_pending_calls",
                                    "Calls waiting for a reply from each harbor.",
                                    labels=["harbor"])
        queued = GaugeMetricFamily(
            "skyproto_outbound_queue_bytes",
            "Bytes waiting to be sent to each harbor: queue=connecting while its link comes "
            "up, queue=link beyond the socket's own buffer.", labels=["harbor", "queue"])
        for harbor, peer in sorted(node.router.peers.items()):
            label = str(harbor)
            state = peer.state
            for each in LINK_STATES:
                states.add_metric([label, each], 1 if each == state else 0)
            link = peer.link
            heard = _last_heard(link)
            if heard is not None and getattr(link, "up", False):
                silence.add_metric([label], max(0.0, now - heard))
            pending.add_metric([label], node.sessions.pending_to(harbor))
            queued.add_metric([label, "connecting"], peer.core.queued_bytes)
            queued.add_metric([label, "link"], getattr(link, "held_bytes", 0) if link else 0)
        yield from (states, silence, pending, queued)


def _last_heard(link: object) -> float | None:
    """When a link last heard its peer (its heartbeat timer's clock), if it tells."""
    heard = getattr(link, "last_heard", None)
    if heard is None:
        heard = getattr(getattr(link, "_heartbeat", None), "last_heard", None)
    return heard if isinstance(heard, int | float) else None


class GateCollector(Collector):
    """A gate's clients and requests."""

    def __init__(self, gate: GateFactory) -> None:
        self.gate = gate

    def collect(self) -> Iterator[Metric]:
        """The gate's metrics: clients, connections, evictions, requests."""
        gate = self.gate
        yield _gauge("skyproto_gate_clients", "Clients connected to the gate.", len(gate.clients))
        yield _by_label(CounterMetricFamily(
            "skyproto_gate_connections",
            "Client connections: accepted, or refused because every client awaited replies.",
            labels=["outcome"]), [("accepted", gate.accepted), ("refused", gate.refused)])
        yield _counter("skyproto_gate_evictions",
                       "Idle clients closed to make room for new ones.", gate.evicted)
        yield _by_label(CounterMetricFamily(
            "skyproto_gate_requests",
            "Client requests: answered (the service replied), failed (the call failed: "
            "the service raised, timed out or was unreachable), malformed.",
            labels=["outcome"]),
            [("answered", gate.requests_answered), ("failed", gate.requests_failed),
             ("malformed", gate.requests_malformed)])
        yield _gauge("skyproto_gate_requests_in_flight", "Client requests awaiting replies.",
                     sum(len(client.replies) for client in list(gate.clients)))


class MasterCollector(Collector):
    """The master's nodes, connections and table."""

    def __init__(self, master: MasterService) -> None:
        self.master = master
        self._first_sequence = master.registry.sequence

    def collect(self) -> Iterator[Metric]:
        """The master's metrics: nodes, connections by state, names, groups, failures before
        authentication."""
        master = self.master
        yield _gauge("skyproto_master_nodes", "Nodes joined to this master.", len(master.joined))
        states = Counter(connection.state for connection in list(master.connections))
        yield _by_label(GaugeMetricFamily(
            "skyproto_master_connections", "Connections to the master, by session state.",
            labels=["state"]), [(state, states.get(state, 0))
                                for state in MASTER_SESSION_STATES])
        table = master.registry.snapshot()
        yield _gauge("skyproto_master_harbors", "Harbors in the master's table.",
                     len(table.harbors))
        yield _gauge("skyproto_master_names", "Global names in the master's table.",
                     len(table.names))
        yield _gauge("skyproto_master_table_sequence",
                     "The sequence number of the table's last change.", table.sequence)
        yield _counter("skyproto_master_events",
                       "Changes (harbor up/down, name bound/removed) pushed since this "
                       "master started.", max(0, table.sequence - self._first_sequence))
        yield _by_label(CounterMetricFamily(
            "skyproto_master_preauth_failures",
            "Connections that failed before proving the secret, by kind.", labels=["kind"]),
            master.preauth_failures.items())


class MapperCollector(Collector):
    """A port mapper's registrations and what it has counted."""

    def __init__(self, mapper: MapperServerFactory) -> None:
        self.mapper = mapper

    def collect(self) -> Iterator[Metric]:
        """The mapper's metrics: registered names, connections and request counters."""
        mapper = self.mapper
        yield _gauge("skyproto_mapper_registered_names", "Node names registered now.",
                     len(mapper.table))
        yield _gauge("skyproto_mapper_open_connections", "Connections open now.",
                     len(mapper.connections))
        counters = mapper.counters
        for field in attrs.fields(MapperCounters):
            yield _counter(f"skyproto_mapper_{field.name}",
                           _MAPPER_COUNTERS.get(field.name, field.name.replace("_", " ")),
                           getattr(counters, field.name))
