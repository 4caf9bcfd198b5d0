"""Whether a daemon is serving: ``/health`` answers 200 ``ok`` or 503 with the reason.

A check returns None while all is well, else one line saying what is wrong. A master and
a mapper are healthy while they run. A node is not while it stops, once the master
refused it, or when it has had no master for longer than its grace (the master client's
request timeout, 5 s by default: from then on new global names and lookups fail).
Without ``--master`` (static peers only) a running node is healthy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.web.resource import Resource
from twisted.web.server import Request

from .headers import set_headers

if TYPE_CHECKING:
    from ..node.node import Node

__all__ = ["Health", "HealthResource", "NodeHealth", "Running"]


class Health(Protocol):
    """What ``/health`` asks."""

    def start(self) -> None:
        """The daemon serves from now on."""

    def stop(self) -> None:
        """The daemon is stopping."""

    def check(self) -> str | None:
        """None when serving, else why not (one line)."""


class Running:
    """Healthy from :meth:`start` to :meth:`stop`: a master or a mapper."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.running = False
        self.stopped = False

    def start(self) -> None:
        """The daemon runs: healthy from now on."""
        self.running = True

    def stop(self) -> None:
        """The daemon is stopping: unhealthy from now on."""
        self.running, self.stopped = False, True

    def check(self) -> str | None:
        """None when running, else why not (starting or stopping)."""
        if self.running:
            return None
        return f"the {self.what} is stopping" if self.stopped else f"the {self.what} is starting"


class NodeHealth(Running):
    """A node: unhealthy while stopping, when refused by its master, or without a master
    for longer than ``grace`` seconds (default: the master client's request timeout).

    While running it looks at the master connection every ``interval`` seconds, so the
    time the master has been away is known even if nobody asked ``/health`` meanwhile.
    """

    def __init__(self, node: Node, clock: IReactorTime, grace: float | None = None,
                 interval: float = 0.5) -> None:
        super().__init__("node")
        self.node = node
        self.clock = clock
        self.grace = grace
        self.interval = interval
        #: when the master was last seen joined (or, before that, when we started)
        self.master_seen = clock.seconds()
        self._sampler = LoopingCall(self.sample)
        self._sampler.clock = clock

    def start(self) -> None:
        """Start sampling whether the node is joined to its master."""
        super().start()
        self.master_seen = self.clock.seconds()
        if not self._sampler.running:
            self._sampler.start(self.interval, now=True)

    def stop(self) -> None:
        """Stop sampling."""
        super().stop()
        if self._sampler.running:
            self._sampler.stop()

    def sample(self) -> None:
        """Note the time if the node is joined to its master now."""
        master = self.node.master
        if master is not None and master.connected:
            self.master_seen = self.clock.seconds()

    def check(self) -> str | None:
        """None when healthy, else why not: stopping, refused by its master, or away from it longer
        than the grace."""
        stopping = super().check()
        if stopping is not None:
            return stopping
        if self.node.router.stopping:
            return "the node is stopping"
        master = self.node.master
        if master is None:
            return None
        self.sample()
        where = master.endpoint_description
        if master.state == "refused":
            return f"the master at {where} refused this node: {master.refusal}"
        if master.connected:
            return None
        grace = master.request_timeout if self.grace is None else self.grace
        away = self.clock.seconds() - self.master_seen
        if away <= grace:
            return None
        return (f"no master at {where} for {away:.1f} s (longer than {grace:g} s; "
                f"the master client is {master.state})")


class HealthResource(Resource):
    """``/health``: 200 ``ok``, or 503 and the reason, as one line of plain text."""

    isLeaf = True

    def __init__(self, health: Health) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.health = health

    def render_GET(self, request: Request) -> bytes:
        """``ok`` (200), or the reason (503)."""
        reason = self.health.check()
        set_headers(request, content_type=b"text/plain; charset=utf-8", cache_control=b"no-store")
        if reason is None:
            return b"ok\n"
        request.setResponseCode(503)
        return reason.encode("utf-8") + b"\n"
