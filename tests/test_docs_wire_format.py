"""docs/wire-format.md against the code: every marked example and table, byte for byte.

Each example sits in a fenced block after an ``<!-- example: NAME -->`` marker; each
checked table after a ``<!-- table: NAME -->`` marker. A hex dump line is hex byte pairs
separated by single spaces, then (after two or more spaces) an annotation. A Python
example is run and its functions checked against real handshakes and records. Stated facts
(constants, abort reasons, the type-byte check, error messages) are checked against what
the code does.
"""

from __future__ import annotations

import hashlib
import inspect
import re
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest.mock import Mock

import attrs
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from skyproto import auth, tap
from skyproto.address import format_handle, parse_handle
from skyproto.endpoints import harbor_tcp_port
from skyproto.errors import ConfigurationError, NoSuchService, ProtocolError
from skyproto.harbor.handshake import (
    _IDENTITIES,
    _TIMINGS,
    ACCEPTOR,
    DIALER,
    LinkHandshake,
    PeerIdentity,
)
from skyproto.harbor.handshake import KDF_PROTOCOL as HARBOR_KDF
from skyproto.harbor.link import HarborLink, LinkConfig
from skyproto.harbor.messages import (
    HARBOR_CODEC,
    PROTOCOL_VERSION,
    Heartbeat,
    LinkChallenge,
    LinkHello,
    LinkProof,
    LinkRefused,
)
from skyproto.interfaces import IMasterListener
from skyproto.mapper import client as mapper_client
from skyproto.mapper import epmd
from skyproto.mapper import server as mapper_server
from skyproto.mapper import table as mapper_table
from skyproto.mapper.epmd import (
    NODE_TYPE_NORMAL,
    Alive2Request,
    Alive2XResponse,
    NamesRequest,
    Port2Error,
    Port2Response,
    PortPlease2Request,
    encode_names_reply,
    encode_reply,
    encode_request,
)
from skyproto.mapper.extra import MapperExtra, decode_extra, encode_extra
from skyproto.master import client as master_client
from skyproto.master import server as master_server
from skyproto.master.client import JoinInfo, MasterClient, MasterClientProtocol
from skyproto.master.handshake import KDF_PROTOCOL as MASTER_KDF
from skyproto.master.handshake import MasterHandshake, NodeHandshake
from skyproto.master.messages import _TRANSCRIPT_TAIL as _MASTER_TAIL
from skyproto.master.messages import (
    MASTER_CODEC,
    MASTER_ROLE,
    NODE_ROLE,
    BindName,
    GetTable,
    Join,
    LookupName,
    MasterChallenge,
    MasterHeartbeat,
    MasterHello,
    Observe,
    Refused,
    Reply,
    ServiceInfo,
    TableReply,
    Welcome,
)
from skyproto.master.messages import PROTOCOL_VERSION as MASTER_VERSION
from skyproto.master.messages import transcript as master_transcript
from skyproto.master.registry import (
    GroupJoined,
    GroupLeft,
    HarborJoined,
    HarborLeft,
    HarborRecord,
    InMemoryRegistry,
    NameBound,
    NameUnbound,
    RegistryRefusal,
    Table,
)
from skyproto.master.server import MasterService
from skyproto.node import host_mapper as mapping
from skyproto.node.host_mapper import HostMapper
from skyproto.node.node import Node
from skyproto.session import SESSION_MAX as TABLE_SESSION_MAX
from skyproto.wire import seal
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
from skyproto.wire.framing import DEFAULT_MAX_FRAME, LENGTH_PREFIX, WRITE_CHUNK
from skyproto.wire.heartbeat import HeartbeatTiming
from skyproto.wire.seal import (
    PUBLIC_KEY_SIZE,
    RECORD_OVERHEAD,
    SEALED,
    TAG_SIZE,
    Opener,
    SessionKeys,
)

from .sealed import MasterNodeSide, Wire, master_challenge

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
    # the very bytes HarborLink hands to send_frame for a heartbeat of an idle node
    link = HarborLink(LinkConfig(harbor=1, incarnation=1, secret=b"s-sixteen-bytes!"),
                      Mock(), Clock(), dialer=True, load=lambda: 0)
    sent: list[bytes] = []
    link.send_frame = sent.append  # type: ignore[assignment,method-assign]
    link.up = True
    link._beat()
    assert sent == [dumped[4:]]
    assert HARBOR_CODEC.decode(dumped[5:]) == Heartbeat(0)
    assert any("Heartbeat" in note for note in notes)


# --- the handshake, the key schedule and sealed records (section 7) ------------------------

SECRET = b"correct horse battery staple"
#: the example handshake of section 7: harbor 1 dials harbor 2
DIALER_SEED = bytes(range(32))
ACCEPTOR_SEED = bytes(range(32, 64))
INCARNATIONS = {1: 1_700_000_000_000_000, 2: 1_700_000_000_000_001, 3: 1}


def doc_functions(*names: str) -> dict[str, Any]:
    """The Python examples ``names``, run in one namespace (later ones use earlier ones)."""
    namespace: dict[str, Any] = {}
    for name in names:
        exec(compile(example_block(name, "python"), f"{DOC.name}:{name}", "exec"), namespace)
    return namespace


def example_handshake() -> tuple[LinkHello, LinkChallenge, LinkProof, PeerIdentity,
                                 PeerIdentity]:
    """The handshake of the section 7 examples, between the two pure machines."""
    dialer = LinkHandshake(SECRET, 1, INCARNATIONS[1], dialer=True, expect_harbor=2,
                           seed=DIALER_SEED)
    acceptor = LinkHandshake(SECRET, 2, INCARNATIONS[2], dialer=False, seed=ACCEPTOR_SEED)
    hello = dialer.start()
    assert hello is not None
    (challenge,) = acceptor.receive(hello).send
    assert isinstance(challenge, LinkChallenge)
    step = dialer.receive(challenge)
    (answer,) = step.send
    assert isinstance(answer, LinkProof) and step.peer is not None
    peer = acceptor.receive(answer).peer
    assert peer is not None
    return hello, challenge, answer, step.peer, peer


def test_proof_example_matches_a_real_handshake() -> None:
    ns = doc_functions("key-schedule", "proof")
    transcript, proof = ns["transcript"], ns["proof"]
    hello, challenge, answer, dialer_view, acceptor_view = example_handshake()
    t = transcript(hello.key, challenge.key, hello.version, 1, INCARNATIONS[1],
                   2, INCARNATIONS[2], (1.0, 3.0), (1.0, 3.0))
    assert len(t) == 116
    confirm, _, _ = ns["session_keys"](ns["cluster_key"](SECRET),
                                       ns["shared"](DIALER_SEED, challenge.key), b"harbor", t)
    assert challenge.proof == proof(confirm, b"harbor-acceptor", t)
    assert answer.proof == proof(confirm, b"harbor-dialer", t)
    assert acceptor_view == PeerIdentity(1, INCARNATIONS[1])
    assert dialer_view == PeerIdentity(2, INCARNATIONS[2])


