"""The EPMD wire protocol as a pure codec: bytes in, frozen attrs messages out, and back.

Everything here follows /work/shared/EPMD.md (OTP 25.2.3's epmd) byte for byte, so
genuine Erlang nodes, the ``epmd`` command line client and skyproto can talk to each
other. There is no I/O and no reactor here: :class:`RequestReader` turns the bytes of
one server-side connection into one request, and the ``decode_*`` functions turn a
client's received bytes into a reply. Decoders raise only :class:`EpmdError` (a
:class:`skyproto.errors.ProtocolError`); its subclass :class:`Alive2RefusedError` carries
the error reply a server must send before keeping the connection open.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

from attrs import field, frozen

from ..errors import AddressError, ProtocolError

__all__ = [
    "ALIVE2_REQ",
    "ALIVE2_RESP",
    "ALIVE2_X_RESP",
    "DEFAULT_PORT",
    "DUMP_REQ",
    "ERROR_CREATION",
    "KILL_NO",
    "KILL_OK",
    "KILL_REQ",
    "LOCAL_ONLY_OPCODES",
    "MAX_EXTRA_BYTES",
    "MAX_NAME_BYTES",
    "MAX_NAME_CHARS",
    "MAX_REQUEST_LENGTH",
    "NAMES_REQ",
    "NODE_TYPE_HIDDEN",
    "NODE_TYPE_NORMAL",
    "PORT2_RESP",
    "PORT_PLEASE2_REQ",
    "STOP_NOEXIST",
    "STOP_REQ",
    "STOP_STOPPED",
    "X_RESP_MIN_VERSION",
    "Alive2RefusedError",
    "Alive2Reply",
    "Alive2Request",
    "Alive2Response",
    "Alive2XResponse",
    "CloseSilentlyError",
    "DumpEntry",
    "DumpRequest",
    "DumpResponse",
    "EpmdError",
    "KillRequest",
    "NamesRequest",
    "NamesResponse",
    "Port2Error",
    "Port2Reply",
    "Port2Response",
    "PortPlease2Request",
    "Request",
    "RequestReader",
    "StopRequest",
    "alive2_reply",
    "alive2_reply_size",
    "decode_alive2_reply",
    "decode_names_reply",
    "decode_port2_reply",
    "decode_request",
    "encode_dump_reply",
    "encode_names_reply",
    "encode_reply",
    "encode_request",
    "validate_node_name",
]

DEFAULT_PORT: Final = 4369

# Opcodes (EPMD.md section 1).
ALIVE2_REQ: Final = 120  # 'x'
ALIVE2_X_RESP: Final = 118  # 'v'
ALIVE2_RESP: Final = 121  # 'y'
PORT_PLEASE2_REQ: Final = 122  # 'z'
PORT2_RESP: Final = 119  # 'w'
NAMES_REQ: Final = 110  # 'n'
DUMP_REQ: Final = 100  # 'd'
KILL_REQ: Final = 107  # 'k'
STOP_REQ: Final = 115  # 's'

#: Requests only a local peer may make (others are closed silently).
LOCAL_ONLY_OPCODES: Final = frozenset({ALIVE2_REQ, DUMP_REQ, KILL_REQ, STOP_REQ})

NODE_TYPE_NORMAL: Final = 77  # 'M'
NODE_TYPE_HIDDEN: Final = 72  # 'H'

#: epmd's INBUF_SIZE is 3060: a Length of 3058 or more is refused (section 7).
MAX_REQUEST_LENGTH: Final = 3057
#: MAXSYMLEN: the largest node name and the largest Extra field, in bytes.
MAX_NAME_BYTES: Final = 1020
MAX_EXTRA_BYTES: Final = 1020
#: Node names may hold at most this many UTF-8 characters.
MAX_NAME_CHARS: Final = 255
#: The creation real epmd puts in an ALIVE2 error reply ([observed]).
ERROR_CREATION: Final = 99
#: The first distribution version with 32-bit creations (ALIVE2_X_RESP).
X_RESP_MIN_VERSION: Final = 6

KILL_OK: Final = b"OK"
KILL_NO: Final = b"NO"
STOP_STOPPED: Final = b"STOPPED"
STOP_NOEXIST: Final = b"NOEXIST"

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_ALIVE2_HEAD = struct.Struct(">BHBBHHH")  # opcode, port, type, protocol, high, low, nlen
_PORT2_HEAD = struct.Struct(">BBHBBHHH")  # opcode, result, port, type, proto, high, low, nlen
_ALIVE2_X = struct.Struct(">BBI")
_ALIVE2 = struct.Struct(">BBH")


# --------------------------------------------------------------------------- errors


class EpmdError(ProtocolError):
    """Bytes that break the EPMD protocol; a server closes the connection without a reply."""


class CloseSilentlyError(EpmdError):
    """A request epmd drops without a reply (bad framing, non-local peer, bad fields)."""


class Alive2RefusedError(EpmdError):
    """An ALIVE2_REQ that epmd answers with an error reply (section 2, rules 5 to 7).

    ``reply`` holds the full 6- or 4-byte error reply (chosen by the request's HighVsn);
    the server sends it and then keeps the connection open, unregistered, as epmd does.
    """

    def __init__(self, reason: str, high: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.high = high
        self.reply = encode_reply(alive2_reply(high, None))


# --------------------------------------------------------------------------- messages


def _u8(_instance: object, attribute: object, value: int) -> None:
    if not 0 <= value <= 0xFF:
        raise ValueError(f"{getattr(attribute, 'name', '?')}={value} does not fit in 8 bits")


def _u16(_instance: object, attribute: object, value: int) -> None:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"{getattr(attribute, 'name', '?')}={value} does not fit in 16 bits")


def _u32(_instance: object, attribute: object, value: int) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{getattr(attribute, 'name', '?')}={value} does not fit in 32 bits")


@frozen
class Alive2Request:
    """ALIVE2_REQ: register ``name`` (no ``@host``) as listening on ``port``."""

    port: int = field(validator=_u16)
    node_type: int = field(validator=_u8)
    protocol: int = field(validator=_u8)
    high: int = field(validator=_u16)
    low: int = field(validator=_u16)
    name: str
    extra: bytes = b""


@frozen
class PortPlease2Request:
    """PORT_PLEASE2_REQ: where does ``name`` listen?"""

    name: str


@frozen
class NamesRequest:
    """NAMES_REQ: list every live registration."""


@frozen
class DumpRequest:
    """DUMP_REQ: debugging list of live and remembered names (local peers only)."""


@frozen
class KillRequest:
    """KILL_REQ: ask the mapper to exit (local peers only)."""


@frozen
class StopRequest:
    """STOP_REQ: forcibly unregister ``name`` (local peers, relaxed mode only).

    The name is taken up to its first NUL, as epmd's C string is; bytes that are not
    UTF-8 are kept as surrogate escapes (they can never match a registered name).
    """

    name: str


Request = (
    Alive2Request | PortPlease2Request | NamesRequest | DumpRequest | KillRequest | StopRequest
)


@frozen
class Alive2XResponse:
    """ALIVE2_X_RESP (HighVsn >= 6): ``118 | Result:8 | Creation:32``, 6 bytes."""

    result: int = field(validator=_u8)
    creation: int = field(validator=_u32)


@frozen
class Alive2Response:
    """ALIVE2_RESP (HighVsn < 6): ``121 | Result:8 | Creation:16``, 4 bytes."""

    result: int = field(validator=_u8)
    creation: int = field(validator=_u16)


Alive2Reply = Alive2XResponse | Alive2Response


@frozen
class Port2Response:
    """PORT2_RESP with Result 0: every field echoes the node's ALIVE2_REQ."""

    port: int = field(validator=_u16)
    node_type: int = field(validator=_u8)
    protocol: int = field(validator=_u8)
    high: int = field(validator=_u16)
    low: int = field(validator=_u16)
    name: str
    extra: bytes = b""


@frozen
class Port2Error:
    """PORT2_RESP with Result > 0 (2 bytes): the name is not registered."""

    result: int = field(default=1, validator=_u8)


Port2Reply = Port2Response | Port2Error


@frozen
class NamesResponse:
    """NAMES_RESP: the mapper's configured port, then (name, port) newest first."""

    epmd_port: int = field(validator=_u32)
    nodes: tuple[tuple[str, int], ...] = ()


@frozen
class DumpEntry:
    """One DUMP_RESP line: a name, its port and the mapper's descriptor for it."""

    name: str
    port: int
    fd: int


@frozen
class DumpResponse:
    """DUMP_RESP: live names (newest first), then remembered unregistered ones (oldest first)."""

    epmd_port: int = field(validator=_u32)
    active: tuple[DumpEntry, ...] = ()
    unused: tuple[DumpEntry, ...] = ()


# --------------------------------------------------------------------------- names


def validate_node_name(name: str) -> bytes:
    """Return ``name`` as UTF-8 if epmd would register it, else raise AddressError.

    A node name is 1 to 255 characters, at most 1020 bytes of UTF-8, without NUL;
    senders check this up front rather than have the mapper close on them.
    """
    if not name:
        raise AddressError("a node name cannot be empty")
    if "\0" in name:
        raise AddressError(f"node name {name!r} contains a NUL")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise AddressError(f"node name {name!r} is not valid Unicode") from e
    if len(raw) > MAX_NAME_BYTES:
        raise AddressError(f"node name is {len(raw)} bytes, the limit is {MAX_NAME_BYTES}")
    if len(name) > MAX_NAME_CHARS:
        raise AddressError(f"node name is {len(name)} characters, the limit is {MAX_NAME_CHARS}")
    return raw


# --------------------------------------------------------------------------- requests


def encode_request(request: Request) -> bytes:
    """The wire bytes of ``request``, with its 2-byte length prefix.

    Raises AddressError for a name epmd would refuse and ValueError for an Extra over
    1020 bytes, so a client finds out before the mapper silently closes on it.
    """
    body: bytes
    if isinstance(request, Alive2Request):
        name = validate_node_name(request.name)
        if len(request.extra) > MAX_EXTRA_BYTES:
            raise ValueError(f"extra is {len(request.extra)} bytes, the limit is {MAX_EXTRA_BYTES}")
        body = (
            _ALIVE2_HEAD.pack(
                ALIVE2_REQ,
                request.port,
                request.node_type,
                request.protocol,
                request.high,
                request.low,
                len(name),
            )
            + name
            + _U16.pack(len(request.extra))
            + request.extra
        )
    elif isinstance(request, PortPlease2Request):
        body = bytes([PORT_PLEASE2_REQ]) + validate_node_name(request.name)
    elif isinstance(request, NamesRequest):
        body = bytes([NAMES_REQ])
    elif isinstance(request, DumpRequest):
        body = bytes([DUMP_REQ])
    elif isinstance(request, KillRequest):
        body = bytes([KILL_REQ])
    else:
        raw = request.name.encode("utf-8", "surrogateescape")
        if not raw or b"\0" in raw:
            raise AddressError(f"cannot stop node name {request.name!r}")
        body = bytes([STOP_REQ]) + raw
    if len(body) > MAX_REQUEST_LENGTH:
        raise ValueError(f"request of {len(body)} bytes exceeds {MAX_REQUEST_LENGTH}")
    return _U16.pack(len(body)) + body


def decode_request(body: bytes, *, local: bool = True) -> Request:
    """Decode one request body (the ``Length`` bytes after the prefix), as epmd does.

    ``local`` says whether the peer is local (section 2 rule 1); ALIVE2, DUMP, KILL and
    STOP from other peers are closed silently. Raises :class:`CloseSilentlyError` for every
    request epmd drops without a reply and :class:`Alive2RefusedError` for the ALIVE2 rules
    that get an error reply; nothing else.
    """
    if not body:
        raise CloseSilentlyError("empty request")
    opcode = body[0]
    if opcode in LOCAL_ONLY_OPCODES and not local:
        raise CloseSilentlyError(f"request {opcode} from a non-local peer")
    try:
        if opcode == ALIVE2_REQ:
            return _decode_alive2(body)
        if opcode == PORT_PLEASE2_REQ:
            return _decode_port_please2(body)
        if opcode == NAMES_REQ:
            return NamesRequest()  # epmd ignores any bytes after the opcode [observed]
        if opcode == DUMP_REQ:
            return DumpRequest()
        if opcode == KILL_REQ:
            return KillRequest()
        if opcode == STOP_REQ:
            return _decode_stop(body)
    except EpmdError:
        raise
    except (struct.error, IndexError, ValueError) as e:  # pragma: no cover - a safety net
        raise CloseSilentlyError(f"malformed request {opcode}: {e}") from e
    raise CloseSilentlyError(f"unknown opcode {opcode}")


def _decode_alive2(body: bytes) -> Alive2Request:
    """Section 2's rules 2 to 6, in epmd's order (rule 1 is in decode_request)."""
    size = len(body)
    if size <= 13:
        raise CloseSilentlyError(f"ALIVE2_REQ of {size} bytes is too small")
    _, port, node_type, protocol, high, low, nlen = _ALIVE2_HEAD.unpack_from(body)
    if nlen + 13 > size:
        raise CloseSilentlyError(f"ALIVE2_REQ name length {nlen} exceeds the packet")
    (elen,) = _U16.unpack_from(body, 11 + nlen)
    if elen + nlen + 13 > size:
        raise CloseSilentlyError(f"ALIVE2_REQ extra length {elen} exceeds the packet")
    raw = body[11 : 11 + nlen]
    if b"\0" in raw:
        raise CloseSilentlyError("ALIVE2_REQ node name contains a NUL")
    if not raw:
        # epmd would register the empty name when Length > 13; rule 2 means to refuse it.
        raise CloseSilentlyError("ALIVE2_REQ with an empty node name")
    if nlen > MAX_NAME_BYTES:
        raise Alive2RefusedError(f"node name of {nlen} bytes is too long", high)
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Alive2RefusedError("node name is not valid UTF-8", high) from None
    if len(name) > MAX_NAME_CHARS:
        raise Alive2RefusedError(f"node name of {len(name)} characters is too long", high)
    if elen > MAX_EXTRA_BYTES:
        raise Alive2RefusedError(f"extra of {elen} bytes is too long", high)
    extra = body[13 + nlen : 13 + nlen + elen]
    return Alive2Request(port, node_type, protocol, high, low, name, extra)


def _decode_port_please2(body: bytes) -> PortPlease2Request:
    raw = body[1:]
    if raw.endswith(b"\0"):
        raw = raw[:-1]  # a trailing NUL is tolerated
    if not raw:
        raise CloseSilentlyError("PORT_PLEASE2_REQ without a name")
    if b"\0" in raw:
        raise CloseSilentlyError("PORT_PLEASE2_REQ node name contains a NUL")
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CloseSilentlyError("PORT_PLEASE2_REQ node name is not valid UTF-8") from None
    # Real epmd counts one byte too many here, so it cannot look up a 255-character name;
    # we apply the documented limit instead (a deliberate, compatible fix).
    if len(name) > MAX_NAME_CHARS:
        raise CloseSilentlyError(f"PORT_PLEASE2_REQ name of {len(name)} characters is too long")
    return PortPlease2Request(name)


def _decode_stop(body: bytes) -> StopRequest:
    if len(body) <= 1:
        raise CloseSilentlyError("STOP_REQ without a name")
    raw = body[1:].split(b"\0", 1)[0]
    return StopRequest(raw.decode("utf-8", "surrogateescape"))


class RequestReader:
    """Accumulates one connection's bytes into its single request (EPMD.md section 7).

    Feed it every chunk as it arrives; it returns None until the request is complete,
    then the decoded request. A Length of 0 or >= 3058, more bytes than the Length
    announced (a pipelined request or junk), or any byte after the request raise
    :class:`CloseSilentlyError`; a bad request raises what :func:`decode_request` raises.
    """

    __slots__ = ("_buffer", "_done", "_want", "local")

    def __init__(self, local: bool | Callable[[], bool] = True) -> None:
        #: Whether the peer is local, or a callable that tells (asked only for the
        #: requests that need it: ALIVE2, DUMP, KILL, STOP).
        self.local = local
        self._buffer = b""
        self._want = 0
        self._done = False

    @property
    def buffered(self) -> int:
        """How many bytes of the unfinished request are held."""
        return len(self._buffer)

    def feed(self, data: bytes) -> Request | None:
        """Add ``data``; return the request once all ``Length + 2`` bytes are in."""
        if self._done:
            raise CloseSilentlyError(f"got {len(data)} more bytes than expected after the request")
        buffer = self._buffer + data if self._buffer else data
        want = self._want
        if not want:
            if len(buffer) < 2:
                self._buffer = buffer
                return None
            length = (buffer[0] << 8) | buffer[1]
            if length == 0 or length > MAX_REQUEST_LENGTH:
                self._done = True
                raise CloseSilentlyError(f"invalid packet size ({length})")
            want = self._want = length + 2
        if len(buffer) > want:
            self._done = True
            raise CloseSilentlyError(f"got {len(buffer) - 2} bytes in packet, expected {want - 2}")
        if len(buffer) < want:
            self._buffer = buffer
            return None
        self._done = True
        self._buffer = b""
        local = self.local
        if not isinstance(local, bool):
            local = buffer[2] not in LOCAL_ONLY_OPCODES or local()
        return decode_request(buffer[2:], local=local)


# --------------------------------------------------------------------------- replies


def alive2_reply(high: int, creation: int | None) -> Alive2Reply:
    """The ALIVE2 reply for a node of version ``high``: ok with ``creation``, or (None) error.

    ``creation`` is the value to send as is (the table already reduced it for old
    versions); errors carry Result 1 and Creation 99 as real epmd sends them.
    """
    if creation is None:
        if high >= X_RESP_MIN_VERSION:
            return Alive2XResponse(1, ERROR_CREATION)
        return Alive2Response(1, ERROR_CREATION)
    if high >= X_RESP_MIN_VERSION:
        return Alive2XResponse(0, creation)
    return Alive2Response(0, creation)


def encode_reply(reply: Alive2Reply | Port2Reply | NamesResponse | DumpResponse) -> bytes:
    """The wire bytes of a server's reply (replies have no length prefix)."""
    if isinstance(reply, Alive2XResponse):
        return _ALIVE2_X.pack(ALIVE2_X_RESP, reply.result, reply.creation)
    if isinstance(reply, Alive2Response):
        return _ALIVE2.pack(ALIVE2_RESP, reply.result, reply.creation)
    if isinstance(reply, Port2Response):
        name = reply.name.encode("utf-8")
        return (
            _PORT2_HEAD.pack(
                PORT2_RESP,
                0,
                reply.port,
                reply.node_type,
                reply.protocol,
                reply.high,
                reply.low,
                len(name),
            )
            + name
            + _U16.pack(len(reply.extra))
            + reply.extra
        )
    if isinstance(reply, Port2Error):
        return bytes([PORT2_RESP, reply.result])
    if isinstance(reply, NamesResponse):
        return encode_names_reply(reply.epmd_port, reply.nodes)
    return encode_dump_reply(reply.epmd_port, reply.active, reply.unused)


def encode_names_reply(
    epmd_port: int, nodes: tuple[tuple[str, int], ...] | list[tuple[str, int]]
) -> bytes:
    """NAMES_RESP: ``EPMDPortNo:32`` then ``name N at port P\\n`` per node."""
    lines = "".join(f"name {name} at port {port}\n" for name, port in nodes)
    return _U32.pack(epmd_port) + lines.encode("utf-8")


def encode_dump_reply(
    epmd_port: int,
    active: tuple[DumpEntry, ...] | list[DumpEntry],
    unused: tuple[DumpEntry, ...] | list[DumpEntry] = (),
) -> bytes:
    """DUMP_RESP: ``EPMDPortNo:32``, then one NUL-terminated line per entry."""
    parts = [_U32.pack(epmd_port)]
    parts.extend(
        f"active name     <{e.name}> at port {e.port}, fd = {e.fd}\n\0".encode() for e in active
    )
    parts.extend(
        f"old/unused name <{e.name}>, port = {e.port}, fd = {e.fd} \n\0".encode() for e in unused
    )
    return b"".join(parts)


def alive2_reply_size(first_byte: int) -> int:
    """How long an ALIVE2 reply starting with ``first_byte`` is (6 or 4 bytes)."""
    if first_byte == ALIVE2_X_RESP:
        return _ALIVE2_X.size
    if first_byte == ALIVE2_RESP:
        return _ALIVE2.size
    raise EpmdError(f"unexpected ALIVE2 reply opcode {first_byte}")


def decode_alive2_reply(data: bytes) -> Alive2Reply:
    """Decode a whole ALIVE2_X_RESP or ALIVE2_RESP (exactly 6 or 4 bytes)."""
    if not data:
        raise EpmdError("empty ALIVE2 reply")
    size = alive2_reply_size(data[0])
    if len(data) != size:
        raise EpmdError(f"ALIVE2 reply of {len(data)} bytes, expected {size}")
    if data[0] == ALIVE2_X_RESP:
        _, result, creation = _ALIVE2_X.unpack(data)
        return Alive2XResponse(result, creation)
    _, result, creation = _ALIVE2.unpack(data)
    return Alive2Response(result, creation)


def decode_port2_reply(data: bytes) -> Port2Reply:
    """Decode everything the mapper sent before closing in answer to PORT_PLEASE2_REQ."""
    if len(data) < 2:
        raise EpmdError(f"PORT2_RESP of {len(data)} bytes is too short")
    if data[0] != PORT2_RESP:
        raise EpmdError(f"unexpected PORT2 reply opcode {data[0]}")
    if data[1] != 0:
        if len(data) != 2:
            raise EpmdError(f"PORT2_RESP error with {len(data) - 2} trailing bytes")
        return Port2Error(data[1])
    if len(data) < _PORT2_HEAD.size:
        raise EpmdError(f"PORT2_RESP of {len(data)} bytes is too short")
    _, _, port, node_type, protocol, high, low, nlen = _PORT2_HEAD.unpack_from(data)
    end_name = _PORT2_HEAD.size + nlen
    if len(data) < end_name + 2:
        raise EpmdError("PORT2_RESP is shorter than its name")
    (elen,) = _U16.unpack_from(data, end_name)
    if len(data) != end_name + 2 + elen:
        raise EpmdError(f"PORT2_RESP of {len(data)} bytes, its fields say {end_name + 2 + elen}")
    try:
        name = data[_PORT2_HEAD.size : end_name].decode("utf-8")
    except UnicodeDecodeError:
        raise EpmdError("PORT2_RESP node name is not valid UTF-8") from None
    return Port2Response(port, node_type, protocol, high, low, name, data[end_name + 2 :])


def decode_names_reply(data: bytes) -> NamesResponse:
    """Decode everything the mapper sent before closing in answer to NAMES_REQ."""
    if len(data) < 4:
        raise EpmdError(f"NAMES_RESP of {len(data)} bytes is too short")
    (epmd_port,) = _U32.unpack_from(data)
    try:
        text = data[4:].decode("utf-8")
    except UnicodeDecodeError:
        raise EpmdError("NAMES_RESP is not valid UTF-8") from None
    if text and not text.endswith("\n"):
        raise EpmdError("NAMES_RESP does not end with a newline")
    nodes: list[tuple[str, int]] = []
    for line in text.split("\n")[:-1]:
        head, sep, port_text = line.rpartition(" at port ")
        if not sep or not head.startswith("name ") or not port_text.isascii():
            raise EpmdError(f"malformed NAMES_RESP line {line!r}")
        if not port_text.isdigit() or len(port_text) > 5 or int(port_text) > 0xFFFF:
            raise EpmdError(f"malformed port in NAMES_RESP line {line!r}")
        nodes.append((head[5:], int(port_text)))
    return NamesResponse(epmd_port, tuple(nodes))
