"""An in-process chaos harness: a master and 20 nodes on one Clock, a seeded fault schedule.

Everything runs over the ``loopback:`` transport on a ``twisted.internet.task.Clock`` (a
heap-ordered subclass of it, :class:`HeapClock`), and every random choice (the schedule here;
inside skyproto, each node's injected ``rng``: retry jitter, reconnect jitter, its first
session id) comes from ``random.Random(seed)``, so a seed replays exactly.

A killed node is a crash: its port stops listening, its master client stops, every one of its
connections is cut, and its router's timers and connects in flight are cancelled (a dead
process runs nothing); restarting it makes a new Node, a new incarnation of the same harbor.

Each step is one random action (calls by handle and by name, one-way sends, cancels, cutting,
pausing or delaying a connection, refusing a listener, killing and restarting a node or the
master, advancing or stalling the clock), then a short clock advance, then the per-step
invariants. Every ``settle_every`` steps (and at the end) the faults are healed and the clock
runs until the cluster has converged, then the settled invariants are checked and every live
node calls every other one. See :meth:`Chaos.check_step` and :meth:`Chaos.check_settled`.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
from collections.abc import Callable
from typing import Any, cast

from twisted.internet.base import DelayedCall
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from skyproto.address import make_handle
from skyproto.errors import (
    CallTimeout,
    HarborDown,
    MasterUnavailable,
    NoSuchService,
    QueueFull,
    RemoteError,
)
from skyproto.harbor.link import HarborLink
from skyproto.master.client import MasterClientProtocol
from skyproto.master.registry import InMemoryRegistry
from skyproto.master.server import MasterService
from skyproto.node.node import Node
from skyproto.node.service import Service
from skyproto.transports.loopback import LoopbackConnection, network_for

SECRET = b"chaos-secret-sixteen"
MASTER = "loopback:master"
#: the only ways a call may fail
ALLOWED = (CallTimeout, HarborDown, NoSuchService, RemoteError, MasterUnavailable, QueueFull,
           CancelledError)
DEFAULT_TIMEOUT = 10.0  #: Node's default call timeout (a call made with timeout=None)
REQUEST_TIMEOUT = 5.0  #: the master client's bounded wait and request timeout
TICK = 0.1  #: the clock never jumps further than this, except in a deliberate "stall"
SLACK = 0.05 + TICK + 1e-6  #: deadline bucket resolution plus one tick
MAX_SETTLE = 120.0  #: clock seconds a healed cluster gets to converge
HEARTBEAT_TIMEOUT = 3.0  #: Node's and MasterService's default
MAX_FAULT_DELAY = 4.0  #: the longest delay do_delay puts on a connection


def replay_command(seed: int, steps: int | None = None, nodes: int | None = None) -> str:
    extra = "".join(f"SKYPROTO_CHAOS_{k}={v} " for k, v in (("STEPS", steps), ("NODES", nodes))
                    if v is not None)
    return f"SKYPROTO_CHAOS_SEED={seed} {extra}pytest tests/test_chaos.py -k replay"


class HeapClock(Clock):
    """A ``Clock`` that keeps its pending calls in a heap.

    ``Clock.advance`` re-sorts every pending call after each call it runs; with 20 nodes'
    heartbeats (hundreds of pending calls) that sort is most of the run time. This runs the
    calls in exactly the order Clock does (by time, then by when they were scheduled).
    """

    def __init__(self) -> None:
        super().__init__()
        self._heap: list[tuple[float, int, DelayedCall]] = []
        self._order = itertools.count()

    def callLater(self, delay: float, callable: Callable[..., object], *args: object,
                  **kw: object) -> IDelayedCall:
        call = DelayedCall(self.seconds() + delay, callable, args, kw, _ignore, self._push,
                           self.seconds)
        self._push(call)
        return call

    def _push(self, call: DelayedCall) -> None:
        heapq.heappush(self._heap, (call.getTime(), next(self._order), call))

    def getDelayedCalls(self) -> list[IDelayedCall]:
        return [call for when, _, call in self._heap if call.active() and call.getTime() == when]

    def advance(self, amount: float) -> None:
        self.rightNow += amount
        heap = self._heap
        while heap:
            when, _, call = heap[0]
            if call.cancelled or call.called:
                heapq.heappop(heap)
                continue
            due = call.getTime()
            if due != when:  # reset (a fresher entry exists) or delayed (move it)
                heapq.heappop(heap)
                if due > when:
                    self._push(call)
                continue
            if when > self.rightNow:
                break
            heapq.heappop(heap)
            call.called = 1
            call.func(*call.args, **call.kw)


def _connection(link: HarborLink) -> LoopbackConnection | None:
    return getattr(link.transport, "connection", None)


def _ignore(call: DelayedCall) -> None:
    """Cancelled calls stay in the heap and are skipped when they come up."""


class ChaosFailure(AssertionError):
    """An invariant broke; the message has the seed, the step, recent steps and the replay."""


class ChaosEcho(Service):
    """Payload ``["call", id, delay, mode]``: replies ``[id, harbor, incarnation]`` (after
    ``delay`` seconds), or raises when ``mode`` is ``"raise"``. ``["send", id]`` is one-way."""

    def __init__(self, chaos: Chaos, member: Member) -> None:
        self.chaos = chaos
        self.member = member

    def receive(self, source: int, session: int, payload: Any) -> Any:
        if payload[0] == "send":
            self.chaos.delivered(self.member, payload[1])
            return None
        _, call_id, delay, mode = payload
        if mode == "raise":
            raise ValueError(f"call {call_id} asked for an error")
        reply = [call_id, self.member.harbor, self.member.incarnation]
        if delay <= 0:
            return reply
        d: Deferred[Any] = Deferred()
        timer = self.chaos.clock.callLater(delay, d.callback, reply)
        self.member.timers = [t for t in self.member.timers if t.active()]
        self.member.timers.append(timer)
        return d


class Member:
    """One incarnation of one harbor: a Node with a ChaosEcho named ``E<harbor>``."""

    def __init__(self, chaos: Chaos, harbor: int, incarnation: int) -> None:
        self.harbor = harbor
        self.incarnation = incarnation
        self.endpoint = f"loopback:h{harbor}-{incarnation}"
        self.dead = False
        self.timers: list[IDelayedCall] = []
        self.node = Node(harbor, chaos.clock, SECRET, incarnation=incarnation,
                         default_timeout=DEFAULT_TIMEOUT,
                         rng=random.Random(chaos.internal_rng.getrandbits(64)))
        self.node.listen(self.endpoint)
        self.echo = self.node.spawn(ChaosEcho(chaos, self), name=f"E{harbor}")
        self.node.join_master(MASTER, f"n{harbor}@chaos", self.endpoint,
                              request_timeout=REQUEST_TIMEOUT,
                              on_refused=lambda why: chaos.problem(
                                  f"the master refused h{harbor} (incarnation {incarnation}): "
                                  f"{why}"))

    def __repr__(self) -> str:
        return f"h{self.harbor}/{self.incarnation}{' (dead)' if self.dead else ''}"


class Probe:
    """One call made by the harness, and everything that happened to it."""

    __slots__ = ("deadline", "destination", "expect", "fired_at", "harbor", "id", "issued",
                 "lookup", "min_incarnation", "must_succeed", "outcomes", "source", "step")

    def __init__(self, call_id: int, step: int, source: Member, destination: int | str,
                 harbor: int, expect: str, min_incarnation: int, issued: float,
                 deadline: float, lookup: bool, must_succeed: bool) -> None:
        self.id = call_id
        self.step = step
        self.source = source
        self.destination = destination
        self.harbor = harbor
        self.expect = expect
        self.min_incarnation = min_incarnation
        self.issued = issued
        self.deadline = deadline
        self.lookup = lookup
        self.must_succeed = must_succeed
        self.outcomes: list[Any] = []
        self.fired_at = -1.0

    def __repr__(self) -> str:
        dest = self.destination if isinstance(self.destination, str) else \
            f":{self.destination:08x}"
        return (f"call #{self.id} (step {self.step}) {self.source!r} -> {dest} "
                f"{'lookup' if self.lookup else 'cached'}")


class Chaos:
    """One seeded chaos run. :meth:`run` raises :class:`ChaosFailure` on the first broken
    invariant."""

    def __init__(self, seed: int, nodes: int = 20, steps: int = 300, settle_every: int = 100,
                 trace: Callable[[str], object] | None = None,
                 replay_steps: int | None = None, replay_nodes: int | None = None) -> None:
        self.seed = seed
        self.nodes = nodes
        self.steps = steps
        self.settle_every = settle_every
        self.echo_trace = trace
        self.replay_steps, self.replay_nodes = replay_steps, replay_nodes
        self.rng = random.Random(seed)
        self.internal_rng = random.Random(seed * 7919 + 17)
        self.clock: Clock = HeapClock()
        self.net = network_for(self.clock)
        self.step = -1
        self.trace: list[str] = []
        self.problems: list[str] = []
        self.incarnations = itertools.count(1_000_001)
        self.ids = itertools.count(1)
        #: the current incarnation of every harbor (dead or alive); every one ever, in order
        self.members: dict[int, Member] = {}
        self.every_member: list[Member] = []
        self._by_router: dict[int, Member] = {}
        self._by_client: dict[int, Member] = {}
        self.open: dict[int, Probe] = {}
        self.deferreds: dict[int, Deferred[Any]] = {}  #: of the open calls, by probe id
        self.probes: list[Probe] = []
        self.sent: dict[int, tuple[int, int]] = {}
        self.received: dict[int, int] = {}
        self.fault_timers: list[IDelayedCall] = []
        self.refused: set[str] = set()
        self.master: MasterService | None = None
        self.master_port: IListeningPort | None = None
        self.masters = 0
        self.outcomes: dict[str, int] = {}
        self.stats: dict[str, int] = {}
        self.settles = 0

    # --- the run -----------------------------------------------------------------------

    def run(self) -> Chaos:
        observer = cast(ILogObserver, self._observe)
        globalLogPublisher.addObserver(observer)
        try:
            self._run()
        finally:
            globalLogPublisher.removeObserver(observer)
        return self

    def _run(self) -> None:
        self.start_master()
        for harbor in range(1, self.nodes + 1):
            self.start_node(harbor)
        self.note("started a master and %d nodes", self.nodes)
        self.settle("initial")
        actions = self._actions()
        names = [name for name, _ in actions]
        weights = [weight for _, weight in actions]
        for step in range(self.steps):
            self.step = step
            name = self.rng.choices(names, weights)[0]
            self.stats[name] = self.stats.get(name, 0) + 1
            getattr(self, f"do_{name}")()
            self.advance(self.rng.choice((0.0, 0.0, 0.01, 0.05, 0.1, 0.2, 0.3)))
            self.check_step()
            if (step + 1) % self.settle_every == 0 and step + 1 < self.steps:
                self.settle(f"after step {step}")
        self.step = self.steps
        self.settle("final")

    @staticmethod
    def _actions() -> list[tuple[str, float]]:
        return [
            ("call", 28), ("burst", 4), ("send", 8), ("cancel", 3), ("advance", 18),
            ("cut_link", 5), ("cut_master_link", 2), ("pause", 5), ("delay", 4), ("refuse", 2),
            ("kill_node", 2.5), ("restart_node", 3), ("bounce_node", 1.5), ("kill_master", 1),
            ("restart_master", 2), ("stall", 0.7),
        ]

    # --- bookkeeping -------------------------------------------------------------------

    def now(self) -> float:
        return self.clock.seconds()

    def note(self, message: str, *args: object) -> None:
        line = f"step {self.step} t={self.now():.2f}: " + (message % args if args else message)
        self.trace.append(line)
        if self.echo_trace is not None:
            self.echo_trace(line)

    def problem(self, message: str) -> None:
        self.problems.append(f"[step {self.step}, t={self.now():.2f}] {message}")

    def fail(self, message: str) -> None:
        recent = "\n".join("    " + line for line in self.trace[-25:])
        raise ChaosFailure(
            f"chaos seed {self.seed} broke an invariant at step {self.step} "
            f"(clock {self.now():.2f} s):\n  {message}\n"
            f"  last steps:\n{recent}\n"
            f"  replay: {replay_command(self.seed, self.replay_steps, self.replay_nodes)}")

    def _observe(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if "log_failure" in event or level is LogLevel.critical:
            failure = event.get("log_failure")
            detail = (f": {failure.getTraceback()}" if isinstance(failure, Failure) else "")
            self.problem(f"logged failure: {formatEvent(event)}{detail}")
        elif level is LogLevel.error:
            self.stats["logged errors"] = self.stats.get("logged errors", 0) + 1

    def fingerprint(self) -> str:
        """A digest of everything observable: to show that a seed replays exactly."""
        digest = hashlib.sha256()
        for line in self.trace:
            digest.update(line.encode())
        for probe in self.probes:
            outcome = probe.outcomes[0] if probe.outcomes else None
            text = (type(outcome.value).__name__ if isinstance(outcome, Failure)
                    else repr(outcome))
            digest.update(f"{probe.id} {probe.fired_at:.3f} {text}".encode())
        return digest.hexdigest()

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward in ticks; an exception out of a reactor call
        (which a real reactor would log as unhandled) breaks an invariant."""
        remaining = seconds
        while True:
            amount = min(TICK, remaining)
            try:
                self.clock.advance(amount)
            except Exception:
                self.problem(f"unhandled exception in a reactor call: {Failure().getTraceback()}")
                self.fail_now()
            remaining -= amount
            if remaining <= 1e-9:
                break

    def fail_now(self) -> None:
        if self.problems:
            self.fail("\n  ".join(self.problems[:5]))

    # --- who is who --------------------------------------------------------------------

    def live(self) -> list[Member]:
        return [m for m in self.members.values() if not m.dead]

    def dead(self) -> list[Member]:
        return [m for m in self.members.values() if m.dead]

    def owner(self, protocol: object) -> Member | None:
        protocol = getattr(protocol, "_protocol", protocol)  # ClientService's wrapper
        if isinstance(protocol, HarborLink):
            return self._by_router.get(id(protocol.sink))
        if isinstance(protocol, MasterClientProtocol):
            return self._by_client.get(id(protocol.client))
        return None

    def describe(self, connection: LoopbackConnection) -> str:
        client = self.owner(connection.client.protocol)
        server = (f"master{self.masters}" if connection.name == "master"
                  else repr(self.owner(connection.server.protocol)) or connection.name)
        return f"#{connection.connection_id} {client!r}->{server}"

    # --- the cluster -------------------------------------------------------------------

    def start_master(self) -> None:
        self.masters += 1
        self.master = MasterService(InMemoryRegistry(), self.clock, SECRET)
        serverFromString(self.clock, MASTER).listen(self.master).addCallback(
            lambda port: setattr(self, "master_port", port))

    def start_node(self, harbor: int) -> Member:
        member = Member(self, harbor, next(self.incarnations))
        self.members[harbor] = member
        self.every_member.append(member)
        self._by_router[id(member.node.router)] = member
        assert member.node.master is not None
        self._by_client[id(member.node.master)] = member
        return member

    def kill_node(self, member: Member) -> None:
        """Like SIGKILL: nothing of the process runs again, its connections fail."""
        member.dead = True
        node = member.node
        for timer in member.timers:
            if timer.active():
                timer.cancel()
        node.abort()
        for connection in self.net.connections:
            if member in (self.owner(connection.client.protocol),
                          self.owner(connection.server.protocol)):
                connection.cut("node killed")

    def kill_master(self) -> None:
        assert self.master_port is not None
        self.master_port.stopListening()
        self.master_port = None
        for connection in self.net.connections_to("master"):
            connection.cut("master killed")

    # --- actions -----------------------------------------------------------------------

    def do_call(self, source: Member | None = None) -> None:
        source = source or self.rng.choice(self.live())
        harbor = self.rng.randint(1, self.nodes)
        target = self.members[harbor]
        roll = self.rng.random()
        expect = "value"
        destination: int | str
        if roll < 0.45:
            destination = f"E{harbor}"
        elif roll < 0.9:
            destination = target.echo
        elif roll < 0.95:
            destination, expect = make_handle(harbor, 99), "error"  # no such local service
        else:
            destination, expect = f"NOBODY{harbor}", "error"
        delay = self.rng.choice((0.0,) * 6 + (0.1, 0.5, 1.5, 4.0))
        mode = "ok"
        if self.rng.random() < 0.05:
            mode, expect = "raise", "error"
        timeout = self.rng.choice((None, 0.5, 1.0, 2.0, 3.0, 5.0))
        via = source.echo if self.rng.random() < 0.3 else None
        self.call(source, destination, harbor, expect, delay, mode, timeout, via)

    def call(self, source: Member, destination: int | str, harbor: int, expect: str,
             delay: float, mode: str, timeout: float | None, via: int | None = None,
             must_succeed: bool = False) -> Probe:
        node = source.node
        target = self.members[harbor]
        min_incarnation = target.incarnation + (1 if target.dead else 0)
        try:
            node.resolve(destination)
            lookup = False
        except NoSuchService:
            lookup = True
        bound = timeout if timeout else DEFAULT_TIMEOUT
        if lookup:
            bound += 2 * REQUEST_TIMEOUT
        now = self.now()
        probe = Probe(next(self.ids), self.step, source, destination, harbor, expect,
                      min_incarnation, now, now + bound + SLACK, lookup, must_succeed)
        self.probes.append(probe)
        self.open[probe.id] = probe
        self.note("%r: %r (delay %g, %s, timeout %s%s)", source, probe, delay, mode, timeout,
                  f", from :{via:08x}" if via else "")
        before = node.sessions.pending
        d = node.call(destination, ["call", probe.id, delay, mode], timeout=timeout, source=via)
        self.deferreds[probe.id] = d
        d.addBoth(self._fired, probe)
        if not lookup and not probe.outcomes and node.sessions.pending != before + 1:
            self.problem(f"{probe} holds no session id ({before} -> {node.sessions.pending})")
        return probe

    def _fired(self, result: Any, probe: Probe) -> None:
        probe.outcomes.append(result)
        if len(probe.outcomes) > 1:
            self.problem(f"{probe} resolved twice: {probe.outcomes!r}")
            return
        probe.fired_at = self.now()
        self.open.pop(probe.id, None)
        self.deferreds.pop(probe.id, None)
        if isinstance(result, Failure):
            kind = type(result.value).__name__
            self.outcomes[kind] = self.outcomes.get(kind, 0) + 1
            if not result.check(*ALLOWED):
                self.problem(f"{probe} failed with {kind}, not an allowed outcome: "
                             f"{result.getTraceback()}")
            elif probe.must_succeed:
                self.problem(f"{probe} failed in a healed, converged cluster: {result.value!r}")
            return
        self.outcomes["value"] = self.outcomes.get("value", 0) + 1
        if probe.expect != "value":
            self.problem(f"{probe} should have failed, got {result!r}")
            return
        if not (isinstance(result, list) and len(result) == 3):
            self.problem(f"{probe} got a malformed reply {result!r}")
            return
        call_id, harbor, incarnation = result
        replier = self.members.get(harbor)
        if call_id != probe.id:
            self.problem(f"{probe} completed with the reply to call #{call_id} "
                         f"(from h{harbor}/{incarnation})")
        elif harbor != probe.harbor:
            self.problem(f"{probe} answered by harbor {harbor}, not {probe.harbor}")
        elif incarnation < probe.min_incarnation:
            self.problem(f"{probe} answered by old incarnation {incarnation} of h{harbor} "
                         f"(the call was made for incarnation >= {probe.min_incarnation})")
        elif replier is None or replier.dead or replier.incarnation != incarnation:
            self.problem(f"{probe} answered by h{harbor}/{incarnation}, which is not the live "
                         f"incarnation ({replier!r})")

    def do_burst(self, source: Member | None = None) -> None:
        source = source or self.rng.choice(self.live())
        count = self.rng.randint(5, 20)
        self.note("%r: burst of %d calls", source, count)
        for _ in range(count):
            self.do_call(source)

    def do_send(self) -> None:
        source = self.rng.choice(self.live())
        harbor = self.rng.randint(1, self.nodes)
        target = self.members[harbor]
        destination: int | str = f"E{harbor}" if self.rng.random() < 0.5 else target.echo
        msg_id = next(self.ids)
        self.sent[msg_id] = (harbor, target.incarnation + (1 if target.dead else 0))
        try:
            source.node.send(destination, ["send", msg_id])
        except ALLOWED as e:
            self.note("%r: send #%d to %s refused: %s", source, msg_id, destination,
                      type(e).__name__)
        except Exception as e:
            self.problem(f"send #{msg_id} from {source!r} raised {e!r}, not an allowed error")
        else:
            self.note("%r: send #%d to %s", source, msg_id, destination)

    def delivered(self, member: Member, msg_id: int) -> None:
        expected = self.sent.get(msg_id)
        count = self.received[msg_id] = self.received.get(msg_id, 0) + 1
        if expected is None:
            self.problem(f"{member!r} received one-way #{msg_id}, which was never sent")
        elif count > 1:
            self.problem(f"one-way #{msg_id} delivered {count} times (now to {member!r})")
        elif expected[0] != member.harbor or member.incarnation < expected[1]:
            self.problem(f"one-way #{msg_id} for h{expected[0]} (incarnation >= {expected[1]}) "
                         f"delivered to {member!r}")
        elif member.dead:
            self.problem(f"one-way #{msg_id} delivered to dead {member!r}")

    def do_cancel(self) -> None:
        candidates = [p for p in self.open.values() if not p.source.dead]
        if not candidates:
            return self.do_advance()
        probe = self.rng.choice(candidates)
        self.note("cancel %r", probe)
        self.deferreds[probe.id].cancel()
        if not probe.outcomes:
            self.problem(f"cancel() left {probe} unresolved")
        return None

    def do_advance(self) -> None:
        seconds = self.rng.choice((0.5, 1.0, 2.0, round(self.rng.uniform(0.1, 6.0), 1)))
        self.note("advance %.1f s", seconds)
        self.advance(seconds)

    def do_stall(self) -> None:
        """The whole process freezes: the clock jumps in one go (timers fire late)."""
        seconds = round(self.rng.uniform(0.5, 4.0), 2)
        self.note("stall %.2f s", seconds)
        try:
            self.clock.advance(seconds)
        except Exception:
            self.problem(f"unhandled exception in a reactor call: {Failure().getTraceback()}")

    def _pick(self, master: bool | None) -> LoopbackConnection | None:
        live = [c for c in self.net.connections
                if master is None or (c.name == "master") == master]
        return self.rng.choice(live) if live else None

    def do_cut_link(self) -> None:
        connection = self._pick(master=False)
        if connection is None:
            return self.do_advance()
        self.note("cut %s", self.describe(connection))
        connection.cut("chaos cut")
        return None

    def do_cut_master_link(self) -> None:
        connection = self._pick(master=True)
        if connection is None:
            return self.do_advance()
        self.note("cut %s", self.describe(connection))
        connection.cut("chaos cut")
        return None

    def do_pause(self) -> None:
        connection = self._pick(master=None)
        if connection is None:
            return self.do_advance()
        seconds = self.rng.choice((0.5, 1.0, 2.5, 3.5, 6.0))  # the heartbeat timeout is 3 s
        self.note("pause %s for %.1f s", self.describe(connection), seconds)
        connection.pause()
        self.fault_timers.append(self.clock.callLater(seconds, connection.resume))
        return None

    def do_delay(self) -> None:
        connection = self._pick(master=None)
        if connection is None:
            return self.do_advance()
        delay = self.rng.choice((0.01, 0.1, 0.5, 1.0, 2.0, 4.0))
        seconds = self.rng.choice((1.0, 3.0, 10.0))
        self.note("delay %s by %.2f s for %.1f s", self.describe(connection), delay, seconds)
        connection.delay = delay
        self.fault_timers.append(self.clock.callLater(seconds, setattr, connection, "delay",
                                                      0.0))
        return None

    def do_refuse(self) -> None:
        member = self.rng.choice(self.live())
        name = member.endpoint.split(":", 1)[1]
        seconds = self.rng.choice((1.0, 5.0, 15.0))
        self.note("refuse new links to %r for %.1f s", member, seconds)
        self.net.refuse(name)
        self.refused.add(name)
        self.fault_timers.append(self.clock.callLater(seconds, self.net.refuse, name, False))

    def do_kill_node(self) -> None:
        live = self.live()
        if len(live) <= self.nodes // 2:
            return self.do_restart_node()
        member = self.rng.choice(live)
        self.note("kill %r", member)
        self.kill_node(member)
        return None

    def do_restart_node(self) -> None:
        dead = self.dead()
        if not dead:
            return self.do_kill_node()
        old = self.rng.choice(dead)
        member = self.start_node(old.harbor)
        self.note("restart h%d as incarnation %d", member.harbor, member.incarnation)
        return None

    def do_bounce_node(self) -> None:
        """Crash a node and restart it at once, as a supervisor would."""
        member = self.rng.choice(self.live())
        self.note("bounce %r", member)
        self.kill_node(member)
        member = self.start_node(member.harbor)
        self.note("restart h%d as incarnation %d", member.harbor, member.incarnation)
        if self.rng.random() < 0.5:
            self.advance(self.rng.choice((0.5, 1.0, 2.0)))
            self.do_burst(member)  # back at work at once

    def do_kill_master(self) -> None:
        if self.master_port is None:
            return self.do_restart_master()
        self.note("kill master%d", self.masters)
        self.kill_master()
        return None

    def do_restart_master(self) -> None:
        if self.master_port is not None:
            return self.do_advance()
        self.start_master()
        self.note("start master%d", self.masters)
        return None

    def heal(self) -> None:
        for timer in self.fault_timers:
            if timer.active():
                timer.cancel()
        self.fault_timers.clear()
        for name in self.refused:
            self.net.refuse(name, False)
        self.refused.clear()
        for connection in self.net.connections:
            connection.delay = 0.0
            if connection.paused:
                connection.resume()

    # --- invariants --------------------------------------------------------------------

    def check_step(self) -> None:
        """What holds after every step, faults or not."""
        self.check_zombies()
        self.check_registry()
        self.check_sessions()
        now = self.now()
        for probe in self.open.values():
            if now > probe.deadline:
                self.problem(f"{probe} is still unresolved {now - probe.issued:.2f} s after it "
                             f"was made (bound {probe.deadline - probe.issued:.2f} s)")
        self.fail_now()

    def check_zombies(self) -> None:
        """A killed node runs no code: no connection of a dead incarnation survives a step."""
        for connection in self.net.connections:
            for protocol in (connection.client.protocol, connection.server.protocol):
                owner = self.owner(protocol)
                if owner is not None and owner.dead:
                    self.problem(f"dead {owner!r} has a live connection "
                                 f"{self.describe(connection)}")

    def check_registry(self) -> None:
        """No harbor is live twice, and the master lists only live incarnations."""
        if self.master is None or self.master_port is None:
            return
        table = self.master.registry.snapshot()
        harbors = [record.harbor for record in table.harbors]
        if len(harbors) != len(set(harbors)):
            self.problem(f"the registry lists a harbor twice: {harbors}")
        for record in table.harbors:
            member = self.members.get(record.harbor)
            if member is None or member.dead or member.incarnation != record.incarnation:
                self.problem(f"the registry lists h{record.harbor} incarnation "
                             f"{record.incarnation}, but the live one is {member!r}")
            connection = self.master.joined.get(record.harbor)
            if connection is None or connection.incarnation != record.incarnation:
                self.problem(f"the registry lists h{record.harbor}/{record.incarnation} but "
                             f"its joined connection is for "
                             f"{getattr(connection, 'incarnation', None)}")
        if set(self.master.joined) != set(harbors):
            self.problem(f"joined connections {sorted(self.master.joined)} != registry {harbors}")
        for name, handle in table.names.items():
            if handle >> 24 not in harbors:
                self.problem(f"the registry names {name} on harbor {handle >> 24}, not live")

    def check_sessions(self) -> None:
        """Session ids held == calls legitimately outstanding; internal indexes agree."""
        sync: dict[int, int] = {}
        lookup: dict[int, int] = {}
        for probe in self.open.values():
            counts = lookup if probe.lookup else sync
            counts[id(probe.source)] = counts.get(id(probe.source), 0) + 1
        for member in self.every_member:
            table = member.node.sessions
            low, extra = sync.get(id(member), 0), lookup.get(id(member), 0)
            if not low <= table.pending <= low + extra:
                self.problem(f"{member!r} holds {table.pending} session ids for {low} "
                             f"outstanding calls (+{extra} still looking a name up)")
            for problem in table.inconsistencies():
                self.problem(f"{member!r}'s session table: {problem}")

    def converged(self) -> str | None:
        """None once the healed cluster agrees with the master; else the first difference."""
        if self.master is None or self.master_port is None:
            return "no master"
        live = self.live()
        table = self.master.registry.snapshot()
        listed = {record.harbor: record.incarnation for record in table.harbors}
        want = {m.harbor: m.incarnation for m in live}
        if listed != want:
            return f"the registry lists {listed}, the live incarnations are {want}"
        names = {f"E{m.harbor}": m.echo for m in live}
        if table.names != names:
            return f"the registry names {table.names}, expected {names}"
        by_harbor = {m.harbor: m for m in live}
        for member in live:
            node = member.node
            assert node.master is not None
            if not node.master.connected:
                return f"{member!r} is not joined to the master"
            others = {h: i for h, i in want.items() if h != member.harbor}
            seen = {h: r.incarnation for h, r in node.membership.harbors.items()}
            if seen != others:
                return f"{member!r} knows harbors {seen}, the master {others}"
            if node.membership.names != table.names:
                return f"{member!r} knows names {node.membership.names}, the master {table.names}"
            peers = node.router.peers
            if set(peers) != set(others):
                odd = {h: peers.get(h) for h in set(peers) ^ set(others)}
                return (f"{member!r} has router peers {sorted(peers)}, the master "
                        f"{sorted(others)}; the difference: {odd}")
            for harbor in others:
                link = cast(HarborLink | None, node.router.peers[harbor].link)
                if link is None:
                    return f"{member!r} has no link to h{harbor}"
                if link.peer_incarnation != others[harbor]:
                    return (f"{member!r}'s link to h{harbor} is to incarnation "
                            f"{link.peer_incarnation}, not {others[harbor]}")
                back = by_harbor[harbor].node.router.peers.get(member.harbor)
                back_link = cast(HarborLink | None, back.link if back is not None else None)
                if (back_link is None or _connection(back_link) is None
                        or _connection(back_link) is not _connection(link)):
                    return f"{member!r} and h{harbor} do not agree on one link"
        harbor_links = [c for c in self.net.connections if c.name != "master"]
        if len(harbor_links) != len(live) * (len(live) - 1) // 2:
            return (f"{len(harbor_links)} harbor connections for {len(live)} live nodes: "
                    + ", ".join(self.describe(c) for c in harbor_links[:8]))
        master_links = self.net.connections_to("master")
        if len(master_links) != len(live):
            return f"{len(master_links)} master connections for {len(live)} live nodes"
        return None

    def settle(self, label: str) -> None:
        """Heal every fault, bring the master back, let the clock run until the cluster has
        converged and every call made so far is over; then check the settled invariants."""
        self.settles += 1
        self.heal()
        if self.master_port is None:
            self.start_master()
        self.note("heal and settle (%s)", label)
        start = self.now()
        # Past every open call's deadline, and past data already queued under a delay fault
        # (healing only resets the delay of later writes) plus a heartbeat timeout.
        until = max([start + MAX_FAULT_DELAY + HEARTBEAT_TIMEOUT]
                    + [p.deadline for p in self.open.values()]) + 1.0
        stable = 0  # converged for this many checks in a row, a second apart
        while True:
            self.advance(1.0)
            self.check_step()
            stable = stable + 1 if self.converged() is None else 0
            if self.now() >= until and not self.open and stable > HEARTBEAT_TIMEOUT:
                break
            if self.now() - start > MAX_SETTLE:
                why = self.converged() or (f"{len(self.open)} calls still open: "
                                           f"{list(self.open.values())[:5]}")
                self.fail(f"no convergence {MAX_SETTLE:g} s after healing ({label}): {why}")
        self.note("settled after %.1f s", self.now() - start)
        self.check_settled(label)
        self.liveness(label)
        self.check_settled(label)

    def check_settled(self, label: str) -> None:
        """No call is open, no session id or index entry is left anywhere."""
        for member in self.every_member:
            table = member.node.sessions
            # An idle deadline timer may remain, but only until the latest deadline a call
            # made now could have: it runs once and finds nothing (it is not a leak).
            latest = self.now() + (table.default_timeout or 0) + 0.1
            timers_left = [t for t in table.timers if t.getTime() > latest]
            if table.pending or table.inconsistencies() or timers_left:
                self.problem(f"{member!r} leaks sessions after settling ({label}): "
                             f"{table.pending} pending, {table.inconsistencies()}, "
                             f"timers {[t.getTime() for t in timers_left]}")
            master = member.node.master
            assert master is not None
            if not member.dead and (master._requests.pending or master._ready):
                self.problem(f"{member!r}'s master client leaks: "
                             f"{master._requests.pending} requests, {len(master._ready)} waiters")
        self.fail_now()

    def liveness(self, label: str) -> None:
        """In the healed cluster, every live node reaches every live node (by name or handle)."""
        live = self.live()
        self.note("liveness round over %d live nodes (%s)", len(live), label)
        made = []
        for source in live:
            for target in live:
                destination: int | str = (f"E{target.harbor}" if (source.harbor + target.harbor)
                                          % 2 else target.echo)
                made.append(self.call(source, destination, target.harbor, "value", 0.0, "ok",
                                      5.0, must_succeed=True))
        self.advance(1.0)
        for probe in made:
            if not probe.outcomes:
                self.problem(f"{probe} did not complete within 1 s in a healed cluster")
        self.fail_now()

    def summary(self) -> str:
        return (f"seed {self.seed}: {self.steps} steps, {len(self.every_member)} incarnations, "
                f"{self.masters} masters, {len(self.probes)} calls {self.outcomes}, "
                f"{len(self.sent)} sends ({sum(self.received.values())} delivered), "
                f"{self.settles} settles, clock {self.now():.0f} s, actions {self.stats}")
