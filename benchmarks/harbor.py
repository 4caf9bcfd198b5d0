"""Harbor calls per second: skyproto node to node, against Twisted AMP and a raw CBOR echo.

Run: ``python benchmarks/harbor.py [--json] [--duration S] [--warmup S] [--rounds N]
[--only NAMES] [--sizes 16,4k,64k] [--profile DIR]``. Every remote figure uses two OS
processes on TCP loopback: this one (the client) and a server started as ``python
benchmarks/harbor.py --serve KIND`` (KIND is ``sky``, ``sky-plain``, ``amp`` or ``raw``),
which listens on an ephemeral port of 127.0.0.1, prints it on stdout, and runs until its
stdin closes; it is killed at the end in
any case. Both sides run the real (epoll) reactor and set TCP_NODELAY. For payloads of
16 B, 4 KiB and 64 KiB (``bytes``):

- ``sky_seq``: ``node.call`` to a remote Echo service, one call outstanding (p50/p99 latency);
- ``sky_pipelined``: the same with 100 calls kept outstanding; links are sealed (AES-256-GCM
  records after the handshake), as always;
- ``sky_plain_seq`` / ``sky_plain_pipelined``: the same over a link whose sealing this
  benchmark switches off on both ends (``--serve sky-plain``; no daemon can do that), to show
  what sealing costs in the same run;
- ``sky_oneway``: ``node.send`` to a remote counting service, counted by the receiver; the
  sender calls the counter after every 1000 messages (at most two such windows unanswered,
  so buffers stay bounded) and every reply must equal the number sent before that call;
- ``sky_local`` / ``sky_local_seq``: ``node.call`` to an Echo service of the same node, no
  second process, 100 outstanding / one outstanding;
- ``amp_seq`` / ``amp_pipelined``: ``twisted.protocols.amp`` with one Echo command (one bytes
  argument, one bytes response);
- ``raw_cbor_seq`` / ``raw_cbor_pipelined``: Int32StringReceiver frames of
  ``cbor2.dumps([session, payload])``, decoded and re-encoded by the server, matched to a
  dict of Deferreds by the client: the minimal equivalent of what skyproto does.

AMP limits each value to 65,535 bytes, so the amp figures are skipped at 64 KiB, with a note.

Each figure runs for ``--warmup`` seconds (0.5), then counts what completes in the next
``--duration`` seconds (3), once per round (``--rounds``, 3), the rounds in alternating
order (forward, backward, ...), so that figures compared in a ratio are measured next to
each other in time; each figure reports its median round, with the failures of all.
"CPU us" is the CPU time both processes (client and server) used over the measured span,
per call: on a shared machine, a steadier figure than the rate, since the other load takes
time from both peers but adds little CPU to either (``*_cpu_us`` in the JSON, and the
client's part of it as ``*_client_cpu_us``).
With ``--json`` the last line of stdout is one JSON object: the
16 B figures under the names above, the 4 KiB ones with a ``_4k`` suffix, the 64 KiB ones
with ``_64k``, latencies as ``*_p50_us`` / ``*_p99_us``, the target ratios as ``ratio_*``,
failed calls as ``*_errors`` and the figures not run as ``skipped``. Any failed call (an
error, a wrong reply, or a call still unanswered ``DRAIN_TIMEOUT`` s after its figure) is
counted, its first error printed, and the run exits with status 1. ``--profile DIR`` writes
cProfile statistics of the client (``client.prof``) and of each server (``server-KIND.prof``).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import cbor2
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, connectProtocol, serverFromString
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IListeningPort, IReadDescriptor
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.protocols import amp
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from skyproto.harbor.link import HarborLink
from skyproto.node.node import Node
from skyproto.node.service import Service
from skyproto.services.echo import Echo

SECRET_ENV = "SKYPROTO_BENCH_SECRET"  #: hex of the secret both nodes share
PROFILE_ENV = "SKYPROTO_BENCH_PROFILE"  #: a server writes its cProfile stats here, if set
SERVER_HARBOR = 2
CLIENT_HARBOR = 1
LOCAL_HARBOR = 3
PLAIN_HARBOR = 4  #: the client node whose link to the ``sky-plain`` server is not sealed
WINDOW = 100  #: calls kept outstanding by the pipelined figures
ONEWAY_BATCH = 1000  #: one-way messages between two counter calls (at most)
#: bytes of one-way messages between two counter calls: one-way sends are refused with
#: QueueFull once a link holds 8 MiB for a slow peer, so batches are sized in bytes too
ONEWAY_BATCH_BYTES = 2 * 1024 * 1024
ONEWAY_WINDOWS = 2  #: counter calls allowed unanswered
START_TIMEOUT = 15.0  #: seconds for a server to print its port, or a link to come up
DRAIN_TIMEOUT = 15.0  #: seconds past a figure's end for its outstanding calls to finish
PAYLOADS: dict[str, bytes] = {
    "": bytes(range(16)),
    "_4k": bytes(i % 251 for i in range(4096)),
    "_64k": bytes(i % 251 for i in range(65536)),
}
SIZE_LABELS = {"": "16 B", "_4k": "4 KiB", "_64k": "64 KiB"}
SIZES = {"16": "", "4k": "_4k", "64k": "_64k"}  #: ``--sizes`` words -> suffixes
DEFAULT_SIZES = "16,4k,64k"
FIGURES = (
    "sky_seq", "sky_pipelined", "sky_oneway", "sky_plain_seq", "sky_plain_pipelined",
    "amp_seq", "amp_pipelined", "raw_cbor_seq", "raw_cbor_pipelined", "sky_local_seq",
    "sky_local",
)
#: (numerator, denominator, target): numerator / denominator >= target (0: reported only)
#: The targets are the Performance issue's: at least the naive Twisted + cbor2 echo, both
#: pipelined and sequential, and at least AMP (which cannot carry 64 KiB values).
RATIOS = (
    ("sky_pipelined", "raw_cbor_pipelined", 1.0),
    ("sky_seq", "raw_cbor_seq", 1.0),
    ("sky_pipelined", "amp_pipelined", 1.0),
    ("sky_seq", "amp_seq", 1.0),
    ("sky_pipelined", "sky_plain_pipelined", 0.0),
    ("sky_seq", "sky_plain_seq", 0.0),
)
LOCAL_TARGET = 100_000.0
SERVER_KINDS = ("sky", "sky-plain", "amp", "raw")


def skip_reason(figure: str, payload: bytes) -> str | None:
    """Why ``figure`` is not measured with ``payload``; None if it is.

    Twisted AMP limits every value to 65,535 bytes (``amp.MAX_VALUE_LENGTH``) and the 64 KiB
    payload is 65,536, so ``callRemote`` cannot send it (``amp.TooLong``). The amp figures are
    skipped at that size, with a note, rather than run with a payload one byte smaller: then
    every figure printed under a size carries exactly that payload, and no ratio at "64 KiB"
    quietly compares AMP moving a different payload. The 64 KiB block compares skyproto with
    the raw CBOR echo, which has no such limit (Int32StringReceiver takes up to 99,999 bytes).
    """
    if figure.startswith("amp_") and len(payload) > amp.MAX_VALUE_LENGTH:
        return (f"skipped: AMP values are limited to {amp.MAX_VALUE_LENGTH:,} bytes, "
                f"this payload is {len(payload):,}")
    return None


def describe(failure: Failure) -> str:
    """One line for a failed call: the exception's type and message."""
    return f"{failure.type.__name__}: {failure.getErrorMessage()}"  # type: ignore[union-attr]

