"""The mapper's table and server protocol, driven with StringTransport and a Clock."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any, cast

import pytest
from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from skyproto.interfaces import IPortMapper
from skyproto.mapper.epmd import DumpEntry
from skyproto.mapper.server import (
    MapperServerFactory,
    MapperServerProtocol,
    describe_address,
    is_local_peer,
    relaxed_from_environ,
)
from skyproto.mapper.table import MapperTable, Registration

LOCAL = IPv4Address("TCP", "127.0.0.1", 40000)
HOST = IPv4Address("TCP", "127.0.0.1", 4369)
REMOTE = IPv4Address("TCP", "10.1.2.3", 40000)
T0 = 1_700_000_000


# --------------------------------------------------------------------------- helpers


def alive2(
    name: str = "foo", port: int = 1234, high: int = 6, low: int = 5, extra: bytes = b""
) -> bytes:
    raw = name.encode()
    body = struct.pack(">BHBBHHH", 120, port, 77, 0, high, low, len(raw)) + raw
    body += struct.pack(">H", len(extra)) + extra
    return struct.pack(">H", len(body)) + body


def framed(body: bytes) -> bytes:
    return struct.pack(">H", len(body)) + body


class RecordingTransport(StringTransportWithDisconnection):
    """A StringTransport that records each write separately and how it was closed."""

    def __init__(self, host: IAddress, peer: IAddress) -> None:
        super().__init__(hostAddress=host, peerAddress=peer)
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class Conn:
    """One simulated connection to the factory."""

    def __init__(self, factory: MapperServerFactory, peer: IAddress, host: IAddress) -> None:
        self.protocol = factory.buildProtocol(peer)
        self.transport = RecordingTransport(host, peer)
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> Conn:
        self.protocol.dataReceived(data)
        return self

    @property
    def reply(self) -> bytes:
        return bytes(self.transport.value())

    def is_open(self) -> bool:
        return bool(self.transport.connected)

    def reset(self) -> None:
        """The peer resets the connection (an RST)."""
        self.transport.connected = False
        self.protocol.connectionLost(Failure(error.ConnectionLost("reset by peer")))


class Mapper:
    """A factory on a Clock, with helpers to open connections to it."""

    def __init__(self, **options: object) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.kills: list[bool] = []
        self.factory = MapperServerFactory(
            self.clock,
            4369,
            on_kill=lambda: self.kills.append(True),
            **options,  # type: ignore[arg-type]
        )

    def connect(self, peer: IAddress = LOCAL, host: IAddress = HOST) -> Conn:
        return Conn(self.factory, peer, host)

    def request(self, data: bytes, peer: IAddress = LOCAL) -> Conn:
        return self.connect(peer).send(data)

    def register(self, name: str = "foo", **kw: Any) -> Conn:
        conn = self.request(alive2(name, **kw))
        assert conn.reply[:2] in (b"v\x00", b"y\x00"), conn.reply
        return conn

    def names(self) -> bytes:
        return self.request(framed(b"n")).reply


@pytest.fixture
def mapper() -> Mapper:
    return Mapper()


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def reasons(events: list[LogEvent]) -> list[str]:
    return [str(e.get("reason", "")) for e in events if "reason" in e]


# --------------------------------------------------------------------------- table


def test_table_provides_the_interface() -> None:
    table = MapperTable(lambda: T0)
    assert verifyObject(IPortMapper, table)


def test_new_name_creation_starts_at_the_time_and_is_bumped() -> None:
    table = MapperTable(lambda: T0)
    reg = table.register("a", 1, 77, 0, 6, 5, b"")
    assert reg == Registration("a", 1, 77, 0, 6, 5, b"", T0 + 1)
    other = table.register("b", 2, 77, 0, 6, 5, b"")
    assert other is not None
    assert other.creation == T0 + 1  # different names may share a value


def test_reregistered_name_gets_old_counter_plus_one() -> None:
    now = [T0]
    table = MapperTable(lambda: now[0])
    creations = []
    for _ in range(4):
        reg = table.register("a", 1, 77, 0, 6, 6, b"")
        assert reg is not None
        creations.append(reg.creation)
        assert table.unregister("a")
        now[0] += 1000  # the clock no longer matters for a remembered name
    assert creations == [T0 + 1, T0 + 2, T0 + 3, T0 + 4]


def test_bump_never_gives_less_than_4() -> None:
    for start, expected in [(0, 4), (1, 4), (2, 4), (3, 4), (4, 5), (0xFFFFFFFF, 4)]:
        table = MapperTable(lambda s=start: s)  # type: ignore[misc]
        reg = table.register("a", 1, 77, 0, 6, 6, b"")
        assert reg is not None
        assert reg.creation == expected, start


def test_old_versions_get_counter_mod_3_plus_1() -> None:
    table = MapperTable(lambda: 0)
    # counter 4, 5, 6, 7 -> 2, 3, 1, 2 (as the real epmd probe showed: 2 then 3)
    seen = []
    for _ in range(4):
        reg = table.register("a", 1, 77, 0, 5, 5, b"")
        assert reg is not None
        seen.append(reg.creation)
        table.unregister("a")
    assert seen == [2, 3, 1, 2]
    reg = table.register("a", 1, 77, 0, 6, 6, b"")
    assert reg is not None
    assert reg.creation == 8  # the same counter, full width for a v6 node


def test_creation_with_fractional_time_source() -> None:
    table = MapperTable(lambda: T0 + 0.75)
    reg = table.register("a", 1, 77, 0, 6, 6, b"")
    assert reg is not None
    assert reg.creation == T0 + 1


def test_unregistered_memory_is_a_fifo_of_1000() -> None:
    table = MapperTable(lambda: T0)
    for i in range(1001):
        table.register(f"n{i}", 1, 77, 0, 6, 6, b"")
        table.unregister(f"n{i}")
    assert len(table.remembered()) == 1000
    assert table.remembered()[0] == "n1"  # n0 was forgotten
    # n0 starts again from the time; n1 continues its counter.
    table_time = T0 + 500
    table._time = lambda: table_time
    n0 = table.register("n0", 1, 77, 0, 6, 6, b"")
    n1 = table.register("n1", 1, 77, 0, 6, 6, b"")
    assert n0 is not None and n1 is not None
    assert n0.creation == T0 + 501
    assert n1.creation == T0 + 2
    assert "n1" not in table.remembered()


def test_small_memory_like_debug_mode() -> None:
    table = MapperTable(lambda: T0, memory=5)
    for i in range(7):
        table.register(f"n{i}", 1, 77, 0, 6, 6, b"")
        table.unregister(f"n{i}")
    assert table.remembered() == ["n2", "n3", "n4", "n5", "n6"]
    with pytest.raises(ValueError):
        MapperTable(lambda: T0, memory=-1)
    none = MapperTable(lambda: T0, memory=0)
    none.register("a", 1, 77, 0, 6, 6, b"")
    none.unregister("a")
    assert none.remembered() == []


def test_table_refuses_duplicates_and_invalid_names() -> None:
    table = MapperTable(lambda: T0)
    first = table.register("a", 1, 77, 0, 6, 6, b"x")
    assert first is not None
    assert table.register("a", 2, 77, 0, 6, 6, b"") is None
    assert table.lookup("a") == first  # untouched
    for name in ("", "a\0", "x" * 256, "\ud800", "\U0001f600" * 256):
        assert table.register(name, 1, 77, 0, 6, 6, b"") is None
    assert table.register("b", 1, 77, 0, 6, 6, b"x" * 1021) is None
    assert not table.unregister("zzz")
    assert table.lookup("zzz") is None
    assert len(table) == 1
    assert "a" in table


def test_names_are_newest_first() -> None:
    table = MapperTable(lambda: T0)
    for name in ("a", "b", "c"):
        table.register(name, ord(name), 77, 0, 6, 6, b"")
    table.unregister("a")
    table.register("a", 1, 77, 0, 6, 6, b"")
    assert [r.name for r in table.names()] == ["a", "c", "b"]
    assert table.name_ports() == [("a", 1), ("c", 99), ("b", 98)]


def test_dump_lists_active_newest_first_and_unused_oldest_first() -> None:
    table = MapperTable(lambda: T0)
    table.register("a", 1, 77, 0, 6, 6, b"", fd=5)
    table.register("b", 2, 77, 0, 6, 6, b"", fd=6)
    table.register("c", 3, 77, 0, 6, 6, b"", fd=7)
    table.unregister("a")
    table.unregister("c")
    assert table.dump() == ([DumpEntry("b", 2, 6)], [DumpEntry("a", 1, 5), DumpEntry("c", 3, 7)])


# --------------------------------------------------------------------------- helpers of the server


def test_relaxed_from_environ() -> None:
    assert relaxed_from_environ({"ERL_EPMD_RELAXED_COMMAND_CHECK": ""})
    assert relaxed_from_environ({"ERL_EPMD_RELAXED_COMMAND_CHECK": "1"})
    assert not relaxed_from_environ({"HOME": "/tmp"})


@pytest.mark.parametrize(
    ("peer", "host", "local"),
    [
        (IPv4Address("TCP", "127.0.0.1", 1), HOST, True),
        (IPv4Address("TCP", "127.255.3.4", 1), IPv4Address("TCP", "10.0.0.1", 1), True),
        (IPv6Address("TCP", "::1", 1), IPv6Address("TCP", "::1", 1), True),
        (IPv6Address("TCP", "::ffff:127.0.0.1", 1), IPv6Address("TCP", "::", 1), True),
        (IPv4Address("TCP", "10.0.0.5", 1), IPv4Address("TCP", "10.0.0.5", 4369), True),
        (IPv6Address("TCP", "fe80::1%eth0", 1), IPv6Address("TCP", "fe80::1%eth0", 2), True),
        (IPv4Address("TCP", "10.0.0.5", 1), IPv4Address("TCP", "10.0.0.6", 4369), False),
        (IPv6Address("TCP", "2001:db8::1", 1), IPv6Address("TCP", "2001:db8::2", 1), False),
        (IPv4Address("TCP", "128.0.0.1", 1), UNIXAddress(b"/x"), False),
        (IPv4Address("TCP", "not-an-ip", 1), HOST, False),
        (UNIXAddress(b"/run/mapper"), UNIXAddress(b"/run/mapper"), True),
        (UNIXAddress(None), UNIXAddress(None), True),
    ],
)
def test_is_local_peer(peer: IAddress, host: IAddress, local: bool) -> None:
    assert is_local_peer(peer, host) is local


def test_describe_address() -> None:
    assert describe_address(IPv4Address("TCP", "1.2.3.4", 5)) == "1.2.3.4:5"
    assert describe_address(IPv6Address("TCP", "::1", 5)) == "[::1]:5"
    assert "UNIXAddress" in describe_address(UNIXAddress(b"/x"))


def test_factory_options_are_checked() -> None:
    for seconds in (0, 0.5, -1):  # epmd counts whole seconds; its atoi gives 0: refused
        with pytest.raises(ValueError, match="at least 1 second"):
            MapperServerFactory(Clock(), 4369, packet_timeout=seconds)
    assert MapperServerFactory(Clock(), 4369, packet_timeout=2.9).packet_timeout == 2
    assert MapperServerFactory(Clock(), 4369).packet_timeout == 60


# --------------------------------------------------------------------------- ALIVE2


def test_alive2_registers_and_keeps_the_connection_open(mapper: Mapper) -> None:
    conn = mapper.request(alive2("foo", port=1234, high=6, low=5))
    assert conn.reply == b"v\x00" + struct.pack(">I", T0 + 1)
    assert conn.is_open()
    assert isinstance(conn.protocol, MapperServerProtocol)
    assert conn.protocol.registered == "foo"
    assert mapper.names() == b"\x00\x00\x11\x11name foo at port 1234\n"
    reg = mapper.factory.table.lookup("foo")
    assert reg == Registration("foo", 1234, 77, 0, 6, 5, b"", T0 + 1)


def test_alive2_old_version_gets_the_4_byte_reply(mapper: Mapper) -> None:
    conn = mapper.request(alive2("foo", high=5, low=5))
    assert conn.reply == b"y\x00" + struct.pack(">H", (T0 + 1) % 3 + 1)


def test_registration_ends_with_the_connection(mapper: Mapper) -> None:
    conn = mapper.register("foo")
    conn.transport.loseConnection()
    assert mapper.factory.table.lookup("foo") is None
    assert mapper.names() == b"\x00\x00\x11\x11"


def test_any_further_byte_unregisters_and_closes(mapper: Mapper, logged: list[LogEvent]) -> None:
    conn = mapper.register("foo")
    conn.send(b"\x00")
    assert not conn.is_open()
    assert mapper.factory.table.lookup("foo") is None
    assert any("more bytes than expected on ALIVE socket" in r for r in reasons(logged))


def test_reset_after_alive2_leaves_no_zombie(mapper: Mapper) -> None:
    conn = mapper.register("foo")
    conn.reset()
    assert mapper.factory.table.lookup("foo") is None
    # The name can be registered again, with a new creation.
    again = mapper.request(alive2("foo"))
    assert again.reply == b"v\x00" + struct.pack(">I", T0 + 2)


def test_reset_before_the_request_is_complete_changes_nothing(mapper: Mapper) -> None:
    data = alive2("foo")
    conn = mapper.request(data[:-1])
    conn.reset()
    assert conn.reply == b""
    assert len(mapper.factory.table) == 0
    assert mapper.factory.connections == set()
    mapper.clock.advance(5)
    assert mapper.clock.getDelayedCalls() == []


def test_reset_while_the_reply_is_being_written(mapper: Mapper) -> None:
    # A write that fails shows up as connectionLost right after: still no zombie.
    conn = mapper.connect()
    conn.send(alive2("foo"))
    conn.reset()
    assert mapper.factory.table.lookup("foo") is None


def test_duplicate_name_gets_an_error_reply_and_stays_open(mapper: Mapper) -> None:
    first = mapper.register("foo", port=1)
    second = mapper.request(alive2("foo", port=2))
    assert second.reply == bytes.fromhex("76 01 00000063")
    assert second.is_open()  # real epmd keeps it open; the client closes it
    assert mapper.factory.table.lookup("foo") == Registration("foo", 1, 77, 0, 6, 5, b"", T0 + 1)
    second.transport.loseConnection()
    assert mapper.factory.table.lookup("foo") is not None  # the loser's close changes nothing
    assert first.is_open()
    old = mapper.request(alive2("foo", high=5))
    assert old.reply == bytes.fromhex("79 01 0063")


def test_after_an_error_reply_a_byte_closes(mapper: Mapper) -> None:
    mapper.register("foo")
    loser = mapper.request(alive2("foo"))
    loser.send(b"x")
    assert not loser.is_open()
    assert mapper.factory.table.lookup("foo") is not None


def test_refused_connection_is_exempt_from_the_idle_timeout(mapper: Mapper) -> None:
    mapper.register("foo")
    loser = mapper.request(alive2("foo"))
    bad = mapper.request(framed(b"x" + struct.pack(">HBBHHH", 1, 77, 0, 6, 5, 1) + b"\xff\0\0"))
    assert bad.reply == bytes.fromhex("76 01 00000063")
    tick(mapper.clock, 3600, step=5)
    assert loser.is_open() and bad.is_open()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"x" + struct.pack(">HBBHHH", 1, 77, 0, 6, 5, 0), "too small"),  # rule 2
        (b"x" + struct.pack(">HBBHHH", 1, 77, 0, 6, 5, 9) + b"abc\0\0", "name length"),  # 3
        (b"x" + struct.pack(">HBBHHH", 1, 77, 0, 6, 5, 3) + b"abc\0\x09", "extra length"),
        (b"x" + struct.pack(">HBBHHH", 1, 77, 0, 6, 5, 3) + b"a\0c\0\0", "NUL"),  # rule 4
    ],
)
def test_alive2_silent_rules(
    mapper: Mapper, logged: list[LogEvent], body: bytes, reason: str
) -> None:
    conn = mapper.request(framed(body))
    assert conn.reply == b""
    assert not conn.is_open()
    assert len(mapper.factory.table) == 0
    assert any(reason in r for r in reasons(logged))


@pytest.mark.parametrize(
    "body",
    [
        b"x" + struct.pack(">HBBHHH", 1, 77, 0, 6, 5, 1021) + b"x" * 1021 + b"\0\0",  # rule 5
        b"x" + struct.pack(">HBBHHH", 1, 77, 0, 6, 5, 256) + b"x" * 256 + b"\0\0",
        b"x" + struct.pack(">HBBHHH", 1, 77, 0, 6, 5, 1) + b"\xff\0\0",
        b"x" + struct.pack(">HBBHHH", 1, 77, 0, 6, 5, 1) + b"a\x03\xfd" + b"e" * 1021,  # 6
    ],
)
def test_alive2_error_reply_rules(mapper: Mapper, body: bytes) -> None:
    conn = mapper.request(framed(body))
    assert conn.reply == bytes.fromhex("76 01 00000063")
    assert conn.is_open()
    assert len(mapper.factory.table) == 0


def test_alive2_extra_of_1020_is_accepted_and_echoed(mapper: Mapper) -> None:
    extra = bytes(range(256)) * 3 + b"\0" * 252
    assert len(extra) == 1020
    mapper.register("foo", port=7)
    mapper.factory.table.unregister("foo")
    conn = mapper.request(alive2("bar", port=9, extra=extra))
    assert conn.reply[:2] == b"v\x00"
    lookup = mapper.request(framed(b"zbar"))
    assert lookup.reply == (
        bytes.fromhex("77 00 0009 4d 00 0006 0005 0003") + b"bar" + b"\x03\xfc" + extra
    )


def test_alive2_from_a_remote_peer_is_closed_silently(mapper: Mapper) -> None:
    conn = mapper.request(alive2("foo"), peer=REMOTE)
    assert conn.reply == b""
    assert not conn.is_open()
    assert len(mapper.factory.table) == 0


def test_alive2_from_our_own_address_is_local(mapper: Mapper) -> None:
    me = IPv4Address("TCP", "192.0.2.7", 50000)
    conn = mapper.connect(peer=me, host=IPv4Address("TCP", "192.0.2.7", 4369)).send(alive2())
    assert conn.reply[:2] == b"v\x00"


@pytest.mark.parametrize("peer", [UNIXAddress(b"/tmp/m.sock"), IPv6Address("TCP", "::1", 5)])
def test_alive2_over_unix_or_ipv6_loopback(mapper: Mapper, peer: IAddress) -> None:
    conn = mapper.connect(peer=peer, host=peer).send(alive2())
    assert conn.reply[:2] == b"v\x00"


def test_stop_and_dump_and_kill_from_remote_are_closed(mapper: Mapper) -> None:
    mapper.register("foo")
    for body in (b"d", b"k", b"sfoo"):
        conn = mapper.request(framed(body), peer=REMOTE)
        assert conn.reply == b""
        assert not conn.is_open()
    assert mapper.factory.table.lookup("foo") is not None
    assert mapper.kills == []


# --------------------------------------------------------------------------- PORT2, NAMES, DUMP


def test_port_please2_found_then_closed(mapper: Mapper) -> None:
    mapper.register("foo", port=1234, high=6, low=5)
    conn = mapper.request(framed(b"zfoo"), peer=REMOTE)
    assert conn.reply == bytes.fromhex("77 00 04d2 4d 00 0006 0005 0003 666f6f 0000")
    assert not conn.is_open()
    assert conn.transport.writes == [conn.reply]
    nul = mapper.request(framed(b"zfoo\0"))
    assert nul.reply == conn.reply


def test_port_please2_unknown_gets_error_then_close(mapper: Mapper) -> None:
    conn = mapper.request(framed(b"zbar"))
    assert conn.reply == b"w\x01"
    assert not conn.is_open()


@pytest.mark.parametrize("body", [b"z", b"z\0", b"zf\0oo", b"z\xff", b"z" + b"y" * 256])
def test_port_please2_malformed_closes_silently(mapper: Mapper, body: bytes) -> None:
    conn = mapper.request(framed(body))
    assert conn.reply == b""
    assert not conn.is_open()


def test_names_matches_the_observed_bytes_in_one_write() -> None:
    mapper = Mapper()
    mapper.factory.port = 53709
    mapper.register("foo", port=1234)
    mapper.register("bar", port=1234)
    conn = mapper.request(framed(b"n"), peer=REMOTE)
    expected = bytes.fromhex("0000d1cd") + b"name bar at port 1234\nname foo at port 1234\n"
    assert conn.transport.writes == [expected]
    assert not conn.is_open()


def test_names_with_nothing_registered(mapper: Mapper) -> None:
    conn = mapper.request(framed(b"n"))
    assert conn.transport.writes == [b"\x00\x00\x11\x11"]


def test_dump_format(mapper: Mapper) -> None:
    mapper.register("foo", port=1)
    bar = mapper.register("bar", port=2)
    bar.transport.loseConnection()
    mapper.register("baz", port=3)
    conn = mapper.request(framed(b"d"))
    fds = {p.registered: p.fd for p in mapper.factory.connections if p.registered}
    bar_fd = bar.protocol.fd
    assert conn.transport.writes == [
        b"\x00\x00\x11\x11"
        + f"active name     <baz> at port 3, fd = {fds['baz']}\n\0".encode()
        + f"active name     <foo> at port 1, fd = {fds['foo']}\n\0".encode()
        + f"old/unused name <bar>, port = 2, fd = {bar_fd} \n\0".encode()
    ]
    assert not conn.is_open()


# --------------------------------------------------------------------------- KILL and STOP


def test_kill_refused_while_nodes_live(mapper: Mapper) -> None:
    mapper.register("foo")
    conn = mapper.request(framed(b"k"))
    assert conn.reply == b"NO"
    assert not conn.is_open()
    assert mapper.kills == []


def test_kill_allowed_with_no_nodes_calls_on_kill_after_the_close(mapper: Mapper) -> None:
    conn = mapper.connect()
    conn.transport.loseConnection = lambda: None  # type: ignore[method-assign]
    conn.send(framed(b"k"))
    assert conn.reply == b"OK"
    assert mapper.kills == []  # not before the reply is out and the connection closed
    conn.protocol.connectionLost(Failure(error.ConnectionDone()))
    assert mapper.kills == [True]


def test_kill_in_relaxed_mode_with_nodes() -> None:
    mapper = Mapper(relaxed=True)
    mapper.register("foo")
    conn = mapper.request(framed(b"k"))
    assert conn.reply == b"OK"
    assert mapper.kills == [True]


def test_kill_without_handler_only_logs(logged: list[LogEvent]) -> None:
    factory = MapperServerFactory(Clock(), 4369)
    conn = Conn(factory, LOCAL, HOST).send(framed(b"k"))
    assert conn.reply == b"OK"
    assert any("no on_kill" in e.get("log_format", "") for e in logged)


def test_stop_without_relaxed_mode_closes_without_reply(mapper: Mapper) -> None:
    node = mapper.register("foo")
    conn = mapper.request(framed(b"sfoo"))
    assert conn.reply == b""
    assert not conn.is_open()
    assert node.is_open()
    assert mapper.factory.table.lookup("foo") is not None


def test_stop_in_relaxed_mode_closes_the_registration() -> None:
    mapper = Mapper(relaxed=True)
    node = mapper.register("foo")
    conn = mapper.request(framed(b"sfoo"))
    assert conn.reply == b"STOPPED"
    assert not conn.is_open()
    assert not node.is_open()
    assert mapper.factory.table.lookup("foo") is None
    assert mapper.factory.table.remembered() == ["foo"]
    again = mapper.request(alive2("foo"))
    assert again.reply == b"v\x00" + struct.pack(">I", T0 + 2)


def test_stop_in_relaxed_mode_unknown_name() -> None:
    mapper = Mapper(relaxed=True)
    conn = mapper.request(framed(b"sbar"))
    assert conn.reply == b"NOEXISTSTOPPED"  # [observed]
    assert not conn.is_open()


def test_stop_without_a_name_closes() -> None:
    mapper = Mapper(relaxed=True)
    conn = mapper.request(framed(b"s"))
    assert conn.reply == b""
    assert not conn.is_open()


# --------------------------------------------------------------------------- section 7


def test_byte_at_a_time_requests(mapper: Mapper) -> None:
    conn = mapper.connect()
    for byte in alive2("slow"):
        assert conn.reply == b""
        mapper.clock.advance(1)  # one byte per second, as epmd's slow_get_port_nr test
        conn.send(bytes([byte]))
    assert conn.reply[:2] == b"v\x00"
    lookup = mapper.connect()
    for byte in framed(b"zslow"):
        mapper.clock.advance(1)
        lookup.send(bytes([byte]))
    assert lookup.reply[:4] == bytes.fromhex("77 00 04d2")


@pytest.mark.parametrize("length", [0, 3058, 63000])
def test_bad_lengths_close_immediately(mapper: Mapper, logged: list[LogEvent], length: int) -> None:
    conn = mapper.request(struct.pack(">H", length))
    assert conn.reply == b""
    assert not conn.is_open()
    assert any("invalid packet size" in r for r in reasons(logged))


def test_pipelined_requests_are_not_processed(mapper: Mapper) -> None:
    conn = mapper.request(alive2("foo") + framed(b"n"))
    assert conn.reply == b""
    assert not conn.is_open()
    assert len(mapper.factory.table) == 0


def test_unknown_opcode_closes(mapper: Mapper, logged: list[LogEvent]) -> None:
    conn = mapper.request(framed(b"Qhello"))
    assert conn.reply == b""
    assert not conn.is_open()
    assert any("unknown opcode 81" in r for r in reasons(logged))


def tick(clock: Clock, seconds: int, step: float = 1.0) -> None:
    """Advance ``clock`` in small exact steps, as a running reactor would."""
    for _ in range(int(seconds / step)):
        clock.advance(step)


def test_idle_connections_time_out(mapper: Mapper, logged: list[LogEvent]) -> None:
    # packet_timeout 60, swept every 5 s like epmd: closed at the first sweep at which
    # more than 60 whole seconds have passed since the last byte (epmd's
    # ``mod_time + packet_timeout < now``).
    silent = mapper.connect()
    partial = mapper.request(framed(b"zfoo")[:3])
    tick(mapper.clock, 59)
    partial.send(b"f")  # activity resets the idle time
    tick(mapper.clock, 1)
    assert silent.is_open()  # exactly 60 s: epmd keeps it too
    tick(mapper.clock, 5)
    assert not silent.is_open()
    assert partial.is_open()
    tick(mapper.clock, 54)
    assert partial.is_open()  # 60 s after its last byte
    tick(mapper.clock, 1)
    assert not partial.is_open()  # 61 s, at a sweep
    assert any("no complete request within 60 s" in r for r in reasons(logged))
    assert mapper.factory.counters.timed_out == 2
    tick(mapper.clock, 5)
    assert mapper.clock.getDelayedCalls() == []  # nothing left to sweep


def test_registered_connections_do_not_time_out(mapper: Mapper) -> None:
    node = mapper.register("foo")
    tick(mapper.clock, 86400, step=5)
    assert node.is_open()
    assert mapper.clock.getDelayedCalls() == []


def test_packet_timeout_option() -> None:
    mapper = Mapper(packet_timeout=2)  # under 5 s: swept every second
    conn = mapper.connect()
    tick(mapper.clock, 2, step=0.5)
    assert conn.is_open()  # 2 whole seconds are not more than 2
    tick(mapper.clock, 1, step=0.5)
    assert not conn.is_open()
    fraction = Mapper(packet_timeout=1.9)  # 1 s, as epmd's atoi("1.9")
    conn = fraction.connect()
    tick(fraction.clock, 1)
    assert conn.is_open()
    tick(fraction.clock, 1)
    assert not conn.is_open()


def test_sweeping_stops_with_the_factory(mapper: Mapper) -> None:
    conn = mapper.connect()
    assert len(mapper.clock.getDelayedCalls()) == 1
    mapper.factory.doStart()
    mapper.factory.doStop()
    assert mapper.clock.getDelayedCalls() == []
    assert conn.is_open()


def test_answered_connections_ignore_late_bytes(mapper: Mapper) -> None:
    conn = mapper.connect()
    conn.transport.loseConnection = lambda: None  # type: ignore[method-assign]
    conn.send(framed(b"n"))
    conn.send(b"late")
    assert conn.transport.writes == [b"\x00\x00\x11\x11"]


def test_factory_keeps_serving_after_malformed_input(mapper: Mapper) -> None:
    node = mapper.register("foo", port=1)
    for junk in (b"\x00\x00", b"\xff\xff", framed(b"?"), framed(b"x\x01")):
        mapper.request(junk)
    assert node.is_open()
    assert mapper.names() == b"\x00\x00\x11\x11name foo at port 1\n"
    assert mapper.factory.connections == {node.protocol}


def test_many_registrations(mapper: Mapper) -> None:
    nodes = [mapper.register(f"n{i}", port=i + 1) for i in range(1000)]
    assert len(mapper.factory.table) == 1000
    for node in nodes:
        node.transport.loseConnection()
    assert len(mapper.factory.table) == 0
    assert len(mapper.factory.table.remembered()) == 1000


# --------------------------------------------------------------------------- epmd's timing


def slow(packet_timeout: int = 1, phase: float = 0.0) -> Mapper:
    """A mapper as OTP's epmd_SUITE runs epmd (``-packet_timeout 1``), the clock at ``phase``
    into a second, with ``foo`` registered at port 1042 (its ``port_request``)."""
    mapper = Mapper(packet_timeout=packet_timeout)
    mapper.clock.advance(phase)
    mapper.register("foo", port=1042)
    return mapper


@pytest.mark.parametrize("phase", [0.0, 0.3, 0.999])
def test_slow_get_port_nr(phase: float) -> None:
    # port_request([?EPMD_PORT_PLEASE2_REQ, d, $f, d, $o, d, $o]): the length and the
    # opcode, then one byte after each 1000 ms pause ("d").
    mapper = slow(phase=phase)
    conn = mapper.connect()
    conn.send(b"\x00\x04z")
    for byte in b"foo":
        mapper.clock.advance(1.0)
        assert conn.is_open(), "closed while the request was still arriving"
        conn.send(bytes([byte]))
    assert conn.reply[:4] == bytes.fromhex("77 00 0412")  # PORT2_RESP, port 1042
    assert not conn.is_open()  # answered, then closed
    assert mapper.factory.counters.timed_out == 0


@pytest.mark.parametrize("phase", [0.0, 0.5])
def test_a_request_byte_by_byte_with_pauses_of_the_packet_timeout(phase: float) -> None:
    mapper = slow(packet_timeout=2, phase=phase)
    conn = mapper.connect()
    for byte in framed(b"zfoo"):  # every byte, header too, 2 s apart
        mapper.clock.advance(2.0)
        assert conn.is_open()
        conn.send(bytes([byte]))
    assert conn.reply[:4] == bytes.fromhex("77 00 0412")


@pytest.mark.parametrize("phase", [0.0, 0.3, 0.999])
def test_a_connection_silent_past_the_packet_timeout_is_closed(
    phase: float, logged: list[LogEvent]
) -> None:
    mapper = slow(phase=phase)
    silent = mapper.connect()
    partial = mapper.connect().send(b"\x00\x04z")
    mapper.clock.advance(1.0)
    assert silent.is_open() and partial.is_open()  # one second is not past 1 s
    tick(mapper.clock, 2)
    assert not silent.is_open() and not partial.is_open()
    assert silent.reply == partial.reply == b""
    assert mapper.factory.counters.timed_out == 2
    assert sum("no complete request within 1 s" in r for r in reasons(logged)) == 2


def test_per_connection_events_are_counted_and_logged_at_debug_only(
    mapper: Mapper, logged: list[LogEvent]
) -> None:
    # The mapper is unauthenticated: whatever anyone does per connection must not write
    # one info or warning line each.
    node = mapper.register("foo")
    mapper.request(alive2("foo"))  # refused: taken
    for junk in (b"\x00\x00", framed(b"Qhello"), alive2("bar") + b"x"):
        mapper.request(junk)  # dropped
    mapper.request(framed(b"s") + b"foo")  # STOP without relaxed mode: dropped
    mapper.request(framed(b"k"))  # refused: live nodes
    mapper.request(framed(b"zfoo"))
    mapper.connect()
    tick(mapper.clock, 65, step=5)  # timed out
    node.send(b"x")  # a byte on the ALIVE socket: unregistered, dropped
    for _ in range(1000):
        mapper.request(framed(b"Q"))
    counters = mapper.factory.counters
    assert (counters.connections, counters.requests, counters.registrations,
            counters.unregistrations, counters.refused, counters.dropped,
            counters.timed_out, counters.kills_refused) == (1009, 4, 1, 1, 1, 1005, 1, 1)
    loud = [e for e in logged if e.get("log_level") not in (LogLevel.debug, None)]
    assert loud == []
    lines = [formatEvent(e) for e in logged]
    assert any("refused ALIVE2_REQ from 127.0.0.1:40000" in line for line in lines)
    assert not any(" object at 0x" in line for line in lines)


def test_the_factory_does_not_log_its_own_repr(logged: list[LogEvent]) -> None:
    factory = MapperServerFactory(Clock(), 4369)
    factory.doStart()
    factory.doStop()
    assert logged == []
