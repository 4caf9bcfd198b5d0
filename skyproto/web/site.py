"""The resource tree a daemon serves on ``--http``, and the service that runs its checks.

``/metrics`` (Prometheus text format, or OpenMetrics when asked for), ``/health``, and on a
master (a ``--standalone`` node included) ``/`` (the cluster page) and ``/status.json``;
elsewhere ``/`` lists the other two. Metrics are collected in the reactor's thread, at
the request: the collectors read live Twisted objects, which no other thread may touch.
(``prometheus_client.twisted.MetricsResource`` collects in the reactor's thread pool and
imports the global reactor, so :class:`MetricsResource` here uses prometheus_client's own
encoder, as that resource does, in the reactor's thread.) Requests are logged at debug
level only (a scraper asks every few seconds).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import http
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from .headers import set_headers
from .health import Health, HealthResource, NodeHealth, Running
from .metrics import (
    GateCollector,
    MapperCollector,
    MasterCollector,
    NodeCollector,
    daemon_registry,
)
from .page import ClusterPage, IndexPage, StatusResource

if TYPE_CHECKING:
    from ..gate import GateFactory
    from ..mapper.server import MapperServerFactory
    from ..master.server import MasterService
    from ..node.host_mapper import HostMapper
    from ..node.node import Node

__all__ = ["MetricsResource", "QuietSite", "Web", "WebService", "mapper_web", "master_web",
           "node_web"]


class MetricsResource(Resource):
    """``/metrics``: ``registry`` in the format the scraper asks for (``Accept``), collected
    now, in the reactor's thread; ``?name[]=...`` restricts it to those metrics."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        """The metrics in the format the client accepts (``name[]`` restricts them)."""
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        registry: Any = self.registry
        names = (request.args or {}).get(b"name[]")
        if names:
            registry = registry.restricted_registry([n.decode("utf-8", "replace")
                                                     for n in names])
        output: bytes = encoder(registry)
        set_headers(request, content_type=content_type.encode("latin-1"),
                    cache_control=b"no-store")
        return output


class QuietSite(Site):
    """A Site that logs each request at debug level, with fields, and no start/stop lines."""

    noisy = False
    logger = Logger()

    def log(self, request: http.Request) -> None:
        """Each request at debug level only (scrapers would flood the log)."""
        peer = request.getClientAddress()  # type: ignore[no-untyped-call]
        self.logger.debug("{method} {path} from {peer}: {code}",
                          method=request.method.decode("latin-1"),
                          path=request.uri.decode("latin-1"),
                          peer=str(getattr(peer, "host", "?")), code=request.code)


@attrs.define
class Web:
    """What one daemon serves over HTTP: its registry, its health check, its site."""

    registry: CollectorRegistry
    health: Health
    site: Site
    #: it serves the cluster page (a master's)
    has_page: bool = False

    def service(self) -> WebService:
        """The service that starts and stops the health checks with the daemon."""
        return WebService(self.health)


class WebService(Service):
    """Starts and stops a daemon's health check with the daemon."""

    def __init__(self, health: Health) -> None:
        self.health = health

    def startService(self) -> None:
        """Start the health checks."""
        super().startService()  # type: ignore[no-untyped-call]
        self.health.start()

    def stopService(self) -> None:
        """Stop the health checks."""
        super().stopService()  # type: ignore[no-untyped-call]
        self.health.stop()


class _Root(Resource):
    """The tree's root: its children, and an (escaped) 404 page for anything else."""

    def getChild(self, path: bytes, request: http.Request) -> IResource:
        return notFound()


def _site(registry: CollectorRegistry, health: Health, home: Resource,
          master: MasterService | None) -> Web:
    root = _Root()  # type: ignore[no-untyped-call]
    root.putChild(b"", home)
    root.putChild(b"metrics", MetricsResource(registry))
    root.putChild(b"health", HealthResource(health))
    if master is not None:
        snapshot = master.registry.snapshot
        root.putChild(b"status.json", StatusResource(snapshot, master.registry.kind))
    site = QuietSite(root)  # type: ignore[no-untyped-call]
    return Web(registry, health, site, has_page=master is not None)


def master_web(master: MasterService, process: bool = True) -> Web:
    """``skymaster``: the master's metrics, the cluster page and ``status.json``."""
    registry = daemon_registry(MasterCollector(master), process=process)
    return _site(registry, Running("master"), ClusterPage(master.registry.snapshot), master)


def mapper_web(mapper: MapperServerFactory, process: bool = True) -> Web:
    """``skymapper``: the mapper's metrics."""
    registry = daemon_registry(MapperCollector(mapper), process=process)
    return _site(registry, Running("mapper"), IndexPage("skymapper"), None)


def node_web(node: Node, clock: IReactorTime, gate: GateFactory | None = None,
             host_mapper: Callable[[], HostMapper | None] = lambda: None,
             master: MasterService | None = None, process: bool = True,
             master_grace: float | None = None) -> Web:
    """``skynode``: the node's metrics (its gate's, its hosted mapper's, and with
    ``--standalone`` its master's and the cluster page too)."""
    collectors: list[Collector] = [NodeCollector(node, host_mapper)]
    if gate is not None:
        collectors.append(GateCollector(gate))
    if master is not None:
        collectors.append(MasterCollector(master))
    registry = daemon_registry(*collectors, process=process)
    home: Resource = (ClusterPage(master.registry.snapshot) if master is not None
                      else IndexPage("skynode"))
    return _site(registry, NodeHealth(node, clock, grace=master_grace), home, master)
