"""Frames: the limit holds both ways, and bad input drops only that connection."""

import pytest
from twisted.internet.testing import StringTransport

from skyproto.errors import FrameTooLarge, ProtocolError
from skyproto.wire.framing import FrameProtocol


class Recorder(FrameProtocol):
    def __init__(self, max_frame=1024):
        super().__init__(max_frame)
        self.frames = []

    def frame_received(self, frame):
        if frame == b"bad":
            raise ProtocolError("bad frame")
        self.frames.append(frame)


def connected(max_frame=1024):
    proto = Recorder(max_frame)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def test_frames_split_and_joined():
    proto, _ = connected()
    data = b"\x00\x00\x00\x03abc\x00\x00\x00\x00\x00\x00\x00\x02de"
    for byte in data:
        proto.dataReceived(bytes([byte]))
    assert proto.frames == [b"abc", b"", b"de"]


def test_send_frame_writes_length_prefix():
    proto, transport = connected()
    proto.send_frame(b"hello")
    assert transport.value() == b"\x00\x00\x00\x05hello"


def test_oversized_send_raises_and_writes_nothing():
    proto, transport = connected(max_frame=10)
    with pytest.raises(FrameTooLarge, match="11 bytes exceeds the limit of 10"):
        proto.send_frame(b"x" * 11)
    assert transport.value() == b""
    proto.send_frame(b"x" * 10)
    assert len(transport.value()) == 14


def test_frames_sent_together_go_in_one_write_and_none_if_one_is_too_big():
    proto, transport = connected(max_frame=10)
    writes = []
    transport.write = writes.append
    with pytest.raises(FrameTooLarge):
        proto.send_frames([b"ok", b"x" * 11])
    assert writes == []
    proto.send_frames([b"one", b"two"])
    assert writes == [b"\x00\x00\x00\x03one\x00\x00\x00\x03two"]
    peer, _ = connected(max_frame=10)
    peer.dataReceived(writes[0])
    assert peer.frames == [b"one", b"two"]


def test_frames_written_while_the_transport_is_full_wait_joined_not_one_by_one():
    """At 4 KiB pipelined every frame past the first waited (and, sealed, went) as a record
    of its own once the transport was full: 3.7 requests a record instead of 14."""
    proto, transport = connected(max_frame=1 << 20)
    writes = []
    transport.write = writes.append
    proto.transport_full = True  # as the transport's producer notice sets it
    frames = [b"\x00\x00\x10\x00" + bytes(4096) for _ in range(20)]
    proto.write_frames(frames)
    assert len(proto._held) == 2  # 64 KiB and the rest, not 20
    assert proto.held_bytes == 20 * 4100 and writes == []
    proto.transport_full = False
    proto.transport_drained()
    assert b"".join(writes) == b"".join(frames)


def test_oversized_receive_drops_the_connection(caplog):
    proto, transport = connected(max_frame=10)
    proto.dataReceived(b"\x00\x00\x00\x0bxxxxxxxxxxx\x00\x00\x00\x01y")
    assert transport.disconnecting
    assert proto.frames == []


def test_protocol_error_drops_only_this_connection_and_stops_reading():
    proto, transport = connected()
    other, other_transport = connected()
    proto.dataReceived(b"\x00\x00\x00\x01a\x00\x00\x00\x03bad\x00\x00\x00\x01c")
    assert proto.frames == [b"a"]  # nothing after the bad frame is handled
    assert transport.disconnecting
    other.dataReceived(b"\x00\x00\x00\x01z")
    assert other.frames == [b"z"]
    assert not other_transport.disconnecting


def test_default_limit_is_16_mib():
    assert FrameProtocol().max_frame == 16 * 1024 * 1024
