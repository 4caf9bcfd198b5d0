"""The router: one harbor link per peer, chosen by the top 8 bits of a destination.

Each peer's life is a :class:`skyproto.node.peer.Peer` machine (dial, handshake, up,
backoff, removed); the router feeds it events, dials for it, and decides which link a harbor
keeps when two come up. Data goes both ways through here: out with :meth:`Router.send_frame`
(frames encoded once, by the caller), in through :meth:`Router.data_received` to the node,
with the link it arrived on, so a reply goes back on the link that asked.

Flow control: when a link's outbound queue passes its mark, feeders are held (gate clients
via :class:`skyproto.node.flow.FlowControl`), and the link itself stops being read while
nothing we wait for comes over it (it only brings requests whose replies pile up there).
"""

from __future__ import annotations

import contextlib
import random
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..endpoints import is_node_name, parse_client_endpoint
from ..errors import ConfigurationError, HarborDown
from ..harbor.link import HarborLink, HarborLinkFactory, LinkConfig
from ..interfaces import IHarborLink, IMessageSink
from ..wire.codec import Frame
from .flow import FlowControl
from .peer import DIALABLE_STATES, Peer, PeerCore
from .resolver import NodeResolver

#: (link it came on, source, destination, session, type, payload)
Deliver = Callable[[IHarborLink, int, int, int, int, Any], None]
HarborLost = Callable[[int, BaseException], None]
Undeliverable = Callable[[IHarborLink, int, int, int, Exception], None]
#: how many calls this node waits on from a harbor
PendingTo = Callable[[int], int]

#: dials one node has in progress at most (connect and handshake); the rest wait their turn
MAX_DIALS = 8


@attrs.define(eq=False)
class _DialTurn:
    """A dial waiting for its turn: the Deferred its peer holds, then the real attempt."""

    core: PeerCore
    waiting: Deferred[Any] = attrs.field(init=False)
    attempt: Deferred[Any] | None = None


