"""Endpoint description strings, in one place: parse, quote, describe, advertise.

Every listen or connect address in skyproto is a Twisted endpoint description
(``tcp:7001:interface=127.0.0.1``, ``unix:/run/sky/b.sock``, ``loopback:beta``). These
functions read and write such strings without building an endpoint, so they need no
reactor: what a node advertises to its mapper (:func:`harbor_tcp_port`,
:func:`client_endpoint_for`), the endpoint to dial for a resolved address
(:func:`tcp_endpoint`), how an endpoint reads in a log line (:func:`describe_endpoint`),
and whether an option's value is a node name or an endpoint (:func:`is_node_name`).
"""

from __future__ import annotations

from typing import Final

from .address import NodeName
from .errors import AddressError

__all__ = [
    "client_endpoint_for",
    "describe_endpoint",
    "harbor_tcp_port",
    "is_node_name",
    "parse_endpoint_description",
    "quote_field",
    "tcp_endpoint",
]

#: Options of ``unix:`` that only a listening endpoint takes (dropped from the client form).
_UNIX_SERVER_ONLY_OPTIONS: Final = frozenset({"mode", "lockfile", "backlog", "wantPID"})


def is_node_name(text: str) -> bool:
    """True for ``name@host`` (no ``:`` anywhere); False for endpoint strings.

    Endpoint descriptions always contain ``:`` (``tcp:...``, ``unix:...``), node names
    never do (IPv6 literals are not supported as node hosts), so the two can share a
    command-line option or a master table column.
    """
    if ":" in text or "@" not in text:
        return False
    try:
        node = NodeName.parse(text)
    except AddressError:
        return False
    return not any(c.isspace() for c in node.host)


def parse_endpoint_description(text: str) -> tuple[str, list[str], dict[str, str]]:
    """Split an endpoint string as Twisted does: (kind, positional args, keyword args).

    Fields are separated by unescaped ``:``; a field with an unescaped ``=`` is a keyword
    argument; ``\\`` escapes the next character (``tcp6:\\:\\:1:4369``).
    """
    fields: list[tuple[str, int | None]] = []
    current: list[str] = []
    equals: int | None = None
    escaped = False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append(("".join(current), equals))
            current, equals = [], None
        else:
            if char == "=" and equals is None:
                equals = len(current)
            current.append(char)
    fields.append(("".join(current), equals))
    kind = fields[0][0]
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for value, at in fields[1:]:
        if at is None:
            args.append(value)
        else:
            kwargs[value[:at]] = value[at + 1 :]
    return kind, args, kwargs


def quote_field(value: str) -> str:
    """Escape ``value`` for use as one field of an endpoint string (``\\``, ``:``, ``=``)."""
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def harbor_tcp_port(endpoint: str) -> int | None:
    """The TCP port of a plain ``tcp:``/``tcp6:`` harbor endpoint, or None for other kinds.

    Supported forms (server or client descriptions, any further options ignored):

    * ``tcp:PORT[:...]``, e.g. ``tcp:7001:interface=127.0.0.1`` (first argument numeric);
    * ``tcp:HOST:PORT[:...]``, e.g. ``tcp:127.0.0.1:7001`` (second argument numeric);
    * ``port=PORT`` as a keyword in either form.

    Anything else (``unix:``, ``ssl:``, ``loopback:``, a plugin, a TCP description with no
    numeric port) returns None: such a node is found through the Extra field. Port 0 (or
    a port outside 1..65535) raises ValueError: advertise the port actually listened on.
    """
    kind, args, kwargs = parse_endpoint_description(endpoint)
    if kind.lower() not in ("tcp", "tcp6"):
        return None
    if "port" in kwargs:
        text: str | None = kwargs["port"]
    elif args and args[0].isdigit():
        text = args[0]
    elif len(args) >= 2 and args[1].isdigit():
        text = args[1]
    else:
        text = None
    if text is None or not text.isdigit():
        return None
    port = int(text)
    if not 1 <= port <= 0xFFFF:
        raise ValueError(
            f"harbor endpoint {endpoint!r} has port {port}: advertise the port actually "
            "listened on (1..65535)"
        )
    return port


def client_endpoint_for(endpoint: str) -> str:
    """The client form of a listening endpoint, for peers to dial: what goes in Extra.

    ``unix:PATH`` loses its server-only options (``mode``, ``lockfile``, ``backlog``,
    ``wantPID``); other kinds are returned unchanged, so give their client form.
    """
    kind, args, kwargs = parse_endpoint_description(endpoint)
    if kind.lower() != "unix":
        return endpoint
    kept = [f"{quote_field(k)}={quote_field(v)}" for k, v in kwargs.items()
            if k not in _UNIX_SERVER_ONLY_OPTIONS]
    return ":".join([kind, *(quote_field(a) for a in args), *kept])


def tcp_endpoint(address: str, port: int) -> str:
    """A client endpoint string for ``address:port``: ``tcp:`` or, for IPv6, ``tcp6:``."""
    if ":" in address:
        return f"tcp6:{quote_field(address)}:{port}"
    return f"tcp:{address}:{port}"


def describe_endpoint(endpoint: str) -> str:
    """``host:port`` for a TCP client endpoint string (``[host]:port`` for IPv6), else as is."""
    kind, args, kwargs = parse_endpoint_description(endpoint)
    if kind.lower() in ("tcp", "tcp6"):
        host = kwargs.get("host", args[0] if args else None)
        port = kwargs.get("port", args[1] if len(args) > 1 else None)
        if host is not None and port is not None:
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return endpoint
