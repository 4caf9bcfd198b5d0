"""HarborLink: one authenticated connection between two nodes (a thin adapter).

The handshake logic is in :mod:`skyproto.harbor.handshake`, the bytes in
:mod:`skyproto.wire.codec`; this class moves frames between the transport and them, keeps
the heartbeat, and tells its :class:`skyproto.interfaces.IMessageSink` when the link comes
up, carries data, or goes down.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface import implementer

from ..address import harbor_of
from ..auth import check_secret
from ..errors import AuthenticationFailed, FrameTooLarge, HarborDown, ProtocolError, QueueFull
from ..interfaces import IHarborLink, IMessageSink
from ..wire.codec import (
    DATA_HEADER,
    Frame,
    FrameKind,
    PayloadType,
    decode_data_header,
    decode_payload,
    decode_payload_parts,
    encode_data_message,
)
from ..wire.framing import (
    DEFAULT_MAX_FRAME,
    DEFAULT_MAX_OUTBOUND,
    WRITE_CHUNK,
    FrameProtocol,
    describe_peer,
)
from ..wire.heartbeat import HeartbeatTimer, HeartbeatTiming
from ..wire.pieces import (
    DEFAULT_MAX_MESSAGE,
    DEFAULT_PIECE_SIZE,
    PIECE,
    PieceAssembler,
    PieceScheduler,
)
from .handshake import HandshakeRefused, LinkHandshake
from .messages import HARBOR_CODEC, Heartbeat, LinkRefused, LinkRetired

_CONTROL = bytes([FrameKind.CONTROL])
_DATA = int(FrameKind.DATA)
_DATA_KIND = bytes([_DATA])  # compared with every frame's first byte (a cached 1-byte slice)
_NORMAL = int(PayloadType.NORMAL)
_CLOSED = Failure(ConnectionDone())
#: handshake messages are under 200 bytes; nothing bigger is read before the proof
HANDSHAKE_MAX_FRAME = 4096
#: piece bytes written past the transport's own mark (see HarborLink._piece_window)
PIECE_WINDOW = 256 * 1024
_HEADER_SIZE = DATA_HEADER.size
_unpack_header = DATA_HEADER.unpack_from
_SESSION_MIN = -(2**31)
_MAX_PTYPE = max(PayloadType)
#: payloads of frames this long are decoded from a view, not a copy
_VIEW_FROM = 64 * 1024
#: A mesh beats on every link every interval with the same few bytes: the heartbeat frames
#: of the commonest loads are encoded once, and recognised whole when they come in.
_BEAT_FRAMES = tuple(_CONTROL + HARBOR_CODEC.encode(Heartbeat(load)) for load in range(256))
_BEAT_LOADS = {frame: load for load, frame in enumerate(_BEAT_FRAMES)}


@attrs.frozen
class LinkConfig:
    """What every link of one node shares."""

    harbor: int
    incarnation: int
    secret: bytes = attrs.field(repr=False, converter=check_secret)
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 3.0
    handshake_timeout: float = 5.0
    max_frame: int = DEFAULT_MAX_FRAME
    max_outbound: int = DEFAULT_MAX_OUTBOUND
    #: the largest message; larger than ``piece_size``, it travels in pieces
    max_message: int = DEFAULT_MAX_MESSAGE
    #: data frames longer than this are cut into pieces of this size (at most max_frame)
    piece_size: int = DEFAULT_PIECE_SIZE

    @property
    def piece_bytes(self) -> int:
        """The bytes of a message each piece carries (a piece must fit in a frame)."""
        return max(1024, min(self.piece_size, self.max_frame - 16))


@implementer(IHarborLink)
class HarborLink(FrameProtocol):
    """Handshake, then data and heartbeats, on one connection."""

    def __init__(
        self,
        config: LinkConfig,
        sink: IMessageSink,
        clock: IReactorTime,
        dialer: bool,
        expect_harbor: int | None = None,
        registry: set[HarborLink] | None = None,
        expect_incarnation: int | None = None,
        load: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(config.max_frame, config.max_outbound, HANDSHAKE_MAX_FRAME)
        self.registry = registry
        self.config = config
        self.sink = sink
        self.clock = clock
        self.dialer = dialer
        self.peer_harbor = 0
        self.peer_incarnation = 0
        self.up = False
        #: a duplicate: nothing new is sent on it; it closes once the peer retired it too
        self.retired = False
        #: a dialer's: fires with this link once it is up, or fails with why it never came up
        self.ready: Deferred[HarborLink] = Deferred()
        timing = HeartbeatTiming(config.heartbeat_interval, config.heartbeat_timeout)
        self._handshake = LinkHandshake(
            config.secret, config.harbor, config.incarnation, dialer, expect_harbor,
            timing=timing, expect_incarnation=expect_incarnation,
        )
        self._timer: IDelayedCall | None = None
        self._heartbeat = HeartbeatTimer(clock, timing.interval, timing.timeout,
                                         self._beat, self._silent)
        self._lost_reason: BaseException | None = None
        self._batch: list[bytes] | None = None
        self._batch_size = 0
        self._data_received = sink.data_received
        self._reply_received = sink.reply_received
        self._harbor = config.harbor
        #: this node's load, told to the peer in every heartbeat
        self._load = load
        #: the peer's load, as its last heartbeat said
        self.peer_load = 0
        #: large messages waiting to go, a piece at a time, and those arriving
        self._pieces = PieceScheduler(self._write_piece, config.piece_bytes, config.max_message)
        self._assembler = PieceAssembler(config.max_message)
        #: a framed message up to this long goes whole (one test per message, not two)
        self._small_frame = 4 + min(config.piece_bytes, config.max_message)
        #: piece bytes that may still go into a transport that said it is full: a pipe kept
        #: this full keeps the socket busy, and a small message waits behind at most this
        self._piece_window = PIECE_WINDOW

    @property
    def local_harbor(self) -> int:
        """This node's harbor id (the local end of the link)."""
        return self.config.harbor

    @property
    def timing(self) -> HeartbeatTiming:
        """The heartbeat timing in force (negotiated once the link is up)."""
        return HeartbeatTiming(self._heartbeat.interval, self._heartbeat.timeout)

    # --- Twisted protocol --------------------------------------------------------------

    def connectionMade(self) -> None:
        """Register the link, start the handshake timer, and (dialing) send our hello."""
        super().connectionMade()
        if self.registry is not None:
            self.registry.add(self)
        self._timer = self.clock.callLater(self.config.handshake_timeout, self._handshake_late)
        hello = self._handshake.start()
        if hello is not None:
            self._send_control(hello)

    def dataReceived(self, data: bytes) -> None:
        """Bytes from the peer: a sign of life; replies made while handling them go out in one
        write."""
        # Liveness counts bytes, not whole frames: part of a large frame is a sign of life.
        self._heartbeat.heard()
        # Replies made while handling these frames go out in one write, not one per frame.
        batch: list[bytes] = []
        self._batch = batch
        self._batch_size = 0
        try:
            super().dataReceived(data)
        finally:
            self._batch = None
            if batch and self.transport is not None:
                # Under WRITE_CHUNK and one frame (write_frame sends each chunk as it fills),
                # so it goes as one write, or waits as one if the transport is full.
                self.write_bytes(batch[0] if len(batch) == 1 else b"".join(batch), True, True)

    def transport_drained(self) -> None:
        """The peer takes our bytes again: alive, and queued pieces may flow."""
        # The peer is taking our bytes: alive, even while we do not read it.
        self._heartbeat.heard()
        super().transport_drained()
        self._piece_window = PIECE_WINDOW
        if self._pieces and self._writable():
            self._pieces.pump()

    def frame_received(self, frame: bytes) -> None:
        """One frame: a data message (checked and delivered on the fast path), a piece, or a control
        message for the handshake or the link."""
        if frame[:1] == _DATA_KIND and self.up:
            try:
                _, source, destination, session, ptype = _unpack_header(frame)
            except struct.error:  # shorter than a header
                decode_data_header(frame)  # raises, saying what is wrong
                raise
            if session == _SESSION_MIN or ptype > _MAX_PTYPE:
                decode_data_header(frame)
            if source >> 24 != self.peer_harbor or destination >> 24 != self._harbor:
                self._misrouted(source, destination)
            try:
                payload = decode_payload(frame[_HEADER_SIZE:] if len(frame) < _VIEW_FROM
                                         else memoryview(frame)[_HEADER_SIZE:])
            except ProtocolError as e:
                self.sink.bad_payload(self, source, destination, session, e)
                return
            if session > 0 and ptype == _NORMAL:  # a reply: straight to the session table
                self._reply_received(session, payload, self.peer_harbor)
            else:
                self._data_received(self, source, destination, session, ptype, payload)
        elif frame and frame[0] == PIECE and self.up:
            parts = self._assembler.receive_parts(frame)
            if parts is not None:
                self._data_in_pieces(parts)
        elif frame and frame[0] == FrameKind.CONTROL:
            load = _BEAT_LOADS.get(frame) if type(frame) is bytes else None
            if load is None:
                self._control_received(HARBOR_CODEC.decode(frame[1:]))
            else:
                self.peer_load = load
        elif not frame:
            raise ProtocolError("empty frame")
        elif frame[0] == _DATA:
            raise ProtocolError("data before the handshake")
        else:
            raise ProtocolError(f"unknown frame kind {frame[0]}")

    def _data_in_pieces(self, parts: list[memoryview]) -> None:
        """A data message that came in pieces: checked as one would be, its payload copied
        once out of the pieces (the first piece holds the whole header: pieces are at least
        1024 bytes)."""
        first = parts[0]
        if first[:1] != _DATA_KIND:
            raise ProtocolError("a message in pieces that is not a data message")
        source, destination, session, ptype = decode_data_header(first)
        if source >> 24 != self.peer_harbor or destination >> 24 != self._harbor:
            self._misrouted(source, destination)
        try:
            payload = decode_payload_parts([first[_HEADER_SIZE:], *parts[1:]])
        except ProtocolError as e:
            self.sink.bad_payload(self, source, destination, session, e)
            return
        self._data_received(self, source, destination, session, ptype, payload)

    def plain_frame_before_sealed(self, frame: bytes) -> None:
        """A plain frame where a sealed record was due: a peer's LinkRefused in the clear says why
        it refused us; anything else drops the link."""
        # The peer refused our proof before it had keys: it says so in the clear.
        try:
            message = (HARBOR_CODEC.decode(frame[1:])
                       if frame and frame[0] == FrameKind.CONTROL else None)
        except ProtocolError:
            message = None
        if isinstance(message, LinkRefused):
            self._control_received(message)
        else:
            super().plain_frame_before_sealed(frame)

    def _misrouted(self, source: int, destination: int) -> None:
        if harbor_of(source) != self.peer_harbor:
            raise ProtocolError(f"source {source:#010x} is not on harbor {self.peer_harbor}")
        raise ProtocolError(f"destination {destination:#010x} is not on this harbor "
                            f"({self.config.harbor}): links carry no transit")

    def connectionLost(self, reason: Failure = _CLOSED) -> None:
        """The link is gone: stop its timers, drop what it queued, and tell the router (pending
        calls fail there)."""
        if self.registry is not None:
            self.registry.discard(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._heartbeat.stop()
        self.discard_outbound()
        self._pieces.clear()
        self._assembler.clear()
        why = self._lost_reason or reason.value
        if self.up:
            self.up = False
            self.log.info("harbor {peer} (incarnation {incarnation}) link lost: {why}",
                          peer=self.peer_harbor, incarnation=self.peer_incarnation, why=str(why))
            self.sink.link_down(self, HarborDown(f"link to harbor {self.peer_harbor} lost: {why}"))
        elif self.dialer and not self.ready.called:
            self.ready.errback(why if isinstance(why, Exception) else HarborDown(str(why)))
        else:
            # Anyone can connect and go away: not worth a line each at info.
            self.log.debug("link from {peer} closed before its handshake: {why}",
                           peer=describe_peer(self.transport), why=str(why))

    # --- IHarborLink -------------------------------------------------------------------

    def send_data(self, source: int, destination: int, session: int, ptype: int,
                  payload: Any) -> None:
        """Send one data message (a request with a session that expects a reply must not be refused
        for a full queue)."""
        self.write_frame(encode_data_message(source, destination, session, ptype, payload),
                         session > 0)

    def write_frame(self, frame: Frame, must: bool) -> None:
        """Write one data frame, in pieces if it is large or a large one is on its way;
        FrameTooLarge over the message limit, QueueFull when ``must`` is false and the queue is
        full."""
        pieces = self._pieces
        size = len(frame)
        if size > self._small_frame or (pieces.lanes and pieces.waits_behind(frame)):
            if size - 4 > self.config.max_message:
                raise FrameTooLarge(size - 4, self.config.max_message)
            if not must and pieces.queued + self.held_bytes > self.max_outbound:
                raise QueueFull(f"{pieces.queued + self.held_bytes} bytes already wait for "
                                f"a slow peer (limit {self.max_outbound})")
            pieces.add(frame)
            if self._writable():
                pieces.pump()
            return
        if not isinstance(frame, bytes):  # a SplitFrame small enough to go whole here
            frame = frame.joined()
        batch = self._batch
        if batch is None:
            self.write_bytes(frame, must)
            return
        if not must and self.held_bytes + size > self.max_outbound:
            self.check_room(size)  # raises QueueFull
        batch.append(frame)
        self._batch_size += size
        if self._batch_size >= WRITE_CHUNK:
            # Out now: the transport may fill, and then this link stops reading requests
            # whose replies would only pile up (the router pauses it between frames).
            frames = batch[:]
            batch.clear()
            self._batch_size = 0
            self.write_frames(frames)

    def _writable(self) -> bool:
        """Pieces may go now: nothing of ours waits, and the transport takes bytes or the
        piece window is not used up."""
        return (self.transport is not None and not self.held_bytes
                and (not self.transport_full or self._piece_window > 0))

    def _write_piece(self, frame: bytes) -> bool:
        """The scheduler's writer: one frame now; False once no more may go."""
        if self.transport_full:
            self._piece_window -= len(frame)
        self.write_through(frame)
        return self._writable()

    def retire(self, reason: str) -> None:
        """Close this duplicate link (the peer keeps the other one), saying why with LinkRetired."""
        if self.retired or self.transport is None:
            return
        self.retired = True
        self.log.info("retiring duplicate link to harbor {peer}: {reason}",
                      peer=self.peer_harbor, reason=reason)
        self._send_control(LinkRetired(reason))
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.clock.callLater(self.config.handshake_timeout, self._retire_late)

    def close(self, reason: str) -> None:
        """Close the link for ``reason``, telling the peer why; its pending calls fail with
        HarborDown."""
        self.log.info("closing link to harbor {peer}: {reason}", peer=self.peer_harbor,
                      reason=reason)
        self._lost_reason = HarborDown(reason)
        if self.transport is not None:
            if self.up:
                with contextlib.suppress(ProtocolError, QueueFull):
                    self._send_control(LinkRefused(reason))  # so the peer knows why
            self.close_connection()

    # --- congestion (FrameProtocol hooks) -----------------------------------------------

    def outbound_congested(self) -> None:
        """Our queue to the peer passed its mark: tell the router (it stops reading feeders)."""
        if self.up:
            self.sink.link_congested(self)

    def outbound_drained(self) -> None:
        """Our queue to the peer drained: tell the router (feeders are read again)."""
        if self.up:
            self.sink.link_drained(self)

    # --- internals ---------------------------------------------------------------------

    def _control_received(self, message: object) -> None:
        if isinstance(message, Heartbeat):
            if isinstance(message.load, int) and message.load >= 0:
                self.peer_load = message.load
            return
        if self.up:
            if isinstance(message, LinkRefused):
                self._lost_reason = HarborDown(f"peer closed the link: {message.reason}")
                self.close_connection()
                return
            if isinstance(message, LinkRetired):
                # The peer sends nothing more here; everything it sent before is read.
                if not self.retired:
                    self.sink.link_retired(self)
                    self.retire(message.reason)
                self._lost_reason = HarborDown(f"duplicate link retired: {message.reason}")
                self.close_connection()
                return
            raise ProtocolError(f"unexpected {type(message).__name__} on an up link")
        if isinstance(message, LinkRefused):
            self._lost_reason = HandshakeRefused(f"peer refused the link: {message.reason}")
            self.log.warn("{peer} refused the link: {reason}",
                          peer=describe_peer(self.transport), reason=message.reason)
            self.close_connection()
            return
        try:
            step = self._handshake.receive(message)
        except HandshakeRefused as e:
            self._refuse(e, str(e))
            return
        except AuthenticationFailed as e:
            self._refuse(e, "authentication failed")
            return
        for reply in step.send:
            self._send_control(reply)
        if step.peer is not None:
            keys = step.peer.keys
            assert keys is not None
            self.start_sealing(keys, initiator=self.dialer)
            self.peer_harbor = step.peer.harbor
            self.peer_incarnation = step.peer.incarnation
            self.up = True
            self.authenticated()
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            self._heartbeat.retime(step.peer.timing)
            self._heartbeat.start()
            self.log.info("harbor {peer} link up (incarnation {incarnation})",
                          peer=self.peer_harbor, incarnation=self.peer_incarnation)
            self.sink.link_up(self)
            self.ready.callback(self)

    def _refuse(self, error: Exception, told: str) -> None:
        # Before the handshake anyone may connect: count, and log at debug only.
        self.log.debug("refusing link from {peer}: {error}", peer=describe_peer(self.transport),
                       error=str(error))
        self._lost_reason = error
        self._send_control(LinkRefused(told))
        self.close_connection()

    def _send_control(self, message: object) -> None:
        self.send_frame(_CONTROL + HARBOR_CODEC.encode(message))

    def _beat(self) -> None:
        load = self._load() if self._load is not None and self.up else 0
        self.send_frame(_BEAT_FRAMES[load] if 0 <= load < len(_BEAT_FRAMES)
                        else _CONTROL + HARBOR_CODEC.encode(Heartbeat(load)))

    def _silent(self, quiet: float) -> None:
        self._lost_reason = HarborDown(f"harbor {self.peer_harbor} silent for {quiet:.1f} s")
        self.drop(str(self._lost_reason))

    def _handshake_late(self) -> None:
        self._timer = None
        self._lost_reason = HarborDown(
            f"no handshake within {self.config.handshake_timeout:g} s"
        )
        self.drop(str(self._lost_reason), quiet=True)

    def _retire_late(self) -> None:
        self._timer = None
        self._lost_reason = HarborDown("the peer never retired the duplicate link")
        if self.transport is not None:
            self.close_connection()


@attrs.define
class HarborLinkFactory(Factory):
    """Builds links for one node: accepting ones, or a dialer meant for ``expect_harbor``."""

    noisy = False  # the links log up and down themselves

    config: LinkConfig
    sink: IMessageSink
    clock: IReactorTime
    dialer: bool = False
    expect_harbor: int | None = None
    registry: set[HarborLink] | None = None
    expect_incarnation: int | None = None
    load: Callable[[], int] | None = None

    def buildProtocol(self, addr: object) -> HarborLink:
        """A new link with this factory's configuration, sink and expectations."""
        return HarborLink(self.config, self.sink, self.clock, self.dialer, self.expect_harbor,
                          self.registry, self.expect_incarnation, self.load)

