"""The strict CBOR codec: every kind of malformed input is a ProtocolError and nothing else."""

import contextlib
import enum
import os

import attrs
import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from skyproto.errors import ProtocolError
from skyproto.wire.codec import (
    DATA_HEADER,
    MessageCodec,
    SplitFrame,
    decode_cbor,
    decode_data_frame,
    decode_payload,
    encode_cbor,
    encode_data_frame,
    encode_data_message,
)

codec = MessageCodec("test")


class Color(enum.IntEnum):
    RED = 1
    BLUE = 2


@attrs.frozen
class Endpoint:
    harbor: int
    address: str


@codec.message(1)
@attrs.frozen
class Hello:
    version: int
    name: str
    secret_proof: bytes
    weight: float
    names: tuple[str, ...]
    table: dict[str, int]
    peers: tuple[Endpoint, ...]
    color: Color
    note: str | None = None


@codec.message(2)
@attrs.frozen
class Ping:
    pass


HELLO = Hello(1, "alpha@h", b"\x00\x01", 0.5, ("A", "B"), {"A": 7}, (Endpoint(2, "tcp:x:1"),),
              Color.BLUE)


def test_round_trip():
    assert codec.decode(codec.encode(HELLO)) == HELLO
    assert codec.decode(codec.encode(Ping())) == Ping()


def test_float_field_accepts_an_integer():
    data = cbor2.dumps([1, 1, "n", b"", 3, [], {}, [], 1, None])
    assert codec.decode(data).weight == 3.0


def raw_hello(**changes):
    fields = [1, 1, "alpha@h", b"", 0.5, [], {}, [], 1, None]
    index = {"version": 1, "name": 2, "secret_proof": 3, "names": 5, "table": 6, "peers": 7,
             "color": 8, "note": 9}
    for key, value in changes.items():
        fields[index[key]] = value
    return cbor2.dumps(fields)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (cbor2.dumps([99]), "unknown test message code 99"),
        (cbor2.dumps([]), "array starting with its code"),
        (cbor2.dumps({"code": 1}), "array starting with its code"),
        (cbor2.dumps([1, 1, "x"]), "array of 9 fields"),
        (raw_hello(version="1"), "expected int, got str"),
        (raw_hello(version=True), "expected int, got bool"),
        (raw_hello(name=b"alpha"), "expected str, got bytes"),
        (raw_hello(secret_proof="text"), "expected bytes"),
        (raw_hello(names=["A", 1]), "expected str, got int"),
        (raw_hello(table={"A": "x"}), "expected int"),
        (raw_hello(table={1: 1}), "map key must be a text"),
        (raw_hello(peers=[[2]]), "Endpoint must be an array of 2"),
        (raw_hello(color=3), "3 is not a Color"),
        (raw_hello(note=5), "matches none of"),
        (raw_hello() + b"\x00", "1 trailing bytes"),
        (raw_hello()[:-1], "malformed CBOR"),
        (b"", "malformed CBOR"),
        (cbor2.dumps(cbor2.CBORTag(4000, 1)), "semantic tag 4000"),
        (cbor2.dumps([1, cbor2.CBORTag(1, 0)]), "malformed CBOR"),  # built-in datetime tag
        (b"\xd9\xd9\xf7" + cbor2.dumps([2]), "malformed CBOR"),  # self-described CBOR tag
        (b"\x81" * 100 + b"\x01", "malformed CBOR.*depth"),
        (b"\xa2\x61a\x01\x61a\x02", "malformed CBOR.*[Dd]uplicate"),
        (b"\x9f\x02", "malformed CBOR"),  # indefinite array that never ends
        (b"\x62\xff\xfe", "malformed CBOR"),  # invalid UTF-8 text
    ],
)
def test_malformed_input_is_a_protocol_error(data, match):
    with pytest.raises(ProtocolError, match=match):
        codec.decode(data)


def test_bignum_tags_are_not_requested():
    with pytest.raises(ProtocolError):
        decode_cbor(cbor2.dumps(2**80))


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_protocol_error(data):
    with contextlib.suppress(ProtocolError):
        codec.decode(data)