def test_proof_constants_are_the_codes() -> None:
    text = doc_text()
    for fmt in (_IDENTITIES.format, _TIMINGS.format, _MASTER_TAIL.format):
        assert f'"{fmt}"' in text, fmt
    for role in (DIALER, ACCEPTOR):
        assert f'b"{role.decode()}"' in text, role
    assert len(auth.prove(b"s", DIALER, b"t")) == auth.PROOF_SIZE


def test_key_schedule_example_is_what_both_sides_derive() -> None:
    text = doc_text()
    ns = doc_functions("key-schedule")
    assert ns["cluster_key"](SECRET) == auth.cluster_key(SECRET)
    assert f'salt=b"{auth.SCRYPT_SALT.decode()}", n=2**14, r=8, p=1' in text
    assert (auth.SCRYPT_N, auth.SCRYPT_R) == (2**14, 8)
    assert f'b"{seal.KDF_LABEL.decode()}"' in text
    for label in (HARBOR_KDF, MASTER_KDF):
        assert f'`b"{label.decode()}"`' in text
    assert (HARBOR_KDF, MASTER_KDF) == (b"harbor", b"master")

    hello, challenge, _, dialer_view, acceptor_view = example_handshake()
    assert hello.key == ns["public_key"](DIALER_SEED)
    assert challenge.key == ns["public_key"](ACCEPTOR_SEED)
    shared = ns["shared"](DIALER_SEED, challenge.key)
    assert shared == ns["shared"](ACCEPTOR_SEED, hello.key)
    t = doc_functions("proof")["transcript"](
        hello.key, challenge.key, PROTOCOL_VERSION, 1, INCARNATIONS[1], 2, INCARNATIONS[2],
        (1.0, 3.0), (1.0, 3.0))
    derived = ns["session_keys"](auth.cluster_key(SECRET), shared, b"harbor", t)
    for view in (dialer_view, acceptor_view):
        assert view.keys is not None
        assert (view.keys.confirm, view.keys.initiator, view.keys.responder) == derived

    # the worked example, and what it says it was made from
    dumped, notes = hex_dump("seal-keys")
    assert dumped.hex(" ") == (auth.cluster_key(SECRET) + hello.key + challenge.key
                               + hashlib.sha256(t).digest() + derived[1] + derived[2]).hex(" ")
    labels = [note for note in notes if note]
    assert [label.split()[0] for label in labels] == [
        "cluster", "key_d", "key_a", "SHA-256", "initiator:", "responder:"]
    flat = " ".join(text.split())
    assert f"the secret `{SECRET.decode()}`" in flat
    assert "the dialer's seed `00 01 02 .. 1f`" in flat
    assert "the acceptor's seed `20 21 22 .. 3f`" in flat
    assert DIALER_SEED.hex(" ").startswith("00 01 02") and DIALER_SEED[-1] == 0x1F
    assert ACCEPTOR_SEED.hex(" ").startswith("20 21 22") and ACCEPTOR_SEED[-1] == 0x3F
    for harbor in (1, 2):
        assert f"harbor {harbor} (incarnation {INCARNATIONS[harbor]})" in flat


def test_stated_secret_minimum() -> None:
    flat = " ".join(doc_text().split())
    assert "one shorter than `MIN_SECRET_SIZE` (16) bytes is refused at start-up" in flat
    auth.check_secret(b"x" * auth.MIN_SECRET_SIZE)
    with pytest.raises(ConfigurationError):
        auth.check_secret(b"x" * (auth.MIN_SECRET_SIZE - 1))


def frames_of(data: bytes) -> list[Any]:
    """The harbor control messages in plain frames."""
    return [HARBOR_CODEC.decode(body[1:]) for body in split_frames(data)]


def make_link(harbor: int, dialer: bool, seed: bytes | None = None,
                **options: Any) -> tuple[HarborLink, StringTransport, Clock]:
    """A real HarborLink on a StringTransport; ``seed`` fixes its X25519 key."""
    clock = Clock()
    config = LinkConfig(harbor=harbor, incarnation=INCARNATIONS[harbor], secret=SECRET,
                        max_frame=options.pop("max_frame", DEFAULT_MAX_FRAME))
    link = HarborLink(config, Mock(), clock, dialer=dialer, **options)
    if seed is not None:
        link._handshake = attrs.evolve(link._handshake, seed=seed)
    transport = StringTransport()
    link.makeConnection(transport)
    return link, transport, clock


def control_frame(message: object) -> bytes:
    body = b"\x00" + HARBOR_CODEC.encode(message)
    return LENGTH_PREFIX.pack(len(body)) + body


def up_acceptor(max_frame: int = DEFAULT_MAX_FRAME) -> tuple[HarborLink, StringTransport,
                                                               SessionKeys]:
    """An acceptor link that a hand-driven dialer brought up: sealed both ways."""
    link, transport, _ = make_link(2, False, ACCEPTOR_SEED, max_frame=max_frame)
    dialer = LinkHandshake(SECRET, 1, INCARNATIONS[1], dialer=True, seed=DIALER_SEED)
    hello = dialer.start()
    link.dataReceived(control_frame(hello))
    (challenge,) = frames_of(transport.value())
    transport.clear()
    step = dialer.receive(challenge)
    link.dataReceived(control_frame(step.send[0]))
    assert link.up and link.sealed and step.peer is not None and step.peer.keys is not None
    return link, transport, step.peer.keys


