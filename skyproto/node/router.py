"""The router: one harbor link per peer, chosen by the top 8 bits of a destination.

It dials the peers it knows (static ``--peer`` entries now, the master's table later),
keeps one live link per harbor, queues messages (bounded) while a first link comes up,
fails them at once while a harbor is down, and redials with jittered exponential backoff.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..errors import ConfigurationError, FrameTooLarge, HarborDown, QueueFull
from ..harbor.link import HarborLink, HarborLinkFactory, LinkConfig
from ..interfaces import IHarborLink, IMessageSink
from ..wire.codec import DATA_HEADER, encode_cbor
from .mapping import NodeResolver, is_node_name

Message = tuple[int, int, int, int, Any]  # source, destination, session, type, payload
Deliver = Callable[[int, int, int, int, Any, int], None]
HarborLost = Callable[[int, BaseException], None]
Undeliverable = Callable[[int, int, int, Exception], None]


@attrs.define
class Peer:
    """What the router knows of one other harbor."""

    harbor: int
    endpoint: str | None = None
    link: IHarborLink | None = None
    dialing: bool = False
    queue: deque[Message] = attrs.field(factory=deque)
    retry: IDelayedCall | None = None
    backoff: float = 0.0
    #: why the harbor is down, told to every caller until it is up again
    last_error: str = ""

    @property
    def state(self) -> str:
        if self.link is not None:
            return "up"
        return "connecting" if self.dialing else "down"


@implementer(IMessageSink)
class Router:
    """Routes messages to harbor links and data from them to ``deliver``."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: LinkConfig,
        deliver: Deliver,
        harbor_lost: HarborLost,
        undeliverable: Undeliverable,
        expected_incarnation: Callable[[int], int | None] = lambda harbor: None,
        max_queue: int = 1000,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        rng: random.Random | None = None,
        resolver: NodeResolver | None = None,
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.config = config
        #: links call this directly for data (a frame fewer than data_received)
        self.deliver = deliver
        self.harbor_lost = harbor_lost
        self.undeliverable = undeliverable
        #: the incarnation the master says is live (None without a master)
        self.expected_incarnation = expected_incarnation
        self.max_queue = max_queue
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.rng = rng or random.Random()
        #: turns ``name@host`` peers into endpoints through that host's mapper
        self.resolver = resolver
        self.peers: dict[int, Peer] = {}
        self.stopping = False
        # Parsing a plugin endpoint (loopback:, a user's own) makes Twisted look its plugins
        # up again, about 0.5 ms a time: each endpoint string is parsed once and reused.
        self._endpoints: dict[str, Any] = {}
        #: every link object currently connected, up or not (for stop and for tests)
        self.links: set[HarborLink] = set()

    # --- peers -------------------------------------------------------------------------

    def add_peer(self, harbor: int, endpoint: str, dial: bool = True) -> None:
        """Learn (or re-learn) where ``harbor`` listens; dial it unless linked (or told not to:
        a newcomer announced by the master dials us)."""
        known = self.peers.get(harbor)
        if known is not None and known.endpoint == endpoint:
            if known.link is None and not known.dialing and dial:
                self._dial(known)
            return  # checked when it was learned: parsing a plugin endpoint scans plugins
        if is_node_name(endpoint):
            if self.resolver is None:
                raise ConfigurationError(
                    f"harbor {harbor}: {endpoint!r} is a node name, but this node has no "
                    f"port mapper to resolve it")
        else:
            try:
                self.client_endpoint(endpoint)
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigurationError(
                    f"harbor {harbor}: bad endpoint {endpoint!r}: {e}"
                ) from None
        peer = self.peers.setdefault(harbor, Peer(harbor))
        peer.endpoint = endpoint
        if dial and peer.link is None and not peer.dialing:
            self._dial(peer)

    def remove_peer(self, harbor: int, reason: str, incarnation: int | None = None) -> None:
        """Forget ``harbor`` (the master says it is gone): close its link, fail its calls.

        With ``incarnation``, a link to a newer incarnation (the node already came back)
        is kept."""
        peer = self.peers.get(harbor)
        if peer is None:
            return
        if (incarnation is not None and peer.link is not None
                and peer.link.peer_incarnation > incarnation):
            return
        del self.peers[harbor]
        if peer.retry is not None and peer.retry.active():
            peer.retry.cancel()
        error = HarborDown(f"harbor {harbor} is down: {reason}")
        self._fail_queue(peer, error)
        if peer.link is not None:
            link, peer.link = peer.link, None
            link.close(reason)
            self.harbor_lost(harbor, error)

    def state(self, harbor: int) -> str:
        peer = self.peers.get(harbor)
        return "unknown" if peer is None else peer.state

    # --- sending -----------------------------------------------------------------------

    def send(self, source: int, destination: int, session: int, ptype: int,
             payload: Any, incarnation: int = 0) -> None:
        """Send toward ``destination``'s harbor; raise HarborDown / QueueFull / FrameTooLarge.

        With ``incarnation`` (a reply), send only over a link to that incarnation of the
        harbor: the process that asked. A restarted one must never get its answer."""
        harbor = destination >> 24
        peer = self.peers.get(harbor)
        if incarnation and (peer is None or peer.link is None
                            or peer.link.peer_incarnation != incarnation):
            raise HarborDown(f"harbor {harbor} incarnation {incarnation}, which asked, is gone")
        if peer is not None and peer.link is not None:
            peer.link.send_data(source, destination, session, ptype, payload)
        elif peer is not None and (peer.dialing or (peer.endpoint and peer.retry is None)):
            if not peer.dialing:  # known but never dialed (the master told us of it)
                self._dial(peer)
            if len(peer.queue) >= self.max_queue:
                raise QueueFull(
                    f"{len(peer.queue)} messages already wait for harbor {harbor}'s link"
                )
            size = DATA_HEADER.size + len(encode_cbor(payload))  # fail now, not at flush
            if size > self.config.max_frame:
                raise FrameTooLarge(size, self.config.max_frame)
            peer.queue.append((source, destination, session, ptype, payload))
        elif peer is None:
            raise HarborDown(f"harbor {harbor} is not known to this node")
        else:
            why = f": {peer.last_error}" if peer.last_error else ""
            raise HarborDown(f"harbor {harbor} is down{why}")

    # --- IMessageSink ------------------------------------------------------------------

    def link_up(self, link: IHarborLink) -> None:
        if self.stopping:  # a dial (or an accept) that completed after stop()
            link.close("node stopping")
            return
        harbor = link.peer_harbor
        peer = self.peers.setdefault(harbor, Peer(harbor))
        current = peer.link
        if current is not None:
            if link.peer_incarnation < current.peer_incarnation:
                link.close(f"harbor {harbor} incarnation {link.peer_incarnation} is stale")
                return
            if link.peer_incarnation == current.peer_incarnation:
                # Both sides dialed: both keep the link dialed by the lower harbor id.
                if self._dialed_by(link) != min(harbor, self.config.harbor):
                    link.close("duplicate link")
                    return
                peer.link = None
                current.close("duplicate link")
            elif self.expected_incarnation(harbor) != link.peer_incarnation:
                # The live link says this incarnation is alive. A real restart loses that
                # link at once (or within the heartbeat bound) and redials; anything else
                # is an impostor claiming a live harbor id.
                link.close(f"harbor {harbor} is held by live incarnation "
                           f"{current.peer_incarnation}")
                return
            else:
                peer.link = None
                current.close(f"replaced by incarnation {link.peer_incarnation}")
                self.harbor_lost(harbor, HarborDown(
                    f"harbor {harbor} restarted (incarnation {link.peer_incarnation})"))
        peer.link = link
        peer.last_error = ""
        peer.backoff = 0.0
        if peer.retry is not None and peer.retry.active():
            peer.retry.cancel()
        peer.retry = None
        while peer.queue:
            source, destination, session, ptype, payload = peer.queue.popleft()
            link.send_data(source, destination, session, ptype, payload)

    def link_down(self, link: IHarborLink, reason: BaseException) -> None:
        peer = self.peers.get(link.peer_harbor)
        if peer is None or peer.link is not link:
            return  # a superseded or forgotten link: its harbor is not down
        peer.link = None
        if peer.endpoint is None:  # it dialed us and nobody told us where it listens
            del self.peers[peer.harbor]
        peer.last_error = str(reason)
        self.harbor_lost(peer.harbor, reason)
        if not self.stopping and peer.endpoint is not None:
            self._forget_address(peer)
            self._schedule_retry(peer)

    def data_received(self, link: IHarborLink, source: int, destination: int, session: int,
                      ptype: int, payload: Any) -> None:
        self.deliver(source, destination, session, ptype, payload, link.peer_incarnation)

    def bad_payload(self, link: IHarborLink, source: int, destination: int, session: int,
                    error: Exception) -> None:
        self.log.warn("unreadable payload from {source:#010x} on harbor {harbor}: {error}",
                      source=source, harbor=link.peer_harbor, error=error)
        self.undeliverable(source, destination, session, error)

    # --- dialing -----------------------------------------------------------------------

    def client_endpoint(self, description: str) -> Any:
        """The client endpoint for a description string, parsed once."""
        endpoint = self._endpoints.get(description)
        if endpoint is None:
            endpoint = self._endpoints[description] = clientFromString(self.reactor, description)
        return endpoint

    def link_factory(self, dialer: bool = False,
                     expect_harbor: int | None = None) -> HarborLinkFactory:
        """A factory for this node's links; every link it builds is kept in ``links``."""
        return HarborLinkFactory(self.config, self, self.clock, dialer, expect_harbor,
                                 registry=self.links)

    def _dialed_by(self, link: IHarborLink) -> int:
        return self.config.harbor if getattr(link, "dialer", False) else link.peer_harbor

    def _dial(self, peer: Peer) -> None:
        assert peer.endpoint is not None
        if self.stopping:
            return
        peer.dialing = True
        if peer.retry is not None and peer.retry.active():
            peer.retry.cancel()
        peer.retry = None
        factory = self.link_factory(dialer=True, expect_harbor=peer.harbor)
        target = peer.endpoint
        resolving: Deferred[str] = (
            self.resolver.resolve_node(target)
            if self.resolver is not None and is_node_name(target) else succeed(target))
        connecting: Deferred[Any] = resolving.addCallback(
            lambda endpoint: self.client_endpoint(endpoint).connect(factory))
        connecting.addTimeout(self.config.handshake_timeout, self.clock)
        connecting.addCallback(lambda link: link.ready)
        connecting.addCallbacks(lambda _: self._dialed(peer),
                                lambda failure: self._dial_failed(peer, failure))

    def _dialed(self, peer: Peer) -> None:
        peer.dialing = False

    def _forget_address(self, peer: Peer) -> None:
        """A dial to a resolved ``name@host`` failed: ask the mapper again next time."""
        if self.resolver is not None and peer.endpoint and is_node_name(peer.endpoint):
            self.resolver.invalidate(peer.endpoint)

    def _dial_failed(self, peer: Peer, failure: Failure) -> None:
        peer.dialing = False
        self._forget_address(peer)
        if self.peers.get(peer.harbor) is not peer:
            return
        error = HarborDown(
            f"harbor {peer.harbor} at {peer.endpoint} is unreachable: {failure.getErrorMessage()}"
        )
        peer.last_error = str(error)
        self._fail_queue(peer, error)
        if peer.link is None and not self.stopping:
            delay = self._schedule_retry(peer)
            self.log.warn("{error}; retrying in {delay:.1f} s", error=error, delay=delay)

    def _fail_queue(self, peer: Peer, error: HarborDown) -> None:
        if peer.queue:
            peer.queue.clear()
            self.harbor_lost(peer.harbor, error)

    def _schedule_retry(self, peer: Peer) -> float:
        peer.backoff = min(self.retry_max, peer.backoff * 2 or self.retry_initial)
        delay = peer.backoff * self.rng.uniform(0.8, 1.2)
        peer.retry = self.clock.callLater(delay, self._retry, peer)
        return delay

    def _retry(self, peer: Peer) -> None:
        peer.retry = None
        if self.stopping:
            return
        if self.peers.get(peer.harbor) is peer and peer.link is None and not peer.dialing:
            self._dial(peer)

    def stop(self) -> None:
        """Close every link and cancel every retry (the node is stopping)."""
        self.stopping = True
        for peer in self.peers.values():
            if peer.retry is not None and peer.retry.active():
                peer.retry.cancel()
            peer.retry = None
        for link in list(self.links):
            link.close("node stopping")
