"""MapperPort: lookups answered in the accept loop, everything else handed to the protocol.

Most tests are deterministic: real TCP sockets on 127.0.0.1, accepted by the test and
given to the port through a fake listener (so the test decides what is already in when
the port reads), on a MemoryReactorClock whose readers and writers :func:`serve` runs
with select() until a condition holds (bounded by a deadline, never a sleep). The last
tests listen for real on the global reactor.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    TCP6ClientEndpoint,
    UNIXServerEndpoint,
    serverFromString,
)
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, formatEvent
from twisted.python.failure import Failure

from skyproto.mapper.client import MapperClient
from skyproto.mapper.epmd import (
    MAX_REQUEST_LENGTH,
    NamesResponse,
    Port2Response,
    encode_names_reply,
)
from skyproto.mapper.port import MapperPort, listen_mapper_tcp, mapper_server_endpoint
from skyproto.mapper.server import MapperServerFactory, MapperServerProtocol

_T = TypeVar("_T")
T0 = 1_700_000_000
DEADLINE = 10.0


# --------------------------------------------------------------------------- helpers


def framed(body: bytes) -> bytes:
    return struct.pack(">H", len(body)) + body


def alive2(name: str, port: int = 1234) -> bytes:
    raw = name.encode()
    return framed(struct.pack(">BHBBHHH", 120, port, 77, 0, 6, 5, len(raw)) + raw + b"\0\0")


class FakeListener:
    """Stands in for the port's listening socket: accept() hands out what the test queued.

    Each item is an accepted socket with the peer address to report, or an OSError to
    raise; once empty, accept() raises EAGAIN like a non-blocking listener.
    """

    def __init__(self) -> None:
        self.queue: list[tuple[socket.socket, tuple[str, int]] | OSError] = []
        self.accepts = 0

    def accept(self) -> tuple[socket.socket, tuple[str, int]]:
        self.accepts += 1
        if not self.queue:
            raise BlockingIOError(errno.EAGAIN, "no connection pending")
        item = self.queue.pop(0)
        if isinstance(item, OSError):
            raise item
        return item

    def fileno(self) -> int:  # pragma: no cover - never polled
        return -1

    def shutdown(self, how: int) -> None:
        """The port closing its listener: nothing to shut."""

    def close(self) -> None:
        """The port closing its listener: nothing to close."""


class Rig:
    """A MapperPort on a fake listener and a MemoryReactorClock, and real client sockets."""

    def __init__(self, **options: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(T0)
        self.factory = MapperServerFactory(self.reactor, 4369, **options)
        self.port = MapperPort(0, self.factory, reactor=self.reactor)
        self.listener = FakeListener()
        self.port.socket = self.listener
        self.port.numberAccepts = 100
        self.port.connected = True
        self.real = socket.create_server(("127.0.0.1", 0))
        self.clients: list[socket.socket] = []

    def close(self) -> None:
        for s in self.clients:
            s.close()
        self.real.close()
        for selectable in self.reactor.getReaders() + self.reactor.getWriters():
            handle = getattr(selectable, "socket", None) or getattr(selectable, "_client", None)
            if handle is not None:
                handle.close()

    def connect(
        self, data: bytes = b"", *, peer: tuple[str, int] | None = None, reset: bool = False
    ) -> socket.socket:
        """A new connection queued on the listener, ``data`` already in when accepted."""
        client = socket.create_connection(self.real.getsockname(), timeout=DEADLINE)
        self.clients.append(client)
        accepted, address = self.real.accept()
        if data:
            client.sendall(data)
        if reset:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
        if data or reset:  # what the test sent has arrived before the port reads
            assert select.select([accepted], [], [], DEADLINE)[0]
        self.listener.queue.append((accepted, peer or address))
        return client

    def accept(self) -> None:
        """One readable event on the listening port."""
        self.port.doRead()

    def idle(self) -> bool:
        """Nothing left for the reactor: every connection decided and closed."""
        return not self.reactor.getReaders() and not self.reactor.getWriters()

    def serve(self, until: Callable[[], bool], what: str = "the condition") -> None:
        serve(self.reactor, until, what)


def serve(reactor: MemoryReactorClock, until: Callable[[], bool], what: str) -> None:
    """Run the reactor's readers and writers as a select() reactor would, until ``until()``."""
    deadline = time.monotonic() + DEADLINE
    while not until():
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out waiting for {what}"
        readers, writers = reactor.getReaders(), reactor.getWriters()
        if not readers and not writers:
            raise AssertionError(f"nothing left to serve, still waiting for {what}")
        readable, writable, _ = select.select(readers, writers, [], min(remaining, 0.2))
        for selectable in readable:
            if selectable in reactor.getReaders():
                _dispatch(reactor, selectable, selectable.doRead)
        for selectable in writable:
            if selectable in reactor.getWriters():
                _dispatch(reactor, selectable, selectable.doWrite)


