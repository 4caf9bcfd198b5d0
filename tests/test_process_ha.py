"""A highly available cluster, measured: two ``twistd skymaster --store etcd:...`` on a real
three-member etcd, 20 nodes in this process (half listing master A first, half B first)
and two ``twistd skynode`` processes (one each way). Skips without ``etcd`` on PATH.

* one table everywhere, and how long a name registered through one master takes to reach
  every node of the other (20 registrations, alternating directions);
* ``kill -9`` of a master while calls flow between the nodes: how long until each node it
  served is joined to the other one, that the table lost nothing (``skyproto status
  --json`` of the survivor before the kill and after the killed master's leases ran out),
  and that no call failed;
* both masters stopped (SIGTERM) and started again: the table is loaded from etcd before
  any node re-joins (its keys live on the stopped masters' leases for ``--store-lease-ttl``,
  10 s by default, so the restart must come within that), and how long each node takes
  to re-join.

Every figure is printed (``pytest -s``) for docs/performance.md, "Several masters on etcd".
Times are on the wall clock: the daemons' come from their ``--log-format json`` lines.
The nodes in this process share the test's reactor, so they wait for it like the others.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from zope.interface import implementer

from skyproto import testing
from skyproto.auth import load_secret
from skyproto.interfaces import IMasterListener
from skyproto.master.client import MasterClient
from skyproto.master.etcd_client import EtcdClient, prefix_end
from skyproto.master.registry import HarborLeft, NameBound, NameUnbound, Table
from skyproto.node.node import Node
from skyproto.services import Echo
from skyproto.tap import describe_address

from .etcd import ETCD, NO_ETCD, EtcdCluster
from .processes import Daemon, daemons, wait_for, wait_for_line

__all__ = ["daemons"]

pytestmark = [pytest.mark.process, pytest.mark.skipif(ETCD is None, reason=NO_ETCD)]

SKYPROTO = str(Path(sys.executable).with_name("skyproto"))
T = TypeVar("T")
IN_PROCESS = 20  #: nodes in this process: 1..10 list master A first, 11..20 master B first
SKYNODES = {30: "s30", 255: "s255"}  #: s30 (echo) lists A first, s255 (auto id, relay) B
ECHO_S30 = 0x1E000002
RELAY_S255 = 0xFF000002
TIMEOUT = 10.0  #: every call's and request's timeout: a call that hangs this long fails
POLL = 0.01  #: how often a skynode's /metrics is read while timing it
ETCD_NAMES = {f"E{h}" for h in range(1, IN_PROCESS + 1)} | {"ECHO", "RELAY"}


def log(line: str) -> None:
    print(f"[ha] {line}", flush=True)


def within(d: Deferred[T], seconds: float) -> Deferred[T]:
    return d.addTimeout(seconds, reactor)


def run(work: Coroutine[Any, Any, T], seconds: float) -> Deferred[T]:
    """A whole scenario, bounded."""
    return within(Deferred.fromCoroutine(work), seconds)


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: of 20 samples, p99 is the largest and p50 the tenth."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def spread(values: list[float]) -> str:
    return (f"p50 {percentile(values, 0.5) * 1000:.0f} ms, p99 "
            f"{percentile(values, 0.99) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms "
            f"(n={len(values)})")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@implementer(IMasterListener)
class Welcomes:
    """Stands between a node's master client and its membership, and stamps each welcome:
    when, and from which master."""

    def __init__(self, client: MasterClient) -> None:
        self.client = client
        self.inner: IMasterListener = client.listener
        client.listener = self
        self.stamps: list[tuple[float, str]] = []
        #: when the client lost its master
        self.lost: list[float] = []
        self._seen = client.welcomes

    def master_table(self, table: Table, first: bool) -> None:
        if self.client.welcomes != self._seen:  # a welcome (not a table fetched on a gap)
            self._seen = self.client.welcomes
            self.stamps.append((time.time(), self.client.endpoint_description))
        self.inner.master_table(table, first)

    def master_event(self, event: Any) -> None:
        self.inner.master_event(event)

    def master_refused(self, reason: str) -> None:
        self.inner.master_refused(reason)

    def master_lost(self, reason: str) -> None:
        self.lost.append(time.time())
        self.inner.master_lost(reason)

    def first_after(self, moment: float) -> tuple[float, str] | None:
        return next(((t, at) for t, at in self.stamps if t > moment), None)


class Calls:
    """Callers that call again as soon as they are answered, until stopped; every failure
    is kept."""

    def __init__(self) -> None:
        self.ok = 0
        self.failures: list[tuple[float, str, str]] = []
        self.latencies: list[float] = []
        self._stopping = False
        self._workers: Deferred[Any] | None = None
        self.started = 0.0

    def start(self, routes: list[tuple[str, Node, Route]]
              ) -> None:
        self.started = time.time()
        self._workers = DeferredList(
            [Deferred.fromCoroutine(self._worker(*route)) for route in routes],
            consumeErrors=True)

    async def _worker(self, what: str, node: Node,
                      route: Route) -> None:
        n = 0
        while not self._stopping:
            n += 1
            token = f"{what}.{n}"
            destination, payload = route(token)
            began = time.time()
            try:
                reply = await node.call(destination, payload, timeout=TIMEOUT)
                if reply != token:
                    raise AssertionError(f"sent {token!r}, got {reply!r}")
            except Exception as e:
                self.failures.append((time.time(), what, f"{type(e).__name__}: {e}"))
                await sleep(0.05)  # never spin on a failing destination
                continue
            self.ok += 1
            self.latencies.append(time.time() - began)

    async def stop(self) -> None:
        self._stopping = True
        if self._workers is not None:
            workers, self._workers = self._workers, None
            await within(workers, TIMEOUT + 5)

    def summary(self) -> str:
        seconds = time.time() - self.started
        return (f"{self.ok} calls answered in {seconds:.1f} s ({self.ok / seconds:.0f}/s), "
                f"{len(self.failures)} failed; latency {spread(self.latencies)}")


class HA:
    """Two etcd-backed masters, 20 nodes here and two skynode processes."""

    def __init__(self, daemons: Any, etcd: EtcdCluster, lease_ttl: int | None = None) -> None:
        self.daemons = daemons
        self.urls = etcd.urls
        self.secret_path: Path = daemons.secret
        self.secret = load_secret(daemons.secret)
        self.prefix = f"/ha-{uuid.uuid4().hex[:8]}/"
        self.lease_ttl = lease_ttl
        self.masters: list[Daemon] = []
        self.at: list[str] = []  #: the masters' endpoints: A, B
        self.http: list[str] = []  #: their /status.json and /metrics base URLs
        self.nodes: dict[int, Node] = {}
        self.welcomes: dict[int, Welcomes] = {}
        self.skynodes: dict[int, Daemon] = {}
        self.skynode_http: dict[int, str] = {}
        self.events: list[tuple[float, int, Any]] = []  #: (when, seen by, event)
        #: the global names every node should know
        self.names = set(ETCD_NAMES)
        self.etcd = EtcdClient.over_treq(self.urls, reactor)
        #: tables the nodes here fetched whole because event sequence numbers skipped
        self.fetches = 0
        self._observer = cast(ILogObserver, self._count_fetches)
        globalLogPublisher.addObserver(self._observer)

    def _count_fetches(self, event: LogEvent) -> None:
        if str(event.get("log_format", "")).startswith("missed events"):
            self.fetches += 1

    # --- masters --------------------------------------------------------------------------

    def master(self, i: int, listen: str = "tcp:0:interface=127.0.0.1") -> Daemon:
        args = ["skymaster", "--log-format", "json", "--listen", listen,
                "--secret-file", str(self.secret_path),
                "--store", "etcd:" + ",".join(self.urls), "--store-prefix", self.prefix,
                "--http", "tcp:0:interface=127.0.0.1"]
        if self.lease_ttl is not None:
            args += ["--store-lease-ttl", str(self.lease_ttl)]
        daemon: Daemon = self.daemons(*args, name=f"master{'AB'[i]}{len(self.masters)}")
        self.masters.append(daemon)
        return daemon

    async def master_up(self, daemon: Daemon) -> tuple[str, str]:
        port = await wait_for_line(daemon, r"skymaster listening on tcp:127\.0\.0\.1:(\d+)")
        http = await wait_for_line(daemon, r"cluster page, /metrics and /health on (http://\S+)")
        await wait_for_line(daemon, r"the registry loaded")
        return f"tcp:127.0.0.1:{port.group(1)}", http.group(1).rstrip("/")

    # --- nodes ----------------------------------------------------------------------------

    def order(self, first: int) -> list[str]:
        return [self.at[first], self.at[1 - first]]

    async def node(self, harbor: int) -> Node:
        node = Node(harbor, reactor, self.secret, default_timeout=TIMEOUT)
        port = await node.listen("tcp:0:interface=127.0.0.1")
        client = node.join_master(self.order(0 if harbor <= IN_PROCESS // 2 else 1),
                                  f"n{harbor}@test", describe_address(port),
                                  request_timeout=TIMEOUT)
        self.welcomes[harbor] = Welcomes(client)
        node.subscribe(lambda event: self.events.append((time.time(), harbor, event)))
        node.spawn(Echo(), f"E{harbor}")
        self.nodes[harbor] = node
        return node

    def skynode(self, harbor: int, first: int, service: str) -> Daemon:
        masters = self.order(first)
        daemon: Daemon = self.daemons(
            "skynode", "--log-format", "json",
            "--harbor", "auto" if harbor == 255 else str(harbor),
            "--name", SKYNODES[harbor], "--master", masters[0], "--master", masters[1],
            "--secret-file", str(self.secret_path), "--service", service, "--no-mapper",
            "--listen", "tcp:0:interface=127.0.0.1", "--http", "tcp:0:interface=127.0.0.1",
            name=SKYNODES[harbor])
        self.skynodes[harbor] = daemon
        return daemon

    def served_by(self, i: int) -> list[int]:
        """The harbors (here and processes) that list master ``i`` first."""
        here = [h for h in self.nodes if (h > IN_PROCESS // 2) == bool(i)]
        return [*here, 30 if i == 0 else 255]

    async def start(self) -> None:
        started = time.time()
        for i in range(2):
            self.master(i)
        for daemon in self.masters:
            at, http = await self.master_up(daemon)
            self.at.append(at)
            self.http.append(http)
        self.skynode(30, 0, "echo")
        self.skynode(255, 1, "relay")
        for harbor in range(1, IN_PROCESS + 1):
            await self.node(harbor)
        for harbor, daemon in self.skynodes.items():
            found = await wait_for_line(daemon, r"/metrics and /health on (http://\S+)")
            self.skynode_http[harbor] = found.group(1).rstrip("/")
        await wait_for(self.one_table, "one table on every node", timeout=30)
        for h, node in self.nodes.items():  # each listed master is where it is joined
            assert node.master is not None
            assert node.master.endpoint_description == self.order(h > IN_PROCESS // 2)[0]
        for harbor, daemon in self.skynodes.items():
            first = self.order(harbor == 255)[0]
            assert daemon.search(rf"joined the master at {re.escape(first)} as harbor {harbor}")
        seen = [await self.skynode_sees(h) for h in self.skynodes]
        assert all(s == (len(self.harbors()) - 1, len(ETCD_NAMES)) for s in seen), seen
        log(f"two masters, {IN_PROCESS} nodes here and 2 skynodes: one table everywhere "
            f"{time.time() - started:.1f} s after the first command (load {load_average()})")

    def harbors(self) -> list[int]:
        return sorted([*self.nodes, *self.skynodes])

    def one_table(self) -> bool:
        want_harbors = self.harbors()
        tables = []
        for node in self.nodes.values():
            client = node.master
            if client is None or not client.connected:
                return False
            tables.append((sorted(client.harbors), set(client.names)))
        return all(t == (want_harbors, self.names) for t in tables)

    async def metrics(self, url: str) -> dict[str, float]:
        response = await within(treq.get(f"{url}/metrics", persistent=False), 5)
        text = await within(treq.text_content(response), 5)
        values = {}
        for line in text.splitlines():
            if line.startswith("skyproto_") and " " in line:
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    async def skynode_sees(self, harbor: int) -> tuple[int, int]:
        """The other harbors and the global names a skynode knows (its /metrics)."""
        values = await self.metrics(self.skynode_http[harbor])
        return (int(values["skyproto_cluster_harbors"]),
                int(values["skyproto_cluster_names"]))

    async def status(self, master: str) -> Any:
        """``skyproto status --json``, run without blocking the reactor."""
        out, err, code = await within(getProcessOutputAndValue(
            SKYPROTO, ("status", "--master", master, "--secret-file", str(self.secret_path),
                       "--json", "--timeout", "5"), env=dict(os.environ), reactor=reactor), 30)
        assert code == 0, err.decode(errors="replace")
        return json.loads(out)

    async def keys(self) -> dict[bytes, int]:
        """Every key under this cluster's prefix in etcd, and the lease it is on."""
        p = self.prefix.encode()
        _, kvs = await within(self.etcd.range(p, prefix_end(p)), 10)
        return {kv.key: kv.lease for kv in kvs}

    def losses(self, since: float) -> list[tuple[int, Any]]:
        """Harbors or names any node here saw leave since ``since``."""
        return [(seen_by, event) for when, seen_by, event in self.events
                if when >= since and isinstance(event, HarborLeft | NameUnbound)]

    async def stop(self) -> None:
        globalLogPublisher.removeObserver(self._observer)
        await DeferredList([node.stop() for node in self.nodes.values()], consumeErrors=True)
        await self.etcd.close()


