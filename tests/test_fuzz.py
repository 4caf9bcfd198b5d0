"""Bad input, fuzzed: every decoder raises only ProtocolError, every adapter replies or drops.

DESIGN.md's standard "bad input gets a clear error and loses nothing", checked without a
network and without a reactor (a Clock, StringTransport, the loopback transport):

* the control codecs (harbor, master), the data header and payload, the EPMD codec (what
  tests/test_epmd_codec.py does not already fuzz) and the mapper Extra get random bytes,
  truncations and bit flips of valid messages, and structured-but-wrong CBOR (deep nesting,
  huge integers, tags, floats, duplicate keys, indefinite lengths, non-minimal heads);
* the protocol adapters (HarborLink before and after its handshake, MasterConnection,
  MasterClientProtocol, the gate's LineClient and PacketClient) get random chunkings of
  random and half-valid streams. The only outcomes allowed: a well-formed reply, waiting for
  more, or a drop of that connection with a logged reason; never an exception out of
  ``dataReceived``, and never harm to the other connections.

Every test is deterministic (``derandomize``, no example database) and the whole file runs
in a few seconds. A decoded message must be a real message: it re-encodes, and its encoding
is a fixed point of decode/encode (byte equality with the input cannot hold in general:
CBOR has non-minimal forms, and an int is accepted for a float field).
"""

from __future__ import annotations

import contextlib
import enum
import struct
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any, cast

import attrs
import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from skyproto.errors import NoSuchService, ProtocolError
from skyproto.gate import GateConfig, GateFactory
from skyproto.harbor.link import HarborLink, LinkConfig
from skyproto.harbor.messages import HARBOR_CODEC, LinkChallenge, LinkHello, LinkRefused
from skyproto.interfaces import IMessageSink
from skyproto.mapper.epmd import (
    ALIVE2_REQ,
    DUMP_REQ,
    KILL_REQ,
    NAMES_REQ,
    PORT_PLEASE2_REQ,
    STOP_REQ,
    Alive2RefusedError,
    Alive2Request,
    Alive2Response,
    Alive2XResponse,
    DumpRequest,
    EpmdError,
    KillRequest,
    NamesRequest,
    NamesResponse,
    Port2Error,
    Port2Response,
    PortPlease2Request,
    RequestReader,
    StopRequest,
    alive2_reply_size,
    decode_alive2_reply,
    decode_names_reply,
    decode_port2_reply,
    decode_request,
    encode_names_reply,
    encode_reply,
    encode_request,
)
from skyproto.mapper.extra import MapperExtra, decode_extra, encode_extra
from skyproto.master.client import JoinInfo, MasterClient, MasterClientProtocol
from skyproto.master.messages import (
    MASTER_CODEC,
    GetTable,
    HarborJoined,
    HarborRecord,
    Join,
    MasterChallenge,
    MasterHello,
    Observe,
    TableReply,
    Welcome,
)
from skyproto.master.registry import InMemoryRegistry, Table
from skyproto.master.server import MasterService
from skyproto.node.node import Node
from skyproto.services import Echo, Relay, SimpleDB
from skyproto.wire.codec import (
    DATA_HEADER,
    MessageCodec,
    PayloadType,
    decode_cbor,
    decode_data_header,
    decode_payload,
    encode_cbor,
)

from .cluster import SECRET, mesh, result_of
from .sealed import MasterNodeSide, Wire, master_challenge

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ADAPTER = settings(FUZZ, max_examples=60)

#: both control codecs (drawn, not parametrized: pytest-twisted wraps a @given test once per
#: parametrized item, and a wrapped-twice test fails with "blockon cannot be called from the
#: twisted greenlet")
codecs = st.sampled_from([HARBOR_CODEC, MASTER_CODEC])
CODEC_FUZZ = settings(FUZZ, max_examples=150)

#: endpoints any node can parse (the adapters' fuzz keeps to these: an unparsable one is the
#: known bug of test_a_node_with_an_unusable_endpoint_does_not_cut_the_others_off)
ENDPOINTS = ("tcp:127.0.0.1:7001", "tcp:10.0.0.2:1", "unix:/tmp/sky-fuzz.sock", "loopback:x")


# --------------------------------------------------------------------------- raw CBOR


def head(major: int, value: int, width: int | None = None) -> bytes:
    """A CBOR initial byte and argument: the shortest form, or ``width`` bytes (0/1/2/4/8)."""
    if width is None:
        width = next(w for w, top in ((0, 24), (1, 1 << 8), (2, 1 << 16), (4, 1 << 32),
                                      (8, 1 << 64)) if value < top)
    if width == 0:
        return bytes([major << 5 | value])
    info = {1: 24, 2: 25, 4: 26, 8: 27}[width]
    return bytes([major << 5 | info]) + value.to_bytes(width, "big")


@st.composite
def heads(draw: st.DrawFn, major: int, value: int) -> bytes:
    """``head`` in its shortest or in any longer (non-minimal, still valid) form."""
    widths = [w for w, top in ((0, 24), (1, 1 << 8), (2, 1 << 16), (4, 1 << 32), (8, 1 << 64))
              if value < top]
    return head(major, value, draw(st.sampled_from(widths)))


BUILTIN_TAGS = (0, 1, 2, 3, 4, 5, 21, 22, 23, 24, 25, 28, 29, 30, 32, 35, 36, 37, 52, 54, 100,
                256, 258, 260, 261, 1004, 55799)
tag_numbers = st.one_of(st.sampled_from(BUILTIN_TAGS), st.integers(0, 2**64 - 1))
u64 = st.integers(0, 2**64 - 1)

