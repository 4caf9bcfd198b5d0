"""The gate over real TCP on 127.0.0.1 (real reactor): a client that half-closes."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from skyproto.gate import GateConfig, GateFactory
from skyproto.node.node import Node
from skyproto.services import SimpleDB

from .cluster import SECRET

TIMEOUT = 10


def get_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class HalfCloser(Protocol):
    """Sends ``data``, closes its write side (``nc -N``), and keeps what comes back."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.received = b""
        self.closed: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.data)
        self.transport.loseWriteConnection()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed.callback(self.received)


async def half_close(framing: str, data: bytes) -> bytes:
    """What a gate of that framing sends a client that sends ``data`` and half-closes."""
    reactor = get_reactor()
    node = Node(1, reactor, SECRET)
    node.spawn(SimpleDB())
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
        GateFactory(node, GateConfig(framing=framing)))
    try:
        client = HalfCloser(data)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port, timeout=5)
        await connectProtocol(endpoint, client).addTimeout(TIMEOUT, reactor)
        return await client.closed.addTimeout(TIMEOUT, reactor)
    finally:
        await port.stopListening()
        await node.stop().addTimeout(TIMEOUT, reactor)


@pytest_twisted.ensureDeferred
async def test_a_half_closing_line_client_gets_every_reply_then_the_close() -> None:
    received = await half_close("line", b"SET a 1\nGET a\nGET b\nSET b 2\nGET b\n")
    assert received == b"OK\nVALUE 1\nNOTFOUND\nOK\nVALUE 2\n"


@pytest_twisted.ensureDeferred
async def test_a_half_closing_packet_client_gets_every_reply_then_the_close() -> None:
    requests = [b"SET a 1", b"GET a"]
    received = await half_close("packet", b"".join(
        len(r).to_bytes(2, "big") + r for r in requests))
    assert received == b"\x00\x02OK\x00\x07VALUE 1"
