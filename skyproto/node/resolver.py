"""Finding other nodes: ``name@host`` to the endpoint its harbor listens on.

:class:`NodeResolver` resolves ``host`` (``reactor.resolve``: the system resolver and
/etc/hosts, as Erlang does), asks that host's mapper with PORT_PLEASE2, and returns an
endpoint string to dial. Answers are cached (so traffic keeps flowing while a mapper is
being taken over) until :meth:`NodeResolver.invalidate`, which the router calls when a
dial to a resolved endpoint fails. It needs no registration of its own (a console tool
resolves too) and is not tied to one mapper, so it is kept apart from
:class:`skyproto.node.host_mapper.HostMapper`. The reactor is injected.

:class:`NodeEndpoint` is a client endpoint for ``name@host`` (a node's ``--master
skymaster@hosta``): every connect asks the host's mapper again, then dials what it said,
so a master that restarted on another port is found at its new one.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Final, cast

import attrs
from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import ConnectError, ConnectionRefusedError
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorCore,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..address import NodeName
from ..endpoints import describe_endpoint, is_node_name, tcp_endpoint
from ..errors import AddressError, SkyprotoError
from ..mapper.client import DEFAULT_TIMEOUT, MapperClient
from ..mapper.epmd import DEFAULT_PORT
from ..mapper.extra import decode_extra

__all__ = [
    "NOT_FOUND_KINDS",
    "NodeEndpoint",
    "NodeLocation",
    "NodeNotFound",
    "NodeResolver",
]

#: What :attr:`NodeNotFound.kind` may be, one per way a lookup fails.
NOT_FOUND_KINDS: Final = frozenset({
    "bad-name",  # not name@host
    "unknown-host",  # the host name does not resolve
    "no-mapper",  # nothing (or nothing sensible) answers on the host's mapper port
    "not-registered",  # the mapper answered: no such name
    "no-endpoint",  # registered with neither a port nor an endpoint
    "wrong-role",  # registered, but not as what the caller looks for (a harbor, not a master)
    "bad-endpoint",  # registered with an endpoint string that is not a client endpoint
})


class NodeNotFound(SkyprotoError):
    """A node name could not be resolved to an endpoint (not registered, unknown host,
    or no mapper answering on its host); the message says which.

    ``kind`` is one of :data:`NOT_FOUND_KINDS`; ``node`` the ``name@host`` looked up (if
    it parsed), ``mapper`` the mapper asked (``host:port`` or its endpoint string).
    """

    def __init__(self, message: str, *, kind: str = "no-mapper", node: NodeName | None = None,
                 mapper: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.node = node
        self.mapper = mapper


@attrs.frozen
class NodeLocation:
    """Where a node listens, as learned from its host's mapper."""

    node: str  #: ``name@host``
    endpoint: str  #: the client endpoint string to dial
    port: int  #: the ALIVE2 port (0 when the endpoint came from Extra)
    harbor: int | None  #: the harbor id from Extra (None for a non-skyproto node)
    role: str | None = None  #: a registration without a harbor id: what it is ("master")


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
            failed.errback(NodeNotFound(str(e), kind="bad-name"))
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
            raise NodeNotFound(f"cannot resolve the host of node {node}: {e}",
                               kind="unknown-host", node=node) from e
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
                f"{type(e).__name__}: {e}", kind="no-mapper", node=node, mapper=where,
            ) from e
        if reply is None:
            raise NodeNotFound(f"node {node.name} is not registered with the mapper at {where}",
                               kind="not-registered", node=node, mapper=where)
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
                "with neither a port nor an endpoint", kind="no-endpoint", node=node,
                mapper=where,
            )
        location = NodeLocation(
            str(node), endpoint, reply.port, None if extra is None else extra.harbor,
            None if extra is None else extra.role,
        )
        self.log.debug("node {node} is at {endpoint}", node=str(node), endpoint=endpoint)
        return location


def _is_refused(error: BaseException | None) -> bool:
    """Whether a connect failed because nothing listens there."""
    if isinstance(error, ConnectionRefusedError):
        return True
    return isinstance(error, ConnectError) and getattr(error, "osError", None) in (
        errno.ECONNREFUSED, errno.ENOENT)