Call = Callable[[bytes], "Deferred[Any]"]


def _global_reactor() -> Any:
    """The real reactor (epoll on Linux); imported only when a process starts running."""
    from twisted.internet import reactor

    return reactor


# --- the protocols under test --------------------------------------------------------------


class EchoCommand(amp.Command):
    """AMP's echo: one bytes argument, the same bytes back."""

    commandName = b"Echo"
    arguments = [(b"payload", amp.String())]  # type: ignore[no-untyped-call]
    response = [(b"payload", amp.String())]  # type: ignore[no-untyped-call]


class AmpEcho(amp.AMP):
    """Both ends of the AMP baseline; the server answers EchoCommand."""

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]
        self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]

    @EchoCommand.responder
    def echo(self, payload: bytes) -> dict[str, bytes]:
        return {"payload": payload}

    def call(self, payload: bytes) -> Deferred[Any]:
        d: Deferred[dict[str, Any]] = self.callRemote(  # type: ignore[no-untyped-call]
            EchoCommand, payload=payload)
        return d.addCallback(_payload_of)


def _payload_of(response: dict[str, Any]) -> Any:
    return response["payload"]


class RawEchoServer(Int32StringReceiver):
    """Decodes ``[session, payload]`` and sends it back re-encoded, as a node would."""

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]

    def stringReceived(self, string: bytes) -> None:
        session, payload = cbor2.loads(string)
        self.sendString(cbor2.dumps([session, payload]))  # type: ignore[no-untyped-call]