def _dispatch(reactor: MemoryReactorClock, selectable: Any, method: Callable[[], Any]) -> None:
    why = method()
    if why:
        reactor.removeReader(selectable)
        reactor.removeWriter(selectable)
        selectable.connectionLost(Failure(why))


def read_all(client: socket.socket) -> bytes:
    """Everything the mapper sends until it closes (bounded by the socket's timeout)."""
    chunks: list[bytes] = []
    while True:
        data = client.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def closed_silently(client: socket.socket) -> bool:
    return read_all(client) == b""


def reasons(events: list[LogEvent]) -> list[str]:
    return [formatEvent(e) for e in events if "reason" in e]


@pytest.fixture
def rig() -> Iterator[Rig]:
    made = Rig()
    made.factory.table.register("foo", 1234, 77, 0, 6, 5, b"", fd=7)
    try:
        yield made
    finally:
        made.close()


def port2(name: str = "foo", port: int = 1234) -> bytes:
    raw = name.encode()
    return struct.pack(">BBHBBHHH", 119, 0, port, 77, 0, 6, 5, len(raw)) + raw + b"\0\0"


# --------------------------------------------------------------------------- the fast path


def test_a_lookup_already_in_is_answered_in_the_accept_loop(rig: Rig) -> None:
    client = rig.connect(framed(b"zfoo"))
    rig.accept()
    assert read_all(client) == port2()
    # No transport, no reader: answered and closed inside doRead.
    assert rig.reactor.getReaders() == [] and rig.factory.connections == set()
    assert (rig.port.fast, rig.port.waited, rig.port.handed_over) == (1, 0, 0)
    counters = rig.factory.counters
    assert (counters.connections, counters.requests, counters.dropped) == (1, 1, 0)


@pytest.mark.parametrize(
    ("body", "reply"),
    [
        (b"zfoo\0", port2()),  # a trailing NUL is tolerated
        (b"znobody", b"w\x01"),  # not registered
        (b"zfo", b"w\x01"),
    ],
)
def test_other_valid_lookups_in_the_accept_loop(rig: Rig, body: bytes, reply: bytes) -> None:
    client = rig.connect(framed(body))
    rig.accept()
    assert read_all(client) == reply
    assert rig.port.fast == 1 and rig.factory.counters.requests == 1


def test_names_in_the_accept_loop(rig: Rig) -> None:
    rig.factory.table.register("b\u00e9", 2222, 77, 0, 6, 5, b"")
    client = rig.connect(framed(b"n"))
    rig.accept()
    assert read_all(client) == encode_names_reply(4369, [("b\u00e9", 2222), ("foo", 1234)])
    assert rig.port.fast == 1


def test_several_pending_connections_in_one_pass(rig: Rig) -> None:
    clients = [rig.connect(framed(b"zfoo")) for _ in range(3)]
    rig.accept()
    assert [read_all(c) for c in clients] == [port2()] * 3
    assert rig.port.fast == 3
    assert rig.factory.counters.connections == 3


def test_accept_tries_as_many_as_last_time(rig: Rig) -> None:
    # Like tcp.Port: after a pass that accepted one, the next tries one accept(), so a
    # lone connection costs no failing accept() call; a full pass allows 20 more.
    rig.accept()  # nothing pending: EAGAIN, nothing done
    assert rig.listener.accepts == 1 and rig.port.numberAccepts == 1
    rig.connect(framed(b"zfoo"))
    rig.connect(framed(b"zfoo"))
    rig.accept()
    assert rig.listener.accepts == 2 and rig.port.fast == 1
    assert rig.port.numberAccepts == 21
    rig.accept()
    assert rig.listener.accepts == 4 and rig.port.fast == 2
    assert rig.port.numberAccepts == 1


