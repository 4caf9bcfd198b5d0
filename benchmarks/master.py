"""The master name service at scale: name propagation, re-registration, a 255-node mesh.

Run: ``python benchmarks/master.py [--json] [--only names,reregister,mesh]
[--heartbeat 1,3] [--names-nodes 10,50] [--names-repeats 200] [--reregister-nodes 100]
[--downs 0.1,2,5] [--nodes-mesh 255] [--mesh-heartbeat 5,30] [--mesh-timeout 300]
[--mesh-hold 10] [--cache-endpoints] [--profile FILE]``.

Everything runs in this one process, on the real reactor, over the in-memory ``loopback:``
transport (so every figure is a CPU figure of one process: no socket is involved, and all
nodes and the master share one core):

- ``names``: with N nodes joined to a master and meshed (N in ``--names-nodes``), one node
  registers a new global name (``register_name`` on a service it spawned) and the time runs
  until every node, the registrant included, has it in ``membership.names``. Every node is
  subscribed (``node.subscribe``) and stamps ``time.perf_counter()`` when it sees the
  NameBound; a repeat's time is the latest of the N stamps. ``--names-repeats`` repeats
  (200), each a new name, from node 1, 2, ... in turn, one at a time; p50 / p99 / max in ms.
  The registrant's own ``register_name`` Deferred is timed too (``ack``).
- ``reregister``: ``--reregister-nodes`` nodes (100), each holding one global name, joined
  and meshed; the master is killed (its port stops listening and every connection to it is
  cut, as ``Cluster.kill_master`` does in tests/test_master.py), left down for each of
  ``--downs`` seconds in turn, and replaced by a new MasterService with an empty
  InMemoryRegistry on the same name. The time runs from the restart until the new registry
  lists every harbor and every name (checked every 5 ms). The master clients reconnect on
  their own backoff (Twisted's ClientService with skyproto's policy: 0.1 s * 2**attempt,
  from attempt 1, capped at 1 s, plus 0 to 0.1 s of jitter), so the figure depends on how
  long the master was down.
- ``mesh``: a master and N nodes (``--nodes-mesh``, harbor 1..N; 255 is the protocol's
  maximum) started at once; the time runs until every node has an up link to every other
  (N*(N-1)/2 links), bounded by ``--mesh-timeout``; then the mesh is watched for
  ``--mesh-hold`` seconds (does it stay up, and what do its heartbeats cost). The
  heartbeats of every link and of the master are ``--mesh-heartbeat`` (5 s interval, 30 s
  timeout) in this scenario only: skyproto's defaults (1 s / 3 s) on 32k links in one
  process would keep the reactor busy by themselves. The process's RSS is reported.

``--heartbeat`` sets the heartbeats of the names and reregister scenarios (skyproto's
defaults, 1 s / 3 s). ``--cache-endpoints`` is an experiment, off by default: it memoises
``clientFromString`` as skyproto's router calls it (parsing a ``loopback:`` description
scans Twisted's plugins, about 0.5 ms, and the router parses again at every ``add_peer``
and dial), to show what caching the parsed endpoint in skyproto would change.

With ``--json`` the last line of stdout is one JSON object of the figures (latencies in ms,
durations in s, e.g. ``name_p99_ms_50``, ``reregister_s_100``, ``mesh_s_255``,
``mesh_links_255``, ``maxrss_mb``). ``--profile FILE`` writes cProfile statistics of the
whole run to FILE and prints the top functions to stderr. A scenario that cannot complete
(a cluster that never settles within its bound) is reported with why, and the others run.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import importlib.metadata
import io
import json
import os
import platform
import pstats
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, TimeoutError
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogBeginner
from twisted.python.failure import Failure
from zope.interface import implementer

from skyproto.errors import SkyprotoError
from skyproto.master.registry import Event, InMemoryRegistry, NameBound
from skyproto.master.server import MasterService
from skyproto.node.node import Node
from skyproto.node.service import Service
from skyproto.transports.loopback import network_for

SECRET = b"skyproto master benchmark secret"
TWISTED_VERSION = importlib.metadata.version("twisted")
POLL = 0.005  #: seconds between two checks of a condition (the re-registration figure)
MESH_POLL = 0.05  #: the same for the mesh and the setups (one check walks N*(N-1) peers)
SETUP_TIMEOUT = 120.0  #: seconds for a cluster to form (or to settle again after a restart)
NAME_TIMEOUT = 10.0  #: seconds for one name to reach every node
REREGISTER_TIMEOUT = 60.0  #: seconds for the restarted master to have everything back
TEARDOWN_TIMEOUT = 30.0  #: seconds for a cluster to close every connection
PROGRESS_EVERY = 10.0  #: seconds between two progress lines of the mesh (on stderr)
NAME_TARGET_MS = 50.0  #: the p99 target of the names figure at 50 nodes
NAME_TARGET_NODES = 50
REREGISTER_TARGET_S = 1.0  #: at 100 nodes
REREGISTER_TARGET_NODES = 100


_ADDRESS = re.compile(r"LoopbackAddress\([^)]*\)")
_NUMBERS = re.compile(r"\d+(\.\d+)?")


def _global_reactor() -> Any:
    """The real reactor (epoll on Linux); imported only when the benchmark starts."""
    from twisted.internet import reactor

    return reactor


def _now() -> float:
    return time.perf_counter()


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def maxrss_mb() -> float:
    """The process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """The process's current resident set size, in MiB (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of ``values`` (not empty)."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


async def sleep(reactor: Any, seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def wait_until(reactor: Any, predicate: Callable[[], bool], what: str, timeout: float,
                     poll: float = POLL) -> float:
    """Check ``predicate`` every ``poll`` s; the perf_counter when it was first seen to hold.

    Raises TimeoutError once ``timeout`` seconds have passed without it holding."""
    deadline = _now() + timeout
    while True:
        if predicate():
            return _now()
        if _now() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        await sleep(reactor, poll)


async def wait_for(reactor: Any, deferred: Deferred[Any], what: str, timeout: float) -> Any:
    """The result of ``deferred``, or TimeoutError after ``timeout`` seconds."""
    def late(failure: Failure) -> Failure:
        if failure.check(TimeoutError):
            return Failure(TimeoutError(f"{what}: not within {timeout:g} s"))
        return failure

    return await deferred.addTimeout(timeout, reactor).addErrback(late)


@implementer(ILogObserver)
class LogCounter:
    """Counts the log events of warning level and above, by kind; keeps the first few."""

    def __init__(self, keep: int = 10) -> None:
        self.kinds: dict[str, int] = {}
        self.total = 0
        self.first: list[str] = []
        self.keep = keep

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if not isinstance(level, type(LogLevel.warn)) or level < LogLevel.warn:
            return
        self.total += 1
        text = f"{level.name}: {formatEvent(event)}"
        if len(self.first) < self.keep:
            self.first.append(text[:300])
        kind = _NUMBERS.sub("#", _ADDRESS.sub("<peer>", text))[:120]
        self.kinds[kind] = self.kinds.get(kind, 0) + 1

    def take(self) -> dict[str, int]:
        """The counts by kind since the last take (the 5 commonest, then the rest), reset."""
        kinds, self.kinds = self.kinds, {}
        ranked = sorted(kinds.items(), key=lambda item: -item[1])
        top = dict(ranked[:5])
        if len(ranked) > 5:
            top["(other kinds)"] = sum(count for _, count in ranked[5:])
        return top


def cache_endpoints() -> None:
    """The --cache-endpoints experiment: memoise clientFromString as skyproto's router sees it.

    Reusing an endpoint object for several connects is fine for ``loopback:`` and ``tcp:``
    (their ``connect`` keeps no state). This patches this process only, never a file."""
    import skyproto.node.router as router

    namespace = vars(router)
    parse: Callable[[Any, str], Any] = namespace["clientFromString"]
    cache: dict[tuple[int, str], Any] = {}

    def cached(reactor: Any, description: str) -> Any:
        key = (id(reactor), description)
        endpoint = cache.get(key)
        if endpoint is None:
            endpoint = cache[key] = parse(reactor, description)
        return endpoint

    namespace["clientFromString"] = cached


class Idle(Service):
    """A service that is only there to be named."""

    def receive(self, source: int, session: int, payload: Any) -> Any:
        return None


class Cluster:
    """A master and nodes on the real reactor, over ``loopback:`` names starting with a tag."""

    def __init__(self, reactor: Any, tag: str, heartbeat: tuple[float, float]) -> None:
        self.reactor = reactor
        self.tag = tag
        self.master_name = f"{tag}-master"
        self.heartbeat = heartbeat
        self.registry = InMemoryRegistry()
        self.master: MasterService | None = None
        self.port: IListeningPort | None = None
        self.nodes: list[Node] = []

    async def start_master(self) -> MasterService:
        """A new master with an empty registry, listening on this cluster's master name."""
        self.registry = InMemoryRegistry()
        master = MasterService(self.registry, self.reactor, SECRET,
                               heartbeat_interval=self.heartbeat[0],
                               heartbeat_timeout=self.heartbeat[1])
        endpoint = serverFromString(self.reactor, f"loopback:{self.master_name}")
        self.port = await endpoint.listen(master)
        self.master = master
        return master

    def kill_master(self) -> None:
        """Like SIGKILL: the port goes, every connection to it is cut."""
        assert self.port is not None
        self.port.stopListening()
        self.port = None
        for connection in network_for(self.reactor).connections_to(self.master_name):
            connection.cut("master killed")

    def add_node(self, harbor: int, names: Iterable[str] = ()) -> Node:
        """Start a node (listening, joining the master); ``names`` are global names of an
        Idle service, bound before the join, so that the join itself asserts them."""
        node = Node(harbor, self.reactor, SECRET, heartbeat_interval=self.heartbeat[0],
                    heartbeat_timeout=self.heartbeat[1])
        endpoint = f"loopback:{self.tag}-h{harbor}"
        node.listen(endpoint)
        for name in names:
            node.register_name(name, node.spawn(Idle()))  # no master yet: fires at once
        node.join_master(f"loopback:{self.master_name}", f"n{harbor}@{self.tag}", endpoint)
        self.nodes.append(node)
        return node

    def up_links(self) -> int:
        """Links up, counted at both ends (a full mesh of N has N*(N-1))."""
        return sum(1 for node in self.nodes for peer in node.router.peers.values()
                   if peer.link is not None)

    def settled(self) -> bool:
        """Every node joined, caught up with the master's sequence, and linked to every other."""
        master = self.master
        if master is None or master.connected() != len(self.nodes):
            return False
        sequence = self.registry.sequence
        for node in self.nodes:
            client = node.master
            if client is None or client.protocol is None or client.sequence != sequence:
                return False
        return self.up_links() == len(self.nodes) * (len(self.nodes) - 1)

    def registered(self, names: Iterable[str]) -> bool:
        """The master's registry lists every node and every one of ``names``."""
        registry = self.registry
        return (len(registry.snapshot().harbors) == len(self.nodes)
                and all(registry.lookup(name) is not None for name in names))

    async def stop(self) -> None:
        """Stop every node and the master; wait (bounded) until no connection is left."""
        nodes, self.nodes = self.nodes, []
        stopping: Deferred[Any] = DeferredList([node.stop() for node in nodes])
        await wait_for(self.reactor, stopping, f"{self.tag}: stopping the nodes",
                       TEARDOWN_TIMEOUT)
        if self.port is not None:
            self.port.stopListening()
            self.port = None
        if self.master is not None:
            self.master.close_all()
        network = network_for(self.reactor)
        prefix = f"{self.tag}-"
        await wait_until(
            self.reactor,
            lambda: not any(c.name.startswith(prefix) for c in network.connections),
            f"{self.tag}: closing every connection", TEARDOWN_TIMEOUT, poll=MESH_POLL)
        await sleep(self.reactor, 0.1)  # the connectionLost calls after the last close
        self.master = None
        gc.collect()