class RawEchoClient(Int32StringReceiver):
    """Session ids mapped to Deferreds, as skyproto's SessionTable does (without timeouts)."""

    def __init__(self) -> None:
        self.pending: dict[int, Deferred[Any]] = {}
        self.next_session = 0

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]

    def call(self, payload: bytes) -> Deferred[Any]:
        self.next_session = session = self.next_session + 1
        d: Deferred[Any] = Deferred()
        self.pending[session] = d
        self.sendString(cbor2.dumps([session, payload]))  # type: ignore[no-untyped-call]
        return d

    def stringReceived(self, string: bytes) -> None:
        session, payload = cbor2.loads(string)
        self.pending.pop(session).callback(payload)

    def connectionLost(self, reason: Failure | None = None) -> None:
        pending, self.pending = self.pending, {}
        for d in pending.values():
            d.errback(reason or ConnectionError("raw echo connection lost"))


class Counter(Service):
    """Counts one-way messages; a call answers ``[count so far, its perf_counter()]``."""

    default_name = "COUNTER"

    def __init__(self) -> None:
        self.count = 0

    def receive(self, source: int, session: int, payload: Any) -> Any:
        if not session:
            self.count += 1
            return None
        return [self.count, time.perf_counter()]


# --- the server process --------------------------------------------------------------------


@implementer(IReadDescriptor)
class StdinWatcher:
    """Stops the reactor when stdin reaches EOF: the parent closed it, or died."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def fileno(self) -> int:
        return sys.stdin.fileno()

    def doRead(self) -> None:
        if not os.read(sys.stdin.fileno(), 4096):
            self.reactor.removeReader(self)
            self._stop()

    def connectionLost(self, reason: Failure) -> None:
        self._stop()  # epoll reports a closed pipe as a hang-up, with no readable event

    def _stop(self) -> None:
        with suppress(ReactorNotRunning):
            self.reactor.stop()

    def logPrefix(self) -> str:
        return "stdin"


def unseal_links(harbor: int | None) -> None:
    """Benchmark only: links of node ``harbor`` (every link, with None) skip sealing, so the
    same run can show what sealing costs. Both ends must do it; nothing else can."""
    seal = HarborLink.start_sealing

    def start_sealing(self: HarborLink, keys: Any, initiator: bool) -> None:
        if harbor is not None and self.config.harbor != harbor:
            seal(self, keys, initiator)

    HarborLink.start_sealing = start_sealing  # type: ignore[method-assign,assignment]


def serve(kind: str) -> int:
    """Listen on 127.0.0.1:0, print ``PORT [ECHO COUNTER]``, serve until stdin closes."""
    reactor = _global_reactor()
    node: Node | None = None
    announce = ""
    factory: Factory
    if kind == "sky-plain":
        unseal_links(None)
    if kind in ("sky", "sky-plain"):
        node = Node(SERVER_HARBOR, reactor, bytes.fromhex(os.environ[SECRET_ENV]))
        echo = node.spawn(Echo())
        counter = node.spawn(Counter())
        announce = f" {echo} {counter}"
        listening = node.listen("tcp:0:interface=127.0.0.1:backlog=16")
    else:
        factory = Factory.forProtocol(AmpEcho if kind == "amp" else RawEchoServer)
        endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1:backlog=16")
        listening = endpoint.listen(factory)

    def listened(port: IListeningPort) -> None:
        print(f"{port.getHost().port}{announce}", flush=True)  # type: ignore[attr-defined]

    def failed(failure: Failure) -> None:
        print(f"listen failed: {failure.getErrorMessage()}", file=sys.stderr, flush=True)
        reactor.stop()

    listening.addCallbacks(listened, failed)
    reactor.addReader(StdinWatcher(reactor))
    profile_path = os.environ.get(PROFILE_ENV)
    if profile_path:
        profiler = cProfile.Profile()
        profiler.runcall(reactor.run)
        profiler.dump_stats(profile_path)
    else:
        reactor.run()
    return 0


@dataclass
class Server:
    """A running server process and what it announced."""

    process: subprocess.Popen[bytes]
    port: int
    handles: list[int]


def read_line(process: subprocess.Popen[bytes], deadline: float) -> str:
    """The first line the process prints, waiting no later than ``deadline``."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    buffer = b""
    while b"\n" not in buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no port line from {process.args!r} in {START_TIMEOUT:g} s")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"{process.args!r} exited ({process.poll()}): {buffer!r}")
            buffer += chunk
    return buffer.split(b"\n", 1)[0].decode()