def _role_of(location: NodeLocation) -> str:
    if location.harbor is not None:
        return f"harbor {location.harbor}"
    if location.role is not None:
        return f"a {location.role}"
    return "not a skyproto process (no skyproto Extra)"


@implementer(IStreamClientEndpoint)
class NodeEndpoint:
    """A client endpoint for ``name@host``: each :meth:`connect` asks ``host``'s mapper
    afresh (through ``resolver``, whose cached answer for the name it drops first) and
    dials the endpoint it answers, so a process that restarted on another port is found
    there. ``role`` (e.g. ``"master"``) refuses a registration that is something else (a
    harbor of that name); None takes whatever is registered. ``endpoint_for`` turns the
    answer into an endpoint (default ``clientFromString``; tests give fakes).

    A failed lookup errbacks with :class:`NodeNotFound` whose message says in words what
    is missing, e.g. ``no skymaster registered with the mapper on hosta
    (10.0.0.1:4369)`` or ``no mapper answers on hosta (10.0.0.1:4369): connection
    refused``. :attr:`stage` says what the current (or last) attempt is doing, for a
    timeout's message.
    """

    log = Logger()

    def __init__(self, reactor: IReactorTime, resolver: NodeResolver, node: str | NodeName,
                 *, role: str | None = None,
                 endpoint_for: Callable[[str], IStreamClientEndpoint] | None = None) -> None:
        self.reactor = reactor
        self.resolver = resolver
        self.node = node if isinstance(node, NodeName) else _parse_node(node)
        self.role = role
        self._endpoint_for = endpoint_for if endpoint_for is not None else (
            lambda description: clientFromString(reactor, description))
        #: what the latest attempt did last, in words
        self.stage = "not started"
        #: the endpoint the latest successful lookup answered, if any
        self.resolved: str | None = None

    def __repr__(self) -> str:
        return f"<NodeEndpoint {self.node}>"

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        """Ask the mapper where the node is now, then connect ``factory`` there."""
        return Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory: IProtocolFactory) -> IProtocol:
        node = self.node
        self.resolver.invalidate(node)  # every attempt asks again: it may have moved
        self.resolved = None
        self.stage = f"asking the mapper on {node.host} for {node.name}"
        try:
            location = await self.resolver.lookup(node)
        except NodeNotFound as e:
            raise NodeNotFound(self.explain(e), kind=e.kind, node=node,
                               mapper=e.mapper) from e
        finally:
            self.resolver.invalidate(node)  # nothing kept: the next attempt asks again
        if self.role is not None and location.role != self.role:
            raise NodeNotFound(
                f"{node.name} on the mapper on {node.host} is {_role_of(location)}, "
                f"not a {self.role}", kind="wrong-role", node=node)
        try:
            endpoint = self._endpoint_for(location.endpoint)
        except (ValueError, KeyError, TypeError) as e:
            raise NodeNotFound(
                f"{node.name} is registered with the mapper on {node.host} at "
                f"{location.endpoint!r}, which is not a client endpoint ({e})",
                kind="bad-endpoint", node=node) from None
        self.resolved = location.endpoint
        self.stage = f"connecting to {location.endpoint} (from the mapper on {node.host})"
        self.log.debug("{node} is at {endpoint}: connecting", node=str(node),
                       endpoint=location.endpoint)
        protocol: IProtocol = await endpoint.connect(factory)
        return protocol

    def explain(self, error: NodeNotFound) -> str:
        """``error`` (from the resolver) in the words of someone dialling this endpoint."""
        node = self.node
        where = f"{node.host} ({error.mapper})" if error.mapper else node.host
        cause = error.__cause__
        if error.kind == "not-registered":
            return f"no {node.name} registered with the mapper on {where}"
        if error.kind == "no-mapper":
            if _is_refused(cause):
                why = "connection refused"
            elif isinstance(cause, TimeoutError):
                why = f"no answer within {self.resolver.timeout:g} s"
            else:
                why = f"{type(cause).__name__}: {cause}" if cause is not None else str(error)
            return f"no mapper answers on {where}: {why}"
        if error.kind == "unknown-host":
            return f"cannot resolve the host {node.host} of {node}: {cause}"
        return str(error)


def _parse_node(text: str) -> NodeName:
    if not is_node_name(text):
        raise AddressError(f"a node name is written name@host (no ':'), not {text!r}")
    return NodeName.parse(text)
