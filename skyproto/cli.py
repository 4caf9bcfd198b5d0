"""The ``skyproto`` console tool (also ``python -m skyproto``).

The only module besides ``tap.py`` that touches the global reactor. User mistakes and
unreachable peers are one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import attrs
from zope.interface import implementer

from . import __version__
from .address import format_handle
from .endpoints import require_tls
from .errors import ConfigurationError
from .interfaces import IMasterListener
from .web.status import status_object as status_object  # also imported from here

if TYPE_CHECKING:
    from .node.resolver import NodeResolver


def master_resolver(reactor: Any) -> NodeResolver:
    """The resolver of a ``--master NAME@HOST`` (HOST's mapper on ``$ERL_EPMD_PORT`` or
    4369, as a node asks it)."""
    from .node.resolver import NodeResolver
    from .tap import mapper_port

    return NodeResolver(reactor, mapper_port(os.environ))


def build_parser() -> argparse.ArgumentParser:
    """The ``skyproto`` argument parser: every command and its options."""
    parser = argparse.ArgumentParser(prog="skyproto", description="Inspect a skyproto cluster.")
    parser.add_argument("--version", action="version", version=f"skyproto {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    names = commands.add_parser("names", help="list a mapper's registrations, like epmd -names")
    names.add_argument("--mapper", metavar="ENDPOINT",
                       help="the mapper (default tcp:127.0.0.1:$ERL_EPMD_PORT, or 4369)")
    names.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    status = commands.add_parser("status", help="list the master's live harbors and names")
    status.add_argument("--master", metavar="ENDPOINT", default="tcp:127.0.0.1:2013",
                        help="the master: an endpoint or NAME@HOST, e.g. skymaster@hosta "
                        "(default tcp:127.0.0.1:2013)")
    status.add_argument("--secret-file", metavar="FILE", default=None,
                        help="cluster secret (default ~/.skyproto.cookie)")
    status.add_argument("--json", action="store_true",
                        help="print one JSON object (with --watch: one per line)")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    status.add_argument("--watch", action="store_true",
                        help="then print every change as it happens, until Ctrl-C")
    services = commands.add_parser("services", help="list the services of one harbor")
    services.add_argument("--master", metavar="ENDPOINT", default="tcp:127.0.0.1:2013",
                          help="the master: an endpoint or NAME@HOST, e.g. skymaster@hosta "
                          "(default tcp:127.0.0.1:2013)")
    services.add_argument("--harbor", metavar="N", type=int, required=True,
                          help="the harbor id (1..255) of the node to ask")
    services.add_argument("--secret-file", metavar="FILE", default=None,
                          help="cluster secret (default ~/.skyproto.cookie)")
    services.add_argument("--json", action="store_true", help="print one JSON object")
    services.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    add_tls_parser(commands)
    return parser


def add_tls_parser(commands: Any) -> None:
    """``skyproto tls ca`` and ``skyproto tls cert`` (like ``consul tls ca|cert create``)."""
    from .tls import DEFAULT_CA_DAYS, DEFAULT_CA_NAME, DEFAULT_CERT_DAYS

    tls = commands.add_parser("tls", help="make a cluster CA and node certificates")
    tls.set_defaults(tls_parser=tls)
    actions = tls.add_subparsers(dest="tls_command", metavar="ACTION")
    ca = actions.add_parser("ca", help="make a cluster CA: DIR/ca.pem and DIR/ca.key",
                            description="Make a cluster CA: an ECDSA P-256 key (DIR/ca.key, "
                                        "mode 0600) and its self-signed certificate "
                                        "(DIR/ca.pem).")
    ca.add_argument("--dir", required=True, metavar="DIR", help="the cluster's TLS directory")
    ca.add_argument("--name", default=DEFAULT_CA_NAME,
                    help=f"the CA's common name (default {DEFAULT_CA_NAME!r})")
    ca.add_argument("--days", type=int, default=DEFAULT_CA_DAYS,
                    help=f"days of validity (default {DEFAULT_CA_DAYS})")
    ca.add_argument("--force", action="store_true", help="replace an existing CA")
    cert = actions.add_parser(
        "cert", help="make NAME's certificate and key, signed by the CA in DIR",
        description="Make the TLS identity of NAME (a node, a master, a client) in DIR/NAME: "
                    "ca.pem, node.crt and node.key (mode 0600), signed by DIR's CA. Its "
                    "names are NAME, localhost, 127.0.0.1 and every --san.")
    cert.add_argument("name", metavar="NAME", help="letters, digits, '.', '_' or '-'")
    cert.add_argument("--dir", required=True, metavar="DIR",
                      help="the cluster's TLS directory (made by skyproto tls ca)")
    cert.add_argument("--san", action="append", default=[], metavar="HOST_OR_IP",
                      help="another host name or IP address peers dial it by (repeatable)")
    cert.add_argument("--days", type=int, default=DEFAULT_CERT_DAYS,
                      help=f"days of validity (default {DEFAULT_CERT_DAYS})")
    cert.add_argument("--force", action="store_true", help="replace an existing identity")


def tls_ca(directory: str, name: str, days: int, force: bool) -> None:
    """``skyproto tls ca``: write the CA, say where, and what comes next."""
    from pathlib import Path

    from .tls import create_ca, save_ca

    certificate, key = save_ca(Path(directory), create_ca(name, days), force)
    print(f"CA certificate: {certificate}")
    print(f"CA key:         {key} (mode 0600; it signs new certificates: keep it off the "
          "nodes)")
    print(f"next, for each master, node and client: skyproto tls cert NAME --dir {directory}")


def tls_cert(directory: str, name: str, sans: list[str], days: int, force: bool) -> None:
    """``skyproto tls cert``: write NAME's identity and print the endpoint strings for it."""
    from pathlib import Path

    from .endpoints import quote_field
    from .tls import create_certificate, load_ca, save_identity, subject_alternative_names

    ca = load_ca(Path(directory))
    subject_alternative_names(name, sans)  # every --san checked before anything is made
    node = create_certificate(ca, name, sans, days)
    identity = save_identity(Path(directory) / name, ca, node, force)
    home = quote_field(str(identity.directory.resolve()))
    crt = quote_field(str(identity.certificate.resolve()))
    key = quote_field(str(identity.key.resolve()))
    names = ", ".join(str(n.value) for n in subject_alternative_names(name, sans))
    until = node.certificate.not_valid_after_utc.strftime("%Y-%m-%d")
    print(f"TLS identity of {name}: {identity.directory} (ca.pem, node.crt, node.key with "
          "mode 0600)")
    print(f"valid for {names}, until {until}")
    print("skyproto endpoints (both sides present a certificate and check the other's "
          "against ca.pem):")
    print(f"  listen:  skytls:PORT:interface=127.0.0.1:dir={home}")
    print(f"  connect: skytls:HOST:PORT:dir={home}")
    print(f"  or give twistd skymaster/skynode --tls-dir {home} and leave out dir=")
    print("Twisted's own endpoints (e.g. a gate for outside clients; no client certificates):")
    print(f"  listen:  ssl:PORT:interface=127.0.0.1:privateKey={key}:certKey={crt}")
    print(f"  connect: tls:HOST:PORT:trustRoots={home}:certificate={crt}:privateKey={key}")


