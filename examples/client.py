#!/usr/bin/env python3
"""A client for a skyproto gate, with plain sockets: one request line out, one reply line in.

    python examples/client.py --gate tcp:127.0.0.1:8888 SET greeting hello world
    OK
    python examples/client.py --gate tcp:127.0.0.1:8888 GET greeting
    VALUE hello world

The words after the options are one request (``SET k v`` -> ``OK``, ``GET k`` ->
``VALUE v`` or ``NOTFOUND``); without them, every line of standard input is a request.
``-v`` prints each request (``> ...``) above its reply (``< ...``).

Exit status: 0 when every reply is an answer, 2 when the gate replied ``ERROR <reason>``
to a request, 1 (with one line on stderr) when the gate cannot be reached, closes the
connection, or does not reply within ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
from collections.abc import Iterable, Iterator
from typing import BinaryIO

PROGRAM = "client.py"
DEFAULT_GATE = "tcp:127.0.0.1:8888"


class GateUnreachable(Exception):
    """The gate is not there, went away, or did not answer in time."""


def endpoint_address(endpoint: str) -> tuple[int, str | tuple[str, int]]:
    """``tcp:HOST:PORT`` (or ``tcp:host=H:port=P``, or just ``HOST:PORT``) and
    ``unix:PATH`` (or ``unix:path=PATH``): the socket family and address to connect to.
    A colon inside a value is escaped with a backslash, as in Twisted endpoint strings."""
    parts = [part.replace("\\:", ":") for part in re.split(r"(?<!\\):", endpoint)]
    kind = parts[0] if parts[0] in ("tcp", "unix") else ""
    args = parts[1:] if kind else parts
    named = dict(part.split("=", 1) for part in args if "=" in part)
    plain = [part for part in args if "=" not in part]
    if kind == "unix":
        path = named.get("path") or (plain[0] if plain else "")
        if not path:
            raise ValueError(f"{endpoint!r}: unix: needs a path")
        return socket.AF_UNIX, path
    host = named.get("host") or (plain[0] if plain else "")
    port = named.get("port") or (plain[1] if len(plain) > 1 else "")
    if not host or not port.isdigit():
        raise ValueError(f"{endpoint!r}: use tcp:HOST:PORT or unix:PATH")
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))


class GateClient:
    """One connection to a line-framed gate (newline-terminated UTF-8)."""

    def __init__(self, endpoint: str, timeout: float = 10.0) -> None:
        self.endpoint = endpoint
        family, address = endpoint_address(endpoint)
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(address)
        except OSError as e:
            self.sock.close()
            raise GateUnreachable(f"cannot reach the gate at {endpoint}: {reason(e)}") from None
        self.reader: BinaryIO = self.sock.makefile("rb")

    def request(self, line: str) -> str:
        """Send one request line; return the gate's reply line (without its newline)."""
        try:
            self.sock.sendall(line.encode("utf-8") + b"\n")
            reply = self.reader.readline()
        except OSError as e:
            raise GateUnreachable(f"the gate at {self.endpoint} failed: {reason(e)}") from None
        if not reply.endswith(b"\n"):
            raise GateUnreachable(f"the gate at {self.endpoint} closed the connection")
        return reply.decode("utf-8", errors="replace").rstrip("\r\n")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def __enter__(self) -> GateClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def reason(error: OSError) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    return error.strerror or str(error)


def requests_from(words: list[str], lines: Iterable[str]) -> Iterator[str]:
    """The request in ``words``, or else each non-empty line read from ``lines``."""
    if words:
        yield " ".join(words)
        return
    for line in lines:
        if line.strip():
            yield line.rstrip("\r\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description="Send requests to a skyproto gate and print its replies.")
    parser.add_argument("--gate", default=DEFAULT_GATE,
                        help=f"the gate's endpoint (default {DEFAULT_GATE})")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait to connect and for each reply (default 10)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print each request (> ...) above its reply (< ...)")
    parser.add_argument("request", nargs="*",
                        help="one request, e.g. GET greeting (default: read lines from stdin)")
    options = parser.parse_args(argv)
    status = 0
    try:
        with GateClient(options.gate, options.timeout) as gate:
            for line in requests_from(options.request, sys.stdin):
                reply = gate.request(line)
                if options.verbose:
                    print(f"> {line}")
                    print(f"< {reply}", flush=True)
                else:
                    print(reply, flush=True)
                if reply.startswith("ERROR"):
                    status = 2
    except (GateUnreachable, ValueError) as e:
        print(f"{PROGRAM}: error: {e}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
