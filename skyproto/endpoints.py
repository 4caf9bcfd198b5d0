"""Endpoint description strings, in one place: parse, quote, describe, advertise.

Every listen or connect address in skyproto is a Twisted endpoint description
(``tcp:7001:interface=127.0.0.1``, ``unix:/run/sky/b.sock``, ``loopback:beta``). These
functions read and write such strings without building an endpoint, so they need no
reactor: what a node advertises to its mapper (:func:`harbor_tcp_port`,
:func:`client_endpoint_for`), the endpoint to dial for a resolved address
(:func:`tcp_endpoint`), how an endpoint reads in a log line (:func:`describe_endpoint`),
and whether an option's value is a node name or an endpoint (:func:`is_node_name`).

TLS: :func:`uses_tls` tells the kinds that need pyOpenSSL (``ssl:``, ``tls:``, skyproto's
``skytls:``), :func:`require_tls` turns a missing pyOpenSSL into one clear line, and
:func:`listener_client_endpoint` names the scheme a port really listens on, so an
``ssl:``/``skytls:`` listener is logged and advertised as such, not as ``tcp:``.
"""

from __future__ import annotations

import weakref
from typing import Any, Final

from twisted.internet.endpoints import clientFromString

from .address import NodeName
from .errors import AddressError, ConfigurationError

__all__ = [
    "TLS_INSTALL_HINT",
    "TLS_KINDS",
    "client_endpoint_for",
    "describe_endpoint",
    "endpoint_host",
    "harbor_tcp_port",
    "is_node_name",
    "is_wildcard_interface",
    "listener_client_endpoint",
    "parse_endpoint_description",
    "quote_field",
    "require_tls",
    "require_tls_support",
    "tcp_endpoint",
    "tls_available",
    "uses_tls",
]

#: Options of ``unix:`` that only a listening endpoint takes (dropped from the client form).
_UNIX_SERVER_ONLY_OPTIONS: Final = frozenset({"mode", "lockfile", "backlog", "wantPID"})

#: Endpoint kinds that need pyOpenSSL and service_identity (Twisted's ``tls`` extra).
TLS_KINDS: Final = frozenset({"ssl", "tls", "skytls"})
TLS_INSTALL_HINT: Final = "pip install 'skyproto[tls]'"

