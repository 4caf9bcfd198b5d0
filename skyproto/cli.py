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
from .endpoints import require_tls
from .errors import ConfigurationError
from .interfaces import IMasterListener
from .web.status import status_object as status_object  # also imported from here


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
        pass

    def master_event(self, event: Any) -> None:
        pass

    def master_refused(self, reason: str) -> None:
        pass

    def master_lost(self, reason: str) -> None:
        pass


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
    if args.command == "tls":
        return run_tls(args)
    endpoint_option = {"names": ("--mapper", "mapper"), "status": ("--master", "master")}
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