def test_sealed_record_example_is_what_a_link_sends() -> None:
    text = doc_text()
    rows = table_rows("sealed-record")
    assert [row[:2] for row in rows] == [
        ["0", "4"], ["4", "1"], ["5", f"length - {RECORD_OVERHEAD}"],
        [f"length - {TAG_SIZE - LENGTH_PREFIX.size}", str(TAG_SIZE)]]
    assert rows[1][2] == f"kind: {SEALED} (`SEALED`)"
    assert RECORD_OVERHEAD == 1 + TAG_SIZE
    assert f"`RECORD_OVERHEAD` ({RECORD_OVERHEAD})" in text

    # A real dialing link, with the example's seed, brought up by the example's acceptor.
    link, transport, clock = make_link(1, True, DIALER_SEED, expect_harbor=2)
    acceptor = LinkHandshake(SECRET, 2, INCARNATIONS[2], dialer=False, seed=ACCEPTOR_SEED)
    (hello,) = frames_of(transport.value())
    transport.clear()
    (challenge,) = acceptor.receive(hello).send
    link.dataReceived(control_frame(challenge))
    (answer,) = frames_of(transport.value())  # LinkProof: still in the clear
    assert isinstance(answer, LinkProof) and link.up and link.sealed
    transport.clear()
    clock.advance(link.timing.interval)  # its first write after LinkProof: a heartbeat
    record = transport.value()

    dumped, notes = hex_dump("sealed-record")
    assert dumped.hex(" ") == record.hex(" ")
    heartbeat = b"\x00" + HARBOR_CODEC.encode(Heartbeat(0))
    beat = LENGTH_PREFIX.pack(len(heartbeat)) + heartbeat
    assert f"`{beat.hex(' ')}`" in text
    initiator = example_handshake()[3].keys.initiator  # type: ignore[union-attr]
    ns = doc_functions("seal")
    assert ns["seal"](initiator, 0, beat) == record
    assert AESGCM(initiator).decrypt(bytes(12), record[5:], None) == beat  # 12 zero bytes
    transport.clear()
    clock.advance(link.timing.interval)
    assert transport.value() == ns["seal"](initiator, 1, beat)  # the counter goes on
    annotations = "\n".join(notes)
    for word in ("SEALED", "initiator", "tag", "25 bytes"):
        assert word in annotations, word


def test_frames_written_together_share_one_record() -> None:
    link, transport, keys = up_acceptor()
    frames = [control_frame(Heartbeat()), control_frame(Heartbeat())]
    link.write_frames(frames)
    (record,) = split_frames(transport.value())
    assert record[0] == SEALED
    assert keys.opener(True).open(record) == b"".join(frames)
    assert f"`WRITE_CHUNK`, {WRITE_CHUNK // 1024} KiB" in " ".join(doc_text().split())


def test_stated_record_drops() -> None:
    documented = {row[1].strip("`") for row in table_rows("record-drops")}
    beat = control_frame(Heartbeat())
    reasons = set()
    for make in (
        lambda keys: keys.sealer(False).seal(beat),  # sealed with the other direction's key
        lambda keys: LENGTH_PREFIX.pack(16) + bytes([SEALED]) + bytes(15),
        lambda keys: beat,
        lambda keys: keys.sealer(True).seal(b"\x00\x00"),
        lambda keys: keys.sealer(True).seal(LENGTH_PREFIX.pack(5) + b"\x00"),
    ):
        link, transport, keys = up_acceptor()
        link.dataReceived(make(keys))
        assert link.drop_reason is not None
        reasons.add(link.drop_reason)
    assert reasons == documented

    # a plain frame after a record was opened is dropped just the same
    link, _, keys = up_acceptor()
    sealer = keys.sealer(True)
    link.dataReceived(sealer.seal(beat))
    assert link.drop_reason is None
    link.dataReceived(beat)
    reason: str | None = link.drop_reason  # (mypy: the assert above narrowed it)
    assert reason == "a plain frame on a sealed connection"

    # the one exception: the acceptor refusing LinkProof, in the clear, to a sealed dialer
    link, transport, _ = make_link(1, True, DIALER_SEED, expect_harbor=2)
    acceptor = LinkHandshake(SECRET, 2, INCARNATIONS[2], dialer=False, seed=ACCEPTOR_SEED)
    (challenge,) = acceptor.receive(frames_of(transport.value())[0]).send
    link.dataReceived(control_frame(challenge))
    assert link.sealed
    link.dataReceived(control_frame(LinkRefused("authentication failed")))
    assert link.drop_reason is None and transport.disconnecting  # closed, not dropped

    # the limits: a frame inside a record, and the record itself
    text = " ".join(doc_text().split())
    assert f"`max_frame` + {2 * LENGTH_PREFIX.size + WRITE_CHUNK + RECORD_OVERHEAD}" in text
    link, _, keys = up_acceptor(max_frame=1024)
    link.dataReceived(keys.sealer(True).seal(LENGTH_PREFIX.pack(1025) + bytes(1025)))
    assert link.drop_reason == "frame of 1025 bytes exceeds the limit of 1024 bytes"
    longest = 1024 + 2 * LENGTH_PREFIX.size + WRITE_CHUNK + RECORD_OVERHEAD
    link, _, _ = up_acceptor(max_frame=1024)
    link.dataReceived(LENGTH_PREFIX.pack(longest) + bytes([SEALED]))
    assert link.drop_reason is None  # waits for the rest
    link, _, _ = up_acceptor(max_frame=1024)
    link.dataReceived(LENGTH_PREFIX.pack(longest + 1) + bytes([SEALED]))
    assert link.drop_reason == (f"sealed record of {longest + 1} bytes exceeds the limit of "
                                f"{longest} bytes")
    assert "`frame of N bytes exceeds the limit of M bytes`, M being `max_frame`" in text


def test_plain_frames_never_look_sealed() -> None:
    assert "0 or 1 (harbor) or `0x80`..`0x9f`" in doc_text()
    assert SEALED not in {kind.value for kind in FrameKind}
    for cls, _ in MASTER_CODEC._by_code.values():
        assert 1 + len(attrs.fields(cls)) <= 0x1F  # a CBOR array head 0x80..0x9f


def test_stated_key_faults() -> None:
    text = doc_text()
    for key, reason in ((b"short", "protocol error: key of 5 bytes, expected 32"),
                        (bytes(32), "protocol error: the peer's key is not a usable X25519 "
                                    "public key")):
        assert f"`{reason}`" in " ".join(text.split())
        link, transport, _ = make_link(2, False)
        link.dataReceived(control_frame(LinkHello(PROTOCOL_VERSION, 1, 1, key)))
        assert link.drop_reason == reason
        assert transport.value() == b""  # aborted: no LinkRefused


