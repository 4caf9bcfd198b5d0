"""The custom-transport plugin example of docs/transports.md, run exactly as printed.

The code block is written to a temporary ``twisted/plugins/`` folder, that folder is made
visible to Twisted's plugin system, and ``serverFromString``/``clientFromString`` with the
new ``tcp4local:`` prefix carry an echo over a real socket.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, clientFromString, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

import twisted.plugins

T = TypeVar("T")

DOC = Path(__file__).resolve().parent.parent / "docs" / "transports.md"
MARKER = "<!-- example: custom-transport-plugin -->"
PLUGIN_MODULE = "tcp4local_endpoint"  # the file name the doc tells users to use
TIMEOUT = 10


def doc_example(marker: str) -> str:
    """The fenced python block that follows ``marker`` in docs/transports.md."""
    text = DOC.read_text(encoding="utf-8")
    assert text.count(marker) == 1, f"{marker} must appear once in {DOC}"
    match = re.search(r"```python\n(.*?)```", text[text.index(marker) :], re.DOTALL)
    assert match is not None, f"no python code block after {marker}"
    return match.group(1)


def get_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def timed(d: Deferred[T]) -> Deferred[T]:
    return d.addTimeout(TIMEOUT, get_reactor())


def test_doc_names_the_plugin_file() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert f"twisted/plugins/{PLUGIN_MODULE}.py" in text
    assert 'prefix = "tcp4local"' in doc_example(MARKER)


@pytest.fixture
def tcp4local_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Install the doc's plugin the way a user would: a twisted/plugins folder on sys.path.

    twisted.plugins.__path__ was computed when twisted.plugins was first imported, so a
    folder added to sys.path now must also be appended to it.
    """
    plugins = tmp_path / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / f"{PLUGIN_MODULE}.py").write_text(doc_example(MARKER), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(twisted.plugins, "__path__", [*twisted.plugins.__path__, str(plugins)])
    yield plugins
    sys.modules.pop(f"twisted.plugins.{PLUGIN_MODULE}", None)


def test_prefix_unknown_without_the_plugin() -> None:
    with pytest.raises(ValueError, match="Unknown endpoint type"):
        serverFromString(get_reactor(), "tcp4local:0")


def test_plugin_parses_descriptions(tcp4local_plugin: Path) -> None:
    reactor = get_reactor()
    server = serverFromString(reactor, "tcp4local:2999:backlog=7")
    assert isinstance(server, TCP4ServerEndpoint)
    assert (server._interface, server._port, server._backlog) == ("127.0.0.1", 2999, 7)
    client = clientFromString(reactor, "TCP4LOCAL:2999:timeout=3")
    assert (client._host, client._port, client._timeout) == ("127.0.0.1", 2999, 3.0)
    assert (tcp4local_plugin / "dropin.cache").exists()


class Echo(Protocol):
    instances: list[Echo] = []

    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()
        Echo.instances.append(self)

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(None)


class Client(Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.echoed: Deferred[bytes] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.expected = 0

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) >= self.expected and not self.echoed.called:
            self.echoed.callback(self.buffer)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_echo_over_the_custom_transport(tcp4local_plugin: Path) -> None:
    reactor = get_reactor()
    Echo.instances.clear()
    port = await timed(serverFromString(reactor, "tcp4local:0").listen(Factory.forProtocol(Echo)))
    try:
        address = port.getHost()
        assert address.host == "127.0.0.1"
        client = await timed(
            clientFromString(reactor, f"tcp4local:{address.port}").connect(
                Factory.forProtocol(Client)
            )
        )
        assert isinstance(client, Client)
        assert client.transport is not None
        assert client.transport.getPeer().port == address.port  # type: ignore[attr-defined]
        message = b"over a plugin transport " * 1000
        client.expected = len(message)
        client.transport.write(message)
        assert await timed(client.echoed) == message
        client.transport.loseConnection()
        await timed(client.lost)
        (server,) = Echo.instances
        await timed(server.lost)
    finally:
        stopped = port.stopListening()
        if stopped is not None:
            await timed(stopped)
