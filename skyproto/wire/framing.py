"""Length-prefixed frames on Twisted's IntNStringReceiver, with one limit for both ways.

A frame is a 4-byte big-endian length and that many bytes. Sending a frame over the limit
raises :class:`FrameTooLarge` at the sender, before anything is written; receiving one
drops that connection with a logged reason. A frame handler that raises
:class:`ProtocolError` also drops only its own connection.
"""

from __future__ import annotations

import contextlib
import struct
from typing import Final

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.protocols.basic import IntNStringReceiver
from zope.interface import implementer

from ..errors import FrameTooLarge, ProtocolError, QueueFull

DEFAULT_MAX_FRAME: Final = 16 * 1024 * 1024
#: bytes a connection may queue beyond the transport's own buffer before sends fail
DEFAULT_MAX_OUTBOUND: Final = 8 * 1024 * 1024
LENGTH_PREFIX: Final = struct.Struct(">I")


@implementer(IPushProducer)
class _Congestion:
    """Registered on the transport: told when its write buffer is full and when it drains."""

    def __init__(self, protocol: FrameProtocol) -> None:
        self.protocol = protocol

    def pauseProducing(self) -> None:
        self.protocol.congested = True

    def resumeProducing(self) -> None:
        self.protocol.congested = False
        self.protocol.backlog = 0

    def stopProducing(self) -> None:
        pass


class FrameProtocol(IntNStringReceiver):
    """A protocol that speaks frames; subclasses implement :meth:`frame_received`."""

    structFormat = ">I"
    prefixLength = 4
    log = Logger()

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME,
                 max_outbound: int = DEFAULT_MAX_OUTBOUND,
                 max_frame_before_auth: int | None = None) -> None:
        # Until the peer has proven the secret its frames are held to a small limit, so
        # that connections without the secret cannot make us buffer max_frame bytes each.
        self.max_frame_after_auth = max_frame
        self.MAX_LENGTH = min(max_frame, max_frame_before_auth or max_frame)
        self.max_outbound = max_outbound
        #: the peer is not reading fast enough: the transport's buffer is over its mark
        self.congested = False
        #: bytes written since the transport said it was full
        self.backlog = 0
        #: why :meth:`drop` dropped the connection, for connectionLost to report
        self.drop_reason: str | None = None

    @property
    def max_frame(self) -> int:
        return self.MAX_LENGTH

    def authenticated(self) -> None:
        """The peer proved the secret: accept frames up to the full limit."""
        self.MAX_LENGTH = self.max_frame_after_auth

    def connectionMade(self) -> None:
        assert self.transport is not None
        register = getattr(self.transport, "registerProducer", None)
        if register is not None:
            register(_Congestion(self), True)
        # A request/response protocol wants small writes to go out at once.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            with contextlib.suppress(OSError):  # UNIX sockets have no Nagle to switch off
                set_no_delay(True)

    def send_frame(self, frame: bytes) -> None:
        """Write one frame; raises FrameTooLarge (and writes nothing) if it is too big."""
        if len(frame) > self.MAX_LENGTH:
            raise FrameTooLarge(len(frame), self.MAX_LENGTH)
        if self.congested:
            self.count_backlog(len(frame) + 4)
        assert self.transport is not None
        self.transport.write(LENGTH_PREFIX.pack(len(frame)) + frame)

    def count_backlog(self, size: int) -> None:
        """Account for a write while the peer is slow; refuse it past ``max_outbound``."""
        if self.backlog + size > self.max_outbound:
            raise QueueFull(
                f"{self.backlog} bytes already wait for a slow peer "
                f"(limit {self.max_outbound}); not sending {size} more"
            )
        self.backlog += size

    def stringReceived(self, string: bytes) -> None:
        try:
            self.frame_received(string)
        except ProtocolError as e:
            self.drop(f"protocol error: {e}")

    def frame_received(self, frame: bytes) -> None:
        """Handle one whole frame. Raise ProtocolError to drop the connection."""
        raise NotImplementedError

    def lengthLimitExceeded(self, length: int) -> None:
        self.drop(f"frame of {length} bytes exceeds the limit of {self.MAX_LENGTH} bytes")

    def drop(self, reason: str) -> None:
        """Abort this connection (only this one), logging why; later frames are ignored."""
        assert self.transport is not None
        self.drop_reason = reason
        self.paused = True  # stops IntNStringReceiver's loop over frames already buffered
        self.log.warn(
            "dropping connection from {peer}: {reason}",
            peer=self.transport.getPeer(),
            reason=reason,
        )
        self.transport.abortConnection()  # type: ignore[attr-defined]