def membership(table: Any) -> tuple[list[tuple[int, str, str, int]], dict[str, int]]:
    """A status table without what may change legitimately (sequence, up_since)."""
    return ([(h["id"], h["name"], h["endpoint"], h["incarnation"]) for h in table["harbors"]],
            table["names"])


def logged(daemon: Daemon) -> list[tuple[float, str]]:
    """(``log_time``, ``log_text``) of every JSON line ``daemon`` logged so far."""
    lines = []
    for line in daemon.output().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            lines.append((float(event.get("log_time", 0)), str(event.get("log_text", ""))))
    return lines


def logged_at(daemon: Daemon, pattern: str, after: float = 0.0) -> float | None:
    """When ``daemon`` first logged a line matching ``pattern`` after ``after`` (wall
    clock, as its JSON log stamps it), or None."""
    return next((when for when, text in logged(daemon)
                 if when > after and re.search(pattern, text)), None)


async def logged_by(daemons: dict[int, Daemon], pattern: str, after: float,
                    timeout: float = 15.0) -> dict[int, float]:
    """Wait (bounded) until each daemon logged ``pattern`` (with ``{harbor}`` its key)
    after ``after``; when each did."""
    def stamps() -> dict[int, float] | None:
        found = {h: logged_at(d, pattern.format(harbor=h), after) for h, d in daemons.items()}
        return {h: t for h, t in found.items() if t is not None} \
            if all(t is not None for t in found.values()) else None

    return await wait_for(stamps, f"{pattern!r} in {sorted(daemons)}'s logs", timeout)