@implementer(IMessageSink)
class Router:
    """Routes frames to harbor links and data from them to ``deliver``."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: LinkConfig,
        deliver: Deliver,
        harbor_lost: HarborLost,
        undeliverable: Undeliverable,
        expected_incarnation: Callable[[int], int | None] = lambda harbor: None,
        max_queue_bytes: int = 1024 * 1024,
        retry_initial: float = 0.5,
        retry_max: float = 2.0,
        rng: random.Random | None = None,
        resolver: NodeResolver | None = None,
        flow: FlowControl | None = None,
        pending_to: PendingTo = lambda harbor: 0,
        load: Callable[[], int] | None = None,
        max_dials: int = MAX_DIALS,
        *,
        reply_received: Callable[[int, Any, int], bool],
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.config = config
        self.deliver = deliver
        #: IMessageSink.data_received is the node's own delivery, with no frame between
        #: (it runs for every message)
        self.data_received: Deliver = deliver
        #: IMessageSink.reply_received: the node's session table's resolve, straight (the
        #: link hands it every successful reply)
        self.reply_received = reply_received
        self.harbor_lost = harbor_lost
        self.undeliverable = undeliverable
        #: the incarnation the master says is live (None without a master)
        self.expected_incarnation = expected_incarnation
        self.max_queue_bytes = max_queue_bytes
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.rng = rng or random.Random()
        #: turns ``name@host`` peers into endpoints through that host's mapper
        self.resolver = resolver
        self.flow = flow or FlowControl()
        #: this node's load, for the heartbeats of its links
        self.load = load
        self.pending_to = pending_to
        self.peers: dict[int, Peer] = {}
        self.stopping = False
        #: dials in progress at most (see _start_dial); the others wait in _dial_queue
        self.max_dials = max_dials
        self._dials_in_progress = 0
        self._dial_queue: deque[_DialTurn] = deque()
        #: every link object currently connected, up or not (for stop and for tests)
        self.links: set[HarborLink] = set()
        #: links this router stopped reading (their replies pile up), with the harbor
        self._unread: set[IHarborLink] = set()

    # --- peers -------------------------------------------------------------------------

    def add_peer(self, harbor: int, endpoint: str, dial: bool = True) -> None:
        """Learn (or re-learn) where ``harbor`` listens; dial it unless linked (or told not to:
        a newcomer announced by the master dials us)."""
        known = self.peers.get(harbor)
        if known is None or known.endpoint != endpoint:
            self._check_endpoint(harbor, endpoint)
            if known is None:
                known = self.peers[harbor] = self._new_peer(harbor)
            known.core.endpoint = endpoint
        # Asking the machine for a dial it would ignore costs a search of all its
        # transitions (automat's way), for every harbor of every table a node is sent.
        if dial and not self.stopping and known.core.state in DIALABLE_STATES:
            known.inputs.dial()

    def _check_endpoint(self, harbor: int, endpoint: str) -> None:
        if is_node_name(endpoint):
            if self.resolver is None:
                raise ConfigurationError(
                    f"harbor {harbor}: {endpoint!r} is a node name, but this node has no "
                    f"port mapper to resolve it")
            return
        try:
            self.client_endpoint(endpoint)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigurationError(f"harbor {harbor}: bad endpoint {endpoint!r}: {e}") from None

    def _new_peer(self, harbor: int) -> Peer:
        return Peer(PeerCore(
            harbor, self.clock, self.rng, self._start_dial, self._queue_failed,
            retry_initial=self.retry_initial, retry_max=self.retry_max,
            max_queue_bytes=self.max_queue_bytes,
            handshake_timeout=self.config.handshake_timeout))

    def remove_peer(self, harbor: int, reason: str, incarnation: int | None = None) -> None:
        """Forget ``harbor`` (the master says it is gone): close its link, fail its calls.

        With ``incarnation``, a link to a newer incarnation (the node already came back)
        is kept."""
        peer = self.peers.get(harbor)
        if peer is None:
            return
        link = peer.link
        if incarnation is not None and link is not None and link.peer_incarnation > incarnation:
            return
        del self.peers[harbor]
        peer.inputs.remove(reason)
        if link is not None:
            self._read_again(link)
            self.flow.drained(harbor)
            self.harbor_lost(harbor, HarborDown(f"harbor {harbor} is down: {reason}"))

    def state(self, harbor: int) -> str:
        """``idle``, ``dialing``, ``handshaking``, ``up``, ``backoff``, or ``unknown``."""
        peer = self.peers.get(harbor)
        return "unknown" if peer is None else peer.state

    def is_down(self, harbor: int) -> bool:
        """The link to ``harbor`` failed and has not come up again (backing off, or
        redialing after a failure): calls there would fail or wait."""
        peer = self.peers.get(harbor)
        return peer is not None and peer.state != "up" and bool(peer.core.last_error)

    # --- sending -----------------------------------------------------------------------

    def send_frame(self, harbor: int, frame: Frame) -> None:
        """Send an encoded request or one-way frame toward ``harbor``: at once on its link,
        queued while the link comes up; HarborDown / QueueFull if it cannot be."""
        peer = self.peers.get(harbor)
        if peer is None:
            raise HarborDown(f"harbor {harbor} is not known to this node")
        core = peer.core
        if core.state == "up":  # Peer.send's first case, in line: this runs for every call
            assert core.link is not None
            core.link.write_frame(frame, False)
        else:
            peer.send(frame)

    def reply_frame(self, link: IHarborLink, frame: Frame) -> None:
        """Send a reply back to whoever asked on ``link``: on that link, or, if it was retired
        as a duplicate, on the link that replaced it to the same process (same incarnation).
        A reply is never refused for room; HarborDown if the asking process is gone."""
        if link.up and not link.retired:
            link.write_frame(frame, True)
            return
        peer = self.peers.get(link.peer_harbor)
        current = peer.link if peer is not None else None
        if current is not None and current.peer_incarnation == link.peer_incarnation:
            current.write_frame(frame, True)
            return
        raise HarborDown(f"the link from harbor {link.peer_harbor} that asked is gone")

    # --- IMessageSink ------------------------------------------------------------------

    def link_up(self, link: IHarborLink) -> None:
        """A link finished its handshake: it becomes its harbor's link (replacing an older
        incarnation's), and queued frames go out."""
        if self.stopping:  # a dial (or an accept) that completed after stop()
            link.close("node stopping")
            return
        harbor = link.peer_harbor
        peer = self.peers.get(harbor)
        if peer is None:
            peer = self.peers[harbor] = self._new_peer(harbor)
        current = peer.link
        if current is not None:
            if link.peer_incarnation < current.peer_incarnation:
                link.close(f"harbor {harbor} incarnation {link.peer_incarnation} is stale")
                return
            if link.peer_incarnation == current.peer_incarnation:
                # Both sides dialed: both keep the link dialed by the lower harbor id, and
                # retire the other, which still delivers what was sent on it before.
                if self._dialed_by(link) != min(harbor, self.config.harbor):
                    link.retire("duplicate link")
                    return
                current.retire("duplicate link")
                self._read_again(current)
            elif self.expected_incarnation(harbor) != link.peer_incarnation:
                # The live link says this incarnation is alive. A real restart loses that
                # link at once (or within the heartbeat bound) and redials; anything else
                # is an impostor claiming a live harbor id.
                link.close(f"harbor {harbor} is held by live incarnation "
                           f"{current.peer_incarnation}")
                return
            else:
                peer.core.link = None
                current.close(f"replaced by incarnation {link.peer_incarnation}")
                self._read_again(current)
                self.harbor_lost(harbor, HarborDown(
                    f"harbor {harbor} restarted (incarnation {link.peer_incarnation})"))
        peer.inputs.attach(link)

    def link_down(self, link: IHarborLink, reason: BaseException) -> None:
        """A link ended: if it was its harbor's link, the harbor is down (pending calls fail) and
        dialed again if we know where it listens."""
        self._unread.discard(link)
        peer = self.peers.get(link.peer_harbor)
        if peer is None or peer.link is not link:
            return  # a retired, superseded or forgotten link: its harbor is not down
        self.flow.drained(peer.harbor)
        if peer.endpoint is None:  # it dialed us and nobody told us where it listens
            del self.peers[peer.harbor]
            peer.inputs.remove(str(reason))
        elif self.stopping:
            peer.inputs.remove("node stopping")
        else:
            self._forget_address(peer)
            peer.inputs.lost(str(reason))
        self.harbor_lost(peer.harbor, reason)

    def link_retired(self, link: IHarborLink) -> None:
        """The peer retired this duplicate link: queue for its harbor until the kept one is up here.
        """
        peer = self.peers.get(link.peer_harbor)
        self._read_again(link)
        if peer is not None and peer.link is link:
            self.flow.drained(peer.harbor)
            if peer.endpoint is not None and not self._may_replace(link):
                # No other link is coming up that the peer could have kept (a peer that
                # retires its only link): redial now rather than wait for none.
                peer.inputs.lost("retired by the peer, with no other link to keep")
                return
            # The peer chose the other link (we have not seen it up yet): queue until the
            # one it kept finishes its handshake here.
            peer.inputs.detach("retired by the peer")

    def _may_replace(self, link: IHarborLink) -> bool:
        """Another link could be the one the peer kept instead of ``link``: one to the same
        harbor, or one still in its handshake (whose harbor is not known yet)."""
        return any(other is not link and not other.retired
                   and (not other.up or other.peer_harbor == link.peer_harbor)
                   for other in self.links)

    def bad_payload(self, link: IHarborLink, source: int, destination: int, session: int,
                    error: Exception) -> None:
        """A message whose payload could not be read: log it and fail that message alone."""
        self.log.warn("unreadable payload from {source:#010x} on harbor {harbor}: {error}",
                      source=source, harbor=link.peer_harbor, error=str(error))
        self.undeliverable(link, source, destination, session, error)

    def link_congested(self, link: IHarborLink) -> None:
        """Replies to a harbor pile up: stop reading its requests (unless we wait for its replies)
        and tell the feeders."""
        harbor = link.peer_harbor
        self.flow.congested(harbor)
        # Replies to this harbor pile up: read no more of its requests, unless we wait for
        # replies from it (reading is how they come; stopping would deadlock both sides).
        if not self.pending_to(harbor) and isinstance(link, HarborLink):
            self._unread.add(link)
            link.pauseProducing()

    def link_drained(self, link: IHarborLink) -> None:
        """A harbor's queue drained: read it again and tell the feeders."""
        self._read_again(link)
        self.flow.drained(link.peer_harbor)

    def _read_again(self, link: IHarborLink) -> None:
        if link in self._unread:
            self._unread.discard(link)
            if isinstance(link, HarborLink):
                link.resumeProducing()

    # --- dialing -----------------------------------------------------------------------

    def client_endpoint(self, description: str) -> Any:
        """The client endpoint for a description string, parsed once (for every router on
        this reactor: see :func:`skyproto.endpoints.parse_client_endpoint`)."""
        return parse_client_endpoint(self.reactor, description)

    def link_factory(self, dialer: bool = False, expect_harbor: int | None = None,
                     expect_incarnation: int | None = None) -> HarborLinkFactory:
        """A factory for this node's links; every link it builds is kept in ``links``."""
        return HarborLinkFactory(self.config, self, self.clock, dialer, expect_harbor,
                                 registry=self.links, expect_incarnation=expect_incarnation,
                                 load=self.load)

    def _dialed_by(self, link: IHarborLink) -> int:
        return self.config.harbor if getattr(link, "dialer", False) else link.peer_harbor

    def _start_dial(self, core: PeerCore) -> Deferred[Any]:
        """Dial ``core``'s harbor now, or once one of the ``max_dials`` dials in progress
        ends: a node that learns of a whole cluster at once would otherwise start every
        handshake in one reactor pass, and in a large one (255 nodes in one process) no
        handshake finished within its timeout. The timeout runs from the dial's start."""
        self._dialable(core)
        if self._dials_in_progress < self.max_dials:
            return self._dial_now(core)
        turn = _DialTurn(core)
        turn.waiting = Deferred(lambda _: self._cancel_turn(turn))
        self._dial_queue.append(turn)
        return turn.waiting

    def _dialable(self, core: PeerCore) -> Peer:
        peer = self.peers.get(core.harbor)
        if self.stopping or peer is None or peer.core is not core or core.endpoint is None:
            raise HarborDown("no longer dialing this harbor")
        return peer

    def _cancel_turn(self, turn: _DialTurn) -> None:
        # Like a dial's own Deferred, a turn ends with None whatever happens: its outcome
        # goes to the peer's machine, so a CancelledError here would be nobody's to handle.
        if turn.attempt is not None:
            turn.attempt.cancel()
        else:
            with contextlib.suppress(ValueError):
                self._dial_queue.remove(turn)
            turn.waiting.callback(None)

    def _dial_ended(self, result: object) -> object:
        self._dials_in_progress -= 1
        while self._dial_queue and self._dials_in_progress < self.max_dials:
            turn = self._dial_queue.popleft()
            try:
                self._dialable(turn.core)
            except HarborDown:
                continue  # its peer moved on meanwhile: nobody waits for this turn
            turn.attempt = self._dial_now(turn.core)
            turn.attempt.chainDeferred(turn.waiting)
        return result

    def _dial_now(self, core: PeerCore) -> Deferred[Any]:
        """Resolve, connect, handshake, all within one timeout; the outcome goes back to
        the peer's machine exactly once."""
        peer = self._dialable(core)
        self._dials_in_progress += 1
        inputs = peer.inputs
        # The master says which process is live there: a mapper's answer (or a stale cache)
        # pointing anywhere else fails the handshake, and the cache entry with it.
        factory = self.link_factory(dialer=True, expect_harbor=core.harbor,
                                    expect_incarnation=self.expected_incarnation(core.harbor))
        target = core.endpoint
        assert target is not None  # _dialable checked it
        resolving: Deferred[str] = (
            self.resolver.resolve_node(target)
            if self.resolver is not None and is_node_name(target) else succeed(target))

        def connect(endpoint: str) -> Deferred[Any]:
            connecting: Deferred[Any] = self.client_endpoint(endpoint).connect(factory)
            return connecting

        def handshake(link: HarborLink) -> Deferred[HarborLink]:
            inputs.connected()
            return link.ready

        attempt = resolving.addCallback(connect).addCallback(handshake)
        attempt.addTimeout(self.config.handshake_timeout, self.clock)
        attempt.addCallbacks(lambda _: inputs.dial_done(),
                             lambda failure: self._dial_failed(core, failure))
        attempt.addBoth(self._dial_ended)
        return attempt

    def _dial_failed(self, core: PeerCore, failure: Failure) -> None:
        if self.resolver is not None and core.endpoint and is_node_name(core.endpoint):
            self.resolver.invalidate(core.endpoint)  # ask the mapper again next time
        peer = self.peers.get(core.harbor)
        if peer is not None and peer.core is core:
            if failure.check(TimeoutError):  # addTimeout's, whose words are "(5.0, 'Deferred')"
                reason = f"no handshake within {self.config.handshake_timeout:g} s"
            else:
                reason = failure.getErrorMessage() or type(failure.value).__name__
            peer.inputs.dial_failed(reason)

    def _forget_address(self, peer: Peer) -> None:
        """A link to a resolved ``name@host`` failed: ask the mapper again next time."""
        if self.resolver is not None and peer.endpoint and is_node_name(peer.endpoint):
            self.resolver.invalidate(peer.endpoint)

    def _queue_failed(self, harbor: int, error: HarborDown) -> None:
        self.harbor_lost(harbor, error)

    def stop(self) -> None:
        """Close every link and cancel every dial and retry (the node is stopping)."""
        self.stopping = True
        for peer in list(self.peers.values()):
            peer.inputs.remove("node stopping")
        for link in list(self.links):
            link.close("node stopping")

    def abort(self) -> None:
        """Like a killed process: every connection aborted without a word, nothing redials."""
        self.stopping = True
        for link in list(self.links):
            if link.transport is not None:
                link.transport.abortConnection()  # type: ignore[attr-defined]
        for peer in list(self.peers.values()):
            peer.inputs.remove("node crashed")
