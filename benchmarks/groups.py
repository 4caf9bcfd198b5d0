"""Service groups: calls/s over a group of 1, 2 and 4 worker processes, and latency with one
of 4 workers frozen (SIGSTOP), with ``least_loaded`` and with ``retry=True``.

Run: ``python benchmarks/groups.py [--json] [--seconds S] [--rounds N]
[--worker-concurrency C]``. About 80 s with the defaults (5 s, 2 rounds).

Processes (all on 127.0.0.1, ephemeral ports, the real epoll reactor in each): ``twistd -n
--pidfile= skymaster`` and four ``twistd -n --pidfile= skynode --harbor H --master ...
--no-mapper --service groupworker:Worker --join-group ...`` (harbors 1 to 4). The worker
module is written into a temporary directory put on PYTHONPATH, with the cookie file (mode
0600, 32 random bytes in hex) that every process reads through ``--secret-file``. The
Worker's handler returns a Deferred that ``self.node.reactor.callLater(0.010, ...)`` fires
with the payload: each call waits 10 ms, and a worker waits on any number of calls at once
(I/O-bound, not CPU). With ``--worker-concurrency C`` a worker instead serves at most C
calls at a time and queues the rest (in order), which makes the worker the bottleneck
(C / 10 ms calls/s each); 0, the default, is no limit.

Groups: every worker is in ``workers`` (4 members); worker 1 is also in ``workers-1`` and
workers 1 and 2 in ``workers-2``. So the groups of 1, 2 and 4 are measured with the same
four processes running, and the modes can alternate without restarting any.

The driver is an in-process :class:`Node` (harbor 100, listening on 127.0.0.1:0, joined to
the master) that keeps 200 calls outstanding with ``node.call_group(group, payload,
pick=..., timeout=10)`` for ``--seconds`` after 0.5 s of warm-up, each reply checked
against its payload. Modes, once per round, rounds in alternating order (forward,
backward, ...):

- ``rr1``, ``rr2``, ``rr4``: round_robin over 1, 2 and 4 workers: calls/s (completed in the
  measured span, divided by it) and ``ratio_rr4_rr1`` (target >= 3.5);
- ``ll4``: least_loaded over the 4 healthy workers: the reference latency;
- ``frozen_ll``: least_loaded over 4 workers, worker 4 frozen with SIGSTOP 0.5 s into the
  measured span (calls in flight to it, as when a member stalls under load); no retry.
  p50/p99 latency against ``ll4``'s p99 (target: p99 within 2x);
- ``frozen_retry``: the same with ``retry=True``: the longest time a call waited on the
  frozen member before it was declared down and the call re-sent (target: no longer than
  the heartbeat timeout, 3 s, the daemons' default), the longest call in all (that wait
  plus the re-sent call's own time; reported against the same 3 s), and the failed calls
  (must be 0).

Latencies are those of the calls started in the measured span, however late they end
(failed calls included). After each frozen mode the worker gets SIGCONT and must be back in
its groups (it re-joins the master by itself), with its link up, within 30 s; the next mode
starts one heartbeat later. ``frozen_*_down_s`` is how long after the SIGSTOP a monitor
(``node.monitor``) on the frozen member fired: when the driver declared it down, and failed
(or, with retry, re-sent) the calls waiting on it. Calls/s, p50 and p99 are the median of
the rounds (with two rounds, their mean); the longest waits and calls, the peaks and the
failures are over all rounds.

Which failed calls fail the run (exit status 1):

- every failed call of ``rr1``, ``rr2``, ``rr4``, ``ll4`` and ``frozen_retry``: an error, a
  wrong reply, or a call still unanswered 15 s after its mode's end;
- in ``frozen_ll`` (no retry), only the unexplained ones. A failure is explained, and
  reported apart as ``frozen_ll_expected_failures``, when it is ``HarborDown`` naming the
  frozen worker's harbor, for a call made before the driver declared that harbor down (the
  monitor fired), failing no later than the heartbeat timeout plus 1 s after the SIGSTOP:
  a call that was in flight to the frozen member, which is what a caller without
  ``retry`` is promised. Any other failure there (a timeout, a wrong reply, HarborDown of
  another harbor, later than that, or for a call made once the harbor was known down, i.e.
  sent to a member already gone) is unexplained and counted.

Also exit status 1: a worker that does not come back after SIGCONT, or a cluster that does
not come up. Missed targets are reported (``met`` / ``MISSED``), not turned into a status.
Every process is stopped at the end, however the run ends (SIGCONT before SIGTERM for a
frozen one, SIGKILL after 10 s), and the temporary directory removed.

With ``--json`` the last line of stdout is one JSON object: ``MODE_calls_s``,
``MODE_p50_ms``, ``MODE_p99_ms``, ``MODE_max_ms``, ``MODE_failures``,
``MODE_driver_cpu`` and ``MODE_workers_cpu`` (CPU used over the measured span, in cores:
this process, and the four workers together, from /proc); for the two frozen
modes ``MODE_down_s``, ``MODE_waited_max_ms`` (the longest wait on the frozen member),
``MODE_pending_peak`` (the most calls the driver had waiting on it at once),
``MODE_frozen_share`` (its share of the outstanding calls over the span) and
``MODE_rejoined_s`` (SIGCONT to live member again); the ratios ``ratio_rr4_rr1``,
``ratio_rr2_rr1``, ``ratio_frozen_ll_p99_ll4_p99``, ``ratio_frozen_retry_p99_ll4_p99``;
``frozen_ll_expected_failures``; ``failed_calls`` (those that fail the run); and
``load_before`` / ``load_after`` (``os.getloadavg()``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.python.failure import Failure

from skyproto.auth import load_secret
from skyproto.errors import HarborDown
from skyproto.node.node import Node

DRIVER_HARBOR = 100
WORKER_HARBORS = (1, 2, 3, 4)
FROZEN_HARBOR = 4  #: the worker frozen in the frozen modes (a member of ``workers`` only)
#: the group of each size; its members are the workers of harbors 1 to that size
GROUPS = {1: "workers-1", 2: "workers-2", 4: "workers"}
WINDOW = 200  #: calls kept outstanding
DELAY = 0.010  #: seconds each call waits in the worker
CALL_TIMEOUT = 10.0  #: longer than the heartbeat timeout: a frozen member is found down
HEARTBEAT_TIMEOUT = 3.0  #: the daemons' (and the driver's) default
WARMUP = 0.5  #: unmeasured seconds before each mode
FREEZE_AFTER = 0.5  #: seconds into the measured span at which the frozen modes SIGSTOP
EXPLAINED_SLACK = 1.0  #: seconds past the heartbeat timeout a HarborDown is still explained
START_TIMEOUT = 30.0  #: seconds for the cluster to come up, or a resumed worker to return
DRAIN_TIMEOUT = 15.0  #: seconds past a mode's end for its outstanding calls to end
SAMPLE_EVERY = 0.02  #: seconds between samples of the calls waiting on each worker
TWISTD = str(Path(sys.executable).with_name("twistd"))
WORKER_MODULE = "groupworker"
WORKER_SOURCE = f'''\
"""The benchmark's worker: answers the payload after 10 ms, without using the CPU."""