def test_a_registration_made_and_ended_is_seen_by_fast_lookups(rig: Rig) -> None:
    rig.factory.table.unregister("foo")
    node = rig.connect(alive2("foo"))
    rig.accept()
    lookup = rig.connect(framed(b"zfoo"))
    rig.accept()
    assert read_all(lookup) == port2()
    node.close()
    rig.serve(lambda: "foo" not in rig.factory.table, "the unregistration")
    gone = rig.connect(framed(b"zfoo"))
    rig.accept()
    assert read_all(gone) == b"w\x01"


# --------------------------------------------------------------------------- waiting


def test_a_request_not_in_yet_waits_in_a_light_reader(rig: Rig) -> None:
    client = rig.connect()
    rig.accept()
    [waiting] = rig.reactor.getReaders()
    assert not isinstance(waiting, MapperPort) and rig.factory.connections == set()
    assert rig.factory.counters.connections == 0  # counted once it is decided
    client.sendall(framed(b"zfoo"))
    rig.serve(lambda: rig.port.fast == 1, "the answer")
    assert read_all(client) == port2()
    assert rig.reactor.getReaders() == []
    assert (rig.port.fast, rig.port.waited, rig.port.handed_over) == (1, 1, 0)
    counters = rig.factory.counters
    assert (counters.connections, counters.requests) == (1, 1)


def test_a_silent_connection_times_out_like_a_protocol(
    events: list[LogEvent],
) -> None:
    rig = Rig(packet_timeout=1)
    try:
        client = rig.connect()
        rig.accept()
        assert len(rig.reactor.getReaders()) == 1
        rig.reactor.advance(1)  # last_activity + 1 == now: kept, as epmd keeps it
        assert len(rig.reactor.getReaders()) == 1
        rig.reactor.advance(1)
        assert rig.reactor.getReaders() == []
        assert closed_silently(client)
        counters = rig.factory.counters
        assert (counters.connections, counters.timed_out, counters.requests) == (1, 1, 0)
        assert any(
            "closing 127.0.0.1:" in r and "no complete request within 1 s (0 bytes buffered)" in r
            for r in reasons(events)
        )
        rig.reactor.advance(1)
        assert rig.reactor.getDelayedCalls() == []  # nothing left to sweep
    finally:
        rig.close()


def test_a_waiting_connection_that_gets_its_request_is_not_timed_out() -> None:
    rig = Rig(packet_timeout=1)
    try:
        client = rig.connect()
        rig.accept()
        client.sendall(framed(b"znobody"))
        rig.serve(lambda: rig.port.fast == 1, "the answer")
        rig.reactor.advance(5)
        assert rig.factory.counters.timed_out == 0
        assert read_all(client) == b"w\x01"
    finally:
        rig.close()


# --------------------------------------------------------------------------- hand-over


def test_a_request_split_before_accept_is_finished_by_the_protocol(rig: Rig) -> None:
    request = framed(b"zfoo")
    client = rig.connect(request[:3])
    rig.accept()
    [protocol] = rig.factory.connections
    assert isinstance(protocol, MapperServerProtocol) and protocol._reader.buffered == 3
    client.sendall(request[3:])
    rig.serve(lambda: not rig.factory.connections, "the close")
    assert read_all(client) == port2()
    assert (rig.port.fast, rig.port.handed_over) == (0, 1)
    counters = rig.factory.counters
    assert (counters.connections, counters.requests) == (1, 1)


