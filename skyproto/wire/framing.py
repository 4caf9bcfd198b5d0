"""Length-prefixed frames, sealed into records after the handshake, with one size limit.

A frame is a 4-byte big-endian length and that many bytes. Sending a frame over the limit
raises :class:`FrameTooLarge` at the sender, before anything is written; receiving one
drops that connection with a logged reason. A frame handler that raises
:class:`ProtocolError` also drops only its own connection.

Once a handshake has derived keys (:mod:`skyproto.wire.seal`),
:meth:`FrameProtocol.seal_outbound` and :meth:`FrameProtocol.open_inbound` switch each
direction to sealed records: every write (a frame, or the frames written together) becomes
one record, and every record received must open, in order, or the connection is dropped.
Frames are parsed here rather than by Twisted's IntNStringReceiver because the switch can
fall in the middle of a read.

Outbound bytes go straight to the transport while it accepts them. Once the transport says
its buffer is full (it pauses us, as a producer), frames wait in this protocol's own queue,
counted exactly in bytes, and go out as the transport drains. ``max_outbound`` bounds that
queue for traffic that may be refused (new requests get :class:`QueueFull`); traffic that must
not be lost (replies, control) is always queued. Crossing ``outbound_mark`` calls
:meth:`FrameProtocol.outbound_congested`; falling back under a quarter of it calls
:meth:`FrameProtocol.outbound_drained`, so owners can stop reading whoever feeds them.
"""

from __future__ import annotations

import contextlib
import struct
from collections import deque
from collections.abc import Sequence
from typing import Final

from twisted.internet import tcp, unix
from twisted.internet.interfaces import IPushProducer, ITransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from ..errors import FrameTooLarge, ProtocolError, QueueFull
from .seal import RECORD_OVERHEAD, SEALED, Opener, Sealer, SessionKeys

DEFAULT_MAX_FRAME: Final = 16 * 1024 * 1024
#: bytes a connection may queue beyond the transport's own buffer before sends fail
DEFAULT_MAX_OUTBOUND: Final = 8 * 1024 * 1024
LENGTH_PREFIX: Final = struct.Struct(">I")
#: frames made together are joined into writes of about this size (fewer system calls)
WRITE_CHUNK: Final = 64 * 1024


@implementer(IPushProducer)
class _Congestion:
    """Registered on the transport: told when its write buffer is full and when it drains."""

    def __init__(self, protocol: FrameProtocol) -> None:
        self.protocol = protocol

    def pauseProducing(self) -> None:
        self.protocol.transport_full = True

    def resumeProducing(self) -> None:
        self.protocol.transport_full = False
        self.protocol.transport_drained()

    def stopProducing(self) -> None:
        pass


_LENGTH_SIZE: Final = LENGTH_PREFIX.size
_unpack_length = LENGTH_PREFIX.unpack_from