def test_stated_link_refusals() -> None:
    documented = {row[1].strip("`") for row in table_rows("link-refusals")}
    refusals = []
    dialer = LinkHandshake(SECRET, 1, INCARNATIONS[1], dialer=True, seed=DIALER_SEED)
    hello = dialer.start()
    assert hello is not None
    for sent in (attrs.evolve(hello, version=PROTOCOL_VERSION - 1),
                 attrs.evolve(hello, heartbeat_interval=0.0),
                 attrs.evolve(hello, harbor=256),
                 attrs.evolve(hello, harbor=2),
                 hello):
        link, transport, _ = make_link(2, False)
        link.dataReceived(control_frame(sent))
        if sent is hello:  # a wrong proof, after a good hello
            transport.clear()
            link.dataReceived(control_frame(LinkProof(bytes(32))))
        (refused,) = frames_of(transport.value())
        assert isinstance(refused, LinkRefused) and transport.disconnecting
        refusals.append(refused.reason)
    for harbor, expect_incarnation in ((3, None), (2, 5)):
        link, transport, _ = make_link(1, True, expect_harbor=2,
                                         expect_incarnation=expect_incarnation)
        (hello,) = frames_of(transport.value())
        transport.clear()
        acceptor = LinkHandshake(SECRET, harbor, INCARNATIONS[harbor], dialer=False)
        link.dataReceived(control_frame(acceptor.receive(hello).send[0]))
        (refused,) = frames_of(transport.value())
        assert isinstance(refused, LinkRefused)
        refusals.append(refused.reason)
    assert set(refusals) == documented


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
    config = LinkConfig(harbor=1, incarnation=1, secret=b"s-sixteen-bytes!")
    actual = {
        "DEFAULT_MAX_FRAME": DEFAULT_MAX_FRAME,
        "MAX_DEPTH": MAX_DEPTH,
        "SESSION_MAX": SESSION_MAX,
        "PROTOCOL_VERSION": PROTOCOL_VERSION,
        "PUBLIC_KEY_SIZE": PUBLIC_KEY_SIZE,
        "PROOF_SIZE": auth.PROOF_SIZE,
        "MIN_SECRET_SIZE": auth.MIN_SECRET_SIZE,
        "SCRYPT_N": auth.SCRYPT_N,
        "SCRYPT_R": auth.SCRYPT_R,
        "SEALED": SEALED,
        "TAG_SIZE": TAG_SIZE,
        "RECORD_OVERHEAD": RECORD_OVERHEAD,
        "WRITE_CHUNK": WRITE_CHUNK,
        "heartbeat_interval": config.heartbeat_interval,
        "heartbeat_timeout": config.heartbeat_timeout,
        "handshake_timeout": config.handshake_timeout,
    }
    assert TABLE_SESSION_MAX == SESSION_MAX
    assert auth.NONCE_SIZE == PUBLIC_KEY_SIZE  # the seed: auth.new_nonce()
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
    link = HarborLink(LinkConfig(harbor=1, incarnation=1, secret=b"s-sixteen-bytes!"), Mock(),
                      Clock(), dialer=False)
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
    assert "a value above `max(PayloadType)` (2) is refused" in text
    assert max(PayloadType) == 2
    assert "(`unknown payload type N`)" in text
    for ptype in PayloadType:
        frame = encode_data_frame(1 << 24 | 2, 2 << 24 | 2, 0, ptype, encode_cbor(None))
        assert decode_data_header(frame[LENGTH_PREFIX.size :])[3] == ptype
    frame = encode_data_frame(1 << 24 | 2, 2 << 24 | 2, 0, 3, encode_cbor(None))
    with pytest.raises(ProtocolError, match=r"^unknown payload type 3$"):
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
    node = Node(2, Clock(), b"s-sixteen-bytes!")
    errors: list[Any] = []
    node.call(parse_handle(":02000099"), None).addErrback(errors.append)
    (failure,) = errors
    assert failure.check(NoSuchService)
    assert str(failure.value) == f"no service {format_handle(parse_handle(':02000099'))}"
    assert str(failure.value) == "no service :02000099"


# --- the master protocol (sections 11 to 14) -----------------------------------------------

MASTER_SECRET = SECRET
OTHER_SECRET = b"another cluster's secret"
ALPHA_INCARNATION = 1_700_000_000_000_000
NODE_SEED = bytes(range(64, 96))
MASTER_SEED = bytes(range(96, 128))


def split_frames(data: bytes) -> list[bytes]:
    """The bodies of the length-prefixed frames in ``data`` (which must hold whole frames)."""
    bodies = []
    while data:
        (length,) = LENGTH_PREFIX.unpack_from(data)
        bodies.append(data[LENGTH_PREFIX.size : LENGTH_PREFIX.size + length])
        data = data[LENGTH_PREFIX.size + length :]
    return bodies


def master_frame(message: object) -> bytes:
    body = MASTER_CODEC.encode(message)
    return LENGTH_PREFIX.pack(len(body)) + body


class MasterPeer:
    """One connection to a real MasterService, on a StringTransport and a Clock, driven by
    hand: it seals after the challenge as a node does, under keys from ``secret``."""

    def __init__(self, service: MasterService | None = None, secret: bytes = MASTER_SECRET,
                 seed: bytes | None = None) -> None:
        self.service = service or MasterService(InMemoryRegistry(), Clock(), MASTER_SECRET)
        self.connection = self.service.buildProtocol(None)
        self.transport = StringTransport()
        self.connection.makeConnection(self.transport)
        self.side = MasterNodeSide(secret, seed)
        self.wire = Wire(MASTER_CODEC)
        #: what the last received() read was: sealed records, or plain frames
        self.sealed_answer = False

    @property
    def clock(self) -> Clock:
        return self.service.clock  # type: ignore[return-value]

    @property
    def key(self) -> bytes:
        return self.side.ephemeral.public

    def send(self, message: object) -> None:
        """Send ``message``, sealed once the challenge has been answered."""
        self.connection.dataReceived(self.wire.encode(message))

    def send_plain(self, message: object) -> None:
        self.connection.dataReceived(master_frame(message))

    def received(self) -> list[Any]:
        data = self.transport.value()
        self.transport.clear()
        self.sealed_answer = data[4:5] == bytes([SEALED])
        return self.wire.decode(data)

    def challenge(self) -> MasterChallenge:
        """Hello, then the challenge; seals this side, as a node does."""
        self.send(self.side.hello())
        (challenge,) = self.received()
        assert isinstance(challenge, MasterChallenge) and not self.sealed_answer
        keys, _ = self.side.answer(challenge)
        self.wire.seal(keys, initiator=True)
        return challenge

    def proof(self, challenge: MasterChallenge) -> bytes:
        return self.side.answer(challenge)[1]

    def join(self, harbor: int, names: dict[str, int] | None = None,
             node: str = "alpha@db1") -> list[Any]:
        challenge = self.challenge()
        self.send(Join(self.proof(challenge), harbor, ALPHA_INCARNATION, node,
                       "tcp:127.0.0.1:7001", names or {}, 1.0, 3.0))
        return self.received()


def dropped_reasons(events: list[LogEvent]) -> list[str]:
    found = []
    for event in events:
        match = re.match(r"dropping connection from .*?: (.*)$", formatEvent(event))
        if match:
            found.append(match.group(1))
    return found