@pytest.mark.parametrize("first", [1, 2, 4])
def test_a_request_split_after_waiting_is_finished_by_the_protocol(rig: Rig, first: int) -> None:
    request = framed(b"zfoo")
    client = rig.connect()
    rig.accept()
    client.sendall(request[:first])
    rig.serve(lambda: bool(rig.factory.connections), "the hand-over")
    client.sendall(request[first:])
    rig.serve(lambda: not rig.factory.connections, "the close")
    assert read_all(client) == port2()
    assert (rig.port.waited, rig.port.handed_over, rig.factory.counters.connections) == (1, 1, 1)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x00\x00", "invalid packet size (0)"),
        (struct.pack(">H", MAX_REQUEST_LENGTH + 1) + b"z", "invalid packet size (3058)"),
        (framed(b"zfoo") + b"x", "got 5 bytes in packet, expected 4"),
        (framed(b"zfoo") + framed(b"zfoo"), "got 10 bytes in packet, expected 4"),
        (framed(b"q"), "unknown opcode 113"),
        (framed(b"z"), "PORT_PLEASE2_REQ without a name"),
        (framed(b"zf\0o"), "PORT_PLEASE2_REQ node name contains a NUL"),
        (framed(b"z\xff"), "PORT_PLEASE2_REQ node name is not valid UTF-8"),
        (framed(b"z" + b"a" * 256), "PORT_PLEASE2_REQ name of 256 characters is too long"),
        (
            framed(b"z" + b"a" * (MAX_REQUEST_LENGTH - 1)) + b"zz",
            "got 3058 bytes in packet, expected 3057",
        ),
    ],
)
@pytest.mark.parametrize("waits", [False, True])
def test_malformed_requests_are_dropped_with_their_reason(
    rig: Rig, events: list[LogEvent], data: bytes, reason: str, waits: bool
) -> None:
    if waits:
        client = rig.connect()
        rig.accept()
        client.sendall(data)
    else:
        client = rig.connect(data)
        rig.accept()
    rig.serve(lambda: rig.factory.counters.dropped == 1, "the drop")
    rig.serve(lambda: not rig.factory.connections, "the close")
    assert closed_silently(client)
    assert rig.port.fast == 0 and rig.factory.counters.connections == 1
    assert any(reason in r for r in reasons(events)), reasons(events)


def test_alive2_is_handed_over_and_stays_registered(rig: Rig) -> None:
    node = rig.connect(alive2("bar", 4321))
    rig.accept()
    rig.serve(lambda: not rig.reactor.getWriters(), "the reply written")
    reply = node.recv(6)
    assert reply[:2] == b"v\x00"
    assert rig.factory.table.lookup("bar") is not None
    [protocol] = rig.factory.connections
    assert protocol.registered == "bar"
    assert len(rig.reactor.getReaders()) == 1  # the open registration's transport
    assert rig.factory.descriptor(protocol.transport) >= 0  # DUMP shows a real fd
    node.close()
    rig.serve(lambda: not rig.factory.connections, "the unregistration")
    assert rig.factory.table.lookup("bar") is None
    counters = rig.factory.counters
    assert (counters.registrations, counters.unregistrations) == (1, 1)


def test_alive2_from_a_remote_peer_is_dropped_by_the_protocol(
    rig: Rig, events: list[LogEvent]
) -> None:
    node = rig.connect(alive2("bar"), peer=("10.1.2.3", 40000))
    rig.accept()
    rig.serve(lambda: not rig.factory.connections, "the close")
    assert closed_silently(node)
    assert "bar" not in rig.factory.table
    assert any("request 120 from a non-local peer" in r for r in reasons(events))


def test_dump_is_handed_over(rig: Rig) -> None:
    client = rig.connect(framed(b"d"))
    rig.accept()
    rig.serve(lambda: not rig.factory.connections, "the close")
    assert read_all(client).endswith(b"active name     <foo> at port 1234, fd = 7\n\0")
    assert rig.port.handed_over == 1


@pytest.mark.parametrize("waits", [False, True])
def test_a_connection_closed_before_sending(rig: Rig, waits: bool) -> None:
    if waits:
        client = rig.connect()
        rig.accept()
        client.close()
        rig.serve(lambda: rig.port.handed_over == 1, "the hand-over")
    else:
        rig.connect(reset=False).close()
        assert select.select([rig.listener.queue[0][0]], [], [], DEADLINE)[0]  # type: ignore[index]
        rig.accept()
    rig.serve(lambda: not rig.factory.connections, "the close")
    counters = rig.factory.counters
    assert (counters.connections, counters.requests, counters.dropped) == (1, 0, 0)
    assert rig.reactor.getReaders() == []


@pytest.mark.parametrize("waits", [False, True])
def test_a_connection_reset_before_sending(rig: Rig, waits: bool) -> None:
    if waits:
        client = rig.connect()
        rig.accept()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        rig.serve(lambda: rig.port.handed_over == 1, "the hand-over")
    else:
        rig.connect(reset=True)
        rig.accept()
    rig.serve(lambda: not rig.factory.connections, "the close")
    assert rig.factory.counters.connections == 1
    assert rig.reactor.getReaders() == []


