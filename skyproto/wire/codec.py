"""The CBOR codec for control messages and the fixed binary header of data messages.

Control messages are frozen attrs classes registered with a :class:`MessageCodec` under a
small integer code; one is encoded as the CBOR array ``[code, field1, field2, ...]`` in
attrs field order. Decoding is strict: anything but exactly a registered message with every
field of the declared type (no tags, no trailing bytes, bounded nesting) raises
:class:`ProtocolError` and nothing else.

Data messages skip that machinery: a 14-byte header (kind, source, destination, signed
session, type) is packed with ``struct`` and only the payload is CBOR.
"""

from __future__ import annotations

import enum
import io
import struct
import types
import typing
from collections.abc import Callable
from typing import Any, Final, TypeVar

import attrs
import cbor2

from ..errors import FrameTooLarge, ProtocolError

MAX_DEPTH: Final = 32

# cbor2 decodes these tags into Python objects on its own; none of them is requested by
# any skyproto message, so each is switched off (None) and the tag hook refuses the rest.
_BUILTIN_TAGS: Final = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258,
                        260, 261, 1004, 55799)
_NO_SEMANTIC_TAGS: Final[dict[int, Any]] = dict.fromkeys(_BUILTIN_TAGS)


def _refuse_tag(tag: cbor2.CBORTag, immutable: bool) -> object:
    raise ProtocolError(f"unrequested CBOR tag {tag.tag}")


def _strict_decoder(text_keys_only: bool) -> cbor2.CBORDecoder:
    return cbor2.CBORDecoder(
        io.BytesIO(b""),
        tag_hook=_refuse_tag,
        semantic_decoders=_NO_SEMANTIC_TAGS,
        max_depth=MAX_DEPTH,
        allow_duplicate_keys=False,
        strict_hashable_types=text_keys_only,
    )


class _Reader:
    """One strict decoder and the stream it reads, reused for every small item.

    Building a decoder costs more than decoding a small item, and so does giving it a new
    stream (about 0.6 us), so small items are copied into this reader's own buffer instead.
    The reactor is single-threaded, and decode() calls back into nothing that could re-enter.
    After a failure the stream is given again: cbor2's decoder keeps no usable state then.
    """

    #: items up to this size are copied into the reused buffer; larger ones get a stream
    #: of their own (which shares the bytes, no copy)
    COPY_LIMIT: Final = 4096

    __slots__ = ("buffer", "decoder")

    def __init__(self, text_keys_only: bool) -> None:
        self.decoder = _strict_decoder(text_keys_only)
        self.buffer = io.BytesIO()
        self.decoder.fp = self.buffer

    def decode(self, data: bytes | bytearray | memoryview) -> Any:
        size = len(data)
        if size > self.COPY_LIMIT:
            return self._decode_large(data)
        if size and 0x40 <= data[0] < 0x58 and size == data[0] - 0x3F:
            return bytes(data[1:])  # a short byte string (head 0x40 + length): nothing to check
        buffer = self.buffer
        buffer.seek(0)
        buffer.truncate()
        buffer.write(data)
        buffer.seek(0)
        try:
            value = self.decoder.decode()
        except BaseException as e:
            self.decoder.fp = buffer
            raise _malformed(e) from None
        if buffer.tell() != size:  # _check_consumed in line: this runs for every message
            _check_consumed(buffer, data)
        return value

    def _decode_large(self, data: bytes | bytearray | memoryview) -> Any:
        whole = _whole_string(data)
        if whole is not None:
            return whole
        stream = io.BytesIO(data)
        try:
            self.decoder.fp = stream
            value = self.decoder.decode()
        except BaseException as e:
            raise _malformed(e) from None
        finally:
            self.decoder.fp = self.buffer
        _check_consumed(stream, data)
        return value


def _check_consumed(stream: io.BytesIO, data: bytes | bytearray | memoryview) -> None:
    """The decoder read all of ``data``: one item and nothing after it."""
    if stream.tell() != len(data):
        raise ProtocolError(f"{len(data) - stream.tell()} trailing bytes after the CBOR item")


def _string_extent(start: bytes | bytearray | memoryview, total: int) -> tuple[int, int] | None:
    """(major type, head size) when the CBOR item that begins with ``start`` and is
    ``total`` bytes long is exactly one definite-length byte (2) or text (3) string."""
    if not start:
        return None
    initial = start[0]
    major, info = initial >> 5, initial & 31
    if major not in (2, 3) or info > 27:
        return None
    head = 1 if info < 24 else 1 + (1 << (info - 24))
    if len(start) < head:
        return None
    length = info if info < 24 else int.from_bytes(start[1:head], "big")
    return (major, head) if head + length == total else None