def run_tls(args: argparse.Namespace) -> int:
    """``skyproto tls ...``: a user mistake is one line on stderr and exit status 1."""
    try:
        if args.tls_command == "ca":
            tls_ca(args.dir, args.name, args.days, args.force)
        elif args.tls_command == "cert":
            tls_cert(args.dir, args.name, args.san, args.days, args.force)
        else:
            args.tls_parser.print_help()
            return 2
    except ConfigurationError as e:
        print(f"skyproto: error: {e}", file=sys.stderr)
        return 1
    return 0


@implementer(IMasterListener)
class _Observer:
    """An observer needs no notifications: it asks for the table once."""

    def master_table(self, table: Any, first: bool) -> None:
        """Nothing to do: the table is asked for."""

    def master_event(self, event: Any) -> None:
        """Nothing to do: nothing is pushed to an observer that does not watch."""

    def master_refused(self, reason: str) -> None:
        """Nothing to do: the request fails with the reason."""

    def master_lost(self, reason: str) -> None:
        """Nothing to do: the request fails."""


@implementer(IMasterListener)
class _Watcher:
    """``skyproto status --watch``: prints each change the master pushes, with the time
    it arrived, and ends (``done``) when the master goes away."""

    def __init__(self, clock: Any, as_json: bool, master: str) -> None:
        self.clock = clock
        self.as_json = as_json
        self.master = master
        self.table: Any = None
        #: fires with None when stopped, with a failure when the master goes away
        self.done: Any = None

    def master_table(self, table: Any, first: bool) -> None:
        """A table fetched again after a gap: what changed is printed as events."""
        if self.table is not None:
            for event in table_changes(self.table, table):
                self.master_event(event)
        self.table = table

    def master_event(self, event: Any) -> None:
        """One change: one line (text or JSON), flushed at once."""
        now = self.clock.seconds()
        if self.as_json:
            print(json.dumps(event_object(event, now)), flush=True)
        else:
            print(f"{timestamp(now)} {event_line(event)}", flush=True)

    def master_refused(self, reason: str) -> None:
        """The master refused us (never after the handshake): the watch fails."""
        self.fail(f"the master at {self.master} refused: {reason}")

    def master_lost(self, reason: str) -> None:
        """The master went away: the watch ends with status 1."""
        self.fail(f"lost the master at {self.master}: {reason}")

    def fail(self, why: str) -> None:
        """End the watch with ``why`` (once)."""
        from .errors import MasterUnavailable

        if self.done is not None and not self.done.called:
            self.done.errback(MasterUnavailable(why))


