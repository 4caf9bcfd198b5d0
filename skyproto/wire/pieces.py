"""Large messages in pieces, so they never hold up small ones on the same link.

A data frame longer than the piece size is sent as PIECE frames, each carrying up to a
piece of its body (the bytes a whole DATA frame would carry after its length prefix):

::

    PIECE:  0x03 | stream (4) | flags (1) | [total (4), first piece only] | bytes
    flags:  1 FIRST (this piece starts the stream; ``total`` follows), 2 LAST

The sender (:class:`PieceScheduler`) keeps one lane per (source, destination) pair that has
a large message in flight: later messages of that pair wait behind it, so each pair's
messages arrive in the order they were sent, as they do when nothing is split. Lanes take
turns, one piece (or one small message) each, while the transport takes bytes; everything
else on the link goes straight out between pieces. A stream starts only while the totals of
the streams in flight stay within the receiver's reassembly budget, which is the same
setting on both ends (``max_message``).

The receiver (:class:`PieceAssembler`) joins the pieces of each stream and hands the whole
body on when the last arrives. A piece out of place, a stream over the limit or a total
that does not add up is a :class:`skyproto.errors.ProtocolError`: the link is dropped.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from typing import Final

from ..errors import ProtocolError
from .codec import Frame, FrameKind, SplitFrame

PIECE: Final = int(FrameKind.PIECE)
FIRST: Final = 1
LAST: Final = 2
DEFAULT_PIECE_SIZE: Final = 128 * 1024
DEFAULT_MAX_MESSAGE: Final = 64 * 1024 * 1024
_HEAD: Final = struct.Struct(">BIB")
_TOTAL: Final = struct.Struct(">I")
_PREFIX: Final = struct.Struct(">I")
#: where the (source, destination) pair sits in a data frame's body
_PAIR: Final = slice(1, 9)


def piece_frame(stream: int, flags: int, chunk: bytes | memoryview, total: int = 0) -> bytes:
    """One PIECE frame, length prefix included."""
    head = _HEAD.pack(PIECE, stream, flags)
    if flags & FIRST:
        head += _TOTAL.pack(total)
    return _PREFIX.pack(len(head) + len(chunk)) + head + chunk


class _Stream:
    """One large message being cut into pieces."""

    __slots__ = ("head", "length", "offset", "rest", "stream")

    def __init__(self, head: memoryview, rest: memoryview, stream: int) -> None:
        #: the body is ``head`` then ``rest`` (a SplitFrame's payload; else empty)
        self.head = head
        self.rest = rest
        self.length = len(head) + len(rest)
        self.offset = 0
        self.stream = stream

    def take(self, start: int, end: int) -> bytes | memoryview:
        """Bytes ``start:end`` of the body (a view, but where they span both parts)."""
        split = len(self.head)
        if end <= split:
            return self.head[start:end]
        if start >= split:
            return self.rest[start - split:end - split]
        return bytes(self.head[start:]) + self.rest[:end - split]


#: what waits in a lane: a large message (a _Stream) or a whole small frame (bytes)
_Item = _Stream | bytes


class PieceScheduler:
    """The sender's side: lanes of large messages, sent a piece at a time, fairly.

    ``write`` takes framed bytes (one frame, length prefix included) and returns False once
    the transport wants no more for now; :meth:`pump` is called again when it drains.
    """

    def __init__(self, write: Callable[[bytes], bool], piece_size: int = DEFAULT_PIECE_SIZE,
                 budget: int = DEFAULT_MAX_MESSAGE) -> None:
        if piece_size < 1024:
            raise ValueError(f"piece size {piece_size} is under 1024 bytes")
        self._write = write
        self.piece_size = piece_size
        self.budget = budget
        #: what waits, by (source, destination) pair; empty while nothing large is sent
        self.lanes: dict[bytes, deque[_Item]] = {}
        self._next_stream = 1
        #: the totals of the streams started and not finished (the receiver holds these)
        self.in_flight = 0
        #: bytes waiting in lanes, not yet written
        self.queued = 0

    def __bool__(self) -> bool:
        return bool(self.lanes)

    def is_large(self, frame: Frame) -> bool:
        """A framed data message that goes in pieces."""
        return len(frame) - _PREFIX.size > self.piece_size

    def waits_behind(self, frame: Frame) -> bool:
        """This framed data message's pair has a lane: it must queue there."""
        whole = frame.head if isinstance(frame, SplitFrame) else frame
        return bool(self.lanes) and whole[_PREFIX.size + 1:_PREFIX.size + 9] in self.lanes

    def add(self, frame: Frame) -> None:
        """Queue a framed data message (large, or small behind a lane of its pair)."""
        if isinstance(frame, SplitFrame):
            head, rest = memoryview(frame.head)[_PREFIX.size:], memoryview(frame.payload)
        else:
            head, rest = memoryview(frame)[_PREFIX.size:], memoryview(b"")
        pair = bytes(head[_PAIR])
        size = len(head) + len(rest)
        item: _Item
        if size > self.piece_size:
            item = _Stream(head, rest, self._next_stream)
            self._next_stream = self._next_stream % 0xFFFFFFFF + 1
        else:
            item = frame.joined() if isinstance(frame, SplitFrame) else frame
        self.lanes.setdefault(pair, deque()).append(item)
        self.queued += size

    def pump(self) -> None:
        """Write a piece (or a small message) from each lane in turn, until the transport
        is full or every lane is empty or waits for budget."""
        while self.lanes:
            moved = False
            for pair in list(self.lanes):
                lane = self.lanes[pair]
                head = lane[0]
                if isinstance(head, bytes):
                    lane.popleft()
                    self.queued -= len(head) - _PREFIX.size
                    more = self._write(head)
                elif head.offset == 0 and not self._may_start(head.length):
                    continue
                else:
                    more = self._write(self._next_piece(head))
                    if head.offset == head.length:
                        lane.popleft()
                        self.in_flight -= head.length
                moved = True
                if not lane:
                    del self.lanes[pair]
                if not more:
                    return
            if not moved:
                return

    def _may_start(self, total: int) -> bool:
        return self.in_flight == 0 or self.in_flight + total <= self.budget

    def _next_piece(self, stream: _Stream) -> bytes:
        start = stream.offset
        end = min(start + self.piece_size, stream.length)
        flags = (FIRST if start == 0 else 0) | (LAST if end == stream.length else 0)
        if start == 0:
            self.in_flight += stream.length
        stream.offset = end
        self.queued -= end - start
        return piece_frame(stream.stream, flags, stream.take(start, end), stream.length)

    def clear(self) -> int:
        """The link is gone: forget everything; return how many bytes waited."""
        dropped = self.queued
        self.lanes.clear()
        self.queued = self.in_flight = 0
        return dropped


