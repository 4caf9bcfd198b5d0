"""Instructions per call, counted by valgrind: skyproto against the naive Twisted+cbor2 echo.

Run: ``python benchmarks/instructions.py [--window 100] [--calls 2000,12000] [--kinds
sky,raw] [--json]``. On a shared VM the rate of a call wanders by 20 % from one run to the
next; the number of instructions the CPU runs for it does not. For each kind this runs
itself under ``valgrind --tool=callgrind`` twice, with both ends of a link in one process
on TCP loopback (``--one KIND N WINDOW``: N calls, WINDOW kept outstanding), and reports
the difference of the two totals over the difference of the call counts, so start-up
(imports, the handshake's scrypt) cancels out. Kinds: ``sky`` (two nodes, a sealed link,
node.call to an Echo service), ``plain`` (the same link unsealed) and ``raw`` (the echo of
``benchmarks/harbor.py``). User-space instructions only: what the kernel does for a
socket is not in the count (see ``harbor.py`` for time). Needs valgrind (Debian's
``valgrind``); a call that fails or returns the wrong payload makes the run exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any

PAYLOAD = bytes(range(16))
SECRET = b"instructions benchmark secret 32"


def one(kind: str, calls: int, window: int) -> int:
    """Run ``calls`` calls with ``window`` outstanding on the global reactor; 0 if all
    came back right, else 1."""
    from twisted.internet import epollreactor

    epollreactor.install()  # type: ignore[no-untyped-call]
    from twisted.internet import reactor as global_reactor
    from twisted.internet.defer import Deferred, ensureDeferred
    from twisted.internet.endpoints import clientFromString, connectProtocol, serverFromString
    from twisted.internet.protocol import Factory
    from twisted.internet.task import deferLater

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import harbor as bench  # type: ignore[import-not-found]

    from skyproto.node.node import Node
    from skyproto.services.echo import Echo

    reactor: Any = global_reactor
    failures: list[str] = []

    async def setup() -> Any:
        if kind in ("sky", "plain"):
            if kind == "plain":
                bench.unseal_links(None)
            server = Node(2, reactor, SECRET)
            echo = server.spawn(Echo())
            port = await server.listen("tcp:0:interface=127.0.0.1")
            client = Node(1, reactor, SECRET)
            address: Any = port.getHost()
            client.add_peer(2, f"tcp:127.0.0.1:{address.port}")
            for _ in range(1000):
                if client.router.state(2) == "up":
                    break
                await deferLater(reactor, 0.01, lambda: None)
            return lambda payload: client.call(echo, payload)
        listening = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            Factory.forProtocol(bench.RawEchoServer))
        raw = await connectProtocol(
            clientFromString(reactor, f"tcp:127.0.0.1:{listening.getHost().port}"),
            bench.RawEchoClient())
        return raw.call

    async def run() -> None:
        call = await setup()
        done: Deferred[None] = Deferred()
        counts = {"issued": 0, "back": 0}

        def issue() -> None:
            counts["issued"] += 1
            call(PAYLOAD).addCallbacks(back, failed)

        def back(reply: object) -> None:
            if reply != PAYLOAD:
                failures.append(f"wrong reply {reply!r}")
            finished()

        def failed(failure: Any) -> None:
            failures.append(str(failure.value))
            finished()

        def finished() -> None:
            counts["back"] += 1
            if counts["issued"] < calls and not failures:
                issue()
            elif counts["back"] == counts["issued"] and not done.called:
                done.callback(None)

        for _ in range(min(window, calls)):
            issue()
        await done

    def stop(result: object) -> None:
        if result is not None:
            failures.append(str(result))
        reactor.stop()

    reactor.callWhenRunning(lambda: ensureDeferred(run()).addBoth(stop))
    reactor.run()
    if failures:
        print(f"{kind}: {len(failures)} failed calls, the first: {failures[0]}", file=sys.stderr)
        return 1
    return 0


def counted(kind: str, calls: int, window: int) -> int:
    """Instructions valgrind counted for one ``--one`` run."""
    with tempfile.TemporaryDirectory() as folder:
        result = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={folder}/out",
             sys.executable, os.path.abspath(__file__), "--one", kind, str(calls),
             str(window)],
            capture_output=True, text=True, check=False)
    found = re.search(r"Collected : (\d+)", result.stderr)
    if result.returncode != 0 or found is None:
        raise RuntimeError(f"{kind} run of {calls} calls failed: {result.stderr[-500:]}")
    return int(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", nargs=3, metavar=("KIND", "CALLS", "WINDOW"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--window", type=int, default=100, help="calls kept outstanding")
    parser.add_argument("--calls", default="2000,12000", help="the two call counts")
    parser.add_argument("--kinds", default="sky,plain,raw")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.one:
        kind, calls, window = args.one
        return one(kind, int(calls), int(window))
    if shutil.which("valgrind") is None:
        print("instructions: valgrind is not installed (apt-get install valgrind)",
              file=sys.stderr)
        return 1
    low, high = (int(n) for n in args.calls.split(","))
    per_call: dict[str, float] = {}
    for kind in args.kinds.split(","):
        try:
            per_call[kind] = (counted(kind, high, args.window)
                              - counted(kind, low, args.window)) / (high - low)
        except RuntimeError as e:
            print(f"instructions: {e}", file=sys.stderr)
            return 1
        if not args.json:
            print(f"{kind:6} {per_call[kind]:10,.0f} instructions per call "
                  f"(window {args.window})")
    if "sky" in per_call and "raw" in per_call:
        ratio = per_call["raw"] / per_call["sky"]
        if not args.json:
            print(f"raw / sky: {ratio:.3f} (above 1: skyproto runs fewer instructions)")
        per_call["ratio_raw_sky"] = round(ratio, 3)
    if args.json:
        print(json.dumps({k: round(v, 3) for k, v in per_call.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