@given(st.binary(max_size=60))
def test_random_data_frames_raise_only_protocol_error(data):
    with contextlib.suppress(ProtocolError):
        decode_data_frame(b"\x01" + data)


def test_duplicate_message_code_is_refused():
    with pytest.raises(ValueError, match="taken"):
        codec.message(1)(Ping)


def test_encoding_an_unregistered_class_is_a_type_error():
    with pytest.raises(TypeError, match="not a test message"):
        codec.encode(Endpoint(1, "x"))


def test_unencodable_payload_is_a_type_error():
    with pytest.raises(TypeError, match="cannot encode object"):
        encode_cbor(object())


def test_data_frame_layout_byte_for_byte():
    payload = encode_cbor(["GET", "k"])
    frame = encode_data_frame(0x0100002A, 0x02000001, -7, 0, payload)
    assert frame.hex() == (
        "00000015"  # length: 14-byte header + 7-byte payload
        "01"  # kind: DATA
        "0100002a"  # source :0100002a
        "02000001"  # destination :02000001
        "fffffff9"  # session -7: a request (replies carry it positive)
        "00"  # type: NORMAL
        "8263474554616b"  # CBOR ["GET", "k"]
    )
    assert decode_data_frame(frame[4:]) == (0x0100002A, 0x02000001, -7, 0, ["GET", "k"])
    assert DATA_HEADER.size == 14


def test_payloads_may_use_integer_keys():
    frame = encode_data_frame(0x01000001, 0x01000002, 0, 0, encode_cbor({1: "a"}))
    assert decode_data_frame(frame[4:])[4] == {1: "a"}


def test_short_data_frame():
    with pytest.raises(ProtocolError, match="shorter than its header"):
        decode_data_frame(b"\x01\x00")


@pytest.mark.parametrize("value", [os.urandom(70_000), "ü" * 40_000, b"", "x" * 5000])
def test_large_strings_decode_as_the_generic_decoder_does(value):
    """One whole string is sliced, not read by cbor2 in chunks; the result is the same,
    from bytes, a bytearray or a view."""
    data = cbor2.dumps(value)
    for form in (data, bytearray(data), memoryview(data)):
        assert decode_payload(form) == value == cbor2.loads(data)
        assert type(decode_payload(form)) is type(value)


@pytest.mark.parametrize("data, words", [
    (cbor2.dumps(b"x" * 70_000) + b"\x00", "trailing"),
    (cbor2.dumps(b"x" * 70_000)[:-1], "malformed CBOR"),
    (cbor2.dumps("x" * 70_000)[:-2] + b"\xff\xfe", "malformed CBOR"),  # not UTF-8
])
def test_large_strings_that_do_not_add_up_are_protocol_errors(data, words):
    with pytest.raises(ProtocolError, match=words):
        decode_payload(data)


def test_a_large_byte_payload_frames_as_the_generic_encoder_would():
    payload = os.urandom(200_000)
    frame = encode_data_message(0x01000001, 0x02000003, -7, 0, payload)
    assert isinstance(frame, SplitFrame) and frame.payload is payload  # not copied
    whole = frame.joined()
    assert len(frame) == len(whole)
    assert whole == encode_data_frame(0x01000001, 0x02000003, -7, 0, cbor2.dumps(payload))
    assert decode_payload(whole[4 + DATA_HEADER.size:]) == payload


def test_short_byte_strings_are_read_without_the_decoder_and_checked_all_the_same():
    from skyproto.errors import ProtocolError
    from skyproto.wire.codec import decode_payload

    for value in (b"", b"x", bytes(range(16)), bytes(23)):
        assert decode_payload(cbor2.dumps(value)) == value
        assert type(decode_payload(bytearray(cbor2.dumps(value)))) is bytes
    with pytest.raises(ProtocolError):
        decode_payload(cbor2.dumps(b"abc") + b"\x00")  # trailing bytes
    with pytest.raises(ProtocolError):
        decode_payload(cbor2.dumps(b"abc")[:-1])  # cut short
