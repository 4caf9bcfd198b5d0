"""docs/wire-format.md against the code: every marked example and table, byte for byte.

Each example sits in a fenced block after an ``<!-- example: NAME -->`` marker; each
checked table after a ``<!-- table: NAME -->`` marker. A hex dump line is hex byte pairs
separated by single spaces, then (after two or more spaces) an annotation. Stated facts
(constants, abort reasons, the type-byte check, error messages) are checked against what
the code does.
"""

from __future__ import annotations

import inspect
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest.mock import Mock

import attrs
import pytest
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
    TableReply,
    Welcome,
)
from skyproto.master.messages import PROTOCOL_VERSION as MASTER_VERSION
from skyproto.master.messages import transcript as master_transcript
from skyproto.master.registry import (
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
                   2, 1_700_000_000_000_001, (1.0, 3.0), (1.0, 3.0))
    assert len(t) == 116
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


# --- the master protocol (sections 11 to 14) -----------------------------------------------

MASTER_SECRET = b"correct horse battery staple"
ALPHA_INCARNATION = 1_700_000_000_000_000


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
    """One connection to a real MasterService, on a StringTransport and a Clock."""

    def __init__(self, service: MasterService | None = None) -> None:
        self.service = service or MasterService(InMemoryRegistry(), Clock(), MASTER_SECRET)
        self.connection = self.service.buildProtocol(None)
        self.transport = StringTransport()
        self.connection.makeConnection(self.transport)
        self.nonce = bytes(range(32))

    @property
    def clock(self) -> Clock:
        return self.service.clock  # type: ignore[return-value]

    def send(self, message: object) -> None:
        self.connection.dataReceived(master_frame(message))

    def received(self) -> list[Any]:
        data = self.transport.value()
        self.transport.clear()
        return [MASTER_CODEC.decode(body) for body in split_frames(data)]

    def challenge(self) -> MasterChallenge:
        self.send(MasterHello(MASTER_VERSION, self.nonce))
        (challenge,) = self.received()
        assert isinstance(challenge, MasterChallenge)
        return challenge

    def proof(self, challenge: MasterChallenge) -> bytes:
        text = master_transcript(MASTER_VERSION, self.nonce, challenge.nonce)
        return auth.prove(MASTER_SECRET, NODE_ROLE, text)

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
    # the very bytes MasterService.push writes to a joined node
    peer = MasterPeer()
    peer.join(1)
    peer.service.push((event,))
    assert peer.transport.value() == dumped
    annotations = "\n".join(notes)
    for text in ("NameBound", "22", "sequence 7", '"SIMPLEDB"', ":01000002", "no kind byte"):
        assert text in annotations, f"the master-frame annotations should mention {text}"


def test_stated_master_heartbeat_bytes() -> None:
    text = doc_text()
    beat = master_frame(MasterHeartbeat())
    assert f"`{beat.hex(' ')}`" in text
    assert f"`{beat[LENGTH_PREFIX.size:].hex(' ')}`" in text
    assert master_server._BEAT == master_client._BEAT == beat[LENGTH_PREFIX.size :]


def test_master_proof_example_matches_a_real_handshake() -> None:
    namespace: dict[str, Any] = {}
    exec(compile(example_block("master-proof", "python"), f"{DOC.name}:master-proof", "exec"),
         namespace)
    transcript, proof = namespace["master_transcript"], namespace["proof"]
    text = doc_text()
    for role in (NODE_ROLE, MASTER_ROLE):
        assert f'b"{role.decode()}"' in text, role

    peer = MasterPeer()
    challenge = peer.challenge()
    t = transcript(peer.nonce, challenge.nonce, MASTER_VERSION)
    assert len(t) == 66
    assert t == master_transcript(MASTER_VERSION, peer.nonce, challenge.nonce)
    assert challenge.proof == proof(MASTER_SECRET, b"master-server", t)
    peer.send(Join(proof(MASTER_SECRET, b"master-node", t), 1, ALPHA_INCARNATION,
                   "alpha@db1", "tcp:127.0.0.1:7001", {}, 1.0, 3.0))
    welcome, *_ = peer.received()
    assert isinstance(welcome, Welcome) and welcome.harbor == 1

    observer = MasterPeer(peer.service)
    challenge = observer.challenge()
    t = transcript(observer.nonce, challenge.nonce, MASTER_VERSION)
    observer.send(Observe(proof(MASTER_SECRET, b"master-node", t), 1.0, 3.0))
    assert observer.received() == []  # nothing answers Observe
    assert observer.connection.state == "observing"