class PieceAssembler:
    """The receiver's side: the pieces of each stream joined, within ``budget`` bytes."""

    def __init__(self, budget: int = DEFAULT_MAX_MESSAGE) -> None:
        self.budget = budget
        #: each stream's total and its pieces so far (views: nothing is copied until the
        #: message is whole, and then once, into what the receiver decodes)
        self._streams: dict[int, tuple[int, list[memoryview]]] = {}
        self._got: dict[int, int] = {}
        #: the totals of the streams begun and not finished
        self.in_flight = 0

    def receive(self, frame: bytes) -> bytes | None:
        """One PIECE frame (kind byte first); the whole body once its last piece is in."""
        parts = self.receive_parts(frame)
        return None if parts is None else b"".join(parts)

    def receive_parts(self, frame: bytes | memoryview) -> list[memoryview] | None:
        """As :meth:`receive`, but the whole body as the pieces' views, in order, for a
        receiver that copies them once into what it needs (see
        :func:`skyproto.wire.codec.decode_payload_parts`)."""
        if len(frame) < _HEAD.size:
            raise ProtocolError("a piece too short for its header")
        _, stream, flags = _HEAD.unpack_from(frame)
        start = _HEAD.size
        if flags & ~(FIRST | LAST):
            raise ProtocolError(f"piece flags {flags:#x} unknown")
        if flags & FIRST:
            if stream in self._streams:
                raise ProtocolError(f"piece stream {stream} started twice")
            if len(frame) < start + _TOTAL.size:
                raise ProtocolError("a first piece without its total")
            (total,) = _TOTAL.unpack_from(frame, start)
            start += _TOTAL.size
            if total > self.budget or self.in_flight + total > self.budget:
                raise ProtocolError(
                    f"a message of {total} bytes in pieces, with {self.in_flight} already "
                    f"in flight, exceeds the limit of {self.budget} bytes")
            self._streams[stream] = (total, [])
            self._got[stream] = 0
            self.in_flight += total
        elif stream not in self._streams:
            raise ProtocolError(f"a piece of stream {stream}, which never started")
        total, parts = self._streams[stream]
        chunk = memoryview(frame)[start:]
        got = self._got[stream] + len(chunk)
        if got > total or (flags & LAST and got != total):
            raise ProtocolError(f"the pieces of stream {stream} make {got} bytes, "
                                f"its first piece said {total}")
        parts.append(chunk)
        self._got[stream] = got
        if not flags & LAST:
            return None
        del self._streams[stream], self._got[stream]
        self.in_flight -= total
        return parts

    def clear(self) -> None:
        """Forget every message being assembled (the link is gone)."""
        self._streams.clear()
        self._got.clear()
        self.in_flight = 0
