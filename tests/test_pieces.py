"""Large messages in pieces: the scheduler and the assembler driven directly, then links on
the loopback transport with a Clock (interleaving, order per pair, limits, a link cut in the
middle of a message, malformed piece sequences)."""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent

from skyproto.errors import FrameTooLarge, HarborDown, ProtocolError
from skyproto.harbor.link import HarborLink
from skyproto.node.node import Node
from skyproto.services import Echo
from skyproto.testing import crash, settle
from skyproto.wire.codec import (
    DATA_HEADER,
    SplitFrame,
    decode_payload_parts,
    encode_cbor,
    encode_data_frame,
    encode_data_message,
)
from skyproto.wire.pieces import FIRST, LAST, PieceAssembler, PieceScheduler, piece_frame

from .cluster import Parked, failure_of, make_node, mesh, result_of


def data(source: int, destination: int, size: int, session: int = 1) -> bytes:
    return encode_data_frame(source, destination, session, 0, encode_cbor(b"x" * size))


class Wire:
    """What a scheduler wrote, with a transport that fills after ``room`` frames."""

    def __init__(self, room: int = 10**9) -> None:
        self.frames: list[bytes] = []
        self.room = room

    def write(self, frame: bytes) -> bool:
        self.frames.append(frame)
        return len(self.frames) < self.room

    def bodies(self) -> list[bytes]:
        return [frame[4:] for frame in self.frames]


def reassemble(bodies: list[bytes], budget: int = 64 << 20) -> list[bytes]:
    """What a receiver hands on, in order: whole frames as they are, pieces joined."""
    assembler = PieceAssembler(budget)
    out: list[bytes] = []
    for body in bodies:
        if body[0] == 3:
            whole = assembler.receive(body)
            if whole is not None:
                out.append(bytes(whole))
        else:
            out.append(body)
    assert assembler.in_flight == 0
    return out


# --------------------------------------------------------------------------- scheduler


def test_a_large_message_goes_in_pieces_and_comes_back_whole() -> None:
    wire = Wire()
    scheduler = PieceScheduler(wire.write, piece_size=4096)
    frame = data(0x01000001, 0x02000002, 20_000)
    assert scheduler.is_large(frame)
    scheduler.add(frame)
    scheduler.pump()
    assert len(wire.frames) == 5 and all(len(f) <= 4096 + 4 + 10 for f in wire.frames)
    assert reassemble(wire.bodies()) == [frame[4:]]
    assert not scheduler and scheduler.queued == 0 and scheduler.in_flight == 0


def test_lanes_take_turns_and_each_pair_keeps_its_order() -> None:
    wire = Wire()
    scheduler = PieceScheduler(wire.write, piece_size=1024)
    a_big, a_small = data(0x01000001, 0x02000002, 5000, 1), data(0x01000001, 0x02000002, 10, 2)
    b_big = data(0x01000003, 0x02000002, 5000, 3)
    scheduler.add(a_big)
    assert scheduler.waits_behind(a_small)  # same pair: behind its large message
    scheduler.add(a_small)
    scheduler.add(b_big)
    other = data(0x01000004, 0x02000002, 10)
    assert not scheduler.waits_behind(other)  # another pair goes straight out
    scheduler.pump()
    streams = [int.from_bytes(body[1:5], "big") for body in wire.bodies() if body[0] == 3]
    assert streams[:4] == [1, 2, 1, 2]  # the two lanes alternate, a piece each
    assert reassemble(wire.bodies()) == [b[4:] for b in (a_big, b_big, a_small)]


def test_the_scheduler_stops_when_the_transport_is_full_and_goes_on_when_pumped() -> None:
    wire = Wire(room=2)
    scheduler = PieceScheduler(wire.write, piece_size=1024)
    scheduler.add(data(1 << 24 | 1, 2 << 24 | 2, 10_000))
    scheduler.pump()
    assert len(wire.frames) == 2 and scheduler
    wire.room = 10**9
    scheduler.pump()
    assert not scheduler and len(reassemble(wire.bodies())) == 1