@implementer(IPushProducer)
class FrameProtocol(Protocol):
    """A protocol that speaks frames; subclasses implement :meth:`frame_received`.

    It is also the producer its transport's reader is: :meth:`pauseProducing` stops
    handling frames (between two frames) until :meth:`resumeProducing`."""

    log = Logger()
    #: reading is paused: frames wait in the buffer
    paused = False

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME,
                 max_outbound: int = DEFAULT_MAX_OUTBOUND,
                 max_frame_before_auth: int | None = None,
                 outbound_mark: int | None = None) -> None:
        # Until the peer has proven the secret its frames are held to a small limit, so
        # that connections without the secret cannot make us buffer max_frame bytes each.
        self.max_frame_after_auth = max_frame
        self.MAX_LENGTH = min(max_frame, max_frame_before_auth or max_frame)
        self.max_outbound = max_outbound
        self.outbound_mark = outbound_mark or max(1, min(max_outbound // 4, 1024 * 1024))
        #: the transport's buffer is over its own mark: new bytes wait in ``_held``
        self.transport_full = False
        self._held: deque[bytes] = deque()
        #: bytes waiting here, beyond the transport's own buffer (exact)
        self.held_bytes = 0
        #: over ``outbound_mark`` (told to :meth:`outbound_congested`), until drained
        self.congested = False
        #: why :meth:`drop` dropped the connection, for connectionLost to report
        self.drop_reason: str | None = None
        self._unprocessed = b""
        self._sealer: Sealer | None = None
        self._opener: Opener | None = None
        #: frames of an opened record not handled yet (reading paused in the middle of it)
        self._opened = b""
        self._opened_offset = 0

    @property
    def max_frame(self) -> int:
        """The largest frame accepted now (before authentication, a smaller limit may apply)."""
        return self.MAX_LENGTH

    def authenticated(self) -> None:
        """The peer proved the secret: accept frames up to the full limit."""
        self.MAX_LENGTH = self.max_frame_after_auth

    @property
    def sealed(self) -> bool:
        """Both directions travel in sealed records."""
        return self._sealer is not None and self._opener is not None

    def seal_outbound(self, sealer: Sealer) -> None:
        """From now on every write is one record sealed by ``sealer``."""
        self._sealer = sealer

    def open_inbound(self, opener: Opener) -> None:
        """From the next frame on, everything received must be a record ``opener`` opens."""
        self._opener = opener

    def start_sealing(self, keys: SessionKeys, initiator: bool) -> None:
        """Seal both directions with a finished handshake's keys (``initiator``: this side
        spoke first)."""
        self.seal_outbound(keys.sealer(initiator))
        self.open_inbound(keys.opener(initiator))

    def _max_record(self) -> int:
        # Frames written together are joined until they pass WRITE_CHUNK, so a record holds
        # at most that much plus one largest frame.
        return self.MAX_LENGTH + 2 * _LENGTH_SIZE + WRITE_CHUNK + RECORD_OVERHEAD

    def connectionMade(self) -> None:
        """Register for the transport's full/drained notifications."""
        assert self.transport is not None
        register = getattr(self.transport, "registerProducer", None)
        if register is not None:
            register(_Congestion(self), True)
        # A request/response protocol wants small writes to go out at once.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            with contextlib.suppress(OSError):  # UNIX sockets have no Nagle to switch off
                set_no_delay(True)

    # --- sending -----------------------------------------------------------------------

    def send_frame(self, frame: bytes, must: bool = True) -> None:
        """Write one frame; FrameTooLarge (nothing written) if it is too big, and QueueFull
        if it may be refused (``must`` false) and the queue is full."""
        if len(frame) > self.MAX_LENGTH:
            raise FrameTooLarge(len(frame), self.MAX_LENGTH)
        self.write_bytes(LENGTH_PREFIX.pack(len(frame)) + frame, must)

    def send_frames(self, frames: Sequence[bytes], must: bool = True) -> None:
        """Write several frames in one write (one record once sealed), as :meth:`send_frame`
        does one; nothing is written if any is too big."""
        for frame in frames:
            if len(frame) > self.MAX_LENGTH:
                raise FrameTooLarge(len(frame), self.MAX_LENGTH)
        self.write_bytes(b"".join([LENGTH_PREFIX.pack(len(frame)) + frame for frame in frames]),
                         must)

    def check_room(self, size: int) -> None:
        """Raise QueueFull if ``size`` more refusable bytes would overflow the queue."""
        if self.held_bytes + size > self.max_outbound:
            raise QueueFull(
                f"{self.held_bytes} bytes already wait for a slow peer "
                f"(limit {self.max_outbound}); not sending {size} more"
            )

    def write_bytes(self, data: bytes, must: bool = True, now: bool = False) -> None:
        """Write already framed bytes (as one record once sealed), or queue them while the
        transport is full. ``now``: try the socket at once (see :func:`send_now`)."""
        if not must and (self.transport_full or self._held):
            self.check_room(len(data))
        if self._sealer is not None:
            data = self._sealer.seal(data)
        if not self.transport_full and not self._held:
            assert self.transport is not None
            if now:
                send_now(self.transport, data)
            else:
                self.transport.write(data)
            return
        self._held.append(data)
        self.held_bytes += len(data)
        if not self.congested and self.held_bytes > self.outbound_mark:
            self.congested = True
            self.outbound_congested()

    def write_through(self, data: bytes) -> None:
        """Write framed bytes to the transport even if it said it is full (nothing of ours
        may wait: order would break); a caller bounds how much it writes this way."""
        assert self.transport is not None and not self._held
        if self._sealer is not None:
            data = self._sealer.seal(data)
        send_now(self.transport, data)  # large pieces: the socket, not another join first

    def write_frames(self, frames: list[bytes], now: bool = False) -> None:
        """Write framed bytes that must go (replies made together): joined into writes of
        up to ``WRITE_CHUNK`` bytes, each one record once sealed, to the transport or to the
        queue once it is full. ``now``: as for :meth:`write_bytes`."""
        if len(frames) == 1 and len(frames[0]) < WRITE_CHUNK:
            self.write_bytes(frames[0], True, now)
            return
        chunk: list[bytes] = []
        size = 0
        for data in frames:
            chunk.append(data)
            size += len(data)
            if size >= WRITE_CHUNK:
                self.write_bytes(b"".join(chunk), True, now)
                chunk, size = [], 0
        if chunk:
            self.write_bytes(b"".join(chunk), True, now)

    def transport_drained(self) -> None:
        """The transport wants more: hand it queued bytes until it is full again."""
        held = self._held
        transport = self.transport
        while held and not self.transport_full and transport is not None:
            data = held.popleft()
            self.held_bytes -= len(data)
            transport.write(data)
        if self.congested and self.held_bytes <= self.outbound_mark // 4:
            self.congested = False
            self.outbound_drained()

    def outbound_congested(self) -> None:
        """More than ``outbound_mark`` bytes wait: a hook for owners (nothing by default)."""

    def outbound_drained(self) -> None:
        """The queue fell back under a quarter of the mark: a hook for owners."""

    def discard_outbound(self) -> int:
        """The connection is gone: forget what waits; return how many bytes that was."""
        dropped = self.held_bytes
        self._held.clear()
        self.held_bytes = 0
        if self.congested:
            self.congested = False
            self.outbound_drained()
        return dropped

    # --- receiving ---------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Bytes in: every whole frame (record, once sealed) is handled, the rest waits."""
        if self._opened:
            self._handle_opened()
        buffer = self._unprocessed + data if self._unprocessed else data
        offset = 0
        end = len(buffer)
        while end - offset >= _LENGTH_SIZE and not self.paused:
            (length,) = _unpack_length(buffer, offset)
            opener = self._opener
            limit = self.MAX_LENGTH if opener is None else self._max_record()
            if length > limit:
                self._unprocessed = b""
                self.drop(f"{'frame' if opener is None else 'sealed record'} of {length} "
                          f"bytes exceeds the limit of {limit} bytes")
                return
            start = offset + _LENGTH_SIZE
            offset = start + length
            if offset > end:
                offset = start - _LENGTH_SIZE
                break
            frame = buffer[start:offset]
            if opener is None:
                try:
                    self.frame_received(frame)
                except ProtocolError as e:
                    self.drop(f"protocol error: {e}")
            else:
                self._record_received(opener, frame)
        self._unprocessed = buffer[offset:]

    def _record_received(self, opener: Opener, record: bytes) -> None:
        if not record or record[0] != SEALED:
            if opener.records == 0:  # the peer may not have switched yet (a refusal)
                self.plain_frame_before_sealed(record)
            else:
                self.drop("a plain frame on a sealed connection")
            return
        try:
            self._opened = opener.open(record)
        except ProtocolError as e:
            self.drop(str(e))
            return
        self._opened_offset = 0
        self._handle_opened()

    def _handle_opened(self) -> None:
        """Handle the frames of the last opened record, until done or paused."""
        frames = self._opened
        offset = self._opened_offset
        end = len(frames)
        handle = self.frame_received
        try:
            while offset < end:
                if self.paused:
                    self._opened_offset = offset
                    return
                try:
                    (length,) = _unpack_length(frames, offset)
                except struct.error:  # fewer than 4 bytes left
                    self.drop("a sealed record ends inside a frame length")
                    return
                if length > self.MAX_LENGTH:
                    self.lengthLimitExceeded(length)
                    return
                start = offset + _LENGTH_SIZE
                offset = start + length
                if offset > end:
                    self.drop("a sealed record ends inside a frame")
                    return
                handle(frames[start:offset])
        except ProtocolError as e:
            self.drop(f"protocol error: {e}")
        self._opened = b""

    def plain_frame_before_sealed(self, frame: bytes) -> None:
        """A plain frame where the first sealed record was due: only a refusal the peer sent
        before it switched is acceptable (subclasses accept it); anything else drops."""
        self.drop("a plain frame on a sealed connection")

    def stringReceived(self, string: bytes) -> None:
        """One whole frame, as Twisted's IntNStringReceiver would deliver it: handled by
        :meth:`frame_received`, whose ProtocolError drops the connection."""
        try:
            self.frame_received(string)
        except ProtocolError as e:
            self.drop(f"protocol error: {e}")

    def frame_received(self, frame: bytes) -> None:
        """Handle one whole frame. Raise ProtocolError to drop the connection."""
        raise NotImplementedError

    def lengthLimitExceeded(self, length: int) -> None:
        """A frame over the limit: drop the connection."""
        self.drop(f"frame of {length} bytes exceeds the limit of {self.MAX_LENGTH} bytes")

    # --- IPushProducer: the reader pauses between frames ----------------------------------

    def pauseProducing(self) -> None:
        """Stop reading the peer (and handling what is buffered)."""
        self.paused = True
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        """Read the peer again (a dropped connection never does)."""
        if self.drop_reason is not None:  # a dropped connection never reads again
            return
        self.paused = False
        if self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        self.dataReceived(b"")

    def stopProducing(self) -> None:
        """Stop reading for good."""
        self.paused = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def close_connection(self) -> None:
        """Close after what is written has gone. Our producer is unregistered first: a TLS
        transport does not begin its shutdown while a streaming producer is registered."""
        transport = self.transport
        if transport is None:
            return
        unregister = getattr(transport, "unregisterProducer", None)
        if unregister is not None:
            with contextlib.suppress(RuntimeError):  # none registered (any more)
                unregister()
        transport.loseConnection()

    def drop(self, reason: str, quiet: bool = False) -> None:
        """Abort this connection (only this one), logging why; later frames are ignored.

        ``quiet``: a peer that never authenticated; logged at debug, since anyone can open
        connections and one warning each would let them flood the log."""
        assert self.transport is not None
        self.drop_reason = reason
        self.paused = True  # stops the loop over frames already buffered
        emit = self.log.debug if quiet else self.log.warn
        emit("dropping connection from {peer}: {reason}",
             peer=describe_peer(self.transport), reason=reason)
        self.transport.abortConnection()  # type: ignore[attr-defined]


def send_now(transport: ITransport, data: bytes) -> None:
    """Write ``data``, trying the socket at once when nothing is buffered before it.

    Twisted's transports always buffer a write until the reactor's next turn: two epoll
    changes and a wake-up per write, which dominate a request/response exchange. Like
    asyncio's selector transports, a plain TCP or UNIX connection with an empty buffer is
    written directly here; whatever the socket does not take (or any other transport:
    TLS, the in-memory loopback) goes through ``transport.write`` as usual. A framed
    protocol calls this once per batch of frames it made while handling input, so a burst
    of writes made elsewhere is still joined by Twisted."""
    if (type(transport) in _DIRECT_TRANSPORTS and transport.connected  # type: ignore[attr-defined]
            and not transport.dataBuffer and not transport._tempDataBuffer  # type: ignore[attr-defined]
            and not transport.disconnecting and not transport._writeDisconnected  # type: ignore[attr-defined]
            and not transport.TLS):  # type: ignore[attr-defined]
        sent = transport.writeSomeData(data)  # type: ignore[attr-defined]
        if type(sent) is int:
            if sent == len(data):
                return
            data = data[sent:]
        # a lost connection: the reactor will notice it; write as if nothing happened
    transport.write(data)


#: transports whose socket :func:`send_now` may write to directly (Twisted's own plain
#: TCP and UNIX connections: not their TLS or other wrappers)
_DIRECT_TRANSPORTS: Final = frozenset({tcp.Server, tcp.Client, unix.Server, unix.Client})


def describe_peer(transport: object) -> str:
    """A transport's peer address in words (``127.0.0.1:4711``, a UNIX path, a name)."""
    get_peer = getattr(transport, "getPeer", None)
    if get_peer is None:
        return "an unknown peer"
    address = get_peer()
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is not None and port is not None:
        return f"{host}:{port}"
    name = getattr(address, "name", None)
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return str(name) if name else type(address).__name__