def test_master_frame_example_is_what_the_master_pushes() -> None:
    dumped, notes = hex_dump("master-frame")
    event = NameBound(7, "SIMPLEDB", parse_handle(":01000002"))
    assert dumped.hex(" ") == master_frame(event).hex(" ")
    # no kind byte: the body is the CBOR message itself
    assert MASTER_CODEC.decode(dumped[LENGTH_PREFIX.size :]) == event
    # the very frame MasterService.push writes to a joined node, in one sealed record
    peer = MasterPeer()
    peer.join(1)
    peer.service.push((event,))
    record = peer.transport.value()
    assert record[LENGTH_PREFIX.size] == SEALED
    assert peer.wire.opener is not None
    assert peer.wire.opener.open(record[LENGTH_PREFIX.size :]) == dumped
    assert len(record) == LENGTH_PREFIX.size + RECORD_OVERHEAD + len(dumped)
    assert f"4 + 1 + {len(dumped)} + {TAG_SIZE} = {len(record)} bytes" in doc_text()
    annotations = "\n".join(notes)
    for text in ("NameBound", "22", "sequence 7", '"SIMPLEDB"', ":01000002", "no kind byte"):
        assert text in annotations, f"the master-frame annotations should mention {text}"


def test_stated_master_heartbeat_bytes() -> None:
    text = doc_text()
    beat = master_frame(MasterHeartbeat())
    assert f"`{beat.hex(' ')}`" in text
    assert f"`{beat[LENGTH_PREFIX.size:].hex(' ')}`" in text
    assert master_server._BEAT == master_client._BEAT == beat[LENGTH_PREFIX.size :]
    # accepted in the clear before the hello
    peer = MasterPeer()
    peer.send_plain(MasterHeartbeat())
    peer.challenge()
    assert peer.connection.drop_reason is None


def test_master_proof_example_matches_a_real_handshake() -> None:
    ns = doc_functions("key-schedule", "proof", "master-proof", "seal")
    transcript, proof, session_keys = ns["master_transcript"], ns["proof"], ns["session_keys"]
    text = doc_text()
    for role in (NODE_ROLE, MASTER_ROLE):
        assert f'b"{role.decode()}"' in text, role

    # the two pure machines, with fixed seeds
    node = NodeHandshake(MASTER_SECRET, HeartbeatTiming(), JoinInfo(
        1, ALPHA_INCARNATION, "alpha@db1", "tcp:127.0.0.1:7001"), seed=NODE_SEED)
    master = MasterHandshake(MASTER_SECRET, HeartbeatTiming(2.0, 6.0), seed=MASTER_SEED)
    hello = node.start()
    assert hello.key == ns["public_key"](NODE_SEED)
    answered = master.receive(hello)
    (challenge,) = answered.send
    assert isinstance(challenge, MasterChallenge)
    assert challenge.key == ns["public_key"](MASTER_SEED)
    t = transcript(hello.key, challenge.key, MASTER_VERSION, 2.0, 6.0)
    assert len(t) == 82
    assert t == master_transcript(MASTER_VERSION, hello.key, challenge.key, 2.0, 6.0)
    keys = session_keys(ns["cluster_key"](MASTER_SECRET),
                        ns["shared"](NODE_SEED, challenge.key), b"master", t)
    assert challenge.proof == proof(keys[0], b"master-server", t)
    step = node.receive(challenge)
    (join,) = step.sealed
    assert isinstance(join, Join) and join.proof == proof(keys[0], b"master-node", t)
    for derived in (answered.keys, step.keys):
        assert derived is not None
        assert (derived.confirm, derived.initiator, derived.responder) == keys

    # a node made of the doc's functions alone, against a real MasterService
    service = MasterService(InMemoryRegistry(), Clock(), MASTER_SECRET)
    for message, expected in (
        (lambda c, t: Join(c, 1, ALPHA_INCARNATION, "alpha@db1", "tcp:127.0.0.1:7001", {},
                           1.0, 3.0), Welcome),
        (lambda c, t: Observe(c, 1.0, 3.0), None),
    ):
        peer = MasterPeer(service)
        peer.send_plain(MasterHello(MASTER_VERSION, ns["public_key"](NODE_SEED)))
        (challenge,) = [MASTER_CODEC.decode(b) for b in split_frames(peer.transport.value())]
        peer.transport.clear()
        t = transcript(ns["public_key"](NODE_SEED), challenge.key, MASTER_VERSION,
                       challenge.heartbeat_interval, challenge.heartbeat_timeout)
        confirm, initiator, responder = session_keys(
            ns["cluster_key"](MASTER_SECRET), ns["shared"](NODE_SEED, challenge.key),
            b"master", t)
        assert challenge.proof == proof(confirm, b"master-server", t)
        sent = message(proof(confirm, b"master-node", t), t)
        peer.connection.dataReceived(ns["seal"](initiator, 0, master_frame(sent)))
        peer.wire.opener = Opener(responder)
        answers = peer.received()
        if expected is None:
            assert answers == []  # nothing answers Observe
            assert peer.connection.state == "observing"
        else:
            assert isinstance(answers[0], Welcome) and answers[0].harbor == 1


def test_every_master_message_is_documented() -> None:
    rows = {int(row[0]): row for row in table_rows("master-messages")}
    registered = MASTER_CODEC._by_code
    assert set(rows) == set(registered)
    for code, (cls, _) in registered.items():
        row = rows[code]
        assert row[1] == f"`{cls.__name__}`", f"code {code} is {cls.__name__}, doc: {row[1]}"
        assert re.findall(r"`(\w+)`", row[2]) == [f.name for f in attrs.fields(cls)]
    for code, cls in ((20, HarborJoined), (21, HarborLeft), (22, NameBound), (23, NameUnbound),
                      (24, GroupJoined), (25, GroupLeft)):
        assert registered[code][0] is cls  # the registry's own classes


def test_nested_master_structures_are_documented() -> None:
    rows = {row[0]: row for row in table_rows("master-structs")}
    assert set(rows) == {"`HarborRecord`", "`Table`", "`ServiceInfo`"}
    for cls in (HarborRecord, Table, ServiceInfo):
        row = rows[f"`{cls.__name__}`"]
        fields = [f.name for f in attrs.fields(cls)]
        assert re.findall(r"`(\w+)`", row[1]) == fields
        assert row[2] == f"array of {len(fields)} items"
    record = HarborRecord(1, "alpha@db1", "tcp:127.0.0.1:7001", ALPHA_INCARNATION, 1.5)
    table = Table(3, (record,), {"SIMPLEDB": 0x01000002}, {"workers": (0x01000002, 0x01000003)})
    assert decode_cbor(MASTER_CODEC.encode(TableReply(1, table))) == [
        12, 1, [3, [[1, "alpha@db1", "tcp:127.0.0.1:7001", ALPHA_INCARNATION, 1.5]],
                {"SIMPLEDB": 0x01000002}, {"workers": [0x01000002, 0x01000003]}], "memory"]
    assert MASTER_CODEC.decode(MASTER_CODEC.encode(TableReply(1, table))).table == table


