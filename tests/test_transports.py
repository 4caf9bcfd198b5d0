"""One protocol, unchanged, over tcp:, unix: and loopback: endpoint strings (real reactor)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any, TypeVar, cast

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from skyproto.transports.loopback import LoopbackPort, network_for

T = TypeVar("T")

FRAME_LIMIT = 1024 * 1024
FRAMES = [b"hello", b"x" * (200 * 1024), b"bye"]
TIMEOUT = 10


def get_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def timed(d: Deferred[T]) -> Deferred[T]:
    """pytest-twisted has no per-test timeout: never wait on a bare Deferred."""
    return d.addTimeout(TIMEOUT, get_reactor())


class Echo(Int32StringReceiver):
    """Sends every frame straight back."""

    MAX_LENGTH = FRAME_LIMIT

    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def stringReceived(self, string: bytes) -> None:
        self.sendString(string)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(None)


class EchoServerFactory(Factory):
    def __init__(self) -> None:
        self.protocols: list[Echo] = []

    def buildProtocol(self, addr: Any) -> Echo:
        proto = Echo()
        proto.factory = self
        self.protocols.append(proto)
        return proto


class FrameClient(Int32StringReceiver):
    """Sends FRAMES on connect and collects the echoes."""

    MAX_LENGTH = FRAME_LIMIT

    def __init__(self) -> None:
        self.replies: list[bytes] = []
        self.all_echoed: Deferred[list[bytes]] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        for frame in FRAMES:
            self.sendString(frame)

    def stringReceived(self, string: bytes) -> None:
        self.replies.append(string)
        if len(self.replies) == len(FRAMES):
            self.all_echoed.callback(self.replies)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(None)
        if not self.all_echoed.called:
            self.all_echoed.errback(reason or Failure(RuntimeError("connection lost")))


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """A short directory: AF_UNIX paths are limited to about 100 bytes."""
    path = tempfile.mkdtemp(prefix="skyt-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def server_description(scheme: str, tmp: str) -> str:
    if scheme == "tcp":
        return "tcp:0:interface=127.0.0.1"
    if scheme == "unix":
        return f"unix:{tmp}/sock:mode=600"
    return "loopback:transports-echo"


def client_description(scheme: str, tmp: str, port: IListeningPort) -> str:
    if scheme == "tcp":
        return f"tcp:127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
    if scheme == "unix":
        return f"unix:{tmp}/sock"
    return "loopback:transports-echo"


@pytest.mark.parametrize("scheme", ["tcp", "unix", "loopback"])
@pytest_twisted.ensureDeferred
async def test_same_protocol_over_every_transport(scheme: str, short_tmp: str) -> None:
    reactor = get_reactor()
    server_factory = EchoServerFactory()
    port = await timed(
        serverFromString(reactor, server_description(scheme, short_tmp)).listen(server_factory)
    )
    client: FrameClient | None = None
    try:
        if scheme == "loopback":
            assert isinstance(port, LoopbackPort)
        client_endpoint = clientFromString(reactor, client_description(scheme, short_tmp, port))
        connected = await timed(client_endpoint.connect(Factory.forProtocol(FrameClient)))
        assert isinstance(connected, FrameClient)
        client = connected
        assert await timed(client.all_echoed) == FRAMES
        assert len(server_factory.protocols) == 1

        assert client.transport is not None
        client.transport.loseConnection()
        await timed(client.lost)
        await timed(server_factory.protocols[0].lost)
    finally:
        if client is not None and not client.lost.called:
            cast(Any, client.transport).abortConnection()
        stopped = port.stopListening()
        if stopped is not None:
            await timed(stopped)

    if scheme == "unix":
        assert not os.path.exists(f"{short_tmp}/sock")
    if scheme == "loopback":
        network = network_for(reactor)
        assert not network.listening("transports-echo")
        assert network.connections_to("transports-echo") == ()


class Collector(Int32StringReceiver):
    """Collects echoed frames until it has ``expected`` of them."""

    MAX_LENGTH = 8 * 1024 * 1024

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.replies: list[bytes] = []
        self.done: Deferred[list[bytes]] = Deferred()

    def stringReceived(self, string: bytes) -> None:
        self.replies.append(string)
        if len(self.replies) == self.expected:
            self.done.callback(self.replies)


@pytest.mark.parametrize("scheme", ["tcp", "unix"])
@pytest_twisted.ensureDeferred
async def test_send_now_writes_the_socket_at_once_and_keeps_the_order(
        scheme: str, short_tmp: str) -> None:
    """send_now skips Twisted's buffer only while it is empty: bytes already buffered go
    first, and what the socket does not take is buffered behind them."""
    from skyproto.wire.framing import send_now

    reactor = get_reactor()
    server_factory = EchoServerFactory()
    port = await timed(
        serverFromString(reactor, server_description(scheme, short_tmp)).listen(server_factory))
    big = os.urandom(900 * 1024)  # more than one send takes (Twisted sends 128 KiB at most)
    frames = [b"first", b"buffered", b"behind", big, b"last"]
    framed = [len(f).to_bytes(4, "big") + f for f in frames]
    collector = Collector(len(frames))
    try:
        await timed(clientFromString(reactor, client_description(scheme, short_tmp, port))
                    .connect(Factory.forProtocol(lambda: collector)))
        transport: Any = collector.transport
        send_now(transport, framed[0])
        assert not transport._tempDataBuffer and not transport.dataBuffer  # on the socket
        transport.write(framed[1])  # waits in Twisted's buffer for the next turn
        send_now(transport, framed[2])
        assert transport._tempDataBuffer == framed[1:3]  # queued behind, not sent ahead
        send_now(transport, framed[3])  # larger than the socket takes at once
        send_now(transport, framed[4])
        assert await timed(collector.done) == frames
    finally:
        if collector.transport is not None:
            cast(Any, collector.transport).abortConnection()
        for proto in server_factory.protocols:
            if proto.transport is not None:
                cast(Any, proto.transport).abortConnection()
        stopped = port.stopListening()
        if stopped is not None:
            await timed(stopped)