def test_a_reply_too_big_for_one_send_is_finished_by_the_protocol(rig: Rig) -> None:
    for i in range(600):
        rig.factory.table.register(f"{i:03}" + "n" * 250, 10000 + i, 77, 0, 6, 5, b"")
    expected = encode_names_reply(4369, rig.factory.table.name_ports())
    assert len(expected) > 150_000
    client = rig.connect(framed(b"n"))
    accepted, _ = rig.listener.queue[0]  # type: ignore[misc]
    accepted.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.setblocking(False)
    received: list[bytes] = []

    def drained() -> bool:
        while True:
            try:
                data = client.recv(65536)
            except BlockingIOError:
                return False
            if not data:
                return True
            received.append(data)

    rig.accept()
    assert rig.port.handed_over == 1 and len(rig.factory.connections) == 1
    rig.serve(drained, "the whole NAMES reply")
    assert b"".join(received) == expected
    counters = rig.factory.counters
    assert (counters.connections, counters.requests, counters.dropped) == (1, 1, 0)
    assert rig.factory.connections == set()


# --------------------------------------------------------------------------- accept errors


def test_accept_errors_are_left_to_tcp_port(rig: Rig, events: list[LogEvent]) -> None:
    # ENOBUFS once for us and once for tcp.Port.doRead, which logs it and gives up the pass.
    rig.listener.queue += [OSError(errno.ENOBUFS, "no buffer"), OSError(errno.ENOBUFS, "no")]
    rig.accept()
    assert any(e.get("acceptError") == "ENOBUFS" for e in events)
    client = rig.connect(framed(b"zfoo"))
    rig.accept()
    assert read_all(client) == port2()


def test_an_eperm_from_accept_does_not_stop_the_port(rig: Rig) -> None:
    # Netfilter may make accept() fail with EPERM; tcp.Port carries on accepting.
    rig.listener.queue.append(OSError(errno.EPERM, "netfilter"))
    client = rig.connect(framed(b"zfoo"))
    rig.accept()
    rig.serve(lambda: not rig.factory.connections, "the close")
    assert read_all(client) == port2()
    assert rig.factory.counters.requests == 1