def timestamp(seconds: float) -> str:
    """A moment as ``--watch`` prints it: UTC, to the millisecond."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def event_line(event: Any) -> str:
    """One pushed change in words (``skyproto status --watch``)."""
    from .master.records import GroupJoined, HarborJoined, HarborLeft, NameBound, NameUnbound

    if isinstance(event, HarborJoined):
        r = event.record
        return (f"harbor {r.harbor} joined: {r.node} at {r.endpoint} "
                f"(incarnation {r.incarnation})")
    if isinstance(event, HarborLeft):
        return f"harbor {event.harbor} left: {event.reason} (incarnation {event.incarnation})"
    if isinstance(event, NameBound):
        return f"name {event.name} bound to {format_handle(event.handle)}"
    if isinstance(event, NameUnbound):
        return f"name {event.name} unbound from {format_handle(event.handle)}"
    if isinstance(event, GroupJoined):
        return f"group {event.group} joined by {format_handle(event.handle)}"
    return f"group {event.group} left by {format_handle(event.handle)}"


#: the ``event`` of each change in ``skyproto status --watch --json``
EVENT_KINDS = {"HarborJoined": "harbor_joined", "HarborLeft": "harbor_left",
               "NameBound": "name_bound", "NameUnbound": "name_unbound",
               "GroupJoined": "group_joined", "GroupLeft": "group_left"}


def event_object(event: Any, seconds: float) -> dict[str, Any]:
    """One pushed change as ``--watch --json`` prints it: ``time`` (seconds of the epoch,
    when it arrived), ``event`` (``harbor_joined``, ...), ``sequence`` and its fields."""
    from .master.records import HarborJoined

    shown: dict[str, Any] = {"time": seconds, "event": EVENT_KINDS[type(event).__name__],
                             "sequence": event.sequence}
    if isinstance(event, HarborJoined):
        r = event.record
        shown.update(harbor=r.harbor, name=r.node, endpoint=r.endpoint,
                     incarnation=r.incarnation, up_since=r.up_since)
    else:
        shown.update({f.name: getattr(event, f.name) for f in attrs.fields(type(event))
                      if f.name != "sequence"})
    return shown


def table_changes(old: Any, new: Any) -> list[Any]:
    """The changes from one table to another, as the events that would have made them
    (a watcher that missed events prints these after fetching the table again)."""
    from .master.records import (
        GroupJoined,
        GroupLeft,
        HarborJoined,
        HarborLeft,
        NameBound,
        NameUnbound,
    )

    seq = new.sequence
    changes: list[Any] = []
    before = {r.harbor: r for r in old.harbors}
    after = {r.harbor: r for r in new.harbors}
    for harbor, r in sorted(before.items()):
        if after.get(harbor) != r:
            changes.append(HarborLeft(seq, harbor, r.incarnation, "not in the table any more"))
    for harbor, r in sorted(after.items()):
        if before.get(harbor) != r:
            changes.append(HarborJoined(seq, r))
    for name, handle in sorted(old.names.items()):
        if new.names.get(name) != handle:
            changes.append(NameUnbound(seq, name, handle))
    for name, handle in sorted(new.names.items()):
        if old.names.get(name) != handle:
            changes.append(NameBound(seq, name, handle))
    was = {(g, h) for g, members in old.groups.items() for h in members}
    now = {(g, h) for g, members in new.groups.items() for h in members}
    changes.extend(GroupLeft(seq, g, h) for g, h in sorted(was - now))
    changes.extend(GroupJoined(seq, g, h) for g, h in sorted(now - was))
    return changes


async def watch_status(reactor: Any, endpoint: str, secret_file: str | None, as_json: bool,
                       timeout: float) -> None:
    """``skyproto status --watch``: the table, then every change, until the reactor stops
    (Ctrl-C: a clean end) or the master goes away (MasterUnavailable)."""
    from twisted.internet.defer import Deferred

    from .auth import load_secret
    from .master.client import MasterClient

    watcher = _Watcher(reactor, as_json, endpoint)
    client = MasterClient(reactor, endpoint, load_secret(secret_file, create=False), watcher,
                          request_timeout=timeout, resolver=master_resolver(reactor))
    done: Deferred[None] = Deferred()
    watcher.done = done

    def interrupted() -> Deferred[None]:
        if not done.called:
            done.callback(None)
        return client.stop()  # shutdown waits for the connection to close

    trigger = reactor.addSystemEventTrigger("before", "shutdown", interrupted)
    client.start()
    try:
        table = await client.watch()
        watcher.table = table
        if as_json:
            print(json.dumps(status_object(table, client.store)), flush=True)
        else:
            for line in status_lines(table):
                print(line)
            print(f"watching the master at {endpoint} (Ctrl-C to stop)", flush=True)
        await done
    finally:
        reactor.removeSystemEventTrigger(trigger)
        await client.stop()


async def show_services(reactor: Any, endpoint: str, harbor: int, secret_file: str | None,
                        as_json: bool, timeout: float) -> None:
    """``skyproto services``: harbor ``harbor``'s services, as its node tells the master."""
    from .address import HARBOR_MAX, HARBOR_MIN
    from .auth import load_secret
    from .master.client import MasterClient

    if not HARBOR_MIN <= harbor <= HARBOR_MAX:
        raise ConfigurationError(f"harbor id {harbor} is out of range 1..255")
    client = MasterClient(reactor, endpoint, load_secret(secret_file, create=False), _Observer(),
                          request_timeout=timeout, resolver=master_resolver(reactor))
    client.start()
    try:
        reply = await client.list_services(harbor)
    finally:
        await client.stop()
    if as_json:
        print(json.dumps(services_object(reply)))
        return
    for line in services_lines(reply):
        print(line)