# --- names --------------------------------------------------------------------------------


class NameProbe:
    """Subscribed to every node: stamps when each node sees the name being measured."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes
        self.name = ""
        self.handle = 0
        self.seen: dict[int, float] = {}
        self.done: Deferred[None] = Deferred()
        self.wrong = 0  #: NameBound seen while membership.names did not hold it yet
        for index, node in enumerate(nodes):
            node.subscribe(self._callback(index))

    def _callback(self, index: int) -> Callable[[Event], None]:
        def seen(event: Event) -> None:
            if isinstance(event, NameBound) and event.name == self.name:
                stamp = _now()
                if self.nodes[index].membership.names.get(self.name) != self.handle:
                    self.wrong += 1
                self.seen.setdefault(index, stamp)
                if len(self.seen) == len(self.nodes) and not self.done.called:
                    self.done.callback(None)

        return seen

    def arm(self, name: str, handle: int) -> Deferred[None]:
        self.name, self.handle = name, handle
        self.seen = {}
        self.done = Deferred()
        return self.done


def _stamp(_: object, stamps: list[float]) -> None:
    stamps.append(_now())


@dataclass
class NameResult:
    nodes: int
    everyone_ms: list[float] = field(default_factory=list)  #: until the last node had it
    ack_ms: list[float] = field(default_factory=list)  #: until register_name fired
    setup_s: float = 0.0
    wrong: int = 0
    warnings: int = 0  #: logged while measuring (a drop, a silent peer...)
    error: str = ""


async def name_propagation(reactor: Any, count: int, repeats: int,
                           heartbeat: tuple[float, float], logs: LogCounter) -> NameResult:
    cluster = Cluster(reactor, f"names{count}", heartbeat)
    result = NameResult(count)
    try:
        started = _now()
        await cluster.start_master()
        for harbor in range(1, count + 1):
            cluster.add_node(harbor)
        await wait_until(reactor, cluster.settled, f"{count} nodes joined and meshed",
                         SETUP_TIMEOUT, poll=MESH_POLL)
        result.setup_s = _now() - started
        handles = [node.spawn(Idle()) for node in cluster.nodes]
        probe = NameProbe(cluster.nodes)
        # A master just started holds new names back for its start-up grace (for holders
        # that come back): the first sample would time the grace, not the propagation.
        assert cluster.master is not None
        await sleep(reactor, max(0.0, cluster.master.name_grace_left()) + 0.1)
        warned = logs.total
        for i in range(repeats):
            index = i % count
            name = f"bench-{count}-{i}"
            everyone = probe.arm(name, handles[index])
            acked: list[float] = []
            begin = _now()
            registering = cluster.nodes[index].register_name(name, handles[index])
            registering.addCallback(_stamp, acked)
            await wait_for(reactor, everyone, f"name {name} on every node", NAME_TIMEOUT)
            await wait_for(reactor, registering, f"register_name({name})", NAME_TIMEOUT)
            result.everyone_ms.append((max(probe.seen.values()) - begin) * 1000)
            result.ack_ms.append((acked[0] - begin) * 1000)
        result.wrong = probe.wrong
        result.warnings = logs.total - warned
    except (TimeoutError, SkyprotoError) as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        await cluster.stop()
    return result


# --- re-registration ----------------------------------------------------------------------


@dataclass
class RestartResult:
    down_s: float  #: from the kill to the restart, as measured
    reregister_s: float = 0.0  #: from the restart until the registry had everything back
    first_s: float = 0.0  #: from the restart until the first harbor was back
    clients_s: float = 0.0  #: from the restart until every node's master client was joined
    settled_s: float = 0.0  #: from the restart until every node was caught up again
    warnings: int = 0  #: logged from the kill until settled
    error: str = ""


@dataclass
class ReregisterResult:
    nodes: int
    setup_s: float = 0.0
    restarts: list[RestartResult] = field(default_factory=list)
    error: str = ""


async def restart(reactor: Any, cluster: Cluster, names: list[str], down: float,
                  logs: LogCounter) -> RestartResult:
    warned = logs.total
    killed = _now()
    cluster.kill_master()
    await sleep(reactor, down)
    await cluster.start_master()
    restarted = _now()
    result = RestartResult(restarted - killed)
    try:
        first = await wait_until(reactor, lambda: bool(cluster.registry.snapshot().harbors),
                                 "the first harbor back", REREGISTER_TIMEOUT)
        result.first_s = first - restarted
        done = await wait_until(reactor, lambda: cluster.registered(names),
                                "every harbor and name back", REREGISTER_TIMEOUT)
        result.reregister_s = done - restarted
        clients = await wait_until(
            reactor, lambda: all(n.master is not None and n.master.protocol is not None
                                 for n in cluster.nodes),
            "every master client joined", REREGISTER_TIMEOUT)
        result.clients_s = clients - restarted
        settled = await wait_until(reactor, cluster.settled, "every node caught up again",
                                   SETUP_TIMEOUT, poll=MESH_POLL)
        result.settled_s = settled - restarted
    except TimeoutError as e:
        result.error = str(e)
    result.warnings = logs.total - warned
    return result


async def reregistration(reactor: Any, count: int, downs: list[float],
                         heartbeat: tuple[float, float], logs: LogCounter) -> ReregisterResult:
    cluster = Cluster(reactor, f"rereg{count}", heartbeat)
    result = ReregisterResult(count)
    names = [f"svc-{harbor}" for harbor in range(1, count + 1)]
    try:
        started = _now()
        await cluster.start_master()
        for harbor, name in zip(range(1, count + 1), names, strict=True):
            cluster.add_node(harbor, [name])
        await wait_until(reactor, lambda: cluster.settled() and cluster.registered(names),
                         f"{count} nodes joined and meshed, with their names",
                         SETUP_TIMEOUT, poll=MESH_POLL)
        result.setup_s = _now() - started
        for down in downs:
            await sleep(reactor, 0.5)
            outcome = await restart(reactor, cluster, names, down, logs)
            result.restarts.append(outcome)
            if outcome.error:
                break  # the cluster did not come back: the next restart would mean nothing
    except TimeoutError as e:
        result.error = str(e)
    finally:
        await cluster.stop()
    return result


# --- mesh ---------------------------------------------------------------------------------


@dataclass
class MeshResult:
    nodes: int
    heartbeat: tuple[float, float]
    complete: bool = False
    seconds: float = 0.0  #: until the full mesh, or until the timeout
    cpu_s: float = 0.0  #: CPU time of the process meanwhile
    links: int = 0  #: links up at both ends, at the end of the build
    joined_s: float = 0.0  #: until every node was joined to the master
    longest_stall_s: float = 0.0  #: the longest gap between two checks (a busy reactor)
    progress: list[tuple[float, int]] = field(default_factory=list)  #: (s, links) each second
    hold_s: float = 0.0
    hold_min_links: int = 0  #: the fewest links up while holding
    hold_min_joined: int = 0  #: the fewest nodes joined to the master while holding
    hold_end_links: int = 0  #: links up at the end of the hold
    hold_end_joined: int = 0  #: nodes joined to the master at the end of the hold
    hold_cpu: float = 0.0  #: CPU used while holding / wall time (1.0 = one core)
    hold_longest_stall_s: float = 0.0
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    maxrss_mb: float = 0.0
    warnings: int = 0


async def mesh(reactor: Any, count: int, timeout: float, hold: float,
               heartbeat: tuple[float, float], logs: LogCounter) -> MeshResult:
    cluster = Cluster(reactor, f"mesh{count}", heartbeat)
    result = MeshResult(count, heartbeat, rss_before_mb=rss_mb())
    full = count * (count - 1)
    warned = logs.total
    try:
        master = await cluster.start_master()
        cpu = cpu_seconds()
        started = last = _now()
        for harbor in range(1, count + 1):
            cluster.add_node(harbor)
        deadline = started + timeout
        next_progress = started + 1.0
        next_print = started + PROGRESS_EVERY
        links = 0
        while True:
            now = _now()
            result.longest_stall_s = max(result.longest_stall_s, now - last)
            last = now
            if not result.joined_s and master.connected() == count:
                result.joined_s = now - started
            links = cluster.up_links()
            if links == full:
                result.complete = True
                break
            if now >= next_progress:
                result.progress.append((now - started, links // 2))
                next_progress = now + 1.0
            if now >= next_print:
                print(f"  mesh {count}: {now - started:5.0f} s, {links // 2} of {full // 2} "
                      f"links up, {master.connected()} joined", file=sys.stderr, flush=True)
                next_print = now + PROGRESS_EVERY
            if now > deadline:
                break
            await sleep(reactor, MESH_POLL)
        result.seconds = _now() - started
        result.cpu_s = cpu_seconds() - cpu
        result.links = links // 2
        result.progress.append((result.seconds, result.links))
        if result.complete and hold > 0:
            cpu, began = cpu_seconds(), _now()
            result.hold_min_links, result.hold_min_joined = links // 2, master.connected()
            last = began
            while _now() - began < hold:
                await sleep(reactor, MESH_POLL)
                now = _now()
                result.hold_longest_stall_s = max(result.hold_longest_stall_s, now - last)
                last = now
                result.hold_min_links = min(result.hold_min_links, cluster.up_links() // 2)
                result.hold_min_joined = min(result.hold_min_joined, master.connected())
            result.hold_s = _now() - began
            result.hold_end_links, result.hold_end_joined = (cluster.up_links() // 2,
                                                             master.connected())
            result.hold_cpu = (cpu_seconds() - cpu) / result.hold_s
        result.rss_after_mb = rss_mb()
        result.maxrss_mb = maxrss_mb()
        result.warnings = logs.total - warned
    finally:
        await cluster.stop()
    return result


# --- running ------------------------------------------------------------------------------


@dataclass
class Options:
    only: set[str]
    heartbeat: tuple[float, float]
    names_nodes: list[int]
    names_repeats: int
    reregister_nodes: int
    downs: list[float]
    mesh_nodes: list[int]
    mesh_heartbeat: tuple[float, float]
    mesh_timeout: float
    mesh_hold: float
    cache_endpoints: bool


@dataclass
class Results:
    names: list[NameResult] = field(default_factory=list)
    reregister: ReregisterResult | None = None
    meshes: list[MeshResult] = field(default_factory=list)
    warnings: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0
    cpu_s: float = 0.0  #: CPU time of this process over the whole run
    #: the machine's 1-minute load average at the start and at the end: this process is
    #: single-threaded, so anything above 1 on top of it means it shared its core
    load: tuple[float, float] = (0.0, 0.0)


async def run(reactor: Any, options: Options, logs: LogCounter) -> Results:
    results = Results()
    started, cpu, load = _now(), cpu_seconds(), os.getloadavg()[0]
    if "names" in options.only:
        for count in options.names_nodes:
            results.names.append(await name_propagation(
                reactor, count, options.names_repeats, options.heartbeat, logs))
            results.warnings[f"names{count}"] = logs.take()
    if "reregister" in options.only:
        results.reregister = await reregistration(
            reactor, options.reregister_nodes, options.downs, options.heartbeat, logs)
        results.warnings[f"rereg{options.reregister_nodes}"] = logs.take()
    if "mesh" in options.only:
        for count in options.mesh_nodes:
            results.meshes.append(await mesh(reactor, count, options.mesh_timeout,
                                             options.mesh_hold, options.mesh_heartbeat, logs))
            results.warnings[f"mesh{count}"] = logs.take()
    results.seconds = _now() - started
    results.cpu_s = cpu_seconds() - cpu
    results.load = (load, os.getloadavg()[0])
    return results


def run_reactor(options: Options, logs: LogCounter) -> Results:
    """Run every scenario on the global reactor, then stop it."""
    reactor = _global_reactor()
    outcome: list[Results | Failure] = []
    interrupted: list[bool] = []

    def stopping() -> None:
        if not outcome:
            interrupted.append(True)

    def finish(value: Results | Failure) -> None:
        outcome.append(value)
        if not interrupted:
            reactor.stop()

    def start() -> None:
        Deferred.fromCoroutine(run(reactor, options, logs)).addBoth(finish)

    reactor.addSystemEventTrigger("before", "shutdown", stopping)
    reactor.callWhenRunning(start)
    reactor.run()
    if interrupted or not outcome:
        raise RuntimeError("interrupted: the reactor stopped before the benchmark finished")
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    assert isinstance(result, Results)
    return result


def profiled(path: str | None, options: Options, logs: LogCounter) -> Results:
    """run_reactor, under cProfile when ``path`` is given (stats to it, the top to stderr)."""
    if not path:
        return run_reactor(options, logs)
    profiler = cProfile.Profile()
    try:
        return profiler.runcall(run_reactor, options, logs)
    finally:
        profiler.dump_stats(path)
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(40)
        print(text.getvalue(), file=sys.stderr)


# --- report -------------------------------------------------------------------------------


def summarise(results: Results) -> dict[str, Any]:
    """The JSON object."""
    summary: dict[str, Any] = {}
    for names in results.names:
        n = names.nodes
        if names.everyone_ms:
            summary[f"name_p50_ms_{n}"] = round(statistics.median(names.everyone_ms), 3)
            summary[f"name_p99_ms_{n}"] = round(percentile(names.everyone_ms, 0.99), 3)
            summary[f"name_max_ms_{n}"] = round(max(names.everyone_ms), 3)
            summary[f"name_ack_p99_ms_{n}"] = round(percentile(names.ack_ms, 0.99), 3)
        summary[f"name_repeats_{n}"] = len(names.everyone_ms)
        summary[f"name_setup_s_{n}"] = round(names.setup_s, 2)
        if names.error:
            summary[f"name_error_{n}"] = names.error
    rereg = results.reregister
    if rereg is not None:
        n = rereg.nodes
        summary[f"reregister_setup_s_{n}"] = round(rereg.setup_s, 2)
        done = [r for r in rereg.restarts if not r.error]
        for r in rereg.restarts:
            key = f"{n}_down_{round(r.down_s * 1000, -2):.0f}ms"
            if r.error:
                summary[f"reregister_error_{key}"] = r.error
            else:
                summary[f"reregister_s_{key}"] = round(r.reregister_s, 3)
                summary[f"reregister_settled_s_{key}"] = round(r.settled_s, 3)
        if done and len(done) == len(rereg.restarts):
            summary[f"reregister_s_{n}"] = round(max(r.reregister_s for r in done), 3)
        if rereg.error:
            summary[f"reregister_error_{n}"] = rereg.error
    for m in results.meshes:
        n = m.nodes
        summary[f"mesh_s_{n}"] = round(m.seconds, 2)
        summary[f"mesh_links_{n}"] = m.links
        summary[f"mesh_complete_{n}"] = m.complete
        summary[f"mesh_cpu_s_{n}"] = round(m.cpu_s, 1)
        summary[f"mesh_joined_s_{n}"] = round(m.joined_s, 2)
        summary[f"mesh_longest_stall_s_{n}"] = round(m.longest_stall_s, 2)
        summary[f"mesh_rss_mb_{n}"] = round(m.rss_after_mb, 1)
        if m.hold_s:
            summary[f"mesh_hold_min_links_{n}"] = m.hold_min_links
            summary[f"mesh_hold_cpu_{n}"] = round(m.hold_cpu, 3)
            summary[f"mesh_hold_min_joined_{n}"] = m.hold_min_joined
            summary[f"mesh_hold_end_joined_{n}"] = m.hold_end_joined
        summary[f"mesh_warnings_{n}"] = m.warnings
    summary["maxrss_mb"] = round(maxrss_mb(), 1)
    summary["total_s"] = round(results.seconds, 1)
    summary["cpu_s"] = round(results.cpu_s, 1)
    summary["loadavg_start"], summary["loadavg_end"] = results.load
    warnings = {k: v for k, v in results.warnings.items() if v}
    if warnings:
        summary["log_warnings"] = warnings
    return summary


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(results: Results, options: Options) -> None:
    reactor = _global_reactor()
    print(f"skyproto master benchmark: {type(reactor).__name__}, loopback transport, one "
          f"process, Python {platform.python_version()}, Twisted {TWISTED_VERSION}, "
          f"{os.cpu_count()} CPUs"
          + (", EXPERIMENT --cache-endpoints" if options.cache_endpoints else ""))
    if results.names:
        print(f"\nname propagation: register_name on one node until every node has it "
              f"({options.names_repeats} names each, heartbeats {options.heartbeat[0]:g} s"
              f" / {options.heartbeat[1]:g} s)")
        print(f"  {'nodes':>5}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}"
              f"{'ack p99 ms':>12}{'setup s':>10}  target")
        for r in results.names:
            if not r.everyone_ms:
                print(f"  {r.nodes:>5}  FAILED: {r.error}")
                continue
            p99 = percentile(r.everyone_ms, 0.99)
            target = ""
            if r.nodes == NAME_TARGET_NODES:
                target = f"p99 <= {NAME_TARGET_MS:g} ms: {_verdict(p99 <= NAME_TARGET_MS)}"
            print(f"  {r.nodes:>5}{statistics.median(r.everyone_ms):>10.2f}{p99:>10.2f}"
                  f"{max(r.everyone_ms):>10.2f}{percentile(r.ack_ms, 0.99):>12.2f}"
                  f"{r.setup_s:>10.1f}  {target}")
            if r.error:
                print(f"         stopped after {len(r.everyone_ms)} names: {r.error}")
            if r.wrong or r.warnings:
                print(f"         {r.wrong} NameBound before membership.names had it, "
                      f"{r.warnings} warnings logged while measuring")
    rereg = results.reregister
    if rereg is not None:
        print(f"\nre-registration: {rereg.nodes} nodes with one global name each, master "
              f"killed and restarted empty (heartbeats {options.heartbeat[0]:g} s / "
              f"{options.heartbeat[1]:g} s; setup {rereg.setup_s:.1f} s)")
        if rereg.error:
            print(f"  FAILED: {rereg.error}")
        if rereg.restarts:
            print(f"  {'down s':>8}{'first s':>10}{'registry s':>12}{'clients s':>11}"
                  f"{'settled s':>11}{'warnings':>10}  target")
        for again in rereg.restarts:
            target = ""
            if rereg.nodes == REREGISTER_TARGET_NODES and not again.error:
                target = (f"registry <= {REREGISTER_TARGET_S:g} s: "
                          f"{_verdict(again.reregister_s <= REREGISTER_TARGET_S)}")
            print(f"  {again.down_s:>8.2f}{again.first_s:>10.3f}{again.reregister_s:>12.3f}"
                  f"{again.clients_s:>11.3f}{again.settled_s:>11.3f}{again.warnings:>10}"
                  f"  {target}")
            if again.error:
                print(f"           FAILED: {again.error}")
    for m in results.meshes:
        links = m.nodes * (m.nodes - 1) // 2
        state = "complete" if m.complete else f"INCOMPLETE after {m.seconds:.0f} s"
        print(f"\nmesh: {m.nodes} nodes started at once, heartbeats {m.heartbeat[0]:g} s / "
              f"{m.heartbeat[1]:g} s")
        print(f"  {m.links} of {links} links up in {m.seconds:.1f} s ({state}), "
              f"{m.cpu_s:.1f} s of CPU ({m.cpu_s / max(m.seconds, 1e-9):.0%} of it)")
        print(f"  every node joined the master after {m.joined_s:.1f} s; longest reactor stall "
              f"{m.longest_stall_s:.1f} s; {m.warnings} warnings")
        marks = m.progress[:: max(1, len(m.progress) // 12)]
        if marks and marks[-1] != m.progress[-1]:
            marks.append(m.progress[-1])
        print("  links up over time: " + ", ".join(f"{t:.0f}s:{n}" for t, n in marks))
        if m.hold_s:
            print(f"  then {m.hold_s:.0f} s held: links up {m.hold_min_links} at least, "
                  f"{m.hold_end_links} at the end; nodes joined to the master "
                  f"{m.hold_min_joined} at least, {m.hold_end_joined} at the end")
            print(f"  CPU while holding {m.hold_cpu:.0%} of a core (heartbeats), longest "
                  f"stall {m.hold_longest_stall_s:.2f} s")
        print(f"  RSS {m.rss_before_mb:.0f} MiB before, {m.rss_after_mb:.0f} MiB with the "
              f"mesh up, peak {m.maxrss_mb:.0f} MiB")
    for scenario, kinds in results.warnings.items():
        if kinds:
            print(f"\nwarnings logged in {scenario} ({sum(kinds.values())}):")
            for kind, count in kinds.items():
                print(f"  {count:>8}  {kind}")
    print(f"\ntotal {results.seconds:.0f} s ({results.cpu_s:.0f} s of CPU), peak RSS "
          f"{maxrss_mb():.0f} MiB; load average {results.load[0]:.2f} at the start, "
          f"{results.load[1]:.2f} at the end")


def _list(kind: Callable[[str], Any], text: str) -> list[Any]:
    return [kind(item) for item in text.split(",") if item]


def _pair(text: str) -> tuple[float, float]:
    interval, timeout = _list(float, text)
    if not 0 < interval < timeout:
        raise ValueError(f"need 0 < interval < timeout, got {text!r}")
    return interval, timeout


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--only", default="names,reregister,mesh",
                        help="comma-separated scenarios (names,reregister,mesh)")
    parser.add_argument("--heartbeat", default="1,3",
                        help="heartbeat interval,timeout in s of names and reregister (1,3)")
    parser.add_argument("--names-nodes", default="10,50", help="node counts (10,50)")
    parser.add_argument("--names-repeats", type=int, default=200,
                        help="names registered per node count (200)")
    parser.add_argument("--reregister-nodes", type=int, default=100, help="nodes (100)")
    parser.add_argument("--downs", default="0.1,2,5",
                        help="seconds the master stays down, one restart each (0.1,2,5)")
    parser.add_argument("--nodes-mesh", default="255",
                        help="node counts of the mesh scenario, at most 255 (255)")
    parser.add_argument("--mesh-heartbeat", default="5,30",
                        help="heartbeat interval,timeout in s of the mesh scenario (5,30)")
    parser.add_argument("--mesh-timeout", type=float, default=300.0,
                        help="seconds the mesh may take before it is reported as it is (300)")
    parser.add_argument("--mesh-hold", type=float, default=10.0,
                        help="seconds to watch the full mesh afterwards (10)")
    parser.add_argument("--cache-endpoints", action="store_true",
                        help="experiment: memoise clientFromString in skyproto's router")
    parser.add_argument("--profile", metavar="FILE", help="write cProfile stats to FILE")
    args = parser.parse_args()
    only = set(_list(str, args.only))
    if only - {"names", "reregister", "mesh"}:
        parser.error(f"unknown scenarios {sorted(only - {'names', 'reregister', 'mesh'})}")
    try:
        options = Options(only, _pair(args.heartbeat), _list(int, args.names_nodes),
                          args.names_repeats, args.reregister_nodes, _list(float, args.downs),
                          _list(int, args.nodes_mesh), _pair(args.mesh_heartbeat),
                          args.mesh_timeout, args.mesh_hold, args.cache_endpoints)
    except ValueError as e:
        parser.error(f"bad number: {e}")
    if not all(2 <= n <= 255 for n in [*options.names_nodes, *options.mesh_nodes,
                                       options.reregister_nodes]):
        parser.error("node counts are 2..255")
    if options.names_repeats < 1 or any(d < 0 for d in options.downs):
        parser.error("--names-repeats must be positive and --downs not negative")
    if options.mesh_timeout <= 0 or options.mesh_hold < 0:
        parser.error("--mesh-timeout must be positive and --mesh-hold not negative")
    if options.cache_endpoints:
        cache_endpoints()
    logs = LogCounter()
    # The counter is the only observer: Twisted's buffer of events (kept until logging
    # begins, up to 64k of them) would otherwise grow with every warning, and the RSS too.
    globalLogBeginner.beginLoggingTo([logs], redirectStandardIO=False)
    try:
        results = profiled(args.profile, options, logs)
    finally:
        if logs.first:
            print("first warnings logged:\n  " + "\n  ".join(logs.first), file=sys.stderr)
    report(results, options)
    if args.json:
        summary = summarise(results)
        summary["nproc"] = os.cpu_count() or 0
        summary["python"] = platform.python_version()
        summary["twisted"] = TWISTED_VERSION
        summary["cache_endpoints"] = options.cache_endpoints
        print(json.dumps(summary))
    failed = ([r.error for r in results.names if r.error]
              + ([results.reregister.error] if results.reregister and results.reregister.error
                 else [])
              + [r.error for r in (results.reregister.restarts if results.reregister else [])
                 if r.error]
              + [f"the mesh of {m.nodes} did not complete" for m in results.meshes
                 if not m.complete])
    for why in failed:
        print(f"failed: {why}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
