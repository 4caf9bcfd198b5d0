"""PORT_PLEASE2 lookups per second: skyproto's mapper against a genuine ``epmd``.

Run: ``python benchmarks/mapper.py [--json] [--clients N] [--duration S] [--plain-port]``.
Both mappers run as separate processes on ephemeral ports on 127.0.0.1 (ours on the real
reactor, listening through ``mapper_server_endpoint`` as a ``MapperPort``, or with
``--plain-port`` on Twisted's own ``tcp.Port``; epmd as ``epmd -port P`` in the
foreground) with the same registered names, and the same raw-socket client processes
hammer each in turn: connect, send PORT_PLEASE2_REQ, read until the mapper closes.
Rounds alternate between the two; the median round counts. With ``--json`` the last line
is ``{"skymapper": ..., "epmd": ..., "ratio": ...}``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure


def serve_skymapper(plain: bool) -> None:
    """The child process: our mapper on 127.0.0.1:0, printing its port, until stdin closes.

    It listens as the daemon does (``mapper_server_endpoint``: a ``MapperPort``), or with
    ``plain`` on Twisted's own ``tcp.Port``. At exit it reports to stderr how many
    connections each path of a ``MapperPort`` took.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.stdio import StandardIO

    from skyproto.mapper.port import MapperPort, mapper_server_endpoint
    from skyproto.mapper.server import MapperServerFactory

    factory = MapperServerFactory(reactor, 0)
    description = "tcp:0:interface=127.0.0.1:backlog=1024"
    endpoint = (serverFromString if plain else mapper_server_endpoint)(reactor, description)

    def listening(port: object) -> None:
        factory.port = port.getHost().port  # type: ignore[attr-defined]
        print(factory.port, flush=True)
        if isinstance(port, MapperPort):
            reactor.addSystemEventTrigger("before", "shutdown", report, port)

    def report(port: MapperPort) -> None:
        print(
            f"skymapper: {port.fast} connections answered without a transport, "
            f"{port.handed_over} handed over; {port.waited} had to wait for their request",
            file=sys.stderr,
            flush=True,
        )

    def failed(failure: object) -> None:
        print(f"listen failed: {failure}", file=sys.stderr, flush=True)
        reactor.stop()

    d = endpoint.listen(factory)
    d.addCallbacks(listening, failed)
    # Exit when the parent goes away (it closes our stdin).
    StandardIO(_ExitOnEOF(reactor), reactor=reactor)  # type: ignore[no-untyped-call]
    reactor.run()


class _ExitOnEOF(Protocol):
    """Stops the reactor when stdin reaches EOF (our parent closed it or died)."""

    def __init__(self, reactor: object) -> None:
        self.reactor = reactor

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reactor.stop()  # type: ignore[attr-defined]


def alive2(name: str, port: int) -> bytes:
    raw = name.encode()
    body = struct.pack(">BHBBHHH", 120, port, 77, 0, 6, 5, len(raw)) + raw + b"\0\0"
    return struct.pack(">H", len(body)) + body


def port_please(name: str) -> bytes:
    raw = name.encode()
    return struct.pack(">H", len(raw) + 1) + b"z" + raw