@contextmanager
def server(kind: str, secret: bytes, profile_dir: str | None) -> Iterator[Server]:
    """Start ``--serve kind``; stop it (stdin EOF, then kill) however the block ends."""
    env = dict(os.environ, **{SECRET_ENV: secret.hex()})
    if profile_dir is not None:
        env[PROFILE_ENV] = os.path.join(profile_dir, f"server-{kind}.prof")
    process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve", kind],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0,
    )
    try:
        words = read_line(process, time.monotonic() + START_TIMEOUT).split()
        if not words or not all(w.isdigit() for w in words):
            raise RuntimeError(f"{kind} server did not start: {words!r}")
        yield Server(process, int(words[0]), [int(w) for w in words[1:]])
    finally:
        if process.stdin is not None:
            process.stdin.close()
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)
        if process.stdout is not None:
            process.stdout.close()


# --- load generators -----------------------------------------------------------------------


@dataclass
class Result:
    """What one figure measured."""

    ops: int = 0
    seconds: float = 0.0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)  #: seconds, measured calls only
    error: str | None = None  #: the first failure, as text
    #: CPU seconds of the client and the server process over the measured span (0 for
    #: an in-process figure's server): less disturbed by other load than the rate is
    cpu_client: float = 0.0
    cpu_server: float = 0.0

    @property
    def cpu_us_per_op(self) -> float:
        """Both processes' CPU per measured call, in microseconds."""
        return (self.cpu_client + self.cpu_server) / self.ops * 1e6 if self.ops else 0.0

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    def percentile_us(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6


class CallLoad:
    """Keeps ``window`` calls outstanding; counts those that complete in the measured span.

    After the first failed call no new call is issued; the calls still outstanding are waited
    for (each failure among them counted), for at most ``DRAIN_TIMEOUT`` s past the span's end,
    after which those still unanswered count as failed too.
    """

    def __init__(self, reactor: Any, call: Call, payload: bytes, window: int,
                 warmup: float, duration: float) -> None:
        self.reactor = reactor
        self.call = call
        self.payload = payload
        self.window = window
        self.warmup = warmup
        self.duration = duration
        self.result = Result(seconds=duration)
        self.outstanding = 0
        self.measure_from = self.measure_until = 0.0
        self.done: Deferred[Result] = Deferred()
        self.first_error: Failure | None = None
        self.deadline: Any = None

    def run(self) -> Deferred[Result]:
        now = time.perf_counter()
        self.measure_from = now + self.warmup
        self.measure_until = self.measure_from + self.duration
        self.deadline = self.reactor.callLater(self.warmup + self.duration + DRAIN_TIMEOUT,
                                               self._late)
        for _ in range(self.window):
            if self.first_error is not None or self.done.called:
                break
            self._issue()
        return self.done

    def _issue(self) -> None:
        self.outstanding += 1
        started = time.perf_counter()
        d = self.call(self.payload)
        d.addCallbacks(self._replied, self._failed, callbackArgs=(started,))

    def _replied(self, reply: Any, started: float) -> None:
        if self.done.called:  # answered after the drain deadline: already counted as failed
            return
        now = time.perf_counter()
        self.outstanding -= 1
        if reply != self.payload:
            self.result.errors += 1
        if self.measure_from <= now < self.measure_until:
            self.result.ops += 1
            if started >= self.measure_from:
                self.result.latencies.append(now - started)
        self._next(now)

    def _failed(self, failure: Failure) -> None:
        if self.done.called:
            return
        self.outstanding -= 1
        self.result.errors += 1
        if self.first_error is None:
            self.first_error = failure
            self.result.error = describe(failure)
        self._next(time.perf_counter())

    def _next(self, now: float) -> None:
        if now < self.measure_until and self.first_error is None:
            self._issue()
        elif self.outstanding == 0:
            self._finish()

    def _late(self) -> None:
        self.result.errors += self.outstanding
        if self.result.error is None:
            self.result.error = (f"{self.outstanding} calls unanswered {DRAIN_TIMEOUT:g} s "
                                 "after the figure's end")
        self._finish()

    def _finish(self) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        if not self.done.called:
            self.done.callback(self.result)


class OneWayLoad:
    """``node.send`` in batches to a remote Counter, each batch followed by a counter call.

    At most ``ONEWAY_WINDOWS`` batches are unanswered. The rate is the receiver's: messages it
    counted between the first and the last counter reply of the measured span, over its own
    clock. Every reply must count exactly the messages sent before its call.
    """

    def __init__(self, reactor: Any, node: Node, counter: int, payload: bytes,
                 warmup: float, duration: float, sent_before: int) -> None:
        self.reactor = reactor
        self.node = node
        self.counter = counter
        self.payload = payload
        self.warmup = warmup
        self.duration = duration
        self.sent = sent_before  #: the counter counts since its server started
        self.unanswered = 0
        self.measure_from = self.measure_until = 0.0
        self.first: tuple[int, float] | None = None  #: (count, server time) at the start
        self.last: tuple[int, float] | None = None
        self.errors = 0
        self.done: Deferred[Result] = Deferred()
        self.deadline: Any = None

    def run(self) -> Deferred[Result]:
        now = time.perf_counter()
        self.measure_from = now + self.warmup
        self.measure_until = self.measure_from + self.duration
        self.deadline = self.reactor.callLater(self.warmup + self.duration + DRAIN_TIMEOUT,
                                               self._late)
        for _ in range(ONEWAY_WINDOWS):
            if not self.done.called:
                self._batch()
        return self.done

    def _batch(self) -> None:
        send, counter, payload = self.node.send, self.counter, self.payload
        batch = max(1, min(ONEWAY_BATCH, ONEWAY_BATCH_BYTES // max(1, len(payload))))
        try:
            for _ in range(batch):
                send(counter, payload)
        except Exception as e:  # a refused one-way message is a failure too
            self._fail(1, f"node.send: {type(e).__name__}: {e}")
            return
        self.sent += batch
        self.unanswered += 1
        d = self.node.call(counter, None)
        d.addCallbacks(self._counted, self._failed, callbackArgs=(self.sent,))

    def _counted(self, reply: Any, expected: int) -> None:
        now = time.perf_counter()
        self.unanswered -= 1
        if self.done.called:  # failed or timed out already: send no more
            return
        count, server_time = reply
        if count != expected:
            self.errors += 1
        if now >= self.measure_from:
            if self.first is None:
                self.first = (count, server_time)
            self.last = (count, server_time)
        if now < self.measure_until:
            self._batch()
        elif self.unanswered == 0 and not self.done.called:
            if self.deadline is not None and self.deadline.active():
                self.deadline.cancel()
            self.done.callback(self._result())

    def _result(self) -> Result:
        if self.first is None or self.last is None or self.last[1] <= self.first[1]:
            return Result(errors=self.errors + 1,
                          error="fewer than two counter replies in the measured span")
        return Result(ops=self.last[0] - self.first[0], seconds=self.last[1] - self.first[1],
                      errors=self.errors,
                      error="a counter reply did not count every message sent before it"
                      if self.errors else None)

    def _failed(self, failure: Failure) -> None:
        self.unanswered -= 1
        self._fail(1, f"counter call: {describe(failure)}")

    def _late(self) -> None:
        self._fail(self.unanswered, f"{self.unanswered} counter calls unanswered "
                                    f"{DRAIN_TIMEOUT:g} s after the figure's end")

    def _fail(self, errors: int, error: str) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        if not self.done.called:
            self.done.callback(Result(errors=self.errors + errors, error=error))


# --- the client process --------------------------------------------------------------------


async def wait_until(reactor: Any, predicate: Callable[[], bool], what: str) -> None:
    """Poll ``predicate`` every 10 ms until it holds; TimeoutError after START_TIMEOUT."""
    deadline = time.monotonic() + START_TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {START_TIMEOUT:g} s")
        await deferLater(reactor, 0.01, lambda: None)


@dataclass
class Clients:
    """The client ends of every connection, built once the servers are up."""

    node: Node
    echo: int
    counter: int
    local: Node
    local_echo: int
    amp: AmpEcho
    raw: RawEchoClient
    plain: Node
    plain_echo: int
    oneway_sent: int = 0


async def connect(reactor: Any, servers: dict[str, Server], secret: bytes) -> Clients:
    node = Node(CLIENT_HARBOR, reactor, secret)
    sky = servers["sky"]
    node.add_peer(SERVER_HARBOR, f"tcp:127.0.0.1:{sky.port}")
    await wait_until(reactor, lambda: node.router.state(SERVER_HARBOR) == "up",
                     "the harbor link came up")
    unseal_links(PLAIN_HARBOR)
    plain = Node(PLAIN_HARBOR, reactor, secret)
    plain.add_peer(SERVER_HARBOR, f"tcp:127.0.0.1:{servers['sky-plain'].port}")
    await wait_until(reactor, lambda: plain.router.state(SERVER_HARBOR) == "up",
                     "the unsealed harbor link came up")
    local = Node(LOCAL_HARBOR, reactor, secret)
    local_echo = local.spawn(Echo())
    amp_client = await connectProtocol(
        clientFromString(reactor, f"tcp:127.0.0.1:{servers['amp'].port}"),
        AmpEcho())  # type: ignore[no-untyped-call]
    raw_client = await connectProtocol(
        clientFromString(reactor, f"tcp:127.0.0.1:{servers['raw'].port}"), RawEchoClient())
    return Clients(node, sky.handles[0], sky.handles[1], local, local_echo, amp_client,
                   raw_client, plain, servers["sky-plain"].handles[0])


def process_cpu(pid: int | None) -> tuple[float, float]:
    """CPU seconds used so far by this process and by process ``pid`` (0 without one)."""
    mine = os.times()
    other = 0.0
    if pid is not None:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        other = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return mine.user + mine.system, other


#: which server process answers each kind of figure (in-process figures have none)
SERVER_OF: dict[str, str] = {"sky": "sky", "sky_plain": "sky-plain", "amp": "amp",
                             "raw_cbor": "raw", "sky_oneway": "sky"}


def call_of(node: Node, handle: int) -> Call:
    def call(payload: bytes) -> Deferred[Any]:
        return node.call(handle, payload)

    return call


async def measure(reactor: Any, clients: Clients, figure: str, payload: bytes,
                  warmup: float, duration: float, pids: dict[str, int]) -> Result:
    """One figure, with both processes' CPU over its measured span."""
    kind = figure.removesuffix("_seq").removesuffix("_pipelined")
    pid = pids.get(SERVER_OF.get(kind, ""))
    marks: list[tuple[float, float]] = []
    first = reactor.callLater(warmup, lambda: marks.append(process_cpu(pid)))
    last = reactor.callLater(warmup + duration, lambda: marks.append(process_cpu(pid)))
    try:
        result = await measure_calls(reactor, clients, figure, payload, warmup, duration)
    finally:
        for mark in (first, last):
            if mark.active():
                mark.cancel()
    if len(marks) == 1:  # the last calls came back before the span's own timer ran
        marks.append(process_cpu(pid))
    if len(marks) == 2:
        result.cpu_client = marks[1][0] - marks[0][0]
        result.cpu_server = marks[1][1] - marks[0][1]
    return result


async def measure_calls(reactor: Any, clients: Clients, figure: str, payload: bytes,
                        warmup: float, duration: float) -> Result:
    if figure == "sky_oneway":
        load = OneWayLoad(reactor, clients.node, clients.counter, payload, warmup, duration,
                          clients.oneway_sent)
        result = await load.run()
        clients.oneway_sent = load.sent
        return result
    calls: dict[str, Call] = {
        "sky": call_of(clients.node, clients.echo),
        "sky_local": call_of(clients.local, clients.local_echo),
        "sky_plain": call_of(clients.plain, clients.plain_echo),
        "amp": clients.amp.call,
        "raw_cbor": clients.raw.call,
    }
    if figure.endswith("_seq"):
        window, kind = 1, figure.removesuffix("_seq")
    else:
        window, kind = WINDOW, figure.removesuffix("_pipelined")
    return await CallLoad(reactor, calls[kind], payload, window, warmup, duration).run()


def median_result(rounds: list[Result]) -> Result:
    """The round with the median rate, with every round's failures counted in."""
    ordered = sorted(rounds, key=lambda r: r.rate)
    chosen = ordered[(len(ordered) - 1) // 2]
    errors = sum(r.errors for r in rounds)
    first = next((r.error for r in rounds if r.error), None)
    return Result(chosen.ops, chosen.seconds, errors, chosen.latencies, first,
                  chosen.cpu_client, chosen.cpu_server)


async def run_client(reactor: Any, servers: dict[str, Server], secret: bytes,
                     figures: list[str], payloads: dict[str, bytes], warmup: float,
                     duration: float, rounds: int = 1) -> dict[str, Result]:
    """Every figure once per round, rounds in alternating order (so that a ratio compares
    neighbours in time, not one moment with another); each figure's median round."""
    clients = await connect(reactor, servers, secret)
    pids = {kind: server.process.pid for kind, server in servers.items()}
    measured: dict[str, list[Result]] = {}
    order = [(suffix, payload, figure) for suffix, payload in payloads.items()
             for figure in figures if skip_reason(figure, payload) is None]
    try:
        for number in range(rounds):
            for suffix, payload, figure in (order if number % 2 == 0 else order[::-1]):
                measured.setdefault(figure + suffix, []).append(
                    await measure(reactor, clients, figure, payload, warmup, duration, pids))
    finally:
        clients.amp.transport.loseConnection()  # type: ignore[union-attr]
        clients.raw.transport.loseConnection()  # type: ignore[union-attr]
        await clients.node.stop()
        await clients.local.stop()
        await clients.plain.stop()
    return {key: median_result(results) for key, results in measured.items()}


def run_reactor(servers: dict[str, Server], secret: bytes, figures: list[str],
                payloads: dict[str, bytes], warmup: float,
                duration: float, rounds: int = 1) -> dict[str, Result]:
    """Run the client on the global reactor until every figure is measured."""
    reactor = _global_reactor()
    outcome: list[dict[str, Result] | Failure] = []
    interrupted: list[bool] = []  #: the reactor began to stop before the client finished

    def stopping() -> None:
        if not outcome:
            interrupted.append(True)

    def finish(value: dict[str, Result] | Failure) -> None:
        outcome.append(value)
        if not interrupted:
            reactor.stop()

    def start() -> None:
        Deferred.fromCoroutine(
            run_client(reactor, servers, secret, figures, payloads, warmup, duration, rounds)
        ).addBoth(finish)

    reactor.addSystemEventTrigger("before", "shutdown", stopping)
    reactor.callWhenRunning(start)
    reactor.run()
    if interrupted or not outcome:
        raise RuntimeError("interrupted: the reactor stopped before the benchmark finished")
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


# --- report --------------------------------------------------------------------------------


def split_key(key: str) -> tuple[str, str]:
    """``sky_seq_64k`` -> (``sky_seq``, ``_64k``); a 16 B key has the suffix ``""``."""
    for suffix in PAYLOADS:
        if suffix and key.endswith(suffix):
            return key.removesuffix(suffix), suffix
    return key, ""


def skipped_figures(figures: list[str], payloads: dict[str, bytes]) -> dict[str, str]:
    """Each requested figure not measured, with why: ``{"amp_seq_64k": "skipped: ..."}``."""
    return {figure + suffix: reason for suffix, payload in payloads.items()
            for figure in figures
            if (reason := skip_reason(figure, payload)) is not None}


def summarise(results: dict[str, Result], skipped: dict[str, str]) -> dict[str, Any]:
    """The JSON object: rates, latencies, errors, ratios and the figures skipped."""
    summary: dict[str, Any] = {}
    for key, result in results.items():
        summary[key] = round(result.rate, 1)
        if result.cpu_us_per_op:
            base, suffix = split_key(key)
            summary[f"{base}_cpu_us{suffix}"] = round(result.cpu_us_per_op, 2)
            summary[f"{base}_client_cpu_us{suffix}"] = round(
                result.cpu_client / result.ops * 1e6, 2)
        if result.errors:
            summary[f"{key}_errors"] = result.errors
    for key, result in results.items():
        if result.latencies:
            base, suffix = split_key(key)
            summary[f"{base}_p50_us{suffix}"] = round(result.percentile_us(0.50), 1)
            summary[f"{base}_p99_us{suffix}"] = round(result.percentile_us(0.99), 1)
    for suffix in PAYLOADS:
        for top, bottom, _target in RATIOS:
            a, b = results.get(top + suffix), results.get(bottom + suffix)
            if a is not None and b is not None and b.rate > 0:
                summary[f"ratio_{top}_{bottom}{suffix}"] = round(a.rate / b.rate, 3)
    summary["failed_calls"] = sum(r.errors for r in results.values())
    if skipped:
        summary["skipped"] = skipped
    return summary


def report(results: dict[str, Result], skipped: dict[str, str], warmup: float,
           duration: float) -> None:
    reactor = _global_reactor()
    print(f"skyproto harbor benchmark: {type(reactor).__name__}, Python "
          f"{platform.python_version()}, {os.cpu_count()} CPUs, "
          f"{duration:g} s per figure after {warmup:g} s of warm-up")
    for suffix, label in SIZE_LABELS.items():
        if not any(figure + suffix in results or figure + suffix in skipped
                   for figure in FIGURES):
            continue
        print(f"\npayload {label}")
        print(f"  {'figure':<22}{'ops/s':>12}{'p50 us':>10}{'p99 us':>10}{'CPU us':>9}  notes")
        for figure in FIGURES:
            result = results.get(figure + suffix)
            if result is None:
                if figure + suffix in skipped:
                    print(f"  {figure:<22}{'-':>12}{'':10}{'':10}  {skipped[figure + suffix]}")
                continue
            notes = "1 outstanding" if figure.endswith("_seq") else (
                "receiver-counted" if figure == "sky_oneway" else f"{WINDOW} outstanding")
            if figure.startswith("sky_local"):
                notes += ", in-process"
            if result.errors:
                notes += f", {result.errors} ERRORS"
            p50 = f"{result.percentile_us(0.5):10.1f}" if figure.endswith("_seq") else " " * 10
            p99 = f"{result.percentile_us(0.99):10.1f}" if figure.endswith("_seq") else " " * 10
            cpu = f"{result.cpu_us_per_op:9.1f}" if result.cpu_us_per_op else " " * 9
            print(f"  {figure:<22}{result.rate:>12,.0f}{p50}{p99}{cpu}  {notes}")
            if result.error:
                print(f"  {'':<22}first failure: {result.error}")
        checks: list[str] = []
        for top, bottom, target in RATIOS:
            a, b = results.get(top + suffix), results.get(bottom + suffix)
            if a is None or b is None or b.rate <= 0:
                continue
            ratio = a.rate / b.rate
            if not target:
                checks.append(f"  {top + ' / ' + bottom:<40}{ratio:>10.2f}{'':>12}  "
                              f"(what sealing costs)")
                continue
            verdict = "met" if ratio >= target else "MISSED"
            checks.append(f"  {top + ' / ' + bottom:<40}{ratio:>10.2f}"
                          f"{'>= ' + f'{target:g}':>12}  {verdict}")
        local = results.get("sky_local" + suffix)
        if local is not None:
            verdict = "met" if local.rate >= LOCAL_TARGET else "MISSED"
            checks.append(f"  {'sky_local (calls/s)':<40}{local.rate:>10,.0f}"
                          f"{'>= ' + f'{LOCAL_TARGET:,.0f}':>12}  {verdict}")
        if checks:
            print(f"  {'target':<40}{'value':>10}{'target':>12}")
            print("\n".join(checks))
    failed = sum(r.errors for r in results.values())
    print(f"\nfailed calls: {failed}" + ("" if not failed else " (" + ", ".join(
        f"{key} {r.errors}" for key, r in results.items() if r.errors) + ")"))


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--duration", type=float, default=3.0,
                        help="measured seconds per figure (3)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds, in alternating order; each figure's median (3)")
    parser.add_argument("--warmup", type=float, default=0.5,
                        help="unmeasured seconds before each figure (0.5)")
    parser.add_argument("--only", default=",".join(FIGURES),
                        help=f"comma-separated figures (all: {','.join(FIGURES)})")
    parser.add_argument("--sizes", default=DEFAULT_SIZES,
                        help=f"comma-separated payload sizes among {', '.join(SIZES)} "
                             f"({DEFAULT_SIZES})")
    parser.add_argument("--profile", metavar="DIR",
                        help="write cProfile stats of the client and the servers to DIR")
    parser.add_argument("--serve", choices=SERVER_KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve)

    figures = [f for f in args.only.split(",") if f]
    unknown = sorted(set(figures) - set(FIGURES))
    if unknown:
        parser.error(f"unknown figures {unknown}; choose from {', '.join(FIGURES)}")
    try:
        payloads = {SIZES[size]: PAYLOADS[SIZES[size]] for size in args.sizes.split(",")}
    except KeyError as e:
        parser.error(f"unknown payload size {e}; choose from {', '.join(SIZES)}")
    if args.duration <= 0 or args.warmup < 0 or args.rounds < 1:
        parser.error("--duration must be positive, --warmup not negative, --rounds >= 1")
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    secret = os.urandom(32)
    with ExitStack() as stack:
        servers = {kind: stack.enter_context(server(kind, secret, args.profile))
                   for kind in SERVER_KINDS}
        if args.profile:
            profiler = cProfile.Profile()
            results = profiler.runcall(run_reactor, servers, secret, figures, payloads,
                                       args.warmup, args.duration, args.rounds)
            profiler.dump_stats(os.path.join(args.profile, "client.prof"))
        else:
            results = run_reactor(servers, secret, figures, payloads, args.warmup,
                                  args.duration, args.rounds)
    skipped = skipped_figures(figures, payloads)
    report(results, skipped, args.warmup, args.duration)
    errors = sum(r.errors for r in results.values())
    if args.json:
        summary = summarise(results, skipped)
        summary["duration_s"] = args.duration
        summary["nproc"] = os.cpu_count() or 0
        summary["python"] = platform.python_version()
        print(json.dumps(summary))
    if errors:
        print(f"{errors} calls failed or returned the wrong payload", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
