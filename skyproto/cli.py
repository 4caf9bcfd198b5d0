"""The ``skyproto`` console tool (also ``python -m skyproto``).

The only module besides ``tap.py`` that touches the global reactor. User mistakes and
unreachable peers are one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from zope.interface import implementer

from . import __version__
from .address import format_handle
from .errors import ConfigurationError
from .interfaces import IMasterListener
from .master.registry import Table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skyproto", description="Inspect a skyproto cluster.")
    parser.add_argument("--version", action="version", version=f"skyproto {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    names = commands.add_parser("names", help="list a mapper's registrations, like epmd -names")
    names.add_argument("--mapper", metavar="ENDPOINT",
                       help="the mapper (default tcp:127.0.0.1:$ERL_EPMD_PORT, or 4369)")
    names.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    status = commands.add_parser("status", help="list the master's live harbors and names")
    status.add_argument("--master", metavar="ENDPOINT", default="tcp:127.0.0.1:2013",
                        help="the master (default tcp:127.0.0.1:2013)")
    status.add_argument("--secret-file", metavar="FILE", default=None,
                        help="cluster secret (default ~/.skyproto.cookie)")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    return parser


@implementer(IMasterListener)
class _Observer:
    """An observer needs no notifications: it asks for the table once."""

    def master_table(self, table: Any, first: bool) -> None:
        pass

    def master_event(self, event: Any) -> None:
        pass

    def master_refused(self, reason: str) -> None:
        pass

    def master_lost(self, reason: str) -> None:
        pass


def status_object(table: Table) -> dict[str, Any]:
    """The ``--json`` form of the master's table."""
    return {
        "harbors": [
            {"id": r.harbor, "name": r.node, "endpoint": r.endpoint,
             "incarnation": r.incarnation, "up": True, "up_since": r.up_since}
            for r in table.harbors
        ],
        "names": dict(sorted(table.names.items())),
        "sequence": table.sequence,
    }


async def show_status(reactor: Any, endpoint: str, secret_file: str | None, as_json: bool,
                      timeout: float) -> None:
    from .auth import load_secret
    from .master.client import MasterClient

    client = MasterClient(reactor, endpoint, load_secret(secret_file, create=False), _Observer(),
                          request_timeout=timeout)
    client.start()
    try:
        table = await client.get_table()
    finally:
        await client.stop()
    if as_json:
        print(json.dumps(status_object(table)))
        return
    print(f"{'harbor':<7} {'node':<24} {'endpoint':<32} {'incarnation':<17} up since")
    for r in table.harbors:
        since = datetime.fromtimestamp(r.up_since, UTC).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{r.harbor:<7} {r.node:<24} {r.endpoint:<32} {r.incarnation:<17} {since}")
    print("names:" if table.names else "names: (none)")
    for name, handle in sorted(table.names.items()):
        print(f"  {name:<24} {format_handle(handle)}")


async def show_names(reactor: Any, endpoint: str, timeout: float) -> None:
    from twisted.internet.endpoints import clientFromString

    from .mapper.client import MapperClient

    try:
        client_endpoint = clientFromString(reactor, endpoint)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigurationError(f"bad mapper endpoint {endpoint!r}: {e}") from None
    reply = await MapperClient(reactor, client_endpoint, timeout=timeout).names_reply()
    print(f"epmd: up and running on port {reply.epmd_port} with data:")
    for name, port in reply.nodes:
        print(f"name {name} at port {port}")


def run_on_reactor(job: Callable[[Any], Coroutine[Any, Any, None]], what: str) -> int:
    """Run one coroutine on the global reactor; a failure is one line, exit status 1."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    status: list[int] = []

    def failed(failure: Any) -> None:
        status.append(1)
        print(f"skyproto: error: {what}: {failure.getErrorMessage()}", file=sys.stderr)

    def finish(_: object) -> None:
        reactor.stop()

    def start() -> None:
        done = Deferred.fromCoroutine(job(reactor))
        done.addCallbacks(lambda _: status.append(0), failed)
        done.addBoth(finish)

    reactor.callWhenRunning(start)
    reactor.run()
    return status[0] if status else 1


def main(argv: list[str] | None = None) -> int:
    """Run one command; user mistakes are one line on stderr and exit status 1 or 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "names":
        from .tap import mapper_port

        try:
            endpoint = args.mapper or f"tcp:127.0.0.1:{mapper_port(os.environ)}"
        except ConfigurationError as e:
            print(f"skyproto: error: {e}", file=sys.stderr)
            return 1
        return run_on_reactor(lambda reactor: show_names(reactor, endpoint, args.timeout),
                              f"cannot list names at {endpoint}")
    if args.command == "status":
        return run_on_reactor(
            lambda reactor: show_status(reactor, args.master, args.secret_file, args.json,
                                        args.timeout),
            f"cannot read the status of the master at {args.master}")
    if args.command is None:
        parser.print_help()
        return 2
    print(f"skyproto: error: '{args.command}' is not available yet", file=sys.stderr)
    return 1