raw_leaves = st.one_of(
    u64.flatmap(lambda v: heads(0, v)),  # unsigned, maybe non-minimal
    u64.flatmap(lambda v: heads(1, v)),  # negative, down to -2**64
    st.builds(lambda tag, b: head(6, tag) + head(2, len(b)) + b,  # bignums: 2**64 and beyond
              st.sampled_from((2, 3)), st.binary(min_size=1, max_size=20)),
    st.binary(max_size=16).map(lambda b: head(2, len(b)) + b),
    st.text(max_size=8).map(lambda t: head(3, len(t.encode("utf-8", "surrogatepass")))
                            + t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=8).map(lambda b: head(3, len(b)) + b),  # text that may not be UTF-8
    st.lists(st.binary(max_size=4).map(lambda b: head(2, len(b)) + b), max_size=3)
    .map(lambda chunks: b"\x5f" + b"".join(chunks) + b"\xff"),  # indefinite byte string
    st.lists(st.binary(max_size=4).map(lambda b: head(2, len(b)) + b), max_size=3)
    .map(lambda chunks: b"\x7f" + b"".join(chunks) + b"\xff"),  # text made of byte chunks
    st.binary(min_size=2, max_size=2).map(lambda b: b"\xf9" + b),  # half, single, double
    st.binary(min_size=4, max_size=4).map(lambda b: b"\xfa" + b),  # floats: NaN, inf, ...
    st.binary(min_size=8, max_size=8).map(lambda b: b"\xfb" + b),
    st.sampled_from([b"\xf4", b"\xf5", b"\xf6", b"\xf7", b"\xe0", b"\xf3"]),
    st.integers(0, 255).map(lambda v: b"\xf8" + bytes([v])),  # simple values, reserved too
    st.sampled_from([b"\xff", b"\x1c", b"\x3d", b"\x5e", b"\x1f", b"\xfc", b"\x18", b"\x9b\x00"]),
)


def raw_containers(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    items = st.lists(children, max_size=4)
    pairs = st.lists(st.tuples(children, children), max_size=3)
    return st.one_of(
        st.builds(lambda xs, lie: head(4, max(0, len(xs) + lie)) + b"".join(xs),
                  items, st.sampled_from((0, 0, 0, -1, 1))),
        items.map(lambda xs: b"\x9f" + b"".join(xs) + b"\xff"),
        pairs.map(lambda ps: head(5, len(ps)) + b"".join(k + v for k, v in ps)),
        # the same key twice: strict decoding refuses duplicates
        st.builds(lambda k, a, b: b"\xa2" + k + a + k + b, children, children, children),
        pairs.map(lambda ps: b"\xbf" + b"".join(k + v for k, v in ps) + b"\xff"),
        st.builds(lambda tag, x: head(6, tag) + x, tag_numbers, children),
    )


raw_cbor = st.recursive(raw_leaves, raw_containers, max_leaves=12)

#: nesting far beyond MAX_DEPTH (and Python's recursion limit), in every container kind
deep_cbor = st.builds(
    lambda prefix, depth, leaf: prefix[0] * depth + leaf + prefix[1] * depth,
    st.sampled_from([(b"\x81", b""), (b"\x9f", b"\xff"), (b"\xa1\x00", b""), (b"\xc6", b""),
                     (b"\xd9\xd9\xf7", b""), (b"\xa1", b"\x00")]),
    st.integers(1, 5000),
    st.sampled_from([b"\x00", b"\x80", b"\xf6", b""]),
)

#: Python values, encoded by cbor2: huge ints (bignum tags), floats, tags via CBORTag
plain_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
              st.text(max_size=8), st.binary(max_size=8)),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=4), st.integers(), st.binary(max_size=3)),
                        children, max_size=4),
        st.builds(cbor2.CBORTag, tag_numbers, children),
    ),
    max_leaves=16,
)

any_cbor = st.one_of(raw_cbor, deep_cbor, plain_values.map(cbor2.dumps))


# --------------------------------------------------------------------------- messages


def strategy_for(tp: Any, endpoints: st.SearchStrategy[str] | None = None
                 ) -> st.SearchStrategy[Any]:
    """Values of a message field's declared type (mirroring the codec's own checkers)."""
    if tp is float:
        return st.floats()
    if tp is int:
        return st.integers(-(2**64), 2**64 - 1)
    if tp is str:
        return st.text(max_size=12)
    if tp is bytes:
        return st.binary(max_size=40)
    if tp is bool:
        return st.booleans()
    if tp is type(None):
        return st.none()
    if isinstance(tp, type) and issubclass(tp, enum.IntEnum):
        return st.sampled_from(list(tp))
    if isinstance(tp, type) and attrs.has(tp):
        return message_strategy(tp, endpoints)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(strategy_for(a, endpoints) for a in args))
    if origin is tuple:
        return st.lists(strategy_for(args[0], endpoints), max_size=3).map(tuple)
    if origin is dict:
        return st.dictionaries(strategy_for(args[0], endpoints), strategy_for(args[1], endpoints),
                               max_size=3)
    raise TypeError(f"no strategy for {tp!r}")


def message_strategy(cls: type, endpoints: st.SearchStrategy[str] | None = None
                     ) -> st.SearchStrategy[Any]:
    """Instances of an attrs message class; ``endpoints`` overrides every ``endpoint`` field.
    Values a field's validator refuses (a negative timeout) are left out: no such message
    can be built, so none is encoded."""
    fields = attrs.fields(attrs.resolve_types(cls))

    def build(values: dict[str, Any]) -> Any:
        try:
            return cls(**values)
        except ValueError:
            return None

    return st.fixed_dictionaries({
        f.name: endpoints if f.name == "endpoint" and endpoints is not None
        else strategy_for(f.type, endpoints) for f in fields}).map(build).filter(
            lambda message: message is not None)


def messages(codec: MessageCodec, endpoints: st.SearchStrategy[str] | None = None
             ) -> st.SearchStrategy[Any]:
    """Every message ``codec`` registers, with arbitrary field values of the right types."""
    classes = sorted(codec._by_type, key=lambda cls: codec._by_type[cls])
    return st.one_of(*(message_strategy(cls, endpoints) for cls in classes))