def documented_values(marker: str) -> dict[str, str]:
    return {re.sub(r"`", "", row[0]): row[1] for row in table_rows(marker)}


def defaults(function: Any) -> dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_master_constants_table() -> None:
    service, client = defaults(MasterService.__init__), defaults(MasterClient.__init__)
    actual: dict[str, Any] = {"master.messages.PROTOCOL_VERSION": MASTER_VERSION}
    for name in ("heartbeat_interval", "heartbeat_timeout", "handshake_timeout", "auto_grace"):
        actual[f"MasterService.{name}"] = service[name]
    for name in ("heartbeat_interval", "heartbeat_timeout", "request_timeout",
                 "connect_timeout", "retry_initial", "retry_max"):
        actual[f"MasterClient.{name}"] = client[name]
    documented = documented_values("master-constants")
    assert set(documented) == set(actual)
    for name, value in actual.items():
        assert type(value)(documented[name]) == value, name
    options = tap.MasterOptions()
    options.parseOptions([])
    assert options["heartbeat-interval"] == service["heartbeat_interval"]
    assert options["heartbeat-timeout"] == service["heartbeat_timeout"]
    assert options["listen"] == "tcp:2013:interface=127.0.0.1"
    assert defaults(Node.join_master)["request_timeout"] == client["request_timeout"]


def test_stated_master_refusals_are_what_the_master_sends() -> None:
    documented = {row[1].strip("`") for row in table_rows("master-refusals")}
    refusals = []

    peer = MasterPeer()
    peer.send(MasterHello(MASTER_VERSION + 1, peer.key))
    refusals.extend(peer.received())
    assert peer.transport.disconnecting and not peer.sealed_answer  # in the clear

    # a node of an older version hears why, in the clear
    older = MasterPeer()
    older.send_plain(MasterHello(MASTER_VERSION - 1, bytes(range(32))))
    (refused,) = older.received()
    assert isinstance(refused, Refused) and not older.sealed_answer
    assert refused.reason.startswith(f"protocol version {MASTER_VERSION - 1} is not supported")

    peer = MasterPeer()
    peer.challenge()
    peer.send(Join(bytes(32), 1, ALPHA_INCARNATION, "alpha@db1", "tcp:127.0.0.1:7001", {},
                   1.0, 3.0))
    refusals.extend(peer.received())
    assert peer.sealed_answer  # after the challenge: sealed

    for endpoint, interval in (("tcp:127.0.0.1:7001", 0.0), ("", 1.0)):
        peer = MasterPeer()
        challenge = peer.challenge()
        peer.send(Join(peer.proof(challenge), 1, ALPHA_INCARNATION, "alpha@db1", endpoint, {},
                       interval, 3.0))
        refusals.extend(peer.received())

    refusals.extend(MasterPeer().join(256))

    service = MasterService(InMemoryRegistry(), Clock(), MASTER_SECRET)
    assert isinstance(MasterPeer(service).join(1)[0], Welcome)
    refusals.extend(MasterPeer(service).join(1, node="impostor@db2"))

    registry = InMemoryRegistry()
    for harbor in range(1, 256):
        registry.join(harbor, f"n{harbor}@db1", "tcp:127.0.0.1:1", 1, {}, 0.0)
    no_grace = MasterService(registry, Clock(), MASTER_SECRET, auto_grace=0)
    refusals.extend(MasterPeer(no_grace).join(0))

    assert all(isinstance(r, Refused) for r in refusals), refusals
    assert {r.reason for r in refusals} == documented


def test_stated_master_drops_are_what_the_master_logs(events: list[LogEvent]) -> None:
    rows = table_rows("master-drops")

    def late(peer: MasterPeer) -> None:
        peer.clock.advance(5)  # nothing sent

    def after_challenge(send: Callable[[MasterPeer, MasterChallenge], None],
                        ) -> Callable[[MasterPeer], None]:
        return lambda peer: send(peer, peer.challenge())

    def join(peer: MasterPeer, challenge: MasterChallenge) -> Join:
        return Join(peer.proof(challenge), 1, ALPHA_INCARNATION, "alpha@db1",
                    "tcp:127.0.0.1:7001", {}, 1.0, 3.0)

    def observe_then_bind(peer: MasterPeer, challenge: MasterChallenge) -> None:
        peer.send(Observe(peer.proof(challenge), 1.0, 3.0))
        peer.send(BindName(1, "SIMPLEDB", 0x01000002))

    cases: list[tuple[Callable[[MasterPeer], None], bytes]] = [
        (late, MASTER_SECRET),
        (lambda peer: peer.send(MasterHello(MASTER_VERSION, b"short")), MASTER_SECRET),
        (lambda peer: peer.send(MasterHello(MASTER_VERSION, bytes(32))), MASTER_SECRET),
        (lambda peer: peer.send(GetTable(1)), MASTER_SECRET),
        (after_challenge(lambda peer, c: peer.send(MasterHello(MASTER_VERSION, peer.key))),
         MASTER_SECRET),
        (after_challenge(lambda peer, c: peer.send_plain(join(peer, c))), MASTER_SECRET),
        (after_challenge(lambda peer, c: peer.send(join(peer, c))), OTHER_SECRET),
        (after_challenge(observe_then_bind), MASTER_SECRET),
    ]
    assert len(cases) == len(rows)
    for (case, secret), row in zip(cases, rows, strict=True):
        events.clear()
        peer = MasterPeer(secret=secret)
        case(peer)
        assert dropped_reasons(events) == [row[1].strip("`")], row
        counted = row[2].strip("`") if row[2].startswith("`") else None
        assert peer.service.preauth_failures == Counter([counted] if counted else []), row
    assert "no handshake within 5 s" in rows[0][1]  # MasterService.handshake_timeout

    # the node with another secret gives up on the challenge: the master only counts it
    events.clear()
    peer = MasterPeer(secret=OTHER_SECRET)
    peer.challenge()
    peer.connection.connectionLost(Failure(ConnectionDone()))
    assert dropped_reasons(events) == []
    assert peer.service.preauth_failures == Counter(["closed before the handshake"])
    assert "the master only counts `closed before the handshake`" in " ".join(
        doc_text().split())