def services_object(reply: Any) -> dict[str, Any]:
    """The ``--json`` form of ``skyproto services``: the harbor, its node's name, and each
    service's handle (a plain 32-bit integer), class, names, groups and queue length."""
    return {
        "harbor": reply.harbor, "node": reply.node,
        "services": [{"handle": s.handle, "service": s.kind, "names": list(s.names),
                      "groups": list(s.groups), "queue": s.queue} for s in reply.services],
    }


def services_lines(reply: Any) -> list[str]:
    """``skyproto services`` for people: which node, then one service a line in aligned
    columns (names and groups comma-separated, ``-`` for none)."""
    count = len(reply.services)
    lines = [f"harbor {reply.harbor} ({reply.node}): {count} service{'s' * (count != 1)}"]
    if not count:
        return lines
    rows = [["handle", "service", "names", "groups", "queue"]]
    rows.extend([format_handle(s.handle), s.kind, ",".join(s.names) or "-",
                 ",".join(s.groups) or "-", str(s.queue)] for s in reply.services)
    lines.extend(columns(rows))
    return lines


async def show_status(reactor: Any, endpoint: str, secret_file: str | None, as_json: bool,
                      timeout: float) -> None:
    """``skyproto status``: ask the master for its table once, as an observer, and print it (aligned
    columns, or one JSON object)."""
    from .auth import load_secret
    from .master.client import MasterClient

    client = MasterClient(reactor, endpoint, load_secret(secret_file, create=False), _Observer(),
                          request_timeout=timeout, resolver=master_resolver(reactor))
    client.start()
    try:
        table = await client.get_table()
    finally:
        await client.stop()
    if as_json:
        print(json.dumps(status_object(table, client.store)))
        return
    for line in status_lines(table):
        print(line)


