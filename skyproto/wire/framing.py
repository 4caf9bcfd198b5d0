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

from twisted.logger import Logger
from twisted.protocols.basic import IntNStringReceiver

from ..errors import FrameTooLarge, ProtocolError

DEFAULT_MAX_FRAME: Final = 16 * 1024 * 1024
LENGTH_PREFIX: Final = struct.Struct(">I")


class FrameProtocol(IntNStringReceiver):
    """A protocol that speaks frames; subclasses implement :meth:`frame_received`."""

    structFormat = ">I"
    prefixLength = 4
    log = Logger()

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.MAX_LENGTH = max_frame

    @property
    def max_frame(self) -> int:
        return self.MAX_LENGTH

    def connectionMade(self) -> None:
        # A request/response protocol wants small writes to go out at once.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            with contextlib.suppress(OSError):  # UNIX sockets have no Nagle to switch off
                set_no_delay(True)

    def send_frame(self, frame: bytes) -> None:
        """Write one frame; raises FrameTooLarge (and writes nothing) if it is too big."""
        if len(frame) > self.MAX_LENGTH:
            raise FrameTooLarge(len(frame), self.MAX_LENGTH)
        assert self.transport is not None
        self.transport.write(LENGTH_PREFIX.pack(len(frame)) + frame)

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
        self.paused = True  # stops IntNStringReceiver's loop over frames already buffered
        self.log.warn(
            "dropping connection from {peer}: {reason}",
            peer=self.transport.getPeer(),
            reason=reason,
        )
        self.transport.abortConnection()  # type: ignore[attr-defined]