def test_stated_silence_reasons(events: list[LogEvent]) -> None:
    text = doc_text()
    peer = MasterPeer()
    peer.join(2)
    peer.clock.advance(3.0)
    client = MasterClient(Clock(), "tcp:127.0.0.1:2013", MASTER_SECRET, _Listener(),
                          JoinInfo(1, ALPHA_INCARNATION, "alpha@db1", "tcp:127.0.0.1:7001"))
    protocol = MasterClientProtocol(client)
    protocol.makeConnection(StringTransport())
    client.clock.advance(3.0)  # type: ignore[attr-defined]
    reasons = dropped_reasons(events)
    assert reasons == ["harbor 2 silent for 3.0 s", "the master is silent for 3.0 s"]
    for reason in reasons:
        assert f"`{reason}`" in text


@implementer(IMasterListener)
class _Listener:
    def __init__(self) -> None:
        self.refusals: list[str] = []

    def master_table(self, table: Any, first: bool) -> None:
        pass

    def master_event(self, event: Any) -> None:
        pass

    def master_refused(self, reason: str) -> None:
        self.refusals.append(reason)

    def master_lost(self, reason: str) -> None:
        pass


def test_stated_client_refusals_are_what_the_node_says() -> None:
    rows = table_rows("master-client-refusals")
    documented = [row[1].strip("`") for row in rows[:2]]
    reasons = []
    challenges: list[Callable[[MasterHello], MasterChallenge]] = [
        lambda hello: MasterChallenge(MASTER_VERSION + 1, bytes(32), bytes(32), 1.0, 3.0),
        lambda hello: master_challenge(OTHER_SECRET, hello)[1],  # a master with another secret
        lambda hello: MasterChallenge(MASTER_VERSION, bytes(32), bytes(32), 1.0, 3.0),
    ]
    for make in challenges:
        listener = _Listener()
        client = MasterClient(Clock(), "tcp:127.0.0.1:2013", MASTER_SECRET, listener,
                              JoinInfo(1, ALPHA_INCARNATION, "alpha@db1", "tcp:127.0.0.1:7001"))
        protocol = MasterClientProtocol(client)
        transport = StringTransport()
        protocol.makeConnection(transport)
        (hello,) = [MASTER_CODEC.decode(b) for b in split_frames(transport.value())]
        assert isinstance(hello, MasterHello) and hello.version == MASTER_VERSION
        protocol.dataReceived(master_frame(make(hello)))
        assert transport.disconnecting
        reasons.extend(listener.refusals)
        if listener.refusals:
            assert client.refusal == listener.refusals[0]
        else:  # an unusable key: dropped, and the client will reconnect
            assert protocol.drop_reason == (
                "protocol error: the peer's key is not a usable X25519 public key")
            assert client.refusal is None
    assert reasons == documented


def test_stated_name_errors_are_what_the_registry_says() -> None:
    stated = [row[2].strip("`") for row in table_rows("master-errors")]
    errors = []
    registry = InMemoryRegistry()
    for change in (
        lambda: registry.bind(".db", 0x02000002, 2),
        lambda: registry.bind("SIMPLEDB", 0x01000002, 2),
        lambda: registry.unbind("SIMPLEDB", 1),
    ):
        with pytest.raises(RegistryRefusal) as info:
            change()
        errors.append(str(info.value))
    assert registry.bind("SIMPLEDB", 0x01000002, 1)
    assert registry.bind("SIMPLEDB", 0x01000002, 1) == ()  # same handle: no event
    for change in (
        lambda: registry.bind("SIMPLEDB", 0x02000002, 2),
        lambda: registry.unbind("SIMPLEDB", 2),
    ):
        with pytest.raises(RegistryRefusal) as info:
            change()
        errors.append(str(info.value))
    assert sorted(errors) == sorted(stated)


def test_stated_group_errors_are_what_the_registry_says() -> None:
    stated = [row[2].strip("`") for row in table_rows("master-group-errors")]
    registry = InMemoryRegistry()
    registry.join(1, "alpha@db1", "tcp:127.0.0.1:7001", 1, {}, 0.0)
    registry.join(2, "beta@db1", "tcp:127.0.0.1:7002", 1, {}, 0.0)
    errors = []
    for change in (
        lambda: registry.add_member("two words", 0x02000002, 2),
        lambda: registry.remove_member("x" * 256, 0x02000002, 2),
        lambda: registry.add_member("workers", 0x01000002, 2),
        lambda: registry.remove_member("workers", 0x01000002, 2),
    ):
        with pytest.raises(RegistryRefusal) as info:
            change()
        errors.append(str(info.value))
    assert errors == stated
    assert registry.add_member("workers", 0x01000002, 1)
    assert registry.add_member("workers", 0x01000002, 1) == ()  # a member already: no event
    assert registry.remove_member("workers", 0x02000002, 2) == ()  # not a member: no event


def test_stated_order_of_answers_and_pushes() -> None:
    service = MasterService(InMemoryRegistry(), Clock(), MASTER_SECRET)
    service.clock.advance(service.auto_grace)  # type: ignore[attr-defined]  # no name grace
    alpha, beta = MasterPeer(service), MasterPeer(service)
    welcome, *pushed = alpha.join(1, {"B": 0x01000003, "A": 0x01000002})
    assert isinstance(welcome, Welcome) and welcome.table.sequence == 3
    # the join's own events follow the Welcome and are not above its table's sequence
    assert [type(e) for e in pushed] == [HarborJoined, NameBound, NameBound]
    assert [e.sequence for e in pushed] == [1, 2, 3]
    welcome, *_ = beta.join(2, node="beta@db1")
    alpha.received()

    beta.send(BindName(5, "SIMPLEDB", 0x02000002))
    assert beta.received() == [NameBound(5, "SIMPLEDB", 0x02000002), Reply(5, "", 0)]
    assert alpha.received() == [NameBound(5, "SIMPLEDB", 0x02000002)]

    alpha.connection.connectionLost(Failure(ConnectionDone()))
    left, *unbound = beta.received()
    assert left == HarborLeft(6, 1, ALPHA_INCARNATION, "Connection was closed cleanly.")
    assert unbound == [NameUnbound(7, "A", 0x01000002), NameUnbound(8, "B", 0x01000003)]
    beta.send(LookupName(9, "A"))
    assert beta.received() == [Reply(9, "", 0)]


# --- the port mapper (sections 15 to 17) ----------------------------------------------------

def run(clock: Clock, done: Callable[[], bool], limit: float = 5.0) -> None:
    """Advance ``clock`` in small steps until ``done()``."""
    start = clock.seconds()
    clock.advance(0)
    while not done():
        assert clock.seconds() - start <= limit, "nothing happened in Clock time"
        clock.advance(0.01)