def columns(rows: list[list[str]]) -> list[str]:
    """Rows as lines of left-aligned columns, each as wide as its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [" ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            .rstrip() for row in rows]


def status_lines(table: Any) -> list[str]:
    """``skyproto status`` for people: the harbors, then the names, in aligned columns,
    then the groups and their members."""
    rows = [["harbor", "node", "endpoint", "incarnation", "up since"]]
    for r in table.harbors:
        since = datetime.fromtimestamp(r.up_since, UTC).strftime("%Y-%m-%d %H:%M:%S")
        rows.append([str(r.harbor), r.node, r.endpoint, str(r.incarnation), since])
    lines = columns(rows)
    lines.append("names:" if table.names else "names: (none)")
    names = [[name, format_handle(handle)] for name, handle in sorted(table.names.items())]
    lines.extend(f"  {line}" for line in (columns(names) if names else []))
    groups = getattr(table, "groups", {})
    if groups:
        lines.append("groups:")
        lines.extend(f"  {group} " + " ".join(format_handle(h) for h in members)
                     for group, members in sorted(groups.items()))
    return lines


async def show_names(reactor: Any, endpoint: str, timeout: float) -> None:
    """``skyproto names``: a mapper's registrations, printed as ``epmd -names`` prints them."""
    from twisted.internet.endpoints import clientFromString

    from .mapper.client import MapperClient

    try:
        client_endpoint = clientFromString(reactor, endpoint)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigurationError(f"bad mapper endpoint {endpoint!r}: {e}") from None
    reply = await MapperClient(reactor, client_endpoint, timeout=timeout).names_reply()
    # epmd's own words for a TCP mapper; a unix: (or other) mapper has no port to show
    where = f"port {reply.epmd_port}" if endpoint.split(":", 1)[0] in ("tcp", "tcp6") \
        else endpoint
    print(f"epmd: up and running on {where} with data:")
    for name, port in reply.nodes:
        print(f"name {name} at port {port}")


def run_on_reactor(job: Callable[[Any], Coroutine[Any, Any, None]], what: str) -> int:
    """Run one coroutine on the global reactor; a failure is one line, exit status 1."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.error import ReactorNotRunning

    status: list[int] = []

    def failed(failure: Any) -> None:
        status.append(1)
        print(f"skyproto: error: {what}: {failure.getErrorMessage()}", file=sys.stderr)

    def finish(_: object) -> None:
        with contextlib.suppress(ReactorNotRunning):  # stopping already (Ctrl-C)
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
    if args.command == "tls":
        return run_tls(args)
    endpoint_option = {"names": ("--mapper", "mapper"), "status": ("--master", "master"),
                       "services": ("--master", "master")}
    if args.command in endpoint_option:
        option, attribute = endpoint_option[args.command]
        try:
            require_tls(option, getattr(args, attribute) or "tcp:")
        except ConfigurationError as e:
            print(f"skyproto: error: {e}", file=sys.stderr)
            return 1
    if args.command == "names":
        from .tap import mapper_port

        try:
            endpoint = args.mapper or f"tcp:127.0.0.1:{mapper_port(os.environ)}"
        except ConfigurationError as e:
            print(f"skyproto: error: {e}", file=sys.stderr)
            return 1
        return run_on_reactor(lambda reactor: show_names(reactor, endpoint, args.timeout),
                              f"cannot list names at {endpoint}")
    if args.command == "status" and args.watch:
        return run_on_reactor(
            lambda reactor: watch_status(reactor, args.master, args.secret_file, args.json,
                                         args.timeout),
            f"watching the master at {args.master}")
    if args.command == "services":
        return run_on_reactor(
            lambda reactor: show_services(reactor, args.master, args.harbor, args.secret_file,
                                          args.json, args.timeout),
            f"cannot list the services of harbor {args.harbor} at {args.master}")
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