def test_streams_start_only_within_the_receivers_budget() -> None:
    wire = Wire()
    scheduler = PieceScheduler(wire.write, piece_size=1024, budget=12_000)
    first, second = data(1 << 24 | 1, 2 << 24 | 2, 10_000), data(1 << 24 | 3, 2 << 24 | 2, 10_000)
    scheduler.add(first)
    scheduler.add(second)
    wire.room = 3
    scheduler.pump()
    started = {int.from_bytes(b[1:5], "big") for b in wire.bodies() if b[5] & FIRST}
    assert started == {1} and scheduler.in_flight <= 12_000  # the second waits its turn
    wire.room = 10**9
    scheduler.pump()
    assert reassemble(wire.bodies(), budget=12_000) == [first[4:], second[4:]]


def test_a_cleared_scheduler_forgets_everything() -> None:
    wire = Wire(room=1)
    scheduler = PieceScheduler(wire.write, piece_size=1024)
    scheduler.add(data(1 << 24 | 1, 2 << 24 | 2, 10_000))
    scheduler.pump()
    assert scheduler.clear() > 0 and not scheduler and scheduler.in_flight == 0


# --------------------------------------------------------------------------- assembler


@pytest.mark.parametrize("pieces,error", [
    ([piece_frame(7, 0, b"x")], "stream 7, which never started"),
    ([piece_frame(7, FIRST, b"x", 10), piece_frame(7, FIRST, b"x", 10)], "started twice"),
    ([piece_frame(7, FIRST, b"x" * 5, 4)], "make 5 bytes, its first piece said 4"),
    ([piece_frame(7, FIRST, b"xx", 4), piece_frame(7, LAST, b"x")], "make 3 bytes"),
    ([piece_frame(7, FIRST | LAST, b"x" * 10, 100)], "make 10 bytes"),
    ([piece_frame(7, FIRST, b"x", 2000)], "exceeds the limit of 1000 bytes"),
    ([piece_frame(7, FIRST, b"x", 600), piece_frame(8, FIRST, b"x", 600)],
     "with 600 already in flight"),
    ([piece_frame(7, 4, b"x")], "flags 0x4 unknown"),
    ([b"\x00\x00\x00\x03\x03\x00\x00"], "too short"),
    ([b"\x00\x00\x00\x06\x03\x00\x00\x00\x07\x01"], "without its total"),
])
def test_a_malformed_piece_sequence_is_a_protocol_error(pieces: list[bytes], error: str) -> None:
    assembler = PieceAssembler(budget=1000)
    with pytest.raises(ProtocolError, match=error):
        for piece in pieces:
            assembler.receive(piece[4:])


# --------------------------------------------------------------------------- links


def link(node: Node, harbor: int) -> HarborLink:
    peer: Any = node.router.peers[harbor].link
    assert isinstance(peer, HarborLink)
    return peer


def test_a_small_call_overtakes_a_large_one_on_the_same_link() -> None:
    clock, (a, b) = mesh(2)
    echo, other = b.spawn(Echo()), b.spawn(Echo())  # two pairs: no order between them
    done: list[str] = []
    big = a.call(echo, b"x" * (4 << 20), timeout=30)
    big.addCallback(lambda _: done.append("big"))
    small = a.call(other, "small", timeout=30)
    small.addCallback(lambda _: done.append("small"))
    settle(clock, 1.0)
    assert done == ["small", "big"], done


def test_messages_of_one_pair_keep_their_order_around_a_large_one() -> None:
    clock, (a, b) = mesh(2)
    seen: list[Any] = []

    class Recorder(Echo):
        def receive(self, source: int, session: int, payload: Any) -> Any:
            seen.append(payload if isinstance(payload, str) else len(payload))
            return None

    recorder = b.spawn(Recorder())
    a.send(recorder, "first")
    a.send(recorder, b"x" * (1 << 20))
    a.send(recorder, "after the large one")
    settle(clock, 1.0)
    assert seen == ["first", 1 << 20, "after the large one"]


