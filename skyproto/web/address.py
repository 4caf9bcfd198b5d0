"""The ``--http`` option: where a daemon serves its pages; loopback unless told otherwise."""

from __future__ import annotations

from ..endpoints import parse_endpoint_description

__all__ = ["http_endpoint", "http_url"]


def http_endpoint(text: str) -> str:
    """The listening endpoint for ``--http``: a bare port means ``tcp:PORT`` on 127.0.0.1,
    and a ``tcp:`` endpoint without ``interface=`` listens on 127.0.0.1 too (give
    ``interface=0.0.0.0`` to serve other hosts). ValueError for an empty value."""
    text = text.strip()
    if not text:
        raise ValueError("--http needs an endpoint, e.g. tcp:9100:interface=127.0.0.1")
    if text.isdigit():
        return f"tcp:{int(text)}:interface=127.0.0.1"
    kind, _, kwargs = parse_endpoint_description(text)
    if kind.lower() in ("tcp", "tcp6") and "interface" not in kwargs:
        loopback = "\\:\\:1" if kind.lower() == "tcp6" else "127.0.0.1"
        return f"{text}:interface={loopback}"
    return text


def http_url(client_endpoint: str) -> str | None:
    """``http://host:port/`` for a ``tcp:HOST:PORT`` client endpoint string, else None."""
    kind, args, kwargs = parse_endpoint_description(client_endpoint)
    if kind.lower() not in ("tcp", "tcp6"):
        return None
    host = kwargs.get("host", args[0] if args else "")
    port = kwargs.get("port", args[1] if len(args) > 1 else "")
    if not host or not port:
        return None
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