#: Options of TLS client strings that name this process's own key and certificate files:
#: never advertised (each peer presents its own), by kind.
_TLS_OWN_FILES: Final = {
    "ssl": frozenset({"privateKey", "certKey"}),
    "tls": frozenset({"privateKey", "certificate"}),
    "skytls": frozenset({"dir"}),
}


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
    ``wantPID``); a TLS client string loses the options that name this process's own key
    and certificate (``skytls:`` ``dir=``, ``ssl:`` ``privateKey``/``certKey``, ``tls:``
    ``privateKey``/``certificate``): a peer dialing it presents its own. Other kinds are
    returned unchanged, so give their client form.
    """
    kind, args, kwargs = parse_endpoint_description(endpoint)
    dropped = _TLS_OWN_FILES.get(kind.lower())
    if kind.lower() == "unix":
        dropped = _UNIX_SERVER_ONLY_OPTIONS
    if dropped is None or (kind.lower() != "unix" and not dropped & kwargs.keys()):
        return endpoint
    kept = [f"{quote_field(k)}={quote_field(v)}" for k, v in kwargs.items() if k not in dropped]
    return ":".join([kind, *(quote_field(a) for a in args), *kept])


def uses_tls(endpoint: str) -> bool:
    """True for ``ssl:``, ``tls:`` and ``skytls:`` strings (the kinds needing pyOpenSSL)."""
    return parse_endpoint_description(endpoint)[0].lower() in TLS_KINDS


def tls_available() -> bool:
    """Whether pyOpenSSL and service_identity import (``pip install 'skyproto[tls]'``).

    Without service_identity Twisted would connect without checking host names, so both
    are required."""
    try:
        import OpenSSL.SSL  # noqa: F401
        import service_identity  # noqa: F401
    except ImportError:
        return False
    return True


def require_tls_support(what: str) -> None:
    """:class:`ConfigurationError` (one line starting with ``what``) unless TLS support is
    installed."""
    if not tls_available():
        raise ConfigurationError(
            f"{what} needs pyOpenSSL and service_identity, which are not installed: "
            f"{TLS_INSTALL_HINT}")


def require_tls(option: str, endpoint: str) -> None:
    """:class:`ConfigurationError` (one line naming ``option``) if ``endpoint`` needs TLS
    support that is not installed; nothing otherwise."""
    if uses_tls(endpoint):
        require_tls_support(f"{option} {endpoint}")


def listener_client_endpoint(listen: str | None, host: str, port: int) -> str:
    """The client string for a port listening at ``host:port`` as ``listen`` describes.

    ``skytls:`` listeners give ``skytls:HOST:PORT`` (each dialer adds its own identity);
    Twisted's ``ssl:`` and ``tls:`` listeners give ``ssl:HOST:PORT`` (encrypted, but
    Twisted's servers ask for no client certificate and the client checks none); anything
    else (or no ``listen``) gives ``tcp:HOST:PORT``. An IPv6 ``host`` uses ``host=`` and
    ``port=`` with the colons escaped.
    """
    kind = parse_endpoint_description(listen)[0].lower() if listen else "tcp"
    scheme = {"skytls": "skytls", "ssl": "ssl", "tls": "ssl"}.get(kind, "tcp")
    if ":" in host:
        return f"{scheme}:host={quote_field(host)}:port={port}"
    return f"{scheme}:{host}:{port}"


def tcp_endpoint(address: str, port: int) -> str:
    """A client endpoint string for ``address:port``: ``tcp:`` or, for IPv6, ``tcp6:``."""
    if ":" in address:
        return f"tcp6:{quote_field(address)}:{port}"
    return f"tcp:{address}:{port}"


#: Client endpoint kinds whose first argument (or ``host=``) is the host they dial.
_HOST_KINDS: Final = frozenset({"tcp", "tcp6", "ssl", "tls", "skytls"})


def endpoint_host(endpoint: str) -> str | None:
    """The host a ``tcp:``/``tcp6:``/``ssl:``/``tls:``/``skytls:`` client endpoint dials
    (``tcp:db1:2013`` -> ``db1``, ``tcp:host=10.0.0.1:port=2013`` -> ``10.0.0.1``); None
    for other kinds (``unix:``, ``loopback:``, plugins) or a string without a host."""
    kind, args, kwargs = parse_endpoint_description(endpoint)
    if kind.lower() not in _HOST_KINDS:
        return None
    host = kwargs.get("host", args[0] if args else "")
    return None if not host or host.isdigit() else host  # tcp:2013:... is a server string


def is_wildcard_interface(address: str) -> bool:
    """True for the addresses that mean "every interface" (``0.0.0.0``, ``::``, ``""``):
    a port bound there is reachable on all of them, and dialable at none of them."""
    return address in ("", "0.0.0.0", "::", "0:0:0:0:0:0:0:0")


def describe_endpoint(endpoint: str) -> str:
    """``host:port`` for a TCP client endpoint string (``[host]:port`` for IPv6), else as is."""
    kind, args, kwargs = parse_endpoint_description(endpoint)
    if kind.lower() in ("tcp", "tcp6"):
        host = kwargs.get("host", args[0] if args else None)
        port = kwargs.get("port", args[1] if len(args) > 1 else None)
        if host is not None and port is not None:
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return endpoint


#: parsed client endpoints kept per reactor (at most this many each; cleared when full)
MAX_PARSED_ENDPOINTS: Final = 4096
_parsed: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def parse_client_endpoint(reactor: Any, description: str) -> Any:
    """``clientFromString(reactor, description)``, parsed once per reactor and reused.

    Parsing a scheme that comes from a plugin (``loopback:``, ``skytls:``, a user's own)
    makes Twisted look its plugins up again, about 0.5 to 1 ms each time; a full mesh of N
    nodes in one process would parse N*(N-1) times. The endpoints Twisted's parsers build
    keep no per-connection state, so one serves every dial. Errors are raised as
    ``clientFromString`` raises them (and nothing is kept)."""
    try:
        cache = _parsed.get(reactor)
        if cache is None:
            cache = _parsed[reactor] = {}
    except TypeError:  # a reactor that cannot be weakly referenced: parse every time
        return clientFromString(reactor, description)
    endpoint = cache.get(description)
    if endpoint is None:
        if len(cache) >= MAX_PARSED_ENDPOINTS:
            cache.clear()
        endpoint = cache[description] = clientFromString(reactor, description)
    return endpoint
