"""Finding other nodes: ``name@host`` to the endpoint its harbor listens on.

:class:`NodeResolver` resolves ``host`` (``reactor.resolve``: the system resolver and
/etc/hosts, as Erlang does), asks that host's mapper with PORT_PLEASE2, and returns an
endpoint string to dial. Answers are cached (so traffic keeps flowing while a mapper is
being taken over) until :meth:`NodeResolver.invalidate`, which the router calls when a
dial to a resolved endpoint fails. It needs no registration of its own (a console tool
resolves too) and is not tied to one mapper, so it is kept apart from
:class:`skyproto.node.host_mapper.HostMapper`. The reactor is injected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..address import NodeName
from ..endpoints import describe_endpoint, is_node_name, tcp_endpoint
from ..errors import AddressError, SkyprotoError
from ..mapper.client import DEFAULT_TIMEOUT, MapperClient
from ..mapper.epmd import DEFAULT_PORT
from ..mapper.extra import decode_extra

__all__ = ["NodeLocation", "NodeNotFound", "NodeResolver"]


class NodeNotFound(SkyprotoError):
    """A node name could not be resolved to an endpoint (not registered, unknown host,
    or no mapper answering on its host); the message says which."""


@attrs.frozen
class NodeLocation:
    """Where a node listens, as learned from its host's mapper."""

    node: str  #: ``name@host``
    endpoint: str  #: the client endpoint string to dial
    port: int  #: the ALIVE2 port (0 when the endpoint came from Extra)
    harbor: int | None  #: the harbor id from Extra (None for a non-skyproto node)


class NodeResolver:
    """Resolves ``name@host`` to a harbor endpoint through the mapper on ``host``; caches.

    ``resolve_host`` turns a host name into an address (default: ``reactor.resolve``,
    which reads /etc/hosts and DNS like Erlang). ``mapper_endpoint_for`` turns that address
    into the client endpoint of the host's mapper (default ``tcp:<address>:<mapper_port>``;
    tests map every address to ``loopback:...``). A node whose Extra carries an endpoint
    resolves to it; otherwise to ``tcp:<address>:<port>``. Answers are cached until
    :meth:`invalidate`; concurrent lookups of one node share one query.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        mapper_port: int = DEFAULT_PORT,
        *,
        resolve_host: Callable[[str], Deferred[str]] | None = None,
        mapper_endpoint_for: Callable[[str], str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.reactor = reactor
        self.mapper_port = mapper_port
        self.timeout = timeout
        self._resolve_host = resolve_host if resolve_host is not None else self._system_resolve
        self._mapper_endpoint_for = (
            mapper_endpoint_for if mapper_endpoint_for is not None else self._default_mapper
        )
        self._cache: dict[str, NodeLocation] = {}
        self._pending: dict[str, list[Deferred[NodeLocation]]] = {}

    def _system_resolve(self, host: str) -> Deferred[str]:
        return cast(IReactorCore, self.reactor).resolve(host)

    def _default_mapper(self, address: str) -> str:
        return tcp_endpoint(address, self.mapper_port)

    def resolve_node(self, node: str | NodeName) -> Deferred[str]:
        """Deferred of the endpoint string to dial for ``name@host``; NodeNotFound if none."""
        return self.lookup(node).addCallback(lambda location: location.endpoint)

    def lookup(self, node: str | NodeName) -> Deferred[NodeLocation]:
        """Deferred of the whole :class:`NodeLocation` (endpoint, port, harbor id)."""
        try:
            parsed = node if isinstance(node, NodeName) else _parse_node(node)
        except AddressError as e:
            failed: Deferred[NodeLocation] = Deferred()
            failed.errback(NodeNotFound(str(e)))
            return failed
        key = str(parsed)
        hit = self._cache.get(key)
        if hit is not None:
            return succeed(hit)
        waiter: Deferred[NodeLocation] = Deferred()
        waiters = self._pending.get(key)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        waiters = self._pending[key] = [waiter]
        asking = Deferred.fromCoroutine(self._ask(parsed))
        asking.addBoth(self._answered, key, waiters)
        return waiter

    def cached(self, node: str | NodeName) -> NodeLocation | None:
        """The cached location of ``node``, if any (no query)."""
        return self._cache.get(str(node))

    def invalidate(self, node: str | NodeName) -> bool:
        """Forget what we know of ``node`` (a dial to it failed); True if it was cached.

        A lookup already under way still answers its callers but is not cached, and the
        next :meth:`lookup` asks the mapper again.
        """
        key = str(node)
        self._pending.pop(key, None)
        return self._cache.pop(key, None) is not None

    def _answered(
        self, result: NodeLocation | Failure, key: str, waiters: list[Deferred[NodeLocation]]
    ) -> None:
        current = self._pending.get(key) is waiters
        if current:
            del self._pending[key]
            if isinstance(result, NodeLocation):
                self._cache[key] = result
        for waiter in waiters:
            if not waiter.called:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

    async def _ask(self, node: NodeName) -> NodeLocation:
        try:
            address = await self._resolve_host(node.host)
        except Exception as e:
            raise NodeNotFound(f"cannot resolve the host of node {node}: {e}") from e
        mapper = self._mapper_endpoint_for(address)
        where = describe_endpoint(mapper)
        try:
            client = MapperClient(
                self.reactor, clientFromString(self.reactor, mapper), timeout=self.timeout
            )
            reply = await client.port_please(node.name)
        except Exception as e:
            raise NodeNotFound(
                f"cannot ask the mapper at {where} for node {node.name}: "
                f"{type(e).__name__}: {e}"
            ) from e
        if reply is None:
            raise NodeNotFound(f"node {node.name} is not registered with the mapper at {where}")
        extra = decode_extra(reply.extra)
        if reply.extra and extra is None:
            self.log.debug("ignoring a non-skyproto Extra of {size} bytes for {node}",
                           size=len(reply.extra), node=str(node))
        if extra is not None and extra.endpoint is not None:
            endpoint = extra.endpoint
        elif reply.port:
            endpoint = tcp_endpoint(address, reply.port)
        else:
            raise NodeNotFound(
                f"node {node.name} is registered with the mapper at {where} "
                "with neither a port nor an endpoint"
            )
        location = NodeLocation(
            str(node), endpoint, reply.port, None if extra is None else extra.harbor
        )
        self.log.debug("node {node} is at {endpoint}", node=str(node), endpoint=endpoint)
        return location


def _parse_node(text: str) -> NodeName:
    if not is_node_name(text):
        raise AddressError(f"a node name is written name@host (no ':'), not {text!r}")
    return NodeName.parse(text)
