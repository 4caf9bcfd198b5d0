"""docs/wire-format.md against the code: every marked example and table, byte for byte.

Each example sits in a fenced block after an ``<!-- example: NAME -->`` marker; each
checked table after a ``<!-- table: NAME -->`` marker. A hex dump line is hex byte pairs
separated by single spaces, then (after two or more spaces) an annotation. Stated facts
(constants, abort reasons, the type-byte check, error messages) are checked against what
the code does.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any
from unittest.mock import Mock

import attrs
import pytest
from twisted.internet.task import Clock

from skyproto import auth
from skyproto.address import format_handle, parse_handle
from skyproto.errors import NoSuchService, ProtocolError
from skyproto.harbor import link as harbor_link
from skyproto.harbor.handshake import (
    _IDENTITIES,
    ACCEPTOR,
    DIALER,
    LinkHandshake,
    PeerIdentity,
)
from skyproto.harbor.link import HarborLink, LinkConfig
from skyproto.harbor.messages import (
    HARBOR_CODEC,
    PROTOCOL_VERSION,
    Heartbeat,
    LinkChallenge,
    LinkProof,
)
from skyproto.node.node import Node
from skyproto.session import SESSION_MAX as TABLE_SESSION_MAX
from skyproto.wire.codec import (
    DATA_HEADER,
    MAX_DEPTH,
    SESSION_MAX,
    FrameKind,
    PayloadType,
    decode_cbor,
    decode_data_frame,
    decode_data_header,
    decode_payload,
    encode_cbor,
    encode_data_frame,
)
from skyproto.wire.framing import DEFAULT_MAX_FRAME, LENGTH_PREFIX

DOC = Path(__file__).resolve().parent.parent / "docs" / "wire-format.md"

HEX_LINE = re.compile(r"^([0-9a-f]{2}(?: [0-9a-f]{2})*)(?: {2,}(.*))?$")


def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def after_marker(marker: str) -> str:
    """The text following ``marker``, which must appear exactly once."""
    text = doc_text()
    assert text.count(marker) == 1, f"{marker} must appear exactly once in {DOC.name}"
    return text[text.index(marker) + len(marker) :]


def example_block(name: str, language: str = "") -> str:
    """The fenced block right after ``<!-- example: name -->``."""
    rest = after_marker(f"<!-- example: {name} -->")
    match = re.match(r"\s*```" + re.escape(language) + r"\n(.*?)```", rest, re.DOTALL)
    assert match is not None, f"no ```{language} block right after the {name} marker"
    return match.group(1)


def hex_dump(name: str) -> tuple[bytes, list[str]]:
    """The bytes of a marked hex dump and the annotation of each line."""
    data = bytearray()
    notes: list[str] = []
    for line in example_block(name).splitlines():
        if not line.strip():
            continue
        match = HEX_LINE.match(line)
        assert match is not None, f"not a hex dump line in {name}: {line!r}"
        data += bytes.fromhex(match.group(1))
        notes.append(match.group(2) or "")
    return bytes(data), notes


def table_rows(name: str) -> list[list[str]]:
    """The body rows (cells stripped) of the Markdown table after ``<!-- table: name -->``."""
    rows: list[list[str]] = []
    lines = after_marker(f"<!-- table: {name} -->").strip().splitlines()
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    assert len(rows) > 2, f"no table after the {name} marker"
    assert set(rows[1][0]) <= set("-: "), f"{name}: second row must be the separator"
    return rows[2:]


# --- examples ------------------------------------------------------------------------------

SOURCE = ":0100002a"
DESTINATION = ":02000002"
SESSION = -7
PAYLOAD = ["GET", "k"]


def test_data_frame_example_is_what_the_code_sends() -> None:
    dumped, notes = hex_dump("data-frame")
    expected = encode_data_frame(
        parse_handle(SOURCE), parse_handle(DESTINATION), SESSION, PayloadType.NORMAL,
        encode_cbor(PAYLOAD),
    )
    assert dumped.hex(" ") == expected.hex(" ")
    annotations = "\n".join(notes)
    for text in (SOURCE, DESTINATION, str(SESSION), "DATA", "NORMAL", '"GET"', '"k"'):
        assert text in annotations, f"the data-frame annotations should mention {text}"


def test_data_frame_example_decodes() -> None:
    dumped, _ = hex_dump("data-frame")
    (length,) = LENGTH_PREFIX.unpack_from(dumped)
    assert length == len(dumped) - LENGTH_PREFIX.size
    assert dumped[LENGTH_PREFIX.size] == FrameKind.DATA
    assert decode_data_frame(dumped[LENGTH_PREFIX.size :]) == (
        parse_handle(SOURCE), parse_handle(DESTINATION), SESSION, PayloadType.NORMAL, PAYLOAD
    )


def test_heartbeat_example_is_what_a_link_sends() -> None:
    dumped, notes = hex_dump("heartbeat-frame")
    body = b"\x00" + HARBOR_CODEC.encode(Heartbeat())
    assert dumped.hex(" ") == (struct.pack(">I", len(body)) + body).hex(" ")
    # the very bytes HarborLink hands to send_frame for every heartbeat
    assert dumped[4:] == harbor_link._HEARTBEAT
    assert HARBOR_CODEC.decode(dumped[5:]) == Heartbeat()
    assert any("Heartbeat" in note for note in notes)


def test_proof_example_matches_a_real_handshake() -> None:
    namespace: dict[str, Any] = {}
    exec(compile(example_block("proof", "python"), f"{DOC.name}:proof", "exec"), namespace)
    transcript, proof = namespace["transcript"], namespace["proof"]
    secret = b"correct horse battery staple"
    dialer = LinkHandshake(secret, 1, 1_700_000_000_000_000, dialer=True, expect_harbor=2)
    acceptor = LinkHandshake(secret, 2, 1_700_000_000_000_001, dialer=False)

    hello = dialer.start()
    assert hello is not None
    (challenge,) = acceptor.receive(hello).send
    assert isinstance(challenge, LinkChallenge)
    t = transcript(hello.nonce, challenge.nonce, hello.version, 1, 1_700_000_000_000_000,
                   2, 1_700_000_000_000_001)
    assert len(t) == 84
    assert challenge.proof == proof(secret, b"harbor-acceptor", t)

    step = dialer.receive(challenge)
    (answer,) = step.send
    assert isinstance(answer, LinkProof)
    assert answer.proof == proof(secret, b"harbor-dialer", t)
    assert acceptor.receive(answer).peer == PeerIdentity(1, 1_700_000_000_000_000)


def test_proof_constants_are_the_codes() -> None:
    text = doc_text()
    assert f'"{_IDENTITIES.format}"' in text
    for role in (DIALER, ACCEPTOR):
        assert f'b"{role.decode()}"' in text, role
    assert len(auth.prove(b"s", DIALER, b"t")) == auth.PROOF_SIZE


# --- tables and stated facts ---------------------------------------------------------------

def test_stated_header_size() -> None:
    match = re.search(r"The DATA header is \*\*(\d+) bytes\*\*", doc_text())
    assert match is not None, "the doc should state the DATA header size"
    assert int(match.group(1)) == DATA_HEADER.size
    assert f'struct.Struct("{DATA_HEADER.format}")' in doc_text()


def test_data_header_table_matches_the_struct() -> None:
    rows = table_rows("data-header")
    header, payload = rows[:-1], rows[-1]
    codes = DATA_HEADER.format.lstrip("<>!=@")
    assert len(header) == len(codes)
    offset = 0
    for row, code in zip(header, codes, strict=True):
        size = struct.calcsize(">" + code)
        assert (int(row[0]), int(row[1])) == (offset, size), f"row {row}"
        signed = code.islower()
        assert row[3].startswith(f"{'i' if signed else 'u'}{size * 8}"), f"row {row}"
        offset += size
    assert int(payload[0]) == offset == DATA_HEADER.size
    assert [row[2] for row in rows] == [
        "kind", "source", "destination", "session", "type", "payload"
    ]


def test_every_control_message_is_documented() -> None:
    rows = {int(row[0]): row for row in table_rows("control-messages")}
    registered = HARBOR_CODEC._by_code
    assert set(rows) == set(registered)
    for code, (cls, _) in registered.items():
        row = rows[code]
        assert row[1] == f"`{cls.__name__}`", f"code {code} is {cls.__name__}, doc: {row[1]}"
        assert re.findall(r"`(\w+)`", row[2]) == [f.name for f in attrs.fields(cls)]


def test_frame_kinds_and_payload_types() -> None:
    text = doc_text()
    for kind in FrameKind:
        assert f"| {kind.value} | `{kind.name}` |" in text
    for ptype in PayloadType:
        assert f"| {ptype.value} | `{ptype.name}` |" in text


def test_constants_table() -> None:
    config = LinkConfig(harbor=1, incarnation=1, secret=b"s")
    actual = {
        "DEFAULT_MAX_FRAME": DEFAULT_MAX_FRAME,
        "MAX_DEPTH": MAX_DEPTH,
        "SESSION_MAX": SESSION_MAX,
        "PROTOCOL_VERSION": PROTOCOL_VERSION,
        "NONCE_SIZE": auth.NONCE_SIZE,
        "PROOF_SIZE": auth.PROOF_SIZE,
        "heartbeat_interval": config.heartbeat_interval,
        "heartbeat_timeout": config.heartbeat_timeout,
        "handshake_timeout": config.handshake_timeout,
    }
    assert TABLE_SESSION_MAX == SESSION_MAX
    text = doc_text()
    documented = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^\| `(\w+)` \| ([0-9.]+) \|", text, re.MULTILINE)
    }
    assert set(actual) <= set(documented)
    for name, value in actual.items():
        assert type(value)(documented[name]) == value, name


@pytest.mark.parametrize(("depth", "ok"), [(32, True), (33, False)])
def test_stated_depth_limit(depth: int, ok: bool) -> None:
    assert "32 nested arrays around an integer decode, 33 do not" in doc_text()
    data = b"\x81" * depth + b"\x01"
    if ok:
        decode_cbor(data)
    else:
        with pytest.raises(ProtocolError):
            decode_cbor(data)


# --- what a receiving link refuses, and what it only fails one message for ----------------

def test_stated_abort_reasons_are_what_a_link_raises() -> None:
    text = doc_text()
    link = HarborLink(LinkConfig(harbor=1, incarnation=1, secret=b"s"), Mock(), Clock(),
                      dialer=False)
    data = encode_data_frame(parse_handle(SOURCE), parse_handle(DESTINATION), SESSION,
                             PayloadType.NORMAL, encode_cbor(PAYLOAD))[LENGTH_PREFIX.size :]
    for stated, frame in [
        ("empty frame", b""),
        ("data before the handshake", data),
        ("unknown frame kind N", b"\x07"),
    ]:
        assert f"connection aborted (`{stated}`)" in text, stated
        with pytest.raises(ProtocolError) as info:
            link.frame_received(frame)
        assert str(info.value) == stated.replace("N", "7")


def test_stated_type_byte_check() -> None:
    text = doc_text()
    assert "a value above `max(PayloadType)` (1) is refused" in text
    assert max(PayloadType) == 1
    assert "(`unknown payload type N`)" in text
    for ptype in PayloadType:
        frame = encode_data_frame(1 << 24 | 2, 2 << 24 | 2, 0, ptype, encode_cbor(None))
        assert decode_data_header(frame[LENGTH_PREFIX.size :])[3] == ptype
    frame = encode_data_frame(1 << 24 | 2, 2 << 24 | 2, 0, 2, encode_cbor(None))
    with pytest.raises(ProtocolError, match=r"^unknown payload type 2$"):
        decode_data_header(frame[LENGTH_PREFIX.size :])


def test_a_tagged_payload_passes_the_header_and_fails_the_payload() -> None:
    assert "A failure of checks 1 to 4 aborts the connection" in doc_text()
    frame = encode_data_frame(parse_handle(SOURCE), parse_handle(DESTINATION), SESSION,
                              PayloadType.NORMAL, encode_cbor({1, 2}))[LENGTH_PREFIX.size :]
    assert decode_data_header(frame) == (
        parse_handle(SOURCE), parse_handle(DESTINATION), SESSION, PayloadType.NORMAL
    )
    with pytest.raises(ProtocolError):
        decode_payload(frame[DATA_HEADER.size :])


def test_stated_no_such_service_message_uses_the_text_form() -> None:
    assert '["nosuchservice", "NoSuchService", "no service :02000099"]' in doc_text()
    node = Node(2, Clock(), b"s")
    errors: list[Any] = []
    node.call(parse_handle(":02000099"), None).addErrback(errors.append)
    (failure,) = errors
    assert failure.check(NoSuchService)
    assert str(failure.value) == f"no service {format_handle(parse_handle(':02000099'))}"
    assert str(failure.value) == "no service :02000099"