def test_alive2_example_is_what_a_node_sends_to_its_mapper() -> None:
    dumped, notes = hex_dump("alive2-request")
    extra = encode_extra(1)
    expected = encode_request(Alive2Request(7001, NODE_TYPE_NORMAL, 0, 6, 6, "alpha", extra))
    assert dumped.hex(" ") == expected.hex(" ")
    assert decode_extra(extra) == MapperExtra(1)
    annotations = "\n".join(notes)
    for text in ("ALIVE2_REQ", "7001", '"alpha"', '"harbor"', "harbor id"):
        assert text in annotations, f"the alive2-request annotations should mention {text}"

    # The bytes HostMapper really writes, for the endpoint twistd skynode advertises after
    # --listen tcp:7001:interface=127.0.0.1.
    assert "listening on `tcp:7001:interface=127.0.0.1`" in " ".join(doc_text().split())
    assert harbor_tcp_port("tcp:7001:interface=127.0.0.1") == 7001
    clock = Clock()
    received = bytearray()

    class Recorder(Protocol):
        def dataReceived(self, data: bytes) -> None:
            received.extend(data)
            if len(received) == 2 + int.from_bytes(received[:2], "big"):
                assert self.transport is not None
                self.transport.write(encode_reply(Alive2XResponse(0, 5)))

    ports: list[Any] = []
    serverFromString(clock, "loopback:docs-mapper").listen(
        Factory.forProtocol(Recorder)).addCallback(ports.append)
    agent = HostMapper(clock, "loopback:docs-mapper", "loopback:docs-mapper", 4369, "alpha",
                       "tcp:127.0.0.1:7001", 1)
    creation: list[int] = []
    agent.start().addCallback(creation.append)
    run(clock, lambda: bool(creation))
    assert creation == [5] and not agent.hosting
    assert bytes(received) == dumped
    stopped: list[Any] = []
    agent.stop().addCallback(stopped.append)
    run(clock, lambda: bool(stopped))
    ports[0].stopListening()
    clock.advance(0)


def test_stated_unix_extra() -> None:
    text = " ".join(doc_text().split())
    assert "listening on `unix:/run/sky/beta.sock:mode=600` as harbor 2" in text
    assert '`{"harbor": 2, "endpoint": "unix:/run/sky/beta.sock"}`' in text
    agent = HostMapper(Clock(), "loopback:x", "loopback:x", 4369, "beta",
                       "unix:/run/sky/beta.sock:mode=600", 2)
    assert agent.port == 0
    assert decode_cbor(agent.extra) == {"harbor": 2, "endpoint": "unix:/run/sky/beta.sock"}


def test_epmd_opcode_table() -> None:
    rows = table_rows("epmd-opcodes")
    assert len(rows) == 6
    for row in rows:
        code, char, name = int(row[0]), row[1].strip("`"), row[2].strip("`")
        assert getattr(epmd, name) == code and chr(code) == char, row
    assert (epmd.ALIVE2_X_RESP, epmd.ALIVE2_RESP, epmd.PORT2_RESP) == (118, 121, 119)
    local_only = {getattr(epmd, r[2].strip("`")) for r in rows if r[3] == "local peers only"}
    assert local_only == epmd.LOCAL_ONLY_OPCODES


def test_stated_epmd_bytes() -> None:
    text = " ".join(doc_text().split())  # a quoted dump may be wrapped across lines
    registration = Port2Response(7001, NODE_TYPE_NORMAL, 0, 6, 6, "alpha", encode_extra(1))
    for data in (
        encode_request(PortPlease2Request("alpha")),
        encode_reply(registration),
        encode_reply(Port2Error()),
        encode_request(NamesRequest()),
        encode_reply(epmd.alive2_reply(6, None)),
        encode_reply(epmd.alive2_reply(5, None)),
    ):
        assert f"`{data.hex(' ')}`" in text, data.hex(" ")
    names = encode_names_reply(4369, [("alpha", 7001)])
    assert f"`{names[:4].hex(' ')}` followed by the text `{names[4:-1].decode()}\\n`" in text
    assert encode_reply(Alive2XResponse(0, 5))[:2].hex(" ") == "76 00"
    assert "the 6 bytes `76 00`" in text


def test_mapper_constants_table() -> None:
    modules = {"mapper/epmd.py": epmd, "mapper/table.py": mapper_table,
               "mapper/server.py": mapper_server, "mapper/client.py": mapper_client,
               "node/host_mapper.py": mapping}
    rows = table_rows("mapper-constants")
    assert len(rows) == 12
    for row in rows:
        name, value = row[0].strip("`"), row[1]
        (where,) = re.findall(r"`([\w/]+\.py)`", row[2])
        actual = getattr(modules[where], name)
        assert type(actual)(value) == actual, name
    host_mapper = defaults(HostMapper.__init__)
    assert host_mapper["start_refusals"] == mapping.DEFAULT_START_REFUSALS
    assert host_mapper["takeover_jitter"] == mapping.DEFAULT_TAKEOVER_JITTER
    assert host_mapper["retry_initial"] == mapping.DEFAULT_RETRY_INITIAL
    assert host_mapper["retry_max"] == mapping.DEFAULT_RETRY_MAX


def test_piece_layout_and_refusals_are_what_the_code_does() -> None:
    from skyproto.wire.pieces import (
        DEFAULT_MAX_MESSAGE,
        DEFAULT_PIECE_SIZE,
        FIRST,
        LAST,
        PieceAssembler,
        piece_frame,
    )

    text = " ".join(doc_text().split())
    assert (FIRST, LAST, DEFAULT_PIECE_SIZE, DEFAULT_MAX_MESSAGE) == (1, 2, 128 << 10, 64 << 20)
    first = piece_frame(5, FIRST, b"abc", total=4)
    assert first == b"\x00\x00\x00\x0d" + b"\x03" + (5).to_bytes(4, "big") + b"\x01" + \
        (4).to_bytes(4, "big") + b"abc"
    last = piece_frame(5, LAST, b"d")
    assert last[4:10] == b"\x03\x00\x00\x00\x05\x02" and last[10:] == b"d"
    assembler = PieceAssembler(10)
    assert assembler.receive(first[4:]) is None
    assert bytes(assembler.receive(last[4:]) or b"") == b"abcd"
    for piece, words in [
        (piece_frame(9, LAST, b"x"), "a piece of stream N, which never started"),
        (piece_frame(9, 4, b"x"), "piece flags 0xN unknown"),
    ]:
        assert f"(`{words}`)" in text
        with pytest.raises(ProtocolError,
                           match=words.replace("N", r"\w+").replace("(", r"\(")):
            PieceAssembler(10).receive(piece[4:])
    assert "`FrameTooLarge(size, max_message)`" in text