def test_every_master_message_is_documented() -> None:
    rows = {int(row[0]): row for row in table_rows("master-messages")}
    registered = MASTER_CODEC._by_code
    assert set(rows) == set(registered)
    for code, (cls, _) in registered.items():
        row = rows[code]
        assert row[1] == f"`{cls.__name__}`", f"code {code} is {cls.__name__}, doc: {row[1]}"
        assert re.findall(r"`(\w+)`", row[2]) == [f.name for f in attrs.fields(cls)]
    for code, cls in ((20, HarborJoined), (21, HarborLeft), (22, NameBound), (23, NameUnbound)):
        assert registered[code][0] is cls  # the registry's own classes


def test_nested_master_structures_are_documented() -> None:
    rows = {row[0]: row for row in table_rows("master-structs")}
    assert set(rows) == {"`HarborRecord`", "`Table`"}
    for cls in (HarborRecord, Table):
        row = rows[f"`{cls.__name__}`"]
        fields = [f.name for f in attrs.fields(cls)]
        assert re.findall(r"`(\w+)`", row[1]) == fields
        assert row[2] == f"array of {len(fields)} items"
    record = HarborRecord(1, "alpha@db1", "tcp:127.0.0.1:7001", ALPHA_INCARNATION, 1.5)
    table = Table(3, (record,), {"SIMPLEDB": 0x01000002})
    assert decode_cbor(MASTER_CODEC.encode(TableReply(1, table))) == [
        12, 1, [3, [[1, "alpha@db1", "tcp:127.0.0.1:7001", ALPHA_INCARNATION, 1.5]],
                {"SIMPLEDB": 0x01000002}]]


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
    peer.send(MasterHello(MASTER_VERSION + 1, peer.nonce))
    refusals.extend(peer.received())
    assert peer.transport.disconnecting

    peer = MasterPeer()
    peer.challenge()
    peer.send(Join(bytes(32), 1, ALPHA_INCARNATION, "alpha@db1", "tcp:127.0.0.1:7001", {},
                   1.0, 3.0))
    refusals.extend(peer.received())

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
    documented = [row[1].strip("`") for row in table_rows("master-drops")]

    MasterPeer().clock.advance(5)  # nothing sent

    MasterPeer().send(MasterHello(MASTER_VERSION, b"short"))

    MasterPeer().send(GetTable(1))

    peer = MasterPeer()
    peer.challenge()
    peer.send(MasterHello(MASTER_VERSION, peer.nonce))

    observer = MasterPeer()
    challenge = observer.challenge()
    observer.send(Observe(observer.proof(challenge), 1.0, 3.0))
    observer.send(BindName(1, "SIMPLEDB", 0x01000002))

    assert dropped_reasons(events) == documented
    assert "no handshake within 5 s" in documented  # MasterService.handshake_timeout


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
    for challenge in (MasterChallenge(MASTER_VERSION + 1, bytes(32), bytes(32), 1.0, 3.0),
                      MasterChallenge(MASTER_VERSION, bytes(32), bytes(32), 1.0, 3.0)):
        listener = _Listener()
        client = MasterClient(Clock(), "tcp:127.0.0.1:2013", MASTER_SECRET, listener,
                              JoinInfo(1, ALPHA_INCARNATION, "alpha@db1", "tcp:127.0.0.1:7001"))
        protocol = MasterClientProtocol(client)
        transport = StringTransport()
        protocol.makeConnection(transport)
        (hello,) = [MASTER_CODEC.decode(b) for b in split_frames(transport.value())]
        assert isinstance(hello, MasterHello) and hello.version == MASTER_VERSION
        protocol.dataReceived(master_frame(challenge))
        assert transport.disconnecting
        reasons.extend(listener.refusals)
        assert client.refusal == listener.refusals[0]
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