import collections
import os

from twisted.internet.defer import Deferred

from skyproto.node.service import Service

DELAY = {DELAY!r}
LIMIT = int(os.environ.get("SKYPROTO_BENCH_CONCURRENCY", "0"))  # 0: no limit


class Worker(Service):
    def __init__(self):
        self.busy = 0
        self.waiting = collections.deque()

    def receive(self, source, session, payload):
        answer = Deferred()
        if LIMIT and self.busy >= LIMIT:
            self.waiting.append((answer, payload))
        else:
            self._start(answer, payload)
        return answer

    def _start(self, answer, payload):
        self.busy += 1
        self.node.reactor.callLater(DELAY, self._done, answer, payload)

    def _done(self, answer, payload):
        self.busy -= 1
        if self.waiting:
            self._start(*self.waiting.popleft())
        answer.callback(payload)
'''


@dataclass(frozen=True)
class Mode:
    """One way of driving the group."""

    name: str
    members: int
    pick: str
    retry: bool = False
    frozen: bool = False

    @property
    def group(self) -> str:
        return GROUPS[self.members]


MODES = (
    Mode("rr1", 1, "round_robin"),
    Mode("rr2", 2, "round_robin"),
    Mode("rr4", 4, "round_robin"),
    Mode("ll4", 4, "least_loaded"),
    Mode("frozen_ll", 4, "least_loaded", frozen=True),
    Mode("frozen_retry", 4, "least_loaded", retry=True, frozen=True),
)
TARGET_SCALING = 3.5
TARGET_P99 = 2.0


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the value below which a fraction ``q`` of ``values`` lies."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def describe(failure: Failure) -> str:
    return f"{failure.type.__name__}: {failure.getErrorMessage()}"  # type: ignore[union-attr]


# --- processes -----------------------------------------------------------------------------


class Process:
    """One ``twistd -n`` daemon, its output in a log file of the temporary directory."""

    def __init__(self, name: str, args: list[str], workdir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self.frozen = False
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", *args], cwd=workdir, env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first match of ``pattern`` in the log (blocking; before the reactor runs)."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.output())
            if found:
                return found
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}):\n"
                                   f"{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {pattern!r} in {self.name}'s log in {timeout:g} s")
            time.sleep(0.05)

    def freeze(self) -> None:
        self.process.send_signal(signal.SIGSTOP)
        self.frozen = True

    def resume(self) -> None:
        if self.frozen and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
        self.frozen = False

    def stop(self) -> None:
        """SIGCONT if frozen, SIGTERM, SIGKILL if it has not gone within 10 s."""
        self.resume()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.output().splitlines()[-lines:])


@dataclass
class Cluster:
    """The master and the workers, and what the driver needs to reach them."""

    workdir: Path
    secret_file: Path
    master_at: str
    master: Process
    workers: dict[int, Process]


@contextmanager
def cluster(concurrency: int) -> Iterator[Cluster]:
    """Start the master and the four workers; stop every one however the block ends."""
    with tempfile.TemporaryDirectory(prefix="skygroups") as tmp:
        workdir = Path(tmp)
        (workdir / f"{WORKER_MODULE}.py").write_text(WORKER_SOURCE)
        secret_file = workdir / "cookie"
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32) + "\n")
        env = dict(os.environ, HOME=str(workdir), PYTHONUNBUFFERED="1",
                   SKYPROTO_BENCH_CONCURRENCY=str(concurrency),
                   PYTHONPATH=os.pathsep.join(
                       p for p in (str(workdir), os.environ.get("PYTHONPATH", "")) if p))
        started: list[Process] = []
        try:
            master = Process("master", [
                "skymaster", "--listen", "tcp:0:interface=127.0.0.1",
                "--secret-file", str(secret_file)], workdir, env)
            started.append(master)
            master_at = master.wait_for_line(r"skymaster listening on (\S+)",
                                             START_TIMEOUT).group(1)
            workers: dict[int, Process] = {}
            for harbor in WORKER_HARBORS:
                groups = [g for size, g in GROUPS.items() if harbor <= size]
                workers[harbor] = Process(f"worker{harbor}", [
                    "skynode", "--harbor", str(harbor), "--master", master_at,
                    "--secret-file", str(secret_file), "--no-mapper",
                    "--service", f"{WORKER_MODULE}:Worker",
                    *(arg for group in groups for arg in ("--join-group", group))],
                    workdir, env)
                started.append(workers[harbor])
            yield Cluster(workdir, secret_file, master_at, master, workers)
        except BaseException:
            for process in started:
                print(f"--- {process.name} (last lines of its log)\n{process.tail()}",
                      file=sys.stderr)
            raise
        finally:
            for process in reversed(started):
                process.stop()


# --- the load ------------------------------------------------------------------------------


@dataclass
class Result:
    """One mode, one round."""

    mode: str
    completed: int = 0  #: replies received within the measured span
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  #: calls started in the span
    failures: int = 0  #: failures that fail the run
    expected: int = 0  #: explained failures (frozen_ll only)
    first_failure: str | None = None
    first_expected: str | None = None
    down_after: float | None = None  #: SIGSTOP to the monitor on the frozen member firing
    pending_peak: int = 0  #: most calls waiting on the frozen member at once
    #: the mean number of calls waiting on each worker's harbor over the measured span
    mean_pending: dict[int, float] = field(default_factory=dict)
    rejoined_after: float | None = None  #: SIGCONT to the member being live again
    #: the longest a call that ended after the frozen member was declared down had waited
    #: by then: a call stuck on that member, re-sent then with ``retry``
    waited_at_down: float = 0.0
    #: CPU used over the measured span, in cores: ``driver`` and ``workerN``
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0

    def ms(self, q: float) -> float:
        return percentile(self.latencies, q) * 1e3

    @property
    def max_ms(self) -> float:
        return max(self.latencies, default=0.0) * 1e3


class Load:
    """``WINDOW`` calls kept outstanding on a group until the measured span ends."""

    def __init__(self, node: Node, mode: Mode, seconds: float,
                 workers: dict[int, Process]) -> None:
        self.node = node
        self.workers = workers
        frozen = workers[FROZEN_HARBOR] if mode.frozen else None
        self.mode = mode
        self.seconds = seconds
        self.frozen = frozen
        self.result = Result(mode.name, seconds=seconds)
        self.sequence = 0
        self.outstanding = 0
        self.span_start = 0.0
        self.span_end = 0.0
        self.issuing = True
        #: inside call_group: a call failing at once must not issue the next one within
        #: its own errback (a recursion as deep as the failures are many)
        self.in_call = False
        self.freeze_at: float | None = None
        self.down_at: float | None = None  #: when the monitor on the frozen member fired
        self.drained: Deferred[None] = Deferred()
        self.samples: dict[int, list[int]] = {h: [] for h in WORKER_HARBORS}

    async def run(self) -> Result:
        reactor = self.node.reactor
        now = time.perf_counter()
        self.span_start = now + WARMUP
        self.span_end = self.span_start + self.seconds
        sampler = LoopingCall(self._sample)
        sampler.clock = reactor
        sampler.start(SAMPLE_EVERY, now=False)
        try:
            for _ in range(WINDOW):
                self._issue()
            await deferLater(reactor, max(0.0, self.span_start - time.perf_counter()),
                             lambda: None)
            before = self._cpu()
            if self.mode.frozen:
                await deferLater(reactor, FREEZE_AFTER, lambda: None)
                await self._freeze()
            await deferLater(reactor, max(0.0, self.span_end - time.perf_counter()),
                             lambda: None)
            after = self._cpu()
            self.issuing = False
            self.result.cpu = {who: (after[who] - used) / self.seconds
                               for who, used in before.items() if who in after}
            if self.outstanding:
                timer = reactor.callLater(DRAIN_TIMEOUT, self._late)
                await self.drained
                if timer.active():
                    timer.cancel()
        finally:
            sampler.stop()
        self.result.mean_pending = {h: statistics.fmean(s) if s else 0.0
                                    for h, s in self.samples.items()}
        return self.result

    def _cpu(self) -> dict[str, float]:
        """CPU seconds used so far by the driver and by each worker process."""
        used = {"driver": time.process_time()}
        for harbor, process in self.workers.items():
            seconds = cpu_seconds(process.process.pid)
            if seconds is not None:
                used[f"worker{harbor}"] = seconds
        return used

    async def _freeze(self) -> None:
        assert self.frozen is not None
        member = next(m for m in self.node.group_members(self.mode.group)
                      if m >> 24 == FROZEN_HARBOR)
        watching = self.node.monitor(member)
        self.frozen.freeze()
        self.freeze_at = time.perf_counter()

        def down(reason: str) -> None:
            assert self.freeze_at is not None
            self.down_at = time.perf_counter()
            self.result.down_after = self.down_at - self.freeze_at

        watching.addCallbacks(down, lambda _: None)

    def _sample(self) -> None:
        if not self.span_start <= time.perf_counter() < self.span_end:
            return
        for harbor in WORKER_HARBORS:
            pending = self.node.sessions.pending_to(harbor)
            self.samples[harbor].append(pending)
            if harbor == FROZEN_HARBOR and self.freeze_at is not None:
                self.result.pending_peak = max(self.result.pending_peak, pending)

    def _issue(self) -> None:
        self.sequence += 1
        payload = self.sequence
        started = time.perf_counter()
        self.outstanding += 1
        self.in_call = True
        try:
            called = self.node.call_group(self.mode.group, payload, pick=self.mode.pick,
                                          timeout=CALL_TIMEOUT, retry=self.mode.retry)
            called.addCallbacks(self._answered, self._failed, callbackArgs=(payload, started),
                                errbackArgs=(started,))
        finally:
            self.in_call = False

    def _answered(self, reply: Any, payload: int, started: float) -> None:
        if self.down_at is not None and started < self.down_at:
            self.result.waited_at_down = max(self.result.waited_at_down,
                                             self.down_at - started)
        if reply != payload:
            self._count_failure(f"wrong reply {reply!r} to {payload!r}")
        else:
            ended = time.perf_counter()
            if self.span_start <= ended <= self.span_end:
                self.result.completed += 1
            if started >= self.span_start:
                self.result.latencies.append(ended - started)
        self._next()

    def _failed(self, failure: Failure, started: float) -> None:
        ended = time.perf_counter()
        if self.down_at is not None and started < self.down_at:
            self.result.waited_at_down = max(self.result.waited_at_down,
                                             self.down_at - started)
        if self._explained(failure, started, ended):
            self.result.expected += 1
            self.result.first_expected = self.result.first_expected or describe(failure)
        else:
            self._count_failure(describe(failure))
        if started >= self.span_start:
            self.result.latencies.append(ended - started)
        self._next()

    def _explained(self, failure: Failure, started: float, ended: float) -> bool:
        """In ``frozen_ll`` only: HarborDown of the frozen harbor, for a call made before it
        was declared down, within the heartbeat timeout (plus slack) of the SIGSTOP. See
        the module's docstring."""
        if not self.mode.frozen or self.mode.retry or self.freeze_at is None:
            return False
        named = re.search(rf"\bharbor {FROZEN_HARBOR}\b", failure.getErrorMessage())
        down_at = self.down_at if self.down_at is not None else ended
        return bool(failure.check(HarborDown)) and named is not None and \
            started < down_at and \
            self.freeze_at <= ended <= self.freeze_at + HEARTBEAT_TIMEOUT + EXPLAINED_SLACK

    def _count_failure(self, what: str) -> None:
        self.result.failures += 1
        self.result.first_failure = self.result.first_failure or what

    def _next(self) -> None:
        if self.in_call:  # failed at once: the slot is reused on the next reactor turn
            self.node.reactor.callLater(0, self._next)
            return
        self.outstanding -= 1
        if self.issuing:
            self._issue()
        elif not self.outstanding and not self.drained.called:
            self.drained.callback(None)

    def _late(self) -> None:
        if not self.drained.called:
            self.result.failures += self.outstanding
            self.result.first_failure = self.result.first_failure or (
                f"{self.outstanding} calls unanswered {DRAIN_TIMEOUT:g} s after the mode's end")
            self.issuing = False
            self.outstanding = -1_000_000  # late answers change nothing now
            self.drained.callback(None)


# --- the driver ----------------------------------------------------------------------------


async def wait_until(reactor: Any, predicate: Callable[[], bool], what: str,
                     timeout: float = START_TIMEOUT) -> float:
    """Poll ``predicate`` every 20 ms until it holds; how long that took."""
    started = time.perf_counter()
    while not predicate():
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"{what} within {timeout:g} s")
        await deferLater(reactor, 0.02, lambda: None)
    return time.perf_counter() - started


def cluster_ready(node: Node) -> bool:
    """Every group has its members, and the driver's link to each worker is up."""
    return all(len(node.group_members(group)) == size for size, group in GROUPS.items()) \
        and all(node.router.state(harbor) == "up" for harbor in WORKER_HARBORS)


async def drive(reactor: Any, procs: Cluster, seconds: float, rounds: int) -> list[Result]:
    node = Node(DRIVER_HARBOR, reactor, load_secret(procs.secret_file, create=False),
                default_timeout=CALL_TIMEOUT, heartbeat_timeout=HEARTBEAT_TIMEOUT)
    results: list[Result] = []
    try:
        await node.listen("tcp:0:interface=127.0.0.1")
        node.join_master(procs.master_at)
        await wait_until(reactor, lambda: cluster_ready(node),
                         "the driver saw every worker in its groups, linked")
        await deferLater(reactor, 1.1, lambda: None)  # one heartbeat: loads are known
        for number in range(rounds):
            for mode in (MODES if number % 2 == 0 else MODES[::-1]):
                result = await Load(node, mode, seconds, procs.workers).run()
                if mode.frozen:
                    procs.workers[FROZEN_HARBOR].resume()
                    result.rejoined_after = await wait_until(
                        reactor, lambda: cluster_ready(node),
                        f"worker {FROZEN_HARBOR} back in its group after SIGCONT")
                    await deferLater(reactor, 1.1, lambda: None)
                results.append(result)
                print(f"  round {number + 1} {mode.name:<13} {result.rate:>9,.0f} calls/s  "
                      f"p50 {result.ms(0.5):7.1f} ms  p99 {result.ms(0.99):7.1f} ms  "
                      f"max {result.max_ms:7.1f} ms  failures {result.failures}"
                      + (f" (+{result.expected} expected)" if result.expected else "")
                      + f"  CPU driver {result.cpu.get('driver', 0.0):.0%}, workers "
                      + "+".join(f"{result.cpu[f'worker{h}']:.0%}" for h in WORKER_HARBORS
                                 if f"worker{h}" in result.cpu),
                      flush=True)
    finally:
        await node.stop()
    return results


def run_reactor(procs: Cluster, seconds: float, rounds: int) -> list[Result]:
    """Run the driver on the global reactor until every mode is measured."""
    from twisted.internet import reactor

    outcome: list[list[Result] | Failure] = []

    def finish(value: list[Result] | Failure) -> None:
        outcome.append(value)
        reactor.stop()

    def start() -> None:
        Deferred.fromCoroutine(drive(reactor, procs, seconds, rounds)).addBoth(finish)

    reactor.callWhenRunning(start)
    reactor.run()
    if not outcome:
        raise RuntimeError("interrupted: the reactor stopped before the benchmark finished")
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


# --- report --------------------------------------------------------------------------------


def summarise(results: list[Result]) -> dict[str, Any]:
    by_mode: dict[str, list[Result]] = {}
    for result in results:
        by_mode.setdefault(result.mode, []).append(result)
    summary: dict[str, Any] = {}
    for name, rounds in by_mode.items():
        summary[f"{name}_calls_s"] = round(statistics.median(r.rate for r in rounds), 1)
        summary[f"{name}_p50_ms"] = round(statistics.median(r.ms(0.5) for r in rounds), 2)
        summary[f"{name}_p99_ms"] = round(statistics.median(r.ms(0.99) for r in rounds), 2)
        summary[f"{name}_max_ms"] = round(max(r.max_ms for r in rounds), 2)
        summary[f"{name}_failures"] = sum(r.failures for r in rounds)
        summary[f"{name}_driver_cpu"] = round(statistics.median(
            r.cpu.get("driver", 0.0) for r in rounds), 3)
        summary[f"{name}_workers_cpu"] = round(statistics.median(
            sum(v for k, v in r.cpu.items() if k != "driver") for r in rounds), 3)
        first = next((r.first_failure for r in rounds if r.first_failure), None)
        if first:
            summary[f"{name}_first_failure"] = first
        if name.startswith("frozen"):
            downs = [r.down_after for r in rounds if r.down_after is not None]
            summary[f"{name}_down_s"] = round(max(downs), 3) if downs else None
            summary[f"{name}_pending_peak"] = max(r.pending_peak for r in rounds)
            summary[f"{name}_frozen_share"] = round(statistics.median(
                r.mean_pending[FROZEN_HARBOR] / max(1e-9, sum(r.mean_pending.values()))
                for r in rounds), 3)
            summary[f"{name}_rejoined_s"] = round(max(
                r.rejoined_after or 0.0 for r in rounds), 2)
            summary[f"{name}_waited_max_ms"] = round(max(
                r.waited_at_down for r in rounds) * 1e3, 1)
    frozen_ll = by_mode.get("frozen_ll", [])
    summary["frozen_ll_expected_failures"] = sum(r.expected for r in frozen_ll)
    first = next((r.first_expected for r in frozen_ll if r.first_expected), None)
    if first:
        summary["frozen_ll_first_expected_failure"] = first
    for top, bottom in (("rr4", "rr1"), ("rr2", "rr1")):
        if summary.get(f"{bottom}_calls_s") and f"{top}_calls_s" in summary:
            summary[f"ratio_{top}_{bottom}"] = round(
                summary[f"{top}_calls_s"] / summary[f"{bottom}_calls_s"], 3)
    for top in ("frozen_ll", "frozen_retry"):
        if summary.get("ll4_p99_ms") and f"{top}_p99_ms" in summary:
            summary[f"ratio_{top}_p99_ll4_p99"] = round(
                summary[f"{top}_p99_ms"] / summary["ll4_p99_ms"], 3)
    summary["failed_calls"] = sum(r.failures for r in results)
    return summary


def report(summary: dict[str, Any]) -> None:
    print(f"\n{'mode':<14}{'calls/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
          f"{'CPU driver':>12}{'workers':>9}  failures")
    for mode in MODES:
        name = mode.name
        if f"{name}_calls_s" not in summary:
            continue
        failures = f"{summary[f'{name}_failures']}"
        if name == "frozen_ll":
            failures += f" (+{summary['frozen_ll_expected_failures']} expected HarborDown)"
        print(f"{name:<14}{summary[f'{name}_calls_s']:>10,.0f}{summary[f'{name}_p50_ms']:>9.1f}"
              f"{summary[f'{name}_p99_ms']:>9.1f}{summary[f'{name}_max_ms']:>9.1f}"
              f"{summary[f'{name}_driver_cpu']:>12.0%}{summary[f'{name}_workers_cpu']:>9.0%}"
              f"  {failures}")
        if f"{name}_first_failure" in summary:
            print(f"{'':<14}first failure: {summary[f'{name}_first_failure']}")
        if name.startswith("frozen"):
            print(f"{'':<14}worker {FROZEN_HARBOR} declared down {summary[f'{name}_down_s']} s "
                  f"after SIGSTOP; at most {summary[f'{name}_pending_peak']} calls waited on "
                  f"it at once, the longest {summary[f'{name}_waited_max_ms'] / 1e3:.3f} s; "
                  f"share of the outstanding calls on it "
                  f"{summary[f'{name}_frozen_share']:.1%}; back "
                  f"{summary[f'{name}_rejoined_s']} s after SIGCONT")
    checks: list[tuple[str, float, str, bool]] = []
    if "ratio_rr4_rr1" in summary:
        ratio = summary["ratio_rr4_rr1"]
        checks.append(("rr4 / rr1 calls/s", ratio, f">= {TARGET_SCALING:g}",
                       ratio >= TARGET_SCALING))
    if "ratio_frozen_ll_p99_ll4_p99" in summary:
        ratio = summary["ratio_frozen_ll_p99_ll4_p99"]
        checks.append(("frozen_ll p99 / ll4 p99", ratio, f"<= {TARGET_P99:g}",
                       ratio <= TARGET_P99))
    if "frozen_retry_max_ms" in summary:
        waited = summary["frozen_retry_waited_max_ms"] / 1e3
        checks.append(("frozen_retry longest wait on it (s)", waited,
                       f"<= {HEARTBEAT_TIMEOUT:g}", waited <= HEARTBEAT_TIMEOUT))
        longest = summary["frozen_retry_max_ms"] / 1e3
        checks.append(("frozen_retry longest call (s)", longest,
                       f"<= {HEARTBEAT_TIMEOUT:g}", longest <= HEARTBEAT_TIMEOUT))
        failed = summary["frozen_retry_failures"]
        checks.append(("frozen_retry failed calls", failed, "== 0", failed == 0))
    if checks:
        print(f"\n{'target':<34}{'value':>10}{'target':>10}")
        for what, value, target, met in checks:
            print(f"{what:<34}{value:>10.3f}{target:>10}  {'met' if met else 'MISSED'}")
    print(f"\nfailed calls (failing the run): {summary['failed_calls']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="measured seconds per mode (5)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds, in alternating order; each figure's median (2)")
    parser.add_argument("--worker-concurrency", type=int, default=0, metavar="C",
                        help="calls a worker serves at once, the rest queued (0: no limit)")
    args = parser.parse_args()
    if args.seconds <= FREEZE_AFTER or args.rounds < 1 or args.worker_concurrency < 0:
        parser.error(f"--seconds must be more than {FREEZE_AFTER:g}, --rounds at least 1, "
                     f"--worker-concurrency not negative")
    load_before = os.getloadavg()
    print(f"skyproto groups benchmark: Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, load average {load_before[0]:.2f} {load_before[1]:.2f} "
          f"{load_before[2]:.2f}; {WINDOW} calls outstanding, {DELAY * 1e3:g} ms per call, "
          f"worker concurrency {args.worker_concurrency or 'unlimited'}, "
          f"{args.seconds:g} s per mode after {WARMUP:g} s of warm-up, {args.rounds} rounds",
          flush=True)
    with cluster(args.worker_concurrency) as procs:
        results = run_reactor(procs, args.seconds, args.rounds)
    summary = summarise(results)
    load_after = os.getloadavg()
    summary.update(seconds=args.seconds, rounds=args.rounds,
                   worker_concurrency=args.worker_concurrency, nproc=os.cpu_count() or 0,
                   python=platform.python_version(),
                   load_before=[round(x, 2) for x in load_before],
                   load_after=[round(x, 2) for x in load_after])
    report(summary)
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    if args.json:
        print(json.dumps(summary))
    if summary["failed_calls"]:
        print(f"{summary['failed_calls']} calls failed (see the module docstring for which "
              f"count)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