def test_a_bug_serving_one_connection_does_not_stop_the_port(
    rig: Rig, events: list[LogEvent], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(data: bytes) -> bytes | None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(rig.factory, "fast_reply", broken)
    rig.connect(framed(b"zfoo"))
    rig.accept()
    assert any(
        "log_failure" in e and e["log_format"] == "serving a new mapper connection"
        for e in events
    )
    monkeypatch.undo()
    client = rig.connect(framed(b"zfoo"))
    rig.accept()
    assert read_all(client) == port2()


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize(
    "data",
    [
        framed(b"zfoo"),
        framed(b"zfoo\0"),
        framed(b"znobody"),
        framed(b"n"),
        framed(b"nextra"),
        framed(b"d"),
        framed(b"k"),
        framed(b"sfoo"),
        alive2("bar"),
        alive2("foo"),
        framed(b"zfoo")[:3],
        b"\x00",
        b"",
    ],
)
def test_every_request_gets_what_the_plain_port_gives(data: bytes) -> None:
    """The same bytes, sent before accept, on MapperPort and on a plain tcp.Port path."""
    outcomes = []
    for fast in (True, False):
        rig = Rig()
        try:
            rig.factory.table.register("foo", 1234, 77, 0, 6, 5, b"", fd=7)
            client = rig.connect(data)
            if fast:
                rig.accept()
            else:
                accepted, address = rig.listener.queue.pop(0)  # type: ignore[misc]
                rig.port._hand_over(accepted, address, b"")
            client.shutdown(socket.SHUT_WR)
            rig.serve(rig.idle, "the close")
            reply = read_all(client)
            counters = rig.factory.counters
            outcomes.append((reply[:2], len(reply), counters, rig.factory.table.names()))
        finally:
            rig.close()
    assert outcomes[0] == outcomes[1]


# --------------------------------------------------------------------------- real listening


def reactor() -> Any:
    from twisted.internet import reactor as global_reactor

    return global_reactor


def within(d: Deferred[_T], seconds: float = 30) -> Deferred[_T]:
    return d.addTimeout(seconds, reactor())


def test_mapper_server_endpoint_chooses_by_description() -> None:
    assert isinstance(serverFromString(Clock(), "tcp:0"), TCP4ServerEndpoint)
    # Not a reactor with file descriptors, not TCP: exactly what serverFromString gives.
    assert type(mapper_server_endpoint(Clock(), "tcp:0")) is TCP4ServerEndpoint
    endpoint = mapper_server_endpoint(MemoryReactorClock(), "unix:/tmp/skyproto-x.sock")
    assert isinstance(endpoint, UNIXServerEndpoint)
    with pytest.raises(ValueError):
        mapper_server_endpoint(MemoryReactorClock(), "nonsense:1")


@pytest_twisted.ensureDeferred
async def test_a_real_mapper_port_serves_register_lookup_names() -> None:
    factory = MapperServerFactory(reactor(), 0)
    endpoint = mapper_server_endpoint(reactor(), "tcp:0:interface=127.0.0.1:backlog=64")
    port: IListeningPort = await within(endpoint.listen(factory))
    try:
        assert isinstance(port, MapperPort) and port.backlog == 64
        host = port.getHost()
        assert isinstance(host, IPv4Address) and host.host == "127.0.0.1"
        factory.port = host.port
        client = MapperClient(reactor(), TCP4ClientEndpoint(reactor(), "127.0.0.1", host.port))
        registration = await within(client.register("real", 5555, b"x"))
        assert await within(client.port_please("real")) == Port2Response(
            5555, 77, 0, 6, 6, "real", b"x"
        )
        assert await within(client.names_reply()) == NamesResponse(host.port, (("real", 5555),))
        assert port.fast + port.handed_over == 3 and port.handed_over >= 1
        await within(registration.unregister())
    finally:
        stopped = port.stopListening()
        if stopped is not None:
            await within(stopped)


@pytest_twisted.ensureDeferred
async def test_connections_still_waiting_close_when_the_port_stops() -> None:
    """A stopped mapper leaves no socket behind: a connection that never sent its request
    is closed with the port, not left to an idle sweep."""
    from twisted.internet.task import deferLater

    factory = MapperServerFactory(reactor(), 0)
    endpoint = mapper_server_endpoint(reactor(), "tcp:0:interface=127.0.0.1")
    port: IListeningPort = await within(endpoint.listen(factory))
    assert isinstance(port, MapperPort)
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=DEADLINE)
    try:
        deadline = time.monotonic() + DEADLINE
        while not port.waiting:
            assert time.monotonic() < deadline, "the connection was never accepted"
            await deferLater(reactor(), 0.01, lambda: None)
        waiting = list(port.waiting)
        await within(port.stopListening())
        assert port.waiting == set() and not [w for w in waiting
                                              if w in reactor().getReaders()]
        assert closed_silently(client)
    finally:
        client.close()
        if port.connected:
            await within(port.stopListening())


@pytest_twisted.ensureDeferred
async def test_other_factories_get_a_plain_tcp_port() -> None:
    endpoint = mapper_server_endpoint(reactor(), "tcp:0:interface=127.0.0.1")
    port: IListeningPort = await within(endpoint.listen(Factory.forProtocol(Protocol)))
    try:
        assert not isinstance(port, MapperPort)
    finally:
        stopped = port.stopListening()
        if stopped is not None:
            await within(stopped)


@pytest_twisted.ensureDeferred
async def test_a_real_mapper_port_on_ipv6() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        port = listen_mapper_tcp(reactor(), 0, MapperServerFactory(reactor(), 0), 50, "::1")
    except Exception as e:  # CannotListenError: no ::1 here
        pytest.skip(f"cannot listen on ::1: {e}")
    try:
        port.factory.table.register("six", 6666, 77, 0, 6, 5, b"")
        number = port.getHost().port
        client = MapperClient(reactor(), TCP6ClientEndpoint(reactor(), "::1", number))
        reply = await within(client.port_please("six"))
        assert isinstance(reply, Port2Response) and reply.port == 6666
    finally:
        stopped = port.stopListening()
        if stopped is not None:
            await within(stopped)