def _string_value(major: int, body: bytes | memoryview) -> bytes | str:
    if major == 2:
        return bytes(body)
    try:
        return str(body, "utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(f"malformed CBOR: {e}") from None


def _whole_string(data: bytes | bytearray | memoryview) -> bytes | str | None:
    """``data`` when it is exactly one definite-length byte or text string (the usual large
    payload), decoded with one copy; else None, for the decoder to read (and to say what
    is wrong: too short, trailing bytes).

    cbor2 reads a long string in chunks at about 700 MB/s (22 ms for 15 MiB here, in one
    reactor turn); a slice is several times faster."""
    extent = _string_extent(data, len(data))
    if extent is None:
        return None
    major, head = extent
    return _string_value(major, memoryview(data)[head:])


def decode_payload_parts(parts: list[memoryview]) -> Any:
    """A payload that arrived in pieces (their views, in order), as :func:`decode_payload`
    would decode it joined; a whole string is copied once, straight from the pieces."""
    total = sum(len(part) for part in parts)
    extent = _string_extent(parts[0], total) if parts else None
    if extent is None:
        return decode_payload(b"".join(parts))
    major, head = extent
    joined = b"".join([parts[0][head:], *parts[1:]])
    return joined if major == 2 else _string_value(major, joined)


def _string_head(major: int, length: int) -> bytes:
    """The CBOR head of a definite-length string of ``length`` bytes (major type 2 or 3)."""
    if length < 24:
        return bytes([major << 5 | length])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if length < 1 << (8 * size):
            return bytes([major << 5 | info]) + length.to_bytes(size, "big")
    raise ValueError(f"a string of {length} bytes is too long for CBOR")


def _malformed(error: BaseException) -> BaseException:
    """What a decoding failure becomes: ProtocolError for bad input (cbor2 raises several
    types, RecursionError among them, and its Rust core may panic); KeyboardInterrupt and
    the like pass on."""
    if isinstance(error, ProtocolError):
        return error
    if isinstance(error, Exception) or type(error).__name__ == "PanicException":
        return ProtocolError(f"malformed CBOR: {error}")
    return error


_READERS: Final = {True: _Reader(True), False: _Reader(False)}
_decode_control = _READERS[True].decode
_decode_user = _READERS[False].decode


def decode_cbor(data: bytes, text_keys_only: bool = True) -> Any:
    """Decode exactly one CBOR item of plain types; anything else is a ProtocolError.

    Control messages take only text/byte map keys (no hash-collision games); user payloads
    (``text_keys_only=False``) may use any hashable key, as skynet's Lua tables do.
    Nesting deeper than MAX_DEPTH, tags, duplicate keys and trailing bytes are refused.
    """
    return _decode_control(data) if text_keys_only else _decode_user(data)


def encode_cbor(value: object) -> bytes:
    """Encode a plain value; a value CBOR cannot carry raises TypeError."""
    try:
        return cbor2.dumps(value)
    except cbor2.CBOREncodeError as e:
        raise TypeError(f"cannot encode {type(value).__name__} as CBOR: {e}") from None


# --- type checking of decoded fields -------------------------------------------------------

Checker = Callable[[Any], Any]


def _exact(kind: type) -> Checker:
    def check(value: Any) -> Any:
        if type(value) is not kind:
            raise ProtocolError(f"expected {kind.__name__}, got {type(value).__name__}")
        return value

    return check


def _float(value: Any) -> float:
    if type(value) is float:
        return value
    if type(value) is int:
        return float(value)
    raise ProtocolError(f"expected float, got {type(value).__name__}")


def _any(value: Any) -> Any:
    return value


def _checker_for(tp: Any, structs: dict[type, Checker]) -> Checker:
    """Build the function that checks (and converts) a decoded value of type ``tp``."""
    if tp is Any or tp is object:
        return _any
    if tp is float:
        return _float
    if tp in (int, str, bytes, bool, type(None)):
        return _exact(tp)
    if isinstance(tp, type) and issubclass(tp, enum.IntEnum):
        enum_type = tp

        def check_enum(value: Any) -> Any:
            if type(value) is not int:
                raise ProtocolError(f"expected {enum_type.__name__}, got {type(value).__name__}")
            try:
                return enum_type(value)
            except ValueError:
                raise ProtocolError(f"{value} is not a {enum_type.__name__}") from None

        return check_enum
    if isinstance(tp, type) and attrs.has(tp):
        if tp not in structs:
            structs[tp] = _struct_checker(tp, structs)
        return lambda value: structs[tp](value)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [_checker_for(a, structs) for a in args]

        def check_union(value: Any) -> Any:
            for option in options:
                try:
                    return option(value)
                except ProtocolError:
                    continue
            raise ProtocolError(f"{type(value).__name__} matches none of {tp}")

        return check_union
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = _checker_for(args[0], structs)

        def check_tuple(value: Any) -> Any:
            if type(value) is not list:
                raise ProtocolError(f"expected an array, got {type(value).__name__}")
            return tuple(item(v) for v in value)

        return check_tuple
    if origin is dict:
        key, val = (_checker_for(a, structs) for a in args)

        def check_dict(value: Any) -> Any:
            if type(value) is not dict:
                raise ProtocolError(f"expected a map, got {type(value).__name__}")
            return {key(k): val(v) for k, v in value.items()}

        return check_dict
    raise TypeError(f"skyproto messages cannot carry fields of type {tp!r}")


def _struct_checker(cls: type, structs: dict[type, Checker]) -> Checker:
    """A nested attrs class travels as the array of its fields."""
    fields = attrs.fields(attrs.resolve_types(cls))
    checkers: list[Checker] = []
    structs[cls] = lambda value: build(value)  # allows recursive types
    checkers.extend(_checker_for(f.type, structs) for f in fields)
    names = [f.name for f in fields]
    positional = not any(f.kw_only or not f.init for f in fields)

    def build(value: Any) -> Any:
        if type(value) is not list or len(value) != len(checkers):
            raise ProtocolError(f"{cls.__name__} must be an array of {len(checkers)} fields")
        try:
            if positional:
                return cls(*[c(v) for c, v in zip(checkers, value, strict=True)])
            return cls(**{n: c(v) for n, c, v in zip(names, checkers, value, strict=True)})
        except ProtocolError:
            raise
        except (TypeError, ValueError) as e:  # an attrs validator refused the value
            raise ProtocolError(f"invalid {cls.__name__}: {e}") from None

    return build


#: types that encode as they are (the commonest fields: checked before anything else)
_PLAIN: Final = frozenset({int, str, bytes, float, bool, type(None)})
#: the field names of each attrs class met so far, in order
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _to_plain(value: Any) -> Any:
    """Turn nested attrs instances into arrays and enums into ints, for encoding."""
    kind = type(value)
    if kind in _PLAIN:
        return value
    names = _FIELD_NAMES.get(kind)
    if names is None and attrs.has(kind):
        names = _FIELD_NAMES[kind] = tuple(f.name for f in attrs.fields(kind))
    if names is not None:
        return [_to_plain(getattr(value, name)) for name in names]
    if isinstance(value, enum.IntEnum):
        return int(value)
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {_to_plain(k): _to_plain(v) for k, v in value.items()}
    return value


M = TypeVar("M")


@attrs.define
class MessageCodec:
    """A registry of control messages for one protocol, and their strict codec."""

    name: str
    _by_code: dict[int, tuple[type, Checker]] = attrs.field(factory=dict, init=False)
    _by_type: dict[type, int] = attrs.field(factory=dict, init=False)
    _structs: dict[type, Checker] = attrs.field(factory=dict, init=False)

    def message(self, code: int) -> Callable[[type[M]], type[M]]:
        """Class decorator registering an attrs class under ``code``."""

        def register(cls: type[M]) -> type[M]:
            if code in self._by_code:
                raise ValueError(f"{self.name}: message code {code} is taken")
            self._by_code[code] = (cls, _struct_checker(cls, self._structs))
            self._by_type[cls] = code
            return cls

        return register

    def encode(self, message: object) -> bytes:
        """The CBOR bytes of a registered message."""
        code = self._by_type.get(type(message))
        if code is None:
            raise TypeError(f"{type(message).__name__} is not a {self.name} message")
        return encode_cbor([code, *_to_plain(message)])

    def decode(self, data: bytes) -> Any:
        """Decode one message, checking every field; anything else is a ProtocolError."""
        item = decode_cbor(data)
        if type(item) is not list or not item or type(item[0]) is not int:
            raise ProtocolError(f"a {self.name} message is an array starting with its code")
        entry = self._by_code.get(item[0])
        if entry is None:
            raise ProtocolError(f"unknown {self.name} message code {item[0]}")
        return entry[1](item[1:])


# --- the data path ----------------------------------------------------------------------

class FrameKind(enum.IntEnum):
    """The first byte of every harbor frame."""

    CONTROL = 0  #: a CBOR control message follows (handshake, heartbeat, ...)
    DATA = 1  #: a data header and a CBOR payload follow
    PIECE = 3  #: a piece of a large data message (wire/pieces.py); 2 is a sealed record


class PayloadType(enum.IntEnum):
    """The ``type`` byte of a data message: how to read its payload."""

    NORMAL = 0  #: a request, a one-way message or a successful reply
    ERROR = 1  #: a failed reply: [error kind, exception type, message]
    SYSTEM = 2  #: node to node (local id 1 to local id 1), one-way: monitors


#: kind:u8 | source:u32 | destination:u32 | session:i32 | type:u8, big-endian
DATA_HEADER: Final = struct.Struct(">BIIiB")
_PACK_WITH_LENGTH: Final = struct.Struct(">IBIIiB")
SESSION_MAX: Final = 2**31 - 1
_MAX_PTYPE: Final = max(PayloadType)
_HEADER_LENGTH: Final = DATA_HEADER.size
_DATA_KIND: Final = int(FrameKind.DATA)
_dumps: Final = cbor2.dumps
#: byte string payloads longer than this are framed without a copy (a SplitFrame)
_SPLIT_FROM: Final = 64 * 1024
_LENGTH_MAX: Final = 2**32 - 1  #: what a frame's 4-byte length can say


#: a data message's payload: strict CBOR, any hashable map keys
decode_payload: Final[Callable[[bytes | bytearray | memoryview], Any]] = _decode_user


def encode_data_frame(
    source: int, destination: int, session: int, ptype: int, payload: bytes
) -> bytes:
    """The whole data frame *with* its 4-byte length prefix, in one allocation."""
    return _PACK_WITH_LENGTH.pack(
        DATA_HEADER.size + len(payload), FrameKind.DATA, source, destination, session, ptype
    ) + payload


class SplitFrame:
    """A data frame kept as two parts, its head (length prefix, header, CBOR string head)
    and its large byte string payload, so that the payload is never copied into one frame:
    the piece scheduler cuts pieces from both (:mod:`skyproto.wire.pieces`)."""

    __slots__ = ("head", "payload")

    def __init__(self, head: bytes, payload: bytes) -> None:
        self.head = head
        self.payload = payload

    def __len__(self) -> int:
        return len(self.head) + len(self.payload)

    def joined(self) -> bytes:
        """The frame as one bytes object (for a link that sends it whole)."""
        return self.head + self.payload


#: an encoded data frame, length prefix included: whole, or split around a large payload
Frame = bytes | SplitFrame


def encode_data_message(
    source: int, destination: int, session: int, ptype: int, payload: object,
    limit: int = _LENGTH_MAX,
) -> Frame:
    """A whole data frame, length prefix included, with ``payload`` encoded as CBOR
    (:func:`encode_cbor` in line: this runs for every message sent); FrameTooLarge if the
    message (header and payload) is longer than ``limit``. A large byte string is not
    copied at all: the frame is a :class:`SplitFrame` around it."""
    if type(payload) is bytes and len(payload) > _SPLIT_FROM:
        head = _string_head(2, len(payload))
        length = _HEADER_LENGTH + len(head) + len(payload)
        if length > limit:
            raise FrameTooLarge(length, limit)
        return SplitFrame(_PACK_WITH_LENGTH.pack(
            length, _DATA_KIND, source, destination, session, ptype) + head, payload)
    try:
        body = _dumps(payload)
    except cbor2.CBOREncodeError:
        body = encode_cbor(payload)  # raises the TypeError that says why
    length = _HEADER_LENGTH + len(body)
    if length > limit:
        raise FrameTooLarge(length, limit)
    return _PACK_WITH_LENGTH.pack(length, _DATA_KIND, source, destination, session, ptype) + body


def decode_data_header(frame: bytes | memoryview) -> tuple[int, int, int, int]:
    """(source, destination, session, type) of a DATA frame (prefix removed).

    The payload (``frame[DATA_HEADER.size:]``) is decoded separately, so that a payload
    the receiver cannot read fails that one message, not the whole link.
    """
    if len(frame) < DATA_HEADER.size:
        raise ProtocolError(f"data frame of {len(frame)} bytes is shorter than its header")
    _, source, destination, session, ptype = DATA_HEADER.unpack_from(frame)
    if session == -(2**31):
        raise ProtocolError("session -2**31 is out of range")
    if ptype > _MAX_PTYPE:
        raise ProtocolError(f"unknown payload type {ptype}")
    return source, destination, session, ptype


def decode_data_frame(frame: bytes) -> tuple[int, int, int, int, Any]:
    """(source, destination, session, type, payload) of a DATA frame (prefix removed)."""
    return (*decode_data_header(frame), decode_payload(frame[DATA_HEADER.size:]))
