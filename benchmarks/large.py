"""Large messages: small calls while a 15 MiB call is in flight on the same link, and one
100 MiB message against a raw socket copy between the same two processes.

Run: ``python benchmarks/large.py [--json] [--rounds N] [--seconds S]``. A server process
(``--serve``) runs a node (an Echo and a Sink service; links sealed, as always) and a raw
TCP sink, both on 127.0.0.1; this process is the client. Figures, in alternating rounds:

- ``small_idle_p50_ms`` / ``small_idle_p99_ms``: 16 B echo calls, one at a time, nothing
  else on the link;
- ``small_loaded_p50_ms`` / ``small_loaded_p99_ms``: the same while 15 MiB calls to the
  Sink follow one another on the same link (``large_calls``: how many completed);
- ``sky_100mib_mib_s``: ``node.call`` of a 100 MiB payload to the Sink (which answers its
  length), in MiB/s; ``raw_100mib_mib_s``: the same bytes written to a raw socket whose
  reader answers once it has them all; ``ratio_sky_raw_100mib``.

Every call that fails or returns a wrong answer is counted; a run with any exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, connectProtocol, serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harbor import SECRET_ENV, StdinWatcher, read_line  # type: ignore[import-not-found]

from skyproto.node.node import Node
from skyproto.node.service import Service
from skyproto.services.echo import Echo
from skyproto.wire.pieces import DEFAULT_PIECE_SIZE

SERVER_HARBOR, CLIENT_HARBOR = 2, 1
MAX_MESSAGE = 256 * 1024 * 1024  #: both ends: room for the 100 MiB message
PIECE_ENV = "SKYPROTO_BENCH_PIECE"  #: the piece size both ends use, if set
LARGE = 15 * 1024 * 1024
HUGE = 100 * 1024 * 1024
SMALL = bytes(range(16))
START_TIMEOUT = 15.0
_LENGTH = struct.Struct(">Q")


class Sink(Service):
    """Answers the length of what it was sent."""

    def receive(self, source: int, session: int, payload: Any) -> Any:
        return len(payload)


class RawSink(Protocol):
    """Reads an 8-byte length, then that many bytes; answers the 8-byte count."""

    def __init__(self) -> None:
        self.expected: int | None = None
        self.got = 0
        self.head = b""

    def dataReceived(self, data: bytes) -> None:
        if self.expected is None:
            self.head += data
            if len(self.head) < _LENGTH.size:
                return
            (self.expected,) = _LENGTH.unpack(self.head[:_LENGTH.size])
            data = self.head[_LENGTH.size:]
            self.head = b""
        self.got += len(data)
        if self.got >= self.expected:
            assert self.transport is not None
            self.transport.write(_LENGTH.pack(self.got))
            self.expected, self.got = None, 0


class RawCopy(Protocol):
    """The client of a RawSink: one copy at a time."""

    def __init__(self) -> None:
        self.answer: Deferred[int] | None = None
        self.buffer = b""

    def copy(self, data: bytes) -> Deferred[int]:
        self.answer = Deferred()
        assert self.transport is not None
        self.transport.write(_LENGTH.pack(len(data)))
        self.transport.write(data)
        return self.answer

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) >= _LENGTH.size and self.answer is not None:
            (count,) = _LENGTH.unpack(self.buffer[:_LENGTH.size])
            self.buffer = self.buffer[_LENGTH.size:]
            answer, self.answer = self.answer, None
            answer.callback(count)


def piece_size() -> int:
    return int(os.environ.get(PIECE_ENV, DEFAULT_PIECE_SIZE))


def serve() -> int:
    from twisted.internet import reactor

    node = Node(SERVER_HARBOR, reactor, bytes.fromhex(os.environ[SECRET_ENV]),
                max_message=MAX_MESSAGE, piece_size=piece_size())
    echo, sink = node.spawn(Echo()), node.spawn(Sink())
    ports: list[IListeningPort] = []

    def listened(port: IListeningPort) -> None:
        ports.append(port)
        if len(ports) == 2:
            node_port, raw_port = (port.getHost().port for port in ports)  # type: ignore
            print(f"{node_port} {raw_port} {echo} {sink}", flush=True)

    node.listen("tcp:0:interface=127.0.0.1").addCallback(listened)
    serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
        Factory.forProtocol(RawSink)).addCallback(listened)
    reactor.addReader(StdinWatcher(reactor))
    reactor.run()
    return 0


@contextmanager
def server(secret: bytes) -> Iterator[list[int]]:
    process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        env=dict(os.environ, **{SECRET_ENV: secret.hex()}), bufsize=0)
    try:
        yield [int(w) for w in read_line(process, time.monotonic() + START_TIMEOUT).split()]
    finally:
        if process.stdin is not None:
            process.stdin.close()
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


class Failures:
    def __init__(self) -> None:
        self.count = 0
        self.first: str | None = None

    def add(self, what: str) -> None:
        self.count += 1
        self.first = self.first or what


async def small_calls(node: Node, echo: int, seconds: float, failures: Failures,
                      while_running: Any = None) -> list[float]:
    """Sequential small calls for ``seconds`` (or while ``while_running()`` holds)."""
    latencies = []
    until = time.perf_counter() + seconds
    while time.perf_counter() < until and (while_running is None or while_running()):
        started = time.perf_counter()
        try:
            reply = await node.call(echo, SMALL, timeout=30)
        except Exception as e:
            failures.add(f"small call: {e}")
            continue
        if reply != SMALL:
            failures.add("small call: wrong reply")
        latencies.append(time.perf_counter() - started)
    return latencies


async def loaded(node: Node, echo: int, sink: int, seconds: float,
                 failures: Failures) -> tuple[list[float], int]:
    """Small calls while 15 MiB calls to the sink follow one another on the same link."""
    payload = b"L" * LARGE
    state = {"done": 0, "running": True}

    async def large_loop() -> None:
        while state["running"]:
            try:
                answer = await node.call(sink, payload, timeout=60)
            except Exception as e:
                failures.add(f"large call: {e}")
                return
            if answer != LARGE:
                failures.add(f"large call: answered {answer}")
            state["done"] += 1

    large = Deferred.fromCoroutine(large_loop())
    await deferLater(node.reactor, 0.05, lambda: None)  # the first piece is on its way
    latencies = await small_calls(node, echo, seconds, failures)
    state["running"] = False
    await large
    return latencies, int(state["done"])


async def copy_rates(node: Node, raw: RawCopy, sink: int, failures: Failures,
                     sky_first: bool) -> tuple[float, float]:
    payload = b"H" * HUGE
    rates: dict[str, float] = {}
    for kind in (("sky", "raw") if sky_first else ("raw", "sky")):
        started = time.perf_counter()
        try:
            answer = (await node.call(sink, payload, timeout=120) if kind == "sky"
                      else await raw.copy(payload))
        except Exception as e:
            failures.add(f"{kind} 100 MiB: {e}")
            continue
        if answer != HUGE:
            failures.add(f"{kind} 100 MiB: answered {answer}")
        rates[kind] = HUGE / (1 << 20) / (time.perf_counter() - started)
    return rates.get("sky", 0.0), rates.get("raw", 0.0)


async def run(reactor: Any, ports: list[int], secret: bytes, rounds: int,
              seconds: float) -> dict[str, Any]:
    node_port, raw_port, echo, sink = ports
    node = Node(CLIENT_HARBOR, reactor, secret, max_message=MAX_MESSAGE, default_timeout=120,
                piece_size=piece_size())
    node.add_peer(SERVER_HARBOR, f"tcp:127.0.0.1:{node_port}")
    raw = await connectProtocol(clientFromString(reactor, f"tcp:127.0.0.1:{raw_port}"),
                                RawCopy())
    failures = Failures()
    idle: list[float] = []
    busy: list[float] = []
    large_calls = 0
    sky_rates, raw_rates = [], []
    try:
        await node.call(echo, SMALL, timeout=START_TIMEOUT)  # the link is up
        for number in range(rounds):
            idle += await small_calls(node, echo, seconds, failures)
            latencies, done = await loaded(node, echo, sink, seconds, failures)
            busy += latencies
            large_calls += done
            sky, raw_rate = await copy_rates(node, raw, sink, failures, number % 2 == 0)
            sky_rates.append(sky)
            raw_rates.append(raw_rate)
    finally:
        assert raw.transport is not None
        raw.transport.loseConnection()
        await node.stop()
    sky_rate, raw_rate = statistics.median(sky_rates), statistics.median(raw_rates)
    return {
        "small_idle_p50_ms": round(percentile(idle, 0.5) * 1e3, 2),
        "small_idle_p99_ms": round(percentile(idle, 0.99) * 1e3, 2),
        "small_loaded_p50_ms": round(percentile(busy, 0.5) * 1e3, 2),
        "small_loaded_p99_ms": round(percentile(busy, 0.99) * 1e3, 2),
        "small_loaded_calls": len(busy),
        "large_calls": large_calls,
        "sky_100mib_mib_s": round(sky_rate, 1),
        "raw_100mib_mib_s": round(raw_rate, 1),
        "ratio_sky_raw_100mib": round(sky_rate / raw_rate, 3) if raw_rate else 0.0,
        "failed_calls": failures.count,
        "first_failure": failures.first,
        "rounds": rounds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="seconds of small calls per round and kind (3)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve()
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds must be at least 1 and --seconds positive")
    from twisted.internet import reactor
    from twisted.internet.task import react

    secret = os.urandom(32)
    result: dict[str, Any] = {}
    with server(secret) as ports:
        async def client(reactor: Any) -> None:
            result.update(await run(reactor, ports, secret, args.rounds, args.seconds))

        with suppress(SystemExit):
            react(client)
    del reactor
    print(f"small calls, idle link:        p50 {result['small_idle_p50_ms']} ms, "
          f"p99 {result['small_idle_p99_ms']} ms")
    print(f"small calls, 15 MiB in flight: p50 {result['small_loaded_p50_ms']} ms, "
          f"p99 {result['small_loaded_p99_ms']} ms ({result['small_loaded_calls']} calls, "
          f"{result['large_calls']} large calls done)")
    print(f"100 MiB message: skyproto {result['sky_100mib_mib_s']} MiB/s, raw socket "
          f"{result['raw_100mib_mib_s']} MiB/s, ratio {result['ratio_sky_raw_100mib']}")
    print(f"failed calls: {result['failed_calls']}"
          + (f" (first: {result['first_failure']})" if result["first_failure"] else ""))
    if args.json:
        print(json.dumps(result))
    return 1 if result.get("failed_calls", 1) else 0


if __name__ == "__main__":
    sys.exit(main())