def lookup(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(request)
        chunks: list[bytes] = []
        while True:
            data = s.recv(4096)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def wait_until_serving(port: int, deadline: float) -> None:
    while True:
        try:
            lookup(port, port_please("nobody"))
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextmanager
def skymapper(plain: bool = False) -> Iterator[int]:
    process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve-skymapper"]
        + (["--plain-port"] if plain else []),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"skymapper did not start: {line!r}")
        port = int(line)
        wait_until_serving(port, time.monotonic() + 10)
        yield port
    finally:
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def genuine_epmd(epmd: str) -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    home = tempfile.mkdtemp(prefix="skyproto-bench-")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home}
    process = subprocess.Popen(
        [epmd, "-port", str(port), "-address", "127.0.0.1"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_serving(port, time.monotonic() + 10)
        yield port
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(home, ignore_errors=True)


@contextmanager
def registered(port: int, names: list[str]) -> Iterator[None]:
    """Register ``names`` (keeping their ALIVE2 connections open) for the duration."""
    sockets = []
    try:
        for i, name in enumerate(names):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(alive2(name, 20000 + i))
            reply = b""
            while len(reply) < 6:
                data = s.recv(6 - len(reply))
                if not data:
                    raise RuntimeError(f"mapper closed the registration of {name}")
                reply += data
            if reply[:2] != b"v\x00":
                raise RuntimeError(f"registration of {name} refused: {reply!r}")
            sockets.append(s)
        yield
    finally:
        for s in sockets:
            s.close()


def worker(port: int, names: list[str], start: float, stop: float, out: object) -> None:
    """Look names up in a loop between ``start`` and ``stop``; report how many succeeded."""
    requests = [port_please(n) for n in names]
    expected = [struct.pack(">BBH", 119, 0, 20000 + i) for i in range(len(names))]
    while time.time() < start:
        time.sleep(0.001)
    done = errors = 0
    i = 0
    while time.time() < stop:
        k = i % len(requests)
        i += 1
        try:
            reply = lookup(port, requests[k])
        except OSError:
            errors += 1
            continue
        if reply[:4] == expected[k]:
            done += 1
        else:
            errors += 1
    out.put((done, errors))  # type: ignore[attr-defined]


def measure(port: int, names: list[str], clients: int, duration: float) -> tuple[float, int]:
    """Lookups per second from ``clients`` processes over ``duration`` seconds."""
    queue: multiprocessing.Queue[tuple[int, int]] = multiprocessing.Queue()
    start = time.time() + 0.3
    stop = start + duration
    procs = [
        multiprocessing.Process(target=worker, args=(port, names, start, stop, queue))
        for _ in range(clients)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=duration + 30) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    done = sum(r[0] for r in results)
    errors = sum(r[1] for r in results)
    return done / duration, errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--clients", type=int, default=1, help="client processes (1)")
    parser.add_argument("--duration", type=float, default=1.5, help="seconds per round (1.5)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per mapper (5)")
    parser.add_argument("--names", type=int, default=20, help="registered names (20)")
    parser.add_argument(
        "--plain-port",
        action="store_true",
        help="serve skymapper on Twisted's tcp.Port instead of MapperPort (the old path)",
    )
    parser.add_argument("--serve-skymapper", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_skymapper:
        serve_skymapper(args.plain_port)
        return 0

    epmd = shutil.which("epmd")
    if epmd is None:
        print("epmd is not installed (apt-get install erlang-base)", file=sys.stderr)
        return 2
    names = [f"node{i}" for i in range(args.names)]
    rates: dict[str, list[float]] = {"skymapper": [], "epmd": []}
    with ExitStack() as stack:
        ports = {
            "skymapper": stack.enter_context(skymapper(args.plain_port)),
            "epmd": stack.enter_context(genuine_epmd(epmd)),
        }
        for port in ports.values():
            stack.enter_context(registered(port, names))
        for _ in range(args.rounds):
            for target, port in ports.items():
                rate, errors = measure(port, names, args.clients, args.duration)
                if errors:
                    print(f"{target}: {errors} failed lookups", file=sys.stderr)
                rates[target].append(rate)
    sky = statistics.median(rates["skymapper"])
    real = statistics.median(rates["epmd"])
    ratio = sky / real if real else 0.0
    print(
        f"PORT_PLEASE2 lookups/s, {args.clients} client processes, "
        f"median of {args.rounds} x {args.duration:g} s:"
    )
    print(f"  skymapper: {sky:10.0f}   rounds: {', '.join(f'{r:.0f}' for r in rates['skymapper'])}")
    print(f"  epmd:      {real:10.0f}   rounds: {', '.join(f'{r:.0f}' for r in rates['epmd'])}")
    print(f"  ratio:     {ratio:10.2f}   (skymapper / epmd, target >= 0.8)")
    if args.json:
        print(
            json.dumps(
                {"skymapper": round(sky, 1), "epmd": round(real, 1), "ratio": round(ratio, 3)}
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