def test_the_largest_message_is_a_separate_larger_limit() -> None:
    clock, (a, b) = mesh(2, max_frame=64 * 1024, max_message=8 << 20)
    echo = b.spawn(Echo())
    assert result_of_settled(clock, a.call(echo, b"y" * (3 << 20), timeout=30)) == \
        b"y" * (3 << 20)  # far over max_frame: pieces
    error = failure_of(a.call(echo, b"z" * (9 << 20)), FrameTooLarge)
    assert "exceeds the limit of 8388608" in str(error.value)
    assert a.router.state(2) == "up"


def result_of_settled(clock: Clock, d: Any) -> Any:
    settle(clock, 2.0)
    return result_of(d)


def test_a_link_cut_in_the_middle_of_a_message_fails_that_call_with_harbor_down() -> None:
    clock, (a, b, c) = mesh(3)
    parked = b.spawn(Parked())
    echo_c = c.spawn(Echo())
    big = a.call(parked, b"x" * (8 << 20), timeout=30)
    assert link(a, 2)._pieces  # one piece is out, the rest wait for the transport
    crash(b)
    settle(clock, 0.5)
    assert "harbor 2" in str(failure_of(big, HarborDown).value)
    assert result_of_settled(clock, a.call(echo_c, "others are served")) == "others are served"


def test_a_malformed_piece_sequence_drops_only_that_link() -> None:
    clock, (a, b, c) = mesh(3)
    echo_b, echo_c = b.spawn(Echo()), c.spawn(Echo())
    sender = link(a, 2)
    assert sender._sealer is not None
    # a piece of a stream that never started, sealed as a's own record would be
    b_side = link(b, 1)
    b_side.dataReceived(sender._sealer.seal(piece_frame(99, LAST, b"stray")))
    assert b_side.drop_reason is not None and "never started" in b_side.drop_reason
    assert result_of_settled(clock, a.call(echo_c, "c is fine")) == "c is fine"
    assert result_of_settled(clock, c.call(echo_b, "b is fine")) == "b is fine"


def test_a_sender_over_the_receivers_limit_loses_its_link_with_a_reason(
        events: list[LogEvent]) -> None:
    clock = Clock()
    a = make_node(clock, 1, max_message=8 << 20)
    b = make_node(clock, 2, max_message=1 << 20)
    a.add_peer(2, "loopback:h2")
    parked = b.spawn(Parked())
    a.send(parked, "link up first")
    settle(clock, 0.1)
    d = a.call(parked, b"x" * (2 << 20), timeout=30)
    settle(clock, 0.5)
    failure_of(d, HarborDown)
    reasons = [formatEvent(e) for e in events if "dropping connection" in formatEvent(e)]
    assert any("exceeds the limit of 1048576 bytes" in r for r in reasons), reasons


@pytest.mark.parametrize("size", [70_000, 1024 * 1024 + 3])
def test_a_split_frame_is_cut_from_its_head_and_its_payload(size: int) -> None:
    """A large byte string's frame is never joined: its pieces come from the head and the
    payload, and the receiver gets exactly the frame a joined one would have made, decoded
    with one copy from the pieces."""
    payload = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    frame = encode_data_message(0x01000001, 0x02000001, -3, 0, payload)
    assert isinstance(frame, SplitFrame)
    wire = Wire()
    scheduler = PieceScheduler(wire.write, 32 * 1024)
    scheduler.add(frame)
    scheduler.pump()
    assert len(wire.frames) > 2 and scheduler.queued == 0
    assert reassemble(wire.bodies()) == [frame.joined()[4:]]
    assembler = PieceAssembler()
    parts = None
    for body in wire.bodies():
        parts = assembler.receive_parts(body)
    assert parts is not None
    assert decode_payload_parts([parts[0][DATA_HEADER.size:], *parts[1:]]) == payload


def test_a_split_frame_small_enough_for_the_link_goes_whole() -> None:
    frame = encode_data_message(0x01000001, 0x02000001, -3, 0, b"y" * 100_000)
    assert isinstance(frame, SplitFrame)
    wire = Wire()
    scheduler = PieceScheduler(wire.write, 256 * 1024)  # a piece holds it all
    scheduler.lanes[bytes(frame.head[5:13])] = deque()
    scheduler.add(frame)  # waits behind its pair's lane: as one whole frame
    assert scheduler.lanes[bytes(frame.head[5:13])][-1] == frame.joined()
