"""The pure EPMD codec against EPMD.md, byte for byte (no I/O, no reactor)."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skyproto.errors import AddressError, ProtocolError
from skyproto.mapper.epmd import (
    Alive2RefusedError,
    Alive2Request,
    Alive2Response,
    Alive2XResponse,
    CloseSilentlyError,
    DumpEntry,
    DumpRequest,
    DumpResponse,
    EpmdError,
    KillRequest,
    NamesRequest,
    NamesResponse,
    Port2Error,
    Port2Response,
    PortPlease2Request,
    RequestReader,
    StopRequest,
    alive2_reply,
    alive2_reply_size,
    decode_alive2_reply,
    decode_names_reply,
    decode_port2_reply,
    decode_request,
    encode_dump_reply,
    encode_names_reply,
    encode_reply,
    encode_request,
    validate_node_name,
)


def alive2_body(
    name: bytes = b"foo",
    *,
    port: int = 1234,
    node_type: int = 77,
    protocol: int = 0,
    high: int = 6,
    low: int = 5,
    nlen: int | None = None,
    elen: int | None = None,
    extra: bytes = b"",
    tail: bytes = b"",
) -> bytes:
    """A raw ALIVE2_REQ body, with every length field overridable to build bad ones."""
    nlen = len(name) if nlen is None else nlen
    elen = len(extra) if elen is None else elen
    head = struct.pack(">BHBBHHH", 120, port, node_type, protocol, high, low, nlen)
    return head + name + struct.pack(">H", elen) + extra + tail


def framed(body: bytes) -> bytes:
    return struct.pack(">H", len(body)) + body


def read_all(data: bytes, *, local: bool = True, chunk: int | None = None) -> object:
    """Feed ``data`` to a fresh reader (in ``chunk``-sized pieces); return the request."""
    reader = RequestReader(local)
    result = None
    step = chunk or max(len(data), 1)
    for i in range(0, len(data), step):
        result = reader.feed(data[i : i + step])
        if result is not None:
            assert i + step >= len(data), "request completed before all bytes were fed"
    return result


# --------------------------------------------------------------------------- requests


REQUESTS = [
    Alive2Request(1234, 77, 0, 6, 6, "a_1", b""),
    Alive2Request(65535, 72, 0, 5, 5, "h\u00e9llo", b"\x00\x01extra\x00"),
    PortPlease2Request("foo"),
    NamesRequest(),
    DumpRequest(),
    KillRequest(),
    StopRequest("foo"),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: type(r).__name__)
def test_every_request_round_trips(request_: object) -> None:
    data = encode_request(request_)  # type: ignore[arg-type]
    assert struct.unpack(">H", data[:2])[0] == len(data) - 2
    assert read_all(data) == request_
    assert read_all(data, chunk=1) == request_  # byte at a time


def test_request_bytes_match_the_spec() -> None:
    assert encode_request(NamesRequest()) == b"\x00\x01n"
    assert encode_request(DumpRequest()) == b"\x00\x01d"
    assert encode_request(KillRequest()) == b"\x00\x01k"
    assert encode_request(StopRequest("a")) == b"\x00\x02sa"
    assert encode_request(PortPlease2Request("foo")) == b"\x00\x04zfoo"
    # An OTP 25 node's registration: M, TCP, 6, 6, Elen 0.
    assert encode_request(Alive2Request(0x1234, 77, 0, 6, 6, "a", b"")) == bytes.fromhex(
        "000e7812344d00000600060001610000"
    )


def test_encode_request_refuses_what_epmd_would_refuse() -> None:
    with pytest.raises(AddressError):
        encode_request(Alive2Request(1, 77, 0, 6, 6, "", b""))
    with pytest.raises(AddressError):
        encode_request(Alive2Request(1, 77, 0, 6, 6, "a\0b", b""))
    with pytest.raises(AddressError):
        encode_request(Alive2Request(1, 77, 0, 6, 6, "x" * 256, b""))
    with pytest.raises(AddressError):
        encode_request(Alive2Request(1, 77, 0, 6, 6, "\U0001f600" * 255 + "x", b""))
    with pytest.raises(ValueError, match="extra"):
        encode_request(Alive2Request(1, 77, 0, 6, 6, "a", b"x" * 1021))
    with pytest.raises(AddressError):
        encode_request(PortPlease2Request(""))
    with pytest.raises(AddressError):
        encode_request(StopRequest(""))
    with pytest.raises(ValueError):
        Alive2Request(65536, 77, 0, 6, 6, "a", b"")
    with pytest.raises(ValueError):
        Alive2Request(1, 256, 0, 6, 6, "a", b"")


def test_validate_node_name_limits() -> None:
    assert validate_node_name("a") == b"a"
    assert validate_node_name("x" * 255) == b"x" * 255
    four_byte = "\U0001f600" * 255  # 255 characters, 1020 bytes: both limits exactly
    assert len(validate_node_name(four_byte)) == 1020
    for bad in ("", "a\0", "x" * 256, "\ud800"):
        with pytest.raises(AddressError):
            validate_node_name(bad)


# --------------------------------------------------------------------------- section 7


def test_partial_header_and_body_accumulate() -> None:
    reader = RequestReader()
    data = framed(b"zfoo")
    assert reader.feed(data[:1]) is None
    assert reader.buffered == 1
    assert reader.feed(data[1:3]) is None
    assert reader.feed(data[3:]) == PortPlease2Request("foo")


@pytest.mark.parametrize("length", [0, 3058, 3059, 63000, 65535])
def test_invalid_lengths_are_refused(length: int) -> None:
    with pytest.raises(CloseSilentlyError, match="invalid packet size"):
        RequestReader().feed(struct.pack(">H", length) + b"n")
    reader = RequestReader()
    assert reader.feed(struct.pack(">H", length)[:1]) is None
    with pytest.raises(CloseSilentlyError):
        reader.feed(struct.pack(">H", length)[1:])


def test_largest_length_is_accepted() -> None:
    # Length 3057 is the largest epmd takes; NAMES ignores the bytes after its opcode.
    assert read_all(framed(b"n" + b"\0" * 3056)) == NamesRequest()
    assert read_all(framed(b"n" + b"\0" * 3056), chunk=7) == NamesRequest()


def test_pipelined_request_is_refused() -> None:
    with pytest.raises(CloseSilentlyError, match="expected"):
        RequestReader().feed(framed(b"zfoo") + framed(b"n"))
    reader = RequestReader()
    assert reader.feed(framed(b"zfoo")[:3]) is None
    with pytest.raises(CloseSilentlyError):
        reader.feed(framed(b"zfoo")[3:] + b"j")  # junk after the packet


def test_bytes_after_a_complete_request_are_refused() -> None:
    reader = RequestReader()
    assert reader.feed(framed(b"n")) == NamesRequest()
    with pytest.raises(CloseSilentlyError, match="more bytes than expected"):
        reader.feed(b"x")


@pytest.mark.parametrize("opcode", [0, 1, 65, 119, 121, 255])
def test_unknown_opcode_is_dropped(opcode: int) -> None:
    with pytest.raises(CloseSilentlyError, match="unknown opcode"):
        read_all(framed(bytes([opcode]) + b"abc"))


def test_trailing_bytes_after_names_dump_kill_are_ignored() -> None:
    # Real epmd looks at the opcode only [observed for NAMES].
    assert read_all(framed(b"njunk")) == NamesRequest()
    assert read_all(framed(b"djunk")) == DumpRequest()
    assert read_all(framed(b"kjunk")) == KillRequest()


# --------------------------------------------------------------------------- section 2


def test_alive2_decodes_every_field() -> None:
    body = alive2_body(b"a_1", port=40001, node_type=72, protocol=0, high=6, low=5, extra=b"\0x")
    assert decode_request(body) == Alive2Request(40001, 72, 0, 6, 5, "a_1", b"\0x")


def test_alive2_rule1_non_local_peer_closes_silently() -> None:
    with pytest.raises(CloseSilentlyError, match="non-local"):
        decode_request(alive2_body(), local=False)


def test_alive2_rule2_length_at_most_13_closes_silently() -> None:
    assert len(alive2_body(b"")) == 13
    with pytest.raises(CloseSilentlyError, match="too small"):
        decode_request(alive2_body(b""))
    with pytest.raises(CloseSilentlyError, match="too small"):
        decode_request(b"x\x00")


def test_alive2_rule3_lengths_beyond_the_packet_close_silently() -> None:
    with pytest.raises(CloseSilentlyError, match="name length"):
        decode_request(alive2_body(b"foo", nlen=4))
    with pytest.raises(CloseSilentlyError, match="extra length"):
        decode_request(alive2_body(b"foo", elen=1))
    with pytest.raises(CloseSilentlyError, match="extra length"):
        decode_request(alive2_body(b"foo", extra=b"ab", elen=3))


def test_alive2_rule3_trailing_bytes_are_ignored() -> None:
    request = decode_request(alive2_body(b"foo", extra=b"ab", tail=b"junk"))
    assert request == Alive2Request(1234, 77, 0, 6, 5, "foo", b"ab")


def test_alive2_rule4_nul_in_name_closes_silently() -> None:
    with pytest.raises(CloseSilentlyError, match="NUL"):
        decode_request(alive2_body(b"fo\0o"))
    with pytest.raises(CloseSilentlyError, match="NUL"):
        decode_request(alive2_body(b"name\0"))  # the NUL counted in Nlen


def test_alive2_empty_name_in_a_longer_packet_closes_silently() -> None:
    # Nlen 0 with Length > 13 (real epmd registers "" here; see the module docs).
    with pytest.raises(CloseSilentlyError, match="empty"):
        decode_request(alive2_body(b"", tail=b"\0"))


@pytest.mark.parametrize(
    "name",
    [
        b"x" * 1021,  # more than 1020 bytes
        b"x" * 256,  # more than 255 characters
        "\u00e9".encode() * 256,  # 256 two-byte characters (512 bytes)
        b"\xff",  # not UTF-8
        b"a\xc3",  # truncated sequence
        b"\xc0\xaf",  # overlong
        b"\xed\xa0\x80",  # a surrogate
        b"\xf4\x90\x80\x80",  # beyond U+10FFFF
    ],
)
def test_alive2_rule5_bad_name_gets_an_error_reply(name: bytes) -> None:
    with pytest.raises(Alive2RefusedError) as info:
        decode_request(alive2_body(name))
    assert info.value.reply == bytes.fromhex("76 01 00000063")


def test_alive2_rule5_limits_are_inclusive() -> None:
    for name in ("x" * 255, "\U0001f600" * 255, "\ufffe"):
        request = decode_request(alive2_body(name.encode()))
        assert isinstance(request, Alive2Request)
        assert request.name == name


def test_alive2_rule6_extra_over_1020_gets_an_error_reply() -> None:
    ok = decode_request(alive2_body(b"foo", extra=b"\xab" * 1020))
    assert isinstance(ok, Alive2Request)
    assert ok.extra == b"\xab" * 1020
    with pytest.raises(Alive2RefusedError, match="extra"):
        decode_request(alive2_body(b"foo", extra=b"\xab" * 1021))


def test_alive2_error_reply_follows_the_version() -> None:
    with pytest.raises(Alive2RefusedError) as info:
        decode_request(alive2_body(b"\xff", high=5))
    assert info.value.reply == bytes.fromhex("79 01 0063")


def test_alive2_rules_apply_in_order() -> None:
    # 1 before 5: a bad name from a remote peer is closed silently, not answered.
    with pytest.raises(CloseSilentlyError):
        decode_request(alive2_body(b"\xff"), local=False)
    # 3 before 4 and 5: lengths are checked before the name's content.
    with pytest.raises(CloseSilentlyError, match="extra length"):
        decode_request(alive2_body(b"a\0\xff", elen=9))
    # 4 before 5: a NUL in an over-long, non-UTF-8 name closes silently.
    with pytest.raises(CloseSilentlyError, match="NUL"):
        decode_request(alive2_body(b"\xff\0" + b"x" * 1100))
    # 5 before 6: both wrong still means one error reply, reported for the name.
    with pytest.raises(Alive2RefusedError, match="name"):
        decode_request(alive2_body(b"\xff", extra=b"x" * 1021))


# --------------------------------------------------------------------------- other requests


def test_port_please2_names() -> None:
    assert decode_request(b"zfoo") == PortPlease2Request("foo")
    assert decode_request(b"zfoo\0") == PortPlease2Request("foo")  # trailing NUL stripped
    assert decode_request(b"z" + "\u00e9".encode() * 255) == PortPlease2Request("\u00e9" * 255)
    for bad in (b"z", b"z\0", b"zf\0o", b"zfoo\0\0", b"z\xff", b"z" + b"x" * 256):
        with pytest.raises(CloseSilentlyError):
            decode_request(bad)


def test_port_please2_and_names_are_allowed_from_remote_peers() -> None:
    assert decode_request(b"zfoo", local=False) == PortPlease2Request("foo")
    assert decode_request(b"n", local=False) == NamesRequest()


@pytest.mark.parametrize("opcode", [b"d", b"k", b"sfoo", b"x"])
def test_local_only_requests_from_remote_peers_close(opcode: bytes) -> None:
    with pytest.raises(CloseSilentlyError, match="non-local"):
        decode_request(opcode, local=False)


def test_stop_request_names() -> None:
    assert decode_request(b"sfoo") == StopRequest("foo")
    assert decode_request(b"sfoo\0bar") == StopRequest("foo")  # a C string
    assert decode_request(b"s\xff") == StopRequest("\udcff")  # never matches a real name
    with pytest.raises(CloseSilentlyError):
        decode_request(b"s")


# --------------------------------------------------------------------------- replies


def test_alive2_replies_bytes() -> None:
    assert encode_reply(alive2_reply(6, 0x12345678)) == bytes.fromhex("76 00 12345678")
    assert encode_reply(alive2_reply(5, 3)) == bytes.fromhex("79 00 0003")
    assert encode_reply(alive2_reply(6, None)) == bytes.fromhex("76 01 00000063")
    assert encode_reply(alive2_reply(5, None)) == bytes.fromhex("79 01 0063")
    assert alive2_reply_size(118) == 6
    assert alive2_reply_size(121) == 4


def test_alive2_reply_decoding() -> None:
    assert decode_alive2_reply(bytes.fromhex("76 00 12345678")) == Alive2XResponse(0, 0x12345678)
    assert decode_alive2_reply(bytes.fromhex("79 01 0063")) == Alive2Response(1, 99)
    for bad in (b"", b"v\x00", bytes.fromhex("76 00 1234567800"), b"w\x00\x00\x00"):
        with pytest.raises(EpmdError):
            decode_alive2_reply(bad)


def test_port2_reply_observed_example() -> None:
    # EPMD.md section 3 [observed]: foo, port 1234, M, 0, 6, 5.
    wire = bytes.fromhex("77 00 04d2 4d 00 0006 0005 0003 666f6f 0000")
    reply = Port2Response(1234, 77, 0, 6, 5, "foo", b"")
    assert encode_reply(reply) == wire
    assert decode_port2_reply(wire) == reply
    assert encode_reply(Port2Error()) == b"w\x01"
    assert decode_port2_reply(b"w\x01") == Port2Error(1)


def test_port2_reply_with_binary_extra() -> None:
    reply = Port2Response(1, 72, 0, 6, 6, "n\u00e9", b"\0\xff\0")
    assert decode_port2_reply(encode_reply(reply)) == reply


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"w",
        b"x\x00",
        b"w\x01\x00",  # error reply with trailing bytes
        bytes.fromhex("77 00 04d2 4d 00 0006 0005"),  # truncated header
        bytes.fromhex("77 00 04d2 4d 00 0006 0005 0004 666f6f 0000"),  # name too short
        bytes.fromhex("77 00 04d2 4d 00 0006 0005 0003 666f6f 0001"),  # extra missing
        bytes.fromhex("77 00 04d2 4d 00 0006 0005 0003 666f6f 0000 00"),  # junk after
        bytes.fromhex("77 00 04d2 4d 00 0006 0005 0001 ff 0000"),  # name not UTF-8
    ],
)
def test_malformed_port2_replies(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_port2_reply(bad)


def test_names_reply_observed_example() -> None:
    # EPMD.md section 4 [observed].
    wire = bytes.fromhex("0000d1cd") + b"name bar at port 1234\nname foo at port 1234\n"
    assert encode_names_reply(53709, [("bar", 1234), ("foo", 1234)]) == wire
    reply = NamesResponse(53709, (("bar", 1234), ("foo", 1234)))
    assert encode_reply(reply) == wire
    assert decode_names_reply(wire) == reply
    assert decode_names_reply(b"\0\0\x11\x11") == NamesResponse(0x1111, ())
    assert decode_names_reply(encode_names_reply(1, [("a b at port", 7)])).nodes == (
        ("a b at port", 7),
    )


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"\0\0\x11",
        b"\0\0\x11\x11name a at port 1",  # no final newline
        b"\0\0\x11\x11nom a at port 1\n",
        b"\0\0\x11\x11name a at port x\n",
        b"\0\0\x11\x11name a at port 65536\n",
        b"\0\0\x11\x11name a at port \xd9\xa1\n",
        b"\0\0\x11\x11name \xff at port 1\n",
    ],
)
def test_malformed_names_replies(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_names_reply(bad)


def test_dump_reply_format() -> None:
    # EPMD.md section 5 [observed]: every line ends with a NUL.
    wire = encode_dump_reply(
        4369, [DumpEntry("b", 2, 7), DumpEntry("a", 1, 6)], [DumpEntry("old", 3, 5)]
    )
    assert wire == (
        b"\x00\x00\x11\x11"
        b"active name     <b> at port 2, fd = 7\n\x00"
        b"active name     <a> at port 1, fd = 6\n\x00"
        b"old/unused name <old>, port = 3, fd = 5 \n\x00"
    )
    reply = DumpResponse(4369, (DumpEntry("b", 2, 7), DumpEntry("a", 1, 6)))
    assert encode_reply(reply) == wire[: -len(b"old/unused name <old>, port = 3, fd = 5 \n\x00")]


# --------------------------------------------------------------------------- fuzzing


@settings(max_examples=500, deadline=None)
@given(
    data=st.binary(max_size=4000),
    cuts=st.lists(st.integers(min_value=1, max_value=64), max_size=20),
    local=st.booleans(),
)
def test_random_bytes_give_a_request_or_a_protocol_error(
    data: bytes, cuts: list[int], local: bool
) -> None:
    reader = RequestReader(local)
    position = 0
    sizes = iter(cuts)
    try:
        while position < len(data):
            step = next(sizes, len(data))
            request = reader.feed(data[position : position + step])
            position += step
            if request is not None:
                assert isinstance(
                    request,
                    Alive2Request
                    | PortPlease2Request
                    | NamesRequest
                    | DumpRequest
                    | KillRequest
                    | StopRequest,
                )
                assert position >= len(data)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.booleans())
def test_random_request_bodies(body: bytes, local: bool) -> None:
    with contextlib.suppress(ProtocolError):
        decode_request(body, local=local)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_reply_bytes(data: bytes) -> None:
    for decode in (decode_alive2_reply, decode_port2_reply, decode_names_reply):
        with contextlib.suppress(ProtocolError):
            decode(data)


@settings(max_examples=200, deadline=None)
@given(
    name=st.text(min_size=1, max_size=255).filter(lambda s: "\0" not in s),
    extra=st.binary(max_size=1020),
    port=st.integers(0, 65535),
    high=st.integers(0, 65535),
)
def test_valid_registrations_round_trip(name: str, extra: bytes, port: int, high: int) -> None:
    try:
        validate_node_name(name)
    except AddressError:
        return  # over 1020 bytes, or a lone surrogate
    request = Alive2Request(port, 77, 0, high, 5, name, extra)
    assert read_all(encode_request(request)) == request


def test_reader_asks_a_locality_callable_only_when_needed() -> None:
    asked: list[bool] = []

    def remote() -> bool:
        asked.append(True)
        return False

    assert RequestReader(remote).feed(framed(b"zfoo")) == PortPlease2Request("foo")
    assert RequestReader(remote).feed(framed(b"n")) == NamesRequest()
    assert asked == []
    with pytest.raises(CloseSilentlyError, match="non-local"):
        RequestReader(remote).feed(framed(b"d"))
    assert asked == [True]
    assert RequestReader(lambda: True).feed(framed(b"k")) == KillRequest()