def decoded_or_error(codec: MessageCodec, data: bytes) -> Any:
    """Decode; a ProtocolError is fine (None), anything else fails the test. A message that
    does decode must be a real one: it encodes, and its encoding is a decode/encode fixed point."""
    try:
        message = codec.decode(data)
    except ProtocolError:
        return None
    again = codec.encode(message)
    assert codec.encode(codec.decode(again)) == again
    return message


def flip(data: bytes, positions: list[int]) -> bytes:
    buffer = bytearray(data)
    for position in positions:
        bit = position % (len(buffer) * 8)
        buffer[bit // 8] ^= 1 << (bit % 8)
    return bytes(buffer)


@CODEC_FUZZ
@given(codec=codecs, data=st.data())
def test_every_message_round_trips_byte_for_byte(codec, data):
    message = data.draw(messages(codec))
    encoded = codec.encode(message)
    assert codec.encode(codec.decode(encoded)) == encoded


@CODEC_FUZZ
@given(codec=codecs, data=st.binary(max_size=300))
def test_random_bytes_give_a_message_or_a_protocol_error(codec, data):
    decoded_or_error(codec, data)


@CODEC_FUZZ
@given(codec=codecs, data=st.data())
def test_every_truncation_of_a_valid_message_is_a_protocol_error(codec, data):
    encoded = codec.encode(data.draw(messages(codec)))
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(ProtocolError):
        codec.decode(encoded[:cut])


@CODEC_FUZZ
@given(codec=codecs, data=st.data())
def test_bit_flips_of_a_valid_message(codec, data):
    encoded = codec.encode(data.draw(messages(codec)))
    positions = data.draw(st.lists(st.integers(0, 2**16), min_size=1, max_size=3))
    decoded_or_error(codec, flip(encoded, positions))
    extra = data.draw(st.binary(min_size=1, max_size=4))
    with pytest.raises(ProtocolError, match="trailing bytes"):
        codec.decode(encoded + extra)


@CODEC_FUZZ
@given(codec=codecs, data=any_cbor)
def test_structured_but_wrong_cbor(codec, data):
    decoded_or_error(codec, data)


@CODEC_FUZZ
@given(codec=codecs, data=st.data())
def test_valid_codes_with_wrong_fields(codec, data):
    """A registered code, so field checking is reached: a field of the wrong type, one too
    few or too many, raw CBOR in place of a field, or an arbitrary array of values."""
    fields = cbor2.loads(codec.encode(data.draw(messages(codec))))
    index = data.draw(st.integers(0, len(fields)))
    change = data.draw(st.sampled_from(["replace", "drop", "append", "random"]))
    value = data.draw(plain_values)
    if change == "replace" and index < len(fields):
        fields[index] = value
    elif change == "drop" and index < len(fields):
        del fields[index]
    elif change == "append":
        fields.append(value)
    elif change == "random":
        fields = [fields[0], *data.draw(st.lists(plain_values, max_size=7))]
    try:
        encoded = cbor2.dumps(fields)
    except (OverflowError, ValueError, TypeError, cbor2.CBOREncodeError):
        return  # cbor2 cannot build this (e.g. a float key): nothing to send
    decoded_or_error(codec, encoded)
    # the same fields with one raw (possibly malformed) CBOR item spliced in
    raw = data.draw(raw_cbor)
    decoded_or_error(codec, head(4, len(fields) + 1) + b"".join(cbor2.dumps(f) for f in fields)
                     + raw)


# --------------------------------------------------------------------------- data path


@FUZZ
@given(data=any_cbor)
def test_payload_decodes_to_a_value_that_can_be_sent_back(data):
    """What decode_payload returns is something encode_cbor can send (Echo replies with it)."""
    for text_keys_only in (True, False):
        try:
            value = decode_cbor(data, text_keys_only)
        except ProtocolError:
            continue
        again = encode_cbor(value)  # TypeError here would break Echo's reply
        assert encode_cbor(decode_cbor(again, text_keys_only)) == again


@FUZZ
@given(header=st.binary(max_size=20), payload=any_cbor)
def test_data_header_and_payload(header, payload):
    frame = header + payload
    try:
        source, destination, session, ptype = decode_data_header(frame)
    except ProtocolError:
        assert len(frame) < DATA_HEADER.size or frame[13] > max(PayloadType) or \
            struct.unpack_from(">i", frame, 9)[0] == -(2**31)
        return
    assert 0 <= source < 2**32 and 0 <= destination < 2**32
    assert -(2**31) < session < 2**31
    assert ptype in set(PayloadType)
    with contextlib.suppress(ProtocolError):
        decode_payload(frame[DATA_HEADER.size:])


# --------------------------------------------------------------------------- EPMD

# tests/test_epmd_codec.py already feeds random bytes (random chunking) to RequestReader,
# random bodies to decode_request and random bytes to the three reply decoders, and checks
# every EPMD.md section 7 rule by example. What it lacks, added here: bodies that start with
# a real opcode (random bytes almost never do), truncations and bit flips of valid requests
# and replies, and the stricter "only EpmdError" (not just ProtocolError).

REQUEST_TYPES = {ALIVE2_REQ: Alive2Request, PORT_PLEASE2_REQ: PortPlease2Request,
                 NAMES_REQ: NamesRequest, DUMP_REQ: DumpRequest, KILL_REQ: KillRequest,
                 STOP_REQ: StopRequest}
OPCODES = tuple(REQUEST_TYPES)

epmd_requests = st.one_of(
    st.builds(Alive2Request, st.integers(0, 65535), st.sampled_from((77, 72, 0)),
              st.integers(0, 255), st.integers(0, 65535), st.integers(0, 65535),
              st.text(min_size=1, max_size=20).filter(lambda s: "\0" not in s),
              st.binary(max_size=40)),
    st.builds(PortPlease2Request,
              st.text(min_size=1, max_size=20).filter(lambda s: "\0" not in s)),
    st.builds(StopRequest, st.text(min_size=1, max_size=20).filter(lambda s: "\0" not in s)),
)


def encodable(request: Any) -> bytes | None:
    try:
        return encode_request(request)
    except (ValueError, UnicodeEncodeError):
        return None  # a lone surrogate: senders refuse it up front


@FUZZ
@given(opcode=st.sampled_from(OPCODES), rest=st.binary(max_size=80), local=st.booleans())
def test_request_bodies_behind_a_real_opcode_raise_only_epmd_errors(opcode, rest, local):
    try:
        request = decode_request(bytes([opcode]) + rest, local=local)
    except Alive2RefusedError as e:
        assert opcode == ALIVE2_REQ
        refusal = decode_alive2_reply(e.reply)  # the error reply a server sends is valid
        assert refusal.result == 1
        return
    except EpmdError:
        return
    assert type(request) is REQUEST_TYPES[opcode]


@FUZZ
@given(request=epmd_requests, data=st.data())
def test_truncated_requests_wait_for_more_and_never_decode(request, data):
    encoded = encodable(request)
    if encoded is None:
        return
    cut = data.draw(st.integers(0, len(encoded) - 1))
    reader = RequestReader(True)
    for piece in split(encoded[:cut], data.draw(st.lists(st.integers(1, 8), max_size=10))):
        assert reader.feed(piece) is None  # a proper prefix is never a request nor an error
    assert reader.buffered == cut


@FUZZ
@given(request=epmd_requests, data=st.data())
def test_bit_flipped_requests_give_a_request_or_an_epmd_error(request, data):
    encoded = encodable(request)
    if encoded is None:
        return
    mangled = flip(encoded, data.draw(st.lists(st.integers(0, 2**14), min_size=1, max_size=3)))
    reader = RequestReader(data.draw(st.booleans()))
    sizes = iter(data.draw(st.lists(st.integers(1, 16), max_size=20)))
    position = 0
    try:
        while position < len(mangled):
            step = next(sizes, len(mangled))
            result = reader.feed(mangled[position:position + step])
            position += step
            if result is not None:
                assert position >= len(mangled)
    except EpmdError:
        pass


epmd_replies = st.one_of(
    st.builds(Alive2XResponse, st.integers(0, 255), st.integers(0, 2**32 - 1)),
    st.builds(Alive2Response, st.integers(0, 255), st.integers(0, 65535)),
    st.builds(Port2Response, st.integers(0, 65535), st.integers(0, 255), st.integers(0, 255),
              st.integers(0, 65535), st.integers(0, 65535), st.text(max_size=20),
              st.binary(max_size=40)),
    st.builds(Port2Error, st.integers(1, 255)),
    st.builds(NamesResponse, st.integers(0, 2**32 - 1),
              st.lists(st.tuples(st.text(max_size=10).filter(lambda s: "\n" not in s),
                                 st.integers(0, 65535)), max_size=4).map(tuple)),
)


def decode_reply_as_epmd_client(reply: Any, data: bytes) -> Any:
    """Decode ``data`` the way a client expecting ``reply``'s kind would."""
    if isinstance(reply, Alive2XResponse | Alive2Response):
        return decode_alive2_reply(data)
    if isinstance(reply, Port2Response | Port2Error):
        return decode_port2_reply(data)
    return decode_names_reply(data)


@FUZZ
@given(reply=epmd_replies, data=st.data())
def test_mangled_replies_give_a_reply_or_an_epmd_error(reply, data):
    try:
        encoded = encode_reply(reply)
    except UnicodeEncodeError:
        return
    if isinstance(reply, NamesResponse):
        assert decode_names_reply(encoded) == reply
    else:
        assert decode_reply_as_epmd_client(reply, encoded) == reply
    how = data.draw(st.sampled_from(["truncate", "flip", "append"]))
    if how == "truncate":
        mangled = encoded[:data.draw(st.integers(0, len(encoded) - 1))]
    elif how == "flip":
        mangled = flip(encoded, data.draw(st.lists(st.integers(0, 2**14), min_size=1,
                                                   max_size=3)))
    else:
        mangled = encoded + data.draw(st.binary(min_size=1, max_size=8))
    try:
        decoded = decode_reply_as_epmd_client(reply, mangled)
    except EpmdError:
        return
    if isinstance(decoded, NamesResponse):  # lenient reader (leading zeros): a fixed point
        assert decode_names_reply(encode_names_reply(decoded.epmd_port, decoded.nodes)) == decoded
    else:  # fixed layouts: what decodes re-encodes to the very same bytes
        assert encode_reply(decoded) == mangled


@FUZZ
@given(first=st.integers(0, 255))
def test_alive2_reply_size_knows_two_opcodes_and_refuses_the_rest(first):
    try:
        assert alive2_reply_size(first) in (4, 6)
    except EpmdError:
        assert first not in (118, 121)


# --------------------------------------------------------------------------- mapper Extra


def check_extra(data: bytes) -> None:
    extra = decode_extra(data)  # must never raise
    if extra is not None:
        assert isinstance(extra, MapperExtra)
        if extra.harbor is None:  # a registration that is not a harbor: a role instead
            assert type(extra.role) is str and extra.role
        else:
            assert type(extra.harbor) is int and 1 <= extra.harbor <= 255
        assert extra.endpoint is None or (type(extra.endpoint) is str and extra.endpoint
                                          and "\0" not in extra.endpoint)


@FUZZ
@given(data=st.one_of(st.binary(max_size=1100), any_cbor,
                      plain_values.map(lambda v: cbor2.dumps({"harbor": 1, "endpoint": v})),
                      plain_values.map(lambda v: cbor2.dumps({"harbor": v})),
                      plain_values.map(lambda v: cbor2.dumps({"role": v, "endpoint": "x"}))))
def test_decode_extra_returns_none_for_anything_that_is_not_ours(data):
    check_extra(data)


@FUZZ
@given(harbor=st.integers(1, 255), endpoint=st.none() | st.sampled_from(ENDPOINTS),
       data=st.data())
def test_decode_extra_on_mangled_valid_extras(harbor, endpoint, data):
    encoded = encode_extra(harbor, endpoint)
    assert decode_extra(encoded) == MapperExtra(harbor, endpoint)
    check_extra(encoded[:data.draw(st.integers(0, len(encoded) - 1))])
    check_extra(flip(encoded, data.draw(st.lists(st.integers(0, 2**12), min_size=1,
                                                 max_size=3))))
    check_extra(encoded + data.draw(st.binary(min_size=1, max_size=4)))
    check_extra(encoded + b"\x00" * 1100)  # over epmd's 1020-byte limit


# --------------------------------------------------------------------------- adapters


@contextlib.contextmanager
def captured_logs() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


def unhandled(events: list[LogEvent]) -> list[str]:
    """Errors that escaped a protocol (the loopback transport and the reactor log them)."""
    return [formatEvent(e) for e in events
            if "log_failure" in e and "Unhandled" in str(e.get("log_format", ""))]


def assert_dropped_with_a_reason(events: list[LogEvent], *needles: str) -> None:
    texts = [formatEvent(e) for e in events]
    assert any(needle in text for text in texts for needle in needles), (
        f"connection closed without a logged reason mentioning {needles}: {texts}")


def split(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` cut into pieces of the given sizes (the rest in one piece)."""
    pieces, position = [], 0
    for size in sizes:
        if position >= len(data):
            break
        pieces.append(data[position:position + size])
        position += size
    if position < len(data):
        pieces.append(data[position:])
    return pieces


def framed(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def well_formed_handle(handle: int) -> bool:
    """Harbor 1..255 and local id 1..2**24-1. The fuzz keeps to these: any other destination
    is the known bug of test_a_message_to_local_id_0_is_refused_without_dropping_the_link."""
    return 1 <= handle >> 24 <= 255 and handle & 0xFFFFFF != 0


def feed(protocol: Any, transport: StringTransport, stream: bytes, sizes: list[int],
         between: Callable[[], object] = lambda: None) -> None:
    """Deliver ``stream`` in pieces, as a socket would: nothing more once the protocol has
    closed or aborted (a real transport stops reading then)."""
    for piece in split(stream, sizes):
        if transport.disconnecting:
            return
        protocol.dataReceived(piece)
        between()


def read_frames(data: bytes) -> list[bytes]:
    """Split what a framed protocol wrote; a partial frame at the end fails the test."""
    frames = []
    while data:
        assert len(data) >= 4, f"partial length prefix {data!r}"
        (size,) = struct.unpack_from(">I", data)
        assert len(data) >= 4 + size, "partial frame written"
        frames.append(data[4:4 + size])
        data = data[4 + size:]
    return frames


chunk_sizes = st.lists(st.integers(1, 80), max_size=12)
garbage = st.binary(max_size=120)
huge_prefix = st.sampled_from([b"\xff\xff\xff\xff", b"\x01\x00\x00\x01", b"\x7f\xff\xff\xff"])
valid_hellos = st.builds(LinkHello, st.just(1), st.integers(2, 255), st.integers(0, 2**64 - 1),
                         st.binary(min_size=32, max_size=32))

harbor_frames = st.one_of(
    messages(HARBOR_CODEC).map(lambda m: framed(b"\x00" + HARBOR_CODEC.encode(m))),
    valid_hellos.map(lambda m: framed(b"\x00" + HARBOR_CODEC.encode(m))),
    any_cbor.map(lambda c: framed(b"\x00" + c)),
    st.builds(lambda h, p: framed(b"\x01" + h + p), st.binary(min_size=13, max_size=13)
              .filter(lambda h: well_formed_handle(int.from_bytes(h[4:8], "big"))), any_cbor),
    st.builds(lambda k, b: framed(bytes([k]) + b), st.integers(2, 255), st.binary(max_size=20)),
    st.just(framed(b"")),
    garbage,
    huge_prefix,
)
harbor_streams = st.lists(harbor_frames, max_size=6).map(b"".join)


@implementer(IMessageSink)
class RecordingSink:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def link_up(self, link: Any) -> None:
        self.events.append(("up", link))

    def link_down(self, link: Any, reason: BaseException) -> None:
        self.events.append(("down", reason))

    def data_received(self, link: Any, source: int, destination: int, session: int,
                      ptype: int, payload: Any) -> None:
        self.events.append(("data", (source, destination, session, ptype, payload)))

    def reply_received(self, session: int, payload: Any, harbor: int) -> bool:
        self.events.append(("reply", (session, payload, harbor)))
        return True

    def bad_payload(self, link: Any, source: int, destination: int, session: int,
                    error: Exception) -> None:
        self.events.append(("bad", error))

    def link_congested(self, link: Any) -> None:
        self.events.append(("congested", link))

    def link_drained(self, link: Any) -> None:
        self.events.append(("drained", link))

    def link_retired(self, link: Any) -> None:
        self.events.append(("retired", link))


def peer(port: int) -> IPv4Address:
    return IPv4Address("TCP", "127.0.0.1", port)


@ADAPTER
@given(stream=harbor_streams, sizes=chunk_sizes)
def test_harbor_link_acceptor_replies_or_drops(stream, sizes):
    clock = Clock()
    sink = RecordingSink()
    link = HarborLink(LinkConfig(1, 5, SECRET), sink, clock, dialer=False)
    transport = StringTransport(peerAddress=peer(40001))
    with captured_logs() as events:
        link.makeConnection(transport)
        feed(link, transport, stream, sizes)
        # replies are whole frames of challenges or refusals, nothing else
        for frame in read_frames(transport.value()):
            assert frame[:1] == b"\x00"
            assert isinstance(HARBOR_CODEC.decode(frame[1:]), LinkChallenge | LinkRefused)
        assert not link.up and not sink.events  # nobody gets in without the secret
        clock.advance(LinkConfig(1, 5, SECRET).handshake_timeout)
        assert transport.disconnecting  # at the latest, the handshake timeout drops it
        assert_dropped_with_a_reason(events, ":40001", "port=40001)")
        link.connectionLost(Failure(ConnectionDone()))
    assert clock.getDelayedCalls() == []  # no timer outlives the connection
    assert not unhandled(events)


def settle(clock: Clock, seconds: float = 0.0, step: float = 0.05) -> None:
    clock.advance(0)
    for _ in range(int(seconds / step)):
        clock.advance(step)
    clock.advance(0)


ECHO, RELAY, SIMPLEDB = 0x02000002, 0x02000003, 0x02000004

def data_frame(source: int, destination: int, session: int, ptype: int, payload: bytes
               ) -> bytes:
    return framed(struct.pack(">BIIiB", 1, source, destination, session, ptype) + payload)


#: data frames a node could send over its link to harbor 2: from harbor 1, to a handle on
#: harbor 2 (a service or not). A destination on another harbor is the known bug of
#: test_a_misrouted_message_does_not_make_the_receiver_break_the_protocol.
good_data_frames = st.builds(
    data_frame,
    st.one_of(st.sampled_from([0x01000001, 0x01000002]), st.integers(0x01000000, 0x01FFFFFF)),
    st.one_of(st.sampled_from([ECHO, RELAY, SIMPLEDB, 0x02000001, 0x02FFFFFF]),
              st.integers(0x02000001, 0x02FFFFFF)),
    st.one_of(st.sampled_from([-1, -2, 0, 1, 7]), st.integers(-(2**31) + 1, 2**31 - 1)),
    st.sampled_from([0, 0, 1]),
    st.one_of(plain_values.map(cbor2.dumps), any_cbor,  # any_cbor: mostly unreadable
              st.sampled_from([cbor2.dumps(p) for p in (
                  ["SET", "k", "v"], ["GET", "k"], [":02000002", "relayed"], ["GET"],
                  [0x02000002, "relayed"], ["remote", "ValueError", "x"], "ping")])),
)
#: and every way a frame can be wrong
bad_frames = st.one_of(
    harbor_frames,
    st.builds(data_frame, st.integers(0, 2**32 - 1),
              st.integers(0, 2**32 - 1).filter(well_formed_handle),
              st.integers(-(2**31), 2**31 - 1), st.integers(0, 255), st.binary(max_size=8)),
)
good_streams = st.lists(good_data_frames, max_size=6).map(b"".join)


@settings(ADAPTER, max_examples=40)  # three nodes per example: the slowest fuzz here
@given(before=good_streams, bad=st.none() | bad_frames, after=good_streams, sizes=chunk_sizes)
def test_harbor_link_after_the_handshake_replies_or_drops_and_others_are_served(
        before, bad, after, sizes):
    """Harbor 1's link into harbor 2 carries fuzz: data messages a node could send (any
    destination, session, payload, readable or not) never cost the link; one bad frame among
    them may. Harbor 3 is served throughout, and harbor 1 again once its link is back."""
    with captured_logs() as events:
        clock, (one, two, three) = mesh(3)
        for service in (Echo(), Relay(), SimpleDB()):
            two.spawn(service)
        settle(clock)
        link = two.router.peers[1].link
        assert isinstance(link, HarborLink) and link.up
        # Sealed by harbor 1's own sealer, as one record: the fuzz reaches the frame layer.
        sender = one.router.peers[2].link
        assert isinstance(sender, HarborLink) and sender._sealer is not None
        stream = sender._sealer.seal(before + (bad or b"") + after)
        feed(link, link.transport, stream, sizes, between=lambda: clock.advance(0))
        if bad is None:
            assert not link.transport.disconnecting and link.up
        if link.transport.disconnecting:
            assert_dropped_with_a_reason(events, "dropping connection", "link lost",
                                         "closing link")
        pending = [three.call(ECHO, "from three", timeout=5), one.call(ECHO, "from one",
                                                                        timeout=5)]
        settle(clock, 3.0)
        assert result_of(pending[0]) == "from three"
        if result_of(pending[1]) != "from one":  # it raced the drop: once re-linked, it works
            again = one.call(ECHO, "from one again", timeout=5)
            settle(clock, 1.0)
            assert result_of(again) == "from one again"
        assert two.router.state(1) == two.router.state(3) == "up"
    assert not unhandled(events)


def test_a_message_to_local_id_0_is_refused_without_dropping_the_link():
    with captured_logs() as events:
        clock, (one, two) = mesh(2)
        two.spawn(Echo())
        settle(clock)
        bystander = one.call(ECHO, "pending", timeout=5)  # in flight on the same link
        call = one.call(0x02000000, "to local id 0", timeout=5)
        settle(clock, 0.5)
        outcomes = result_of(bystander), result_of(call)  # consumed: no "Unhandled error"
    assert not unhandled(events), unhandled(events)[0]
    assert outcomes[0] == "pending"
    assert isinstance(outcomes[1], Failure) and outcomes[1].check(NoSuchService), outcomes[1]


def test_a_misrouted_message_does_not_make_the_receiver_break_the_protocol():
    with captured_logs() as events:
        clock, (_, two, _) = mesh(3)
        two.spawn(Echo())
        settle(clock)
        link = two.router.peers[1].link
        assert isinstance(link, HarborLink)
        link.dataReceived(data_frame(0x01000001, 0x03000002, -1, 0, cbor2.dumps("misrouted")))
        settle(clock, 0.5)
        texts = [formatEvent(e) for e in events]
        assert not [t for t in texts if "is not on harbor 2" in t], texts


# --------------------------------------------------------------------------- master


class MasterPeer:
    """A connection to a MasterService, driven by hand over a StringTransport."""

    def __init__(self, service: MasterService, port: int) -> None:
        self.protocol = service.buildProtocol(peer(port))
        self.transport = StringTransport(peerAddress=peer(port))
        self.protocol.makeConnection(self.transport)
        self.wire = Wire(MASTER_CODEC)

    def send(self, message: object) -> None:
        self.protocol.dataReceived(self.wire.encode(message))

    def replies(self) -> list[Any]:
        data = self.transport.value()
        self.transport.clear()
        return self.wire.decode(data)

    def authenticate(self, then: Callable[[bytes], object]) -> None:
        side = MasterNodeSide(SECRET, seed=b"n" * 32)
        self.send(side.hello())
        (challenge,) = self.replies()
        assert isinstance(challenge, MasterChallenge)
        keys, proof = side.answer(challenge)
        self.wire.seal(keys, initiator=True)
        self.send(then(proof))

    def seal(self, stream: bytes) -> bytes:
        """After authentication the fuzz travels in one sealed record, as a node's would."""
        return self.wire.sealer.seal(stream) if self.wire.sealer is not None else stream


def master_with_a_joined_node() -> tuple[Clock, MasterService, Node]:
    """A master on the loopback transport with one real node joined: 'everyone else'."""
    clock = Clock()
    service = MasterService(InMemoryRegistry(), clock, SECRET)
    serverFromString(clock, "loopback:master").listen(service)
    bystander = Node(1, clock, SECRET)
    bystander.listen("loopback:h1")
    bystander.join_master("loopback:master", "bystander@test", "loopback:h1")
    bystander.register_name("KEEP", 0x01000002)
    settle(clock, 0.2)
    assert bystander.master is not None and bystander.master.connected
    return clock, service, bystander


master_frames = st.one_of(
    messages(MASTER_CODEC, st.sampled_from(ENDPOINTS))
    .map(lambda m: framed(MASTER_CODEC.encode(m))),
    any_cbor.map(framed),
    garbage,
    huge_prefix,
)
master_streams = st.lists(master_frames, max_size=6).map(b"".join)
joins = st.builds(lambda harbor, names: (lambda proof: Join(proof, harbor, 7, "fuzz@test",
                                                            "tcp:127.0.0.1:9", names)),
                  st.sampled_from([0, 1, 2, 255, 256, -1, 2**64 - 1]),
                  st.dictionaries(st.text(max_size=6), st.integers(-(2**64), 2**64 - 1),
                                  max_size=3))


@ADAPTER
@given(authenticate=st.one_of(st.none(), st.just(Observe), joins), stream=master_streams,
       sizes=chunk_sizes)
def test_master_connection_replies_or_drops_and_keeps_serving_others(authenticate, stream, sizes):
    with captured_logs() as events:
        clock, service, bystander = master_with_a_joined_node()
        fuzzed = MasterPeer(service, 40002)
        if authenticate is not None:
            fuzzed.authenticate(authenticate)
        feed(fuzzed.protocol, fuzzed.transport, fuzzed.seal(stream), sizes,
             between=lambda: clock.advance(0))
        fuzzed.replies()  # whole frames of real messages (records open)
        if fuzzed.transport.disconnecting:
            assert_dropped_with_a_reason(events, ":40002", "port=40002)")
        settle(clock, service.handshake_timeout + service.heartbeat_timeout)
        assert fuzzed.transport.disconnecting  # silent after the fuzz: dropped in time
        assert_dropped_with_a_reason(events, ":40002", "port=40002)")
        fuzzed.protocol.connectionLost(Failure(ConnectionDone()))
        settle(clock)
        # everyone else: the bystander is still joined, and a newcomer reads the table
        assert bystander.master is not None and bystander.master.connected
        assert bystander.master.names.get("KEEP") == 0x01000002
        observer = MasterPeer(service, 40003)
        observer.authenticate(Observe)
        observer.send(GetTable(1))
        (reply,) = observer.replies()
        assert isinstance(reply, TableReply)
        assert [record.harbor for record in reply.table.harbors] == [1]  # no zombie harbor
        assert reply.table.names == {"KEEP": 0x01000002}
    assert not unhandled(events)


class FakeMaster:
    """The master's side of one MasterClientProtocol, over a StringTransport."""

    def __init__(self, join: bool = True) -> None:
        self.reactor = MemoryReactorClock()
        self.node = Node(1, self.reactor, SECRET)
        self.client = MasterClient(
            self.reactor, "tcp:127.0.0.1:1", SECRET, self.node.membership,
            JoinInfo(1, self.node.incarnation, "n1@test", "tcp:127.0.0.1:2") if join else None)
        self.node.master = self.client
        self.protocol = MasterClientProtocol(self.client)
        self.transport = StringTransport(peerAddress=peer(40004))
        self.protocol.makeConnection(self.transport)
        self.wire = Wire(MASTER_CODEC)
        (hello,) = self.replies()
        assert isinstance(hello, MasterHello)
        self.hello = hello

    def replies(self) -> list[Any]:
        data = self.transport.value()
        self.transport.clear()
        return self.wire.decode(data)

    def send(self, message: object) -> None:
        self.protocol.dataReceived(self.wire.encode(message))

    def seal(self, stream: bytes) -> bytes:
        return self.wire.sealer.seal(stream) if self.wire.sealer is not None else stream

    def challenge(self) -> None:
        keys, challenge = master_challenge(SECRET, self.hello, seed=b"m" * 32)
        self.send(challenge)
        self.wire.seal(keys, initiator=False)
        (answer,) = self.replies()  # sealed: it opened, so the node has the same keys
        assert isinstance(answer, Join | Observe)


welcomes = message_strategy(Welcome, st.sampled_from(ENDPOINTS)).map(
    lambda w: attrs.evolve(w, harbor=1))


@ADAPTER
@given(stage=st.sampled_from(["hello", "challenged", "welcomed", "observing"]),
       welcome=welcomes, stream=master_streams, sizes=chunk_sizes)
def test_master_client_protocol_replies_or_drops(stage, welcome, stream, sizes):
    with captured_logs() as events:
        master = FakeMaster(join=stage != "observing")
        if stage != "hello":
            master.challenge()
        if stage == "welcomed":
            master.send(welcome)
            assert master.client.connected
        feed(master.protocol, master.transport, master.seal(stream), sizes)
        for reply in master.replies():  # only what a node may send to its master
            assert type(reply).__name__ in {"Join", "Observe", "BindName", "UnbindName",
                                            "LookupName", "GetTable", "MasterHeartbeat",
                                            "ServicesReport"}  # the answer to QueryServices
        if master.transport.disconnecting:
            assert_dropped_with_a_reason(events, ":40004", "port=40004)", "refused this node")
        master.protocol.connectionLost(Failure(ConnectionDone()))
        assert not master.client.connected
    assert not unhandled(events)


def test_a_node_with_an_unusable_endpoint_does_not_cut_the_others_off_the_master():
    with captured_logs() as events:
        clock, service, bystander = master_with_a_joined_node()
        assert bystander.master is not None
        welcomes_before = bystander.master.welcomes
        rogue = Node(2, clock, SECRET)  # holds the secret, but advertises an unusable endpoint
        rogue.join_master("loopback:master", "rogue@test", "bogus:endpoint")
        settle(clock, 2.0)
        assert 2 in service.joined
        assert not unhandled(events), unhandled(events)[0]
        assert bystander.master.connected
        assert bystander.master.welcomes == welcomes_before  # never had to rejoin


# --------------------------------------------------------------------------- gate

line_requests = st.one_of(
    st.sampled_from(["SET k v", "GET k", "GET", "SET k", "", "  ", "FOO bar", "SET k a b c",
                     "GET missing", "SET \u00e9 \u2603"]),
    st.text(max_size=30).filter(lambda s: "\n" not in s),
)
line_streams = st.lists(st.one_of(
    line_requests.map(lambda s: s.encode("utf-8", "surrogatepass") + b"\n"),
    line_requests.map(lambda s: s.encode("utf-8", "surrogatepass") + b"\r\n"),
    garbage,
    st.integers(60, 200).map(lambda n: b"x" * n),  # over the (small) request limit
), max_size=8).map(b"".join)
packet_streams = st.lists(st.one_of(
    line_requests.map(lambda s: s.encode("utf-8", "surrogatepass"))
    .map(lambda b: struct.pack(">H", len(b)) + b),
    garbage.map(lambda b: struct.pack(">H", len(b)) + b),
    garbage,
    st.sampled_from([b"\xff\xff", b"\x00\x41", b"\x00\x00"]),  # huge, just over, empty
), max_size=8).map(b"".join)
REPLY_STARTS = ("OK", "VALUE ", "NOTFOUND", "ERROR ")


def gate_replies(framing: str, data: bytes) -> list[str]:
    if framing == "line":
        lines = data.split(b"\n")
        assert lines[-1] == b"", "partial reply line"
        return [line.decode("utf-8") for line in lines[:-1]]
    replies = []
    while data:
        assert len(data) >= 2
        (size,) = struct.unpack_from(">H", data)
        assert len(data) >= 2 + size, "partial reply packet"
        replies.append(data[2:2 + size].decode("utf-8"))
        data = data[2 + size:]
    return replies


@ADAPTER
@given(framing=st.sampled_from(["line", "packet"]), data=st.data(), sizes=chunk_sizes)
def test_gate_clients_reply_or_drop(framing, data, sizes):
    stream = data.draw(line_streams if framing == "line" else packet_streams)
    clock = Clock()
    node = Node(1, clock, SECRET, default_timeout=5)
    node.spawn(SimpleDB())
    factory = GateFactory(node, GateConfig(framing=framing, max_request=64, max_in_flight=4))
    client = factory.buildProtocol(peer(40005))
    transport = StringTransport(peerAddress=peer(40005), lenient=True)
    with captured_logs() as events:
        client.makeConnection(transport)

        def between() -> None:
            for _ in range(10):  # a paused client is not read until its replies are out
                if transport.producerState != "paused":
                    break
                clock.advance(0)
            assert transport.producerState != "paused", "a gate client stays paused"

        feed(client, transport, stream, sizes, between)
        settle(clock)
        for reply in gate_replies(framing, transport.value()):
            assert reply.startswith(REPLY_STARTS), reply
        if transport.disconnecting:
            assert_dropped_with_a_reason(events, ":40005", "port=40005)")
        client.connectionLost(Failure(ConnectionDone()))
    assert not unhandled(events)
    assert factory.clients == set()  # the client and its agent are gone
    assert [type(s).__name__ for s in node.services.values()] == ["SimpleDB"]
    # and the gate still serves a newcomer
    other = factory.buildProtocol(peer(40006))
    other_transport = StringTransport(peerAddress=peer(40006))
    other.makeConnection(other_transport)
    request = b"GET k"
    other.dataReceived(request + b"\n" if framing == "line"
                       else struct.pack(">H", len(request)) + request)
    settle(clock)
    assert gate_replies(framing, other_transport.value())[0].startswith(("VALUE ", "NOTFOUND"))


# --------------------------------------------------------------------------- sanity


def test_the_known_good_paths_are_accepted():
    """The fuzzers' valid cases really are valid (so their failures mean something)."""
    assert decode_extra(encode_extra(3, "unix:/x")) == MapperExtra(3, "unix:/x")
    hello = LinkHello(1, 2, 3, b"n" * 32)
    assert HARBOR_CODEC.decode(HARBOR_CODEC.encode(hello)) == hello
    record = HarborRecord(2, "a@b", ENDPOINTS[0], 1, 0.0)
    joined = HarborJoined(1, record)
    assert MASTER_CODEC.decode(MASTER_CODEC.encode(joined)) == joined
    assert Table(0, (), {}) == MASTER_CODEC.decode(MASTER_CODEC.encode(TableReply(1, Table(
        0, (), {})))).table
