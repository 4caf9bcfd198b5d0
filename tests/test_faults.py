"""Process-level faults: the master killed or restarted under load, a node frozen (SIGSTOP).

Real ``twistd`` daemons (a master, node alpha with ``echo``, node beta with ``relay``) and an
in-test driver Node (harbor 9) joined to the same master on the real reactor. The driver
keeps ``INFLIGHT`` calls in flight at all times through beta's relay to alpha's echo, half
by handle and half by global name (``RELAY`` and ``ECHO`` both resolved from the caches), so
every call crosses the beta -> alpha harbor link. Every figure is printed (``pytest -s``)
for docs/reliability.md.

The third fault of the series, SIGKILL of the node hosting the host's port mapper, is
``tests/test_process_mapping.py::test_nodes_share_a_mapper_resolve_by_name_and_survive_its_host``
and is not repeated here. The nodes below run with ``--no-mapper`` so that only the master
and the harbor links are under test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue

from skyproto.auth import load_secret
from skyproto.errors import HarborDown, RemoteError
from skyproto.master.registry import HarborJoined, HarborLeft, NameBound
from skyproto.node.node import Node
from skyproto.tap import describe_address
from skyproto.testing import InMemoryCluster, connections_of

from .cluster import Parked, failure_of
from .processes import Daemon, daemons, wait_for, wait_for_line

__all__ = ["daemons"]

SKYPROTO = str(Path(sys.executable).with_name("skyproto"))
TIMEOUT = 10.0  #: the driver's call timeout: a call that hangs this long counts as failed
ALPHA_ECHO = 0x01000002
BETA_RELAY = 0x02000002
DRIVER = 9
NAMES = {"ECHO": ALPHA_ECHO, "RELAY": BETA_RELAY}
INFLIGHT = 20
#: answered calls that show a load flowing (each caller answered about fifty times)
STEADY = 50 * INFLIGHT
HEARTBEAT_TIMEOUT = 3.0  #: the default --heartbeat-timeout (interval 1 s)

Route = tuple[str, Callable[[str], tuple[int | str, Any]]]
#: beta relays to alpha by handle; by name, with RELAY and ECHO taken from the caches
RELAYED: list[Route] = [
    ("relay by handle", lambda token: (BETA_RELAY, [ALPHA_ECHO, token])),
    ("relay by name", lambda token: ("RELAY", ["ECHO", token])),
]
DIRECT: Route = ("direct to alpha", lambda token: (ALPHA_ECHO, token))


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


def log(line: str) -> None:
    print(f"[faults] {line}", flush=True)


async def status_json(master_at: str, secret: Path) -> Any:
    """``skyproto status --json``, run without blocking the reactor (the load keeps going)."""
    out, err, code = await getProcessOutputAndValue(
        SKYPROTO, ("status", "--master", master_at, "--secret-file", str(secret), "--json",
                   "--timeout", "5"), env=dict(os.environ), reactor=reactor)
    assert code == 0, err.decode(errors="replace")
    return json.loads(out)


def membership(table: Any) -> tuple[list[tuple[int, str, str, int]], dict[str, int]]:
    """A status table without what a new master legitimately changes (sequence, up_since)."""
    return ([(h["id"], h["name"], h["endpoint"], h["incarnation"]) for h in table["harbors"]],
            table["names"])


class Load:
    """``inflight`` concurrent callers on the driver, each calling again as soon as it is
    answered, until stopped, ``seconds`` have passed or ``max_calls`` each were made."""

    def __init__(self, node: Node, routes: list[Route], inflight: int = INFLIGHT,
                 stop_on_failure: bool = False, seconds: float = 60.0,
                 max_calls: int = 200_000) -> None:
        self.node = node
        self.routes = routes
        self.inflight = inflight
        self.stop_on_failure = stop_on_failure
        self.seconds = seconds
        self.max_calls = max_calls
        self.ok = 0
        self.done_at: list[float] = []
        self.latencies: list[float] = []
        self.failures: list[tuple[float, str, BaseException]] = []
        self.started = 0.0
        self.finished = 0.0
        self._stopping = False
        self._workers: Deferred[Any] | None = None

    def start(self) -> None:
        self.started = time.monotonic()
        self._workers = DeferredList(
            [Deferred.fromCoroutine(self._worker(k)) for k in range(self.inflight)],
            consumeErrors=True)

    async def stop(self) -> None:
        self._stopping = True
        if self._workers is not None:
            workers, self._workers = self._workers, None
            await workers.addTimeout(TIMEOUT + 5, reactor)
            self.finished = time.monotonic()

    async def finished_by_itself(self, within: float) -> None:
        """Wait (bounded) until every worker has stopped on its own (``stop_on_failure``)."""
        assert self._workers is not None
        await self._workers.addTimeout(within, reactor)
        self._workers = None

    async def _worker(self, k: int) -> None:
        what, route = self.routes[k % len(self.routes)]
        deadline = self.started + self.seconds
        for n in range(self.max_calls):
            if self._stopping or time.monotonic() > deadline:
                return
            token = f"{k}.{n}"
            destination, payload = route(token)
            began = time.monotonic()
            try:
                reply = await self.node.call(destination, payload)
                if reply != token:
                    raise AssertionError(f"{what}: sent {token!r}, got {reply!r}")
            except Exception as e:
                self.failures.append((time.monotonic(), what, e))
                if self.stop_on_failure:
                    return
                await sleep(0.05)  # never spin on a failing destination
                continue
            now = time.monotonic()
            self.ok += 1
            self.done_at.append(now)
            self.latencies.append(now - began)

    async def answers(self, calls: int, what: str, timeout: float = 10.0) -> None:
        """Wait until ``calls`` more calls have been answered (or one has failed: the test's
        assertions then say so)."""
        target = self.ok + calls
        await wait_for(lambda: self.ok >= target or self.failures, what, timeout)

    def completed_between(self, start: float, end: float) -> int:
        return sum(1 for t in self.done_at if start <= t <= end)

    def summary(self) -> str:
        seconds = (self.finished or time.monotonic()) - self.started
        latencies = sorted(self.latencies) or [0.0]
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        return (f"{self.ok} calls answered in {seconds:.1f} s ({self.ok / seconds:.0f}/s, "
                f"{self.inflight} in flight), {len(self.failures)} failed; latency median "
                f"{statistics.median(latencies) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
                f"max {latencies[-1] * 1000:.0f} ms")


class Cluster:
    """A skymaster, alpha (echo) and beta (relay) as processes, and the in-test driver."""

    def __init__(self, daemons: Any, kind: str = "tcp") -> None:
        self.daemons = daemons
        self.kind = kind
        self.workdir: Path = daemons.workdir
        self.secret: Path = daemons.secret
        self.masters: list[Daemon] = []
        self.master_listen = ("tcp:0:interface=127.0.0.1" if kind == "tcp" else
                              f"unix:{self.workdir}/master.sock:mode=600:lockfile=1")
        self.master_at = ""
        self.driver: Node | None = None
        self.alpha: Daemon | None = None
        self.beta: Daemon | None = None

    @property
    def master(self) -> Daemon:
        return self.masters[-1]

    def listen(self, name: str) -> str:
        """Where a node accepts harbor links."""
        if self.kind == "tcp":
            return "tcp:0:interface=127.0.0.1"
        return f"unix:{self.workdir}/{name}.sock:mode=600"

    async def start_master(self) -> Daemon:
        """Start a master on the same address every time (a restart keeps its address)."""
        master: Daemon = self.daemons("skymaster", "--listen", self.master_listen,
                              "--secret-file", str(self.secret),
                              name=f"master{len(self.masters)}")
        self.masters.append(master)
        address = (await wait_for_line(master, r"skymaster listening on (\S+)")).group(1)
        if self.kind == "tcp":
            self.master_listen = f"tcp:{address.rsplit(':', 1)[1]}:interface=127.0.0.1"
        assert not self.master_at or self.master_at == address
        self.master_at = address
        return master

    def node(self, harbor: int, name: str, *services: str) -> Daemon:
        args = ["skynode", "--harbor", str(harbor), "--name", name, "--master", self.master_at,
                "--secret-file", str(self.secret), "--listen", self.listen(name), "--no-mapper"]
        for service in services:
            args += ["--service", service]
        daemon: Daemon = self.daemons(*args, name=name)
        return daemon

    async def start(self) -> None:
        await self.start_master()
        self.alpha = self.node(1, "alpha", "echo")
        self.beta = self.node(2, "beta", "relay")
        await wait_for_line(self.alpha, r"joined the master .* as harbor 1")
        await wait_for_line(self.beta, r"joined the master .* as harbor 2")
        self.driver = Node(DRIVER, reactor, load_secret(self.secret), default_timeout=TIMEOUT)
        port = await self.driver.listen(self.listen("driver"))
        self.driver.join_master(self.master_at, "driver@test", describe_address(port))
        await wait_for(lambda: self.converged(0), "the driver to see the whole cluster")

    @property
    def welcomes(self) -> int:
        assert self.driver is not None and self.driver.master is not None
        return self.driver.master.welcomes

    def converged(self, welcomes_before: int) -> bool:
        """The driver joined a master (again) whose table has every harbor and name."""
        assert self.driver is not None and self.driver.master is not None
        master = self.driver.master
        return (master.welcomes > welcomes_before and master.connected
                and sorted(master.harbors) == [1, 2, DRIVER] and master.names == NAMES)

    async def status(self) -> Any:
        return await status_json(self.master_at, self.secret)

    async def stop(self) -> None:
        if self.driver is not None:
            await self.driver.stop()


# --- 1 and 5: SIGKILL the master under load, over tcp: and over unix: ---------------------

@pytest.mark.process
@pytest.mark.parametrize("kind", ["tcp", "unix"])
@pytest_twisted.ensureDeferred
async def test_sigkill_master_under_load_loses_no_call(daemons, kind):
    cluster = Cluster(daemons, kind)
    load: Load | None = None
    try:
        await cluster.start()
        if kind == "unix":
            assert cluster.master_at.startswith("unix:")
            assert all(h["endpoint"].startswith("unix:")
                       for h in (await cluster.status())["harbors"])
        before = membership(await cluster.status())
        assert cluster.driver is not None
        driver, alpha, beta = cluster.driver, cluster.alpha, cluster.beta
        assert driver is not None and alpha is not None and beta is not None
        load = Load(driver, RELAYED)
        load.start()
        await load.answers(STEADY, "the load to run")
        assert load.ok > 0 and not load.failures, load.failures[:3]

        welcomes = cluster.welcomes
        killed = time.monotonic()
        cluster.master.kill()
        # Every node notices the master is gone, and calls go on without it.
        await wait_for(lambda: driver.master is not None and not driver.master.connected,
                       "the driver to lose the master")
        await wait_for_line(alpha, r"lost the master")
        await wait_for_line(beta, r"lost the master")
        await load.answers(STEADY, "calls answered with no master")
        await cluster.start_master()
        listening = time.monotonic()
        await wait_for(lambda: cluster.converged(welcomes), "every node to re-register",
                       timeout=10)
        converged = time.monotonic()
        after = membership(await cluster.status())
        await load.answers(STEADY, "calls answered after re-convergence")
        await load.stop()
    finally:
        if load is not None:
            await load.stop()
        await cluster.stop()

    assert after == before  # same harbors, endpoints, incarnations and names
    assert not load.failures, f"{len(load.failures)} calls failed, first: {load.failures[:3]}"
    during = load.completed_between(killed, converged)
    log(f"master SIGKILL over {kind}: {load.summary()}")
    log(f"master SIGKILL over {kind}: {during} calls answered between the kill and "
        f"re-convergence; every node re-registered {converged - listening:.2f} s after the "
        f"new master listened ({converged - killed:.2f} s after the kill, "
        f"{listening - killed:.2f} s of it with no master)")
    assert during > 0
    assert max(load.latencies) < 1.0  # no call waited for the master (names came from caches)
    assert converged - listening < 3.0


# --- 4: ten master restarts in a row under load --------------------------------------------

@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_ten_master_restarts_under_load_converge_every_time(daemons):
    cluster = Cluster(daemons)
    load: Load | None = None
    cycles: list[tuple[float, float]] = []  # (since the kill, since the new master listened)
    try:
        await cluster.start()
        before = membership(await cluster.status())
        assert cluster.driver is not None
        load = Load(cluster.driver, RELAYED)
        load.start()
        await load.answers(STEADY, "the load to run")
        for cycle in range(10):
            welcomes = cluster.welcomes
            killed = time.monotonic()
            cluster.master.kill()
            await cluster.start_master()
            listening = time.monotonic()
            await wait_for(lambda welcomes=welcomes: cluster.converged(welcomes),
                           f"the table to converge after restart {cycle + 1}", timeout=10)
            converged = time.monotonic()
            cycles.append((converged - killed, converged - listening))
        # The driver's view is the master's table as pushed; ask the master itself too.
        assert membership(await cluster.status()) == before
        await load.answers(STEADY, "calls answered after the last restart")
        await load.stop()
    finally:
        if load is not None:
            await load.stop()
        await cluster.stop()

    assert len(cycles) == 10
    assert not load.failures, f"{len(load.failures)} calls failed, first: {load.failures[:3]}"
    since_listen = sorted(c[1] for c in cycles)
    since_kill = sorted(c[0] for c in cycles)
    log(f"10 master restarts: {load.summary()}")
    log(f"10 master restarts: convergence after the new master listened: min "
        f"{since_listen[0]:.2f} s, median {statistics.median(since_listen):.2f} s, max "
        f"{since_listen[-1]:.2f} s; after the kill (incl. twistd start): min "
        f"{since_kill[0]:.2f} s, median {statistics.median(since_kill):.2f} s, max "
        f"{since_kill[-1]:.2f} s")
    log("10 master restarts: per cycle (s after listening): "
        + " ".join(f"{c[1]:.2f}" for c in cycles))
    assert max(load.latencies) < 1.0
    assert since_listen[-1] < 3.0


# --- 2: SIGSTOP a node past the heartbeat bound, then SIGCONT --------------------------------

def is_harbor_down(error: BaseException) -> bool:
    """HarborDown here, or HarborDown on the relaying node (a RemoteError of that type)."""
    return isinstance(error, HarborDown) or (
        isinstance(error, RemoteError) and error.remote_type == "HarborDown")


async def first_success(call: Callable[[], Deferred[Any]], expected: Any,
                        within: float) -> tuple[float, list[str]]:
    """Call until one answers ``expected`` (bounded in time and tries): (when, errors seen)."""
    errors: list[str] = []
    deadline = time.monotonic() + within
    for _ in range(200):
        try:
            if await call() == expected:
                return time.monotonic(), errors
        except Exception as e:
            if not errors or errors[-1] != f"{type(e).__name__}: {e}":
                errors.append(f"{type(e).__name__}: {e}")
        if time.monotonic() > deadline:
            break
        await sleep(0.05)
    raise AssertionError(f"no answer within {within} s; errors: {errors}")


def new_lines(daemon: Daemon, offset: int, pattern: str = r"") -> list[str]:
    """Log lines written after ``offset``, without the timestamp, that match ``pattern``."""
    lines = daemon.output()[offset:].splitlines()
    return [re.sub(r"^\S+ \[[^]]*\] ", "", line) for line in lines if re.search(pattern, line)]


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_sigstop_a_node_past_the_heartbeat_bound_then_sigcont(daemons):
    cluster = Cluster(daemons)
    load: Load | None = None
    stopped_at = 0.0
    try:
        await cluster.start()
        driver, alpha, beta = cluster.driver, cluster.alpha, cluster.beta
        assert driver is not None and alpha is not None and beta is not None
        before = await cluster.status()
        incarnation = before["harbors"][0]["incarnation"]
        events: list[tuple[float, Any]] = []
        driver.subscribe(lambda event: events.append((time.monotonic(), event)))

        # Callers with calls pending when alpha freezes: the driver directly, and beta
        # (through its relay, by handle and by name). Each caller stops at its first failure.
        load = Load(driver, [DIRECT, *RELAYED], inflight=21, stop_on_failure=True)
        load.start()
        await load.answers(STEADY, "the load to run")
        assert load.ok > 0 and not load.failures, load.failures[:3]
        answered = load.ok
        alpha.process.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        await load.finished_by_itself(within=HEARTBEAT_TIMEOUT + 5)
        await wait_for(lambda: 1 not in (driver.master.harbors if driver.master else [1]),
                       "the master to drop the frozen harbor", timeout=HEARTBEAT_TIMEOUT + 5)
        frozen = await cluster.status()
        assert [h["id"] for h in frozen["harbors"]] == [2, DRIVER]
        assert frozen["names"] == {"RELAY": BETA_RELAY}
        left = [t for t, e in events if isinstance(e, HarborLeft) and e.harbor == 1]
        # Past the heartbeat bound for everyone: the master dropped alpha, and so did each
        # caller (every one failed with HarborDown, beta's relayed calls included): alpha
        # comes back to find its links and its master connection closed.
        await wait_for(lambda: driver.router.state(1) != "up",
                       "the driver's link to alpha to go", timeout=HEARTBEAT_TIMEOUT + 5)
        log_offset = len(alpha.output())
        alpha.process.send_signal(signal.SIGCONT)
        continued = time.monotonic()
        held = continued - stopped_at

        # alpha notices its links and its master connection were closed, rejoins with the
        # same incarnation (its old record is gone, so the master accepts it), and serves.
        rejoined_at = (await wait_for(
            lambda: next((t for t, e in events if t > continued and isinstance(e, HarborJoined)
                          and e.record.harbor == 1), None),
            "alpha to rejoin", timeout=10))
        rejoined = [e for t, e in events if t > continued and isinstance(e, HarborJoined)]
        assert rejoined[0].record.incarnation == incarnation
        named_at = await wait_for(
            lambda: next((t for t, e in events if t > continued and isinstance(e, NameBound)
                          and e.name == "ECHO"), None), "ECHO to come back", timeout=10)
        direct_at, direct_errors = await first_success(
            lambda: driver.call(ALPHA_ECHO, "back", timeout=1.0), "back", within=10)
        relay_at, relay_errors = await first_success(
            lambda: driver.call("RELAY", ["ECHO", "back"], timeout=1.0), "back", within=10)

        # Then it carries a full load again without a single failure.
        steady = Load(driver, [DIRECT, *RELAYED], inflight=21)
        steady.start()
        await steady.answers(STEADY, "a full load again")
        await steady.stop()
        after = await cluster.status()
    finally:
        if stopped_at and cluster.alpha is not None:
            cluster.alpha.process.send_signal(signal.SIGCONT)
        if load is not None:
            await load.stop()
        await cluster.stop()

    assert len(load.failures) == load.inflight
    assert all(is_harbor_down(e) for _, _, e in load.failures), load.failures
    detection: dict[str, list[float]] = {}
    reasons: dict[str, set[str]] = {}
    for t, what, error in load.failures:
        detection.setdefault(what, []).append(t - stopped_at)
        reasons.setdefault(what, set()).add(str(error))
    for what, seconds in sorted(detection.items()):
        log(f"SIGSTOP: {len(seconds)} pending calls {what} failed with HarborDown "
            f"{min(seconds):.2f}..{max(seconds):.2f} s after the SIGSTOP: "
            f"{' | '.join(sorted(reasons[what]))}")
        assert min(seconds) >= HEARTBEAT_TIMEOUT - 1.1, seconds  # 3 s silence, 1 s beats
        assert max(seconds) <= HEARTBEAT_TIMEOUT + 1.5, seconds
    log(f"SIGSTOP: {answered} calls answered before the freeze; the master dropped harbor 1 "
        f"{left[0] - stopped_at:.2f} s after the SIGSTOP; SIGCONT after {held:.2f} s")
    assert left and left[0] - stopped_at <= HEARTBEAT_TIMEOUT + 1.5
    log(f"SIGCONT: alpha rejoined with the same incarnation {rejoined_at - continued:.2f} s "
        f"after SIGCONT, ECHO bound again after {named_at - continued:.2f} s; answered "
        f"directly after {direct_at - continued:.2f} s, through beta's relay by name after "
        f"{relay_at - continued:.2f} s")
    log(f"SIGCONT: errors while recovering: direct {direct_errors or 'none'}; "
        f"relay {relay_errors or 'none'}")
    log(f"SIGCONT: then {steady.summary()}")
    for line in new_lines(alpha, log_offset, r"link|master|harbor|refus")[:20]:
        log(f"SIGCONT: alpha: {line}")
    assert not steady.failures, steady.failures[:3]
    assert max(direct_at, relay_at) - continued < 5.0
    assert membership(after) == membership(before)
    assert alpha.process.poll() is None and "Traceback" not in alpha.output()


def test_a_harbor_the_master_drops_for_silence_fails_calls_saying_it_was_silent():
    # SIGSTOP in test_sigstop_a_node_past_the_heartbeat_bound_then_sigcont shows it over TCP;
    # here the same on loopback, deterministic: only b's master connection goes quiet.
    cluster = InMemoryCluster()
    a, b = cluster.add_node(1), cluster.add_node(2)
    parked = b.spawn(Parked())
    pending = a.call(parked, "pending")
    cluster.settle()
    (to_master,) = [c for c in connections_of(b) if c.name == cluster.master_name]
    to_master.pause()
    cluster.settle(HEARTBEAT_TIMEOUT + 0.5)
    message = str(failure_of(pending, HarborDown).value)
    assert "silent" in message, message