Route = Callable[[str], tuple[int | str, Any]]


def by_handle(harbor: int) -> Route:
    """Calls to the Echo of an in-process node, by handle."""
    return lambda token: ((harbor << 24) | 2, token)


def by_name(harbor: int) -> Route:
    """... and by its global name."""
    return lambda token: (f"E{harbor}", token)


# --- 1 and 2: one table, names across, a master killed under load ------------------------

@pytest_twisted.ensureDeferred
async def test_two_masters_one_table_names_across_and_a_master_killed_under_load(
        daemons: Any, etcd_cluster: EtcdCluster) -> None:
    # 4 s leases instead of 10: the test waits for the killed master's to run out
    ha = HA(daemons, etcd_cluster, lease_ttl=4)
    try:
        await run(one_table_and_a_master_killed(ha), 75)
    finally:
        await within(Deferred.fromCoroutine(ha.stop()), 20)


async def one_table_and_a_master_killed(ha: HA) -> None:
    await ha.start()

    # --- a name registered through one master, seen by every node of the other ---------
    worst: list[float] = []  # per registration: the last node of the other master to see it
    each: list[float] = []  # per registration and node of the other master
    acks: list[float] = []
    fetched = ha.fetches
    for i in range(20):
        side = i % 2  # even: registered through A, watched on B's nodes; odd: the reverse
        registrant = ha.nodes[1 + i // 2 + (IN_PROCESS // 2 if side else 0)]
        watchers = [h for h in ha.served_by(1 - side) if h in ha.nodes]
        skynode = 255 if side == 0 else 30
        name = f"SEEN{i}"
        handle = registrant.spawn(Echo(), f".seen{i}")
        mark = len(ha.events)
        started = time.time()
        registered = registrant.register_name(name, handle)
        names_before = len(ETCD_NAMES) + i

        async def skynode_saw(skynode: int = skynode, names: int = names_before) -> float:
            while True:
                if (await ha.skynode_sees(skynode))[1] > names:
                    return time.time()
                await sleep(POLL)

        skynode_seen = within(Deferred.fromCoroutine(skynode_saw()), 10)
        await within(registered, 10)
        acks.append(time.time() - started)

        def seen_by(name: str = name, mark: int = mark) -> dict[int, float]:
            return {by: when for when, by, event in ha.events[mark:]
                    if isinstance(event, NameBound) and event.name == name}

        def everyone_saw(watchers: list[int] = watchers) -> dict[int, float] | None:
            seen = seen_by()
            return seen if set(watchers) <= set(seen) else None

        seen = await wait_for(everyone_saw, f"{name} on every node of the other master",
                              timeout=10)
        delays = [seen[h] - started for h in watchers] + [await skynode_seen - started]
        each.extend(delays)
        worst.append(max(delays))
    log(f"names through one master seen on every node of the other: last node {spread(worst)}; "
        f"every node {spread(each)}; the registrant's ack {spread(acks)}; tables fetched whole "
        f"by the {IN_PROCESS} nodes here on a gap: {ha.fetches - fetched} "
        f"(load {load_average()})")
    ha.names |= {f"SEEN{i}" for i in range(20)}
    await wait_for(ha.one_table, "every name everywhere")

    # --- kill -9 master A while calls flow ---------------------------------------------
    half = IN_PROCESS // 2
    routes: list[tuple[str, Node, Route]] = []
    for h, node in ha.nodes.items():  # each node calls one on the other master's side
        other = h + half if h <= half else h - half
        routes.append((f"{h}->{other}", node, by_handle(other) if h % 2 else by_name(other)))
    routes += [
        ("1->s30 ECHO", ha.nodes[1], lambda t: ("ECHO", t)),
        ("11->s255 RELAY->E5", ha.nodes[11], lambda t: ("RELAY", ["E5", t])),
        ("2->s255 RELAY->s30", ha.nodes[2], lambda t: (RELAY_S255, [ECHO_S30, t])),
        ("12->s30 ECHO", ha.nodes[12], lambda t: (ECHO_S30, t)),
    ]
    calls = Calls()
    calls.start(routes)
    try:
        await wait_for(lambda: calls.ok >= 1000 or calls.failures, "calls flowing")
        assert not calls.failures, calls.failures[:5]
        before = await ha.status(ha.at[1])
        keys_before = await ha.keys()
        served = ha.served_by(0)
        a_leases = {lease for key, lease in keys_before.items()
                    if any(key.endswith(b"harbors/%03d" % h) for h in served)
                    or any(key.endswith(f"names/E{h}".encode()) for h in served)}
        assert len(a_leases) >= 2 * len(served) - 1  # s30's harbor and ECHO, n's and E<n>

        ok_before = calls.ok
        fetched = ha.fetches
        master_a = ha.masters[0]
        killed = time.time()
        master_a.process.send_signal(signal.SIGKILL)
        s30 = {30: ha.skynodes[30]}
        b = re.escape(ha.at[1])
        moved = await logged_by(s30, rf"joined the master at {b} as harbor 30", killed)
        s30_lost = await logged_by(s30, r"lost the master at", killed)
        back = {30: moved[30] - killed}
        noticed = {30: s30_lost[30] - killed}
        await wait_for(lambda: all(ha.welcomes[h].first_after(killed) for h in served
                                   if h in ha.nodes), "A's nodes joined to B", timeout=10)
        for h in served:
            if h in ha.nodes:
                when, at = ha.welcomes[h].first_after(killed) or (0.0, "")
                assert at == ha.at[1], (h, at)
                back[h] = when - killed
                noticed[h] = next(t for t in ha.welcomes[h].lost if t > killed) - killed
        admitted = [when - killed for when, text in logged(ha.masters[1])
                    if when > killed and re.search(r"harbor \d+ joined:", text)]
        master_a.process.wait(5)
        log(f"kill -9 of master A under load: its {len(served)} nodes joined to B after "
            f"{spread(list(back.values()))}; s30 (a process of its own) "
            f"{back[30] * 1000:.0f} ms; the loss noticed after {spread(list(noticed.values()))}; "
            f"B admitted them {spread(admitted)} after the kill (load {load_average()})")
        assert percentile(list(back.values()), 0.99) <= 1.0

        # A's leases run out (4 s): nothing is lost, because B took every key over
        keys_after = await ha.keys()
        assert set(keys_after) == set(keys_before)
        assert not set(keys_after.values()) & a_leases, "keys still on the killed master's leases"

        async def ran_out() -> None:
            for lease in a_leases:
                while await within(ha.etcd.time_to_live(lease), 5) >= 0:
                    await sleep(0.1)

        await within(Deferred.fromCoroutine(ran_out()), 4 + 6)
        ran_out_after = time.time() - killed
        await calls_answered(calls, 200)
        after = await ha.status(ha.at[1])
        assert membership(after) == membership(before)
        assert set(await ha.keys()) == set(keys_before)
        assert not ha.losses(killed)
        assert not calls.failures, calls.failures[:5]
        assert ha.one_table()
        log(f"the killed master's leases ran out {ran_out_after:.1f} s after the kill; "
            f"B's table before and after: {len(after['harbors'])} harbors, "
            f"{len(after['names'])} names, identical; no node saw a harbor or name leave; "
            f"{calls.ok - ok_before} calls answered since the kill; tables fetched whole "
            f"on a gap meanwhile: {ha.fetches - fetched}")
    finally:
        await calls.stop()
    log(f"load: {calls.summary()}")
    assert not calls.failures, calls.failures[:5]


async def calls_answered(calls: Calls, count: int) -> None:
    target = calls.ok + count
    await wait_for(lambda: calls.ok >= target or calls.failures, f"{count} more calls")


# --- 3: every master stopped and started again --------------------------------------------

@pytest_twisted.ensureDeferred
async def test_all_masters_restarted_load_the_table_from_etcd_and_every_node_rejoins(
        daemons: Any, etcd_cluster: EtcdCluster) -> None:
    ha = HA(daemons, etcd_cluster)  # the default --store-lease-ttl, 10 s
    try:
        await run(all_masters_restarted(ha), 60)
    finally:
        await within(Deferred.fromCoroutine(ha.stop()), 20)


async def all_masters_restarted(ha: HA) -> None:
    await ha.start()
    before = await ha.status(ha.at[0])
    keys_before = await ha.keys()
    want = membership(before)
    assert len(want[0]) == IN_PROCESS + 2

    old = list(ha.masters)
    for daemon in old:
        daemon.process.send_signal(signal.SIGTERM)
    await wait_for(lambda: all(d.process.poll() is not None for d in old), "masters gone")
    stopped = time.time()
    # twistd ends with the signal that stopped it, after a clean shutdown
    assert all(d.process.returncode == -signal.SIGTERM and d.search("Server Shut Down")
               for d in old), [(d.process.returncode, d.output()[-2000:]) for d in old]
    await wait_for(lambda: not any(n.master and n.master.connected for n in ha.nodes.values()),
                   "every node without a master")
    # The worst case for re-joining: masters down long enough that every node's backoff is
    # at its cap (attempts 0.25 to 0.5 s apart from the 3rd on), well within the lease TTL
    # (the keys run out 6.7 to 10 s after the stop: nobody renews them meanwhile).
    # (_unwelcomed: the client's attempts since its last welcome)
    await wait_for(lambda: all(n.master and n.master._unwelcomed >= 4
                               for n in ha.nodes.values()), "every node's backoff at its cap")

    listens = [f"tcp:{at.rsplit(':', 1)[1]}:interface=127.0.0.1" for at in ha.at]
    restarted = time.time()
    fetched = ha.fetches
    new = [ha.master(i, listens[i]) for i in range(2)]
    loaded_pattern = r"the registry loaded (\d+) harbors and (\d+) names"

    async def first_table(daemon: Daemon) -> tuple[float, int, Any]:
        """As soon as a restarted master has loaded: its table, and how many nodes it had
        joined by then (a join waits for the load: the table came from etcd alone)."""
        found = await wait_for_line(daemon, r"cluster page, /metrics and /health on (http://\S+)")
        http = found.group(1).rstrip("/")
        loaded = await testing.wait_for(lambda: logged_at(daemon, loaded_pattern, restarted),
                                        "the registry loaded", 20, clock=reactor, interval=POLL)
        text = next(text for when, text in logged(daemon) if when == loaded)
        counted = re.search(loaded_pattern, text)
        assert counted is not None
        assert (int(counted.group(1)), int(counted.group(2))) == (len(want[0]), len(want[1]))
        joined = int((await ha.metrics(http))["skyproto_master_nodes"])
        response = await within(treq.get(f"{http}/status.json", persistent=False), 5)
        body: bytes = await within(treq.content(response), 5)
        return loaded, joined, json.loads(body)

    firsts = [await d for d in [Deferred.fromCoroutine(first_table(m)) for m in new]]
    for _, _, table in firsts:
        assert membership(table) == want
    loads = {i: loaded for i, (loaded, _, _) in enumerate(firsts)}

    harbors = ha.harbors()
    rejoined = await logged_by(ha.skynodes, r"joined the master at .* as harbor {harbor}\b",
                               restarted)
    await wait_for(lambda: all(w.first_after(restarted) for w in ha.welcomes.values()),
                   "every node re-joined", timeout=15)
    for h, welcomes in ha.welcomes.items():
        stamp = welcomes.first_after(restarted)
        assert stamp is not None
        rejoined[h] = stamp[0]
    up = max(loads.values())  # both masters loaded
    after_up = [max(0.0, t - up) for t in rejoined.values()]
    after_first = [t - min(loads.values()) for t in rejoined.values()]
    await wait_for(ha.one_table, "one table again")
    keys_after = await ha.keys()
    assert set(keys_after) == set(keys_before)
    assert not (set(keys_after.values()) & set(keys_before.values())) - {0}, \
        "keys left on the stopped masters' leases would be lost when they run out"
    after = await ha.status(ha.at[1])
    assert membership(after) == want
    assert sorted(h["id"] for h in after["harbors"]) == harbors
    assert not ha.losses(stopped)
    log(f"both masters SIGTERMed, restarted {restarted - stopped:.2f} s later; registry "
        f"loaded {', '.join(f'{t - restarted:.2f}' for t in sorted(loads.values()))} s after "
        f"the start command, each with all {len(want[0])} harbors and {len(want[1])} names; "
        f"nodes joined when each first answered /status.json (the whole table): "
        f"{', '.join(str(n) for _, n, _ in firsts)}")
    log(f"re-joined after both masters loaded: {spread(after_up)}; after the first loaded: "
        f"{spread(after_first)}; every key now on the new masters' leases; tables fetched "
        f"whole on a gap since the restart: {ha.fetches - fetched} (load {load_average()})")
    assert percentile(after_up, 0.99) <= 1.0, spread(after_up)
    # a call between nodes of the two sides still works, by name
    assert await within(ha.nodes[1].call("RELAY", ["E20", "after"]), TIMEOUT) == "after"
