"""The README's Python example runs as written; ``join_master`` needs only the endpoint."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock

from skyproto.address import short_hostname
from skyproto.errors import ConfigurationError
from skyproto.master.registry import InMemoryRegistry
from skyproto.master.server import MasterService
from skyproto.node.node import Node
from skyproto.testing import settle

README = Path(__file__).resolve().parent.parent / "README.md"
SECRET = b"a secret of at least sixteen bytes"


def example() -> str:
    match = re.search(r"<!-- readme:example -->\s*```python\n(.+?)\n```", README.read_text(),
                      re.S)
    assert match, "README.md has no ```python block after <!-- readme:example -->"
    return match.group(1)


def test_the_readme_example_runs_and_prints_its_result(tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(example())
    env = dict(os.environ, HOME=str(tmp_path), PYTHONPATH=str(README.parent))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert (done.returncode, done.stdout, done.stderr) == (0, "hello world\n", "")
    assert not list(tmp_path.glob(".skyproto.cookie"))  # it touched no secret file


def test_join_master_takes_the_name_and_the_endpoint_from_the_node() -> None:
    clock = Clock()
    master = MasterService(InMemoryRegistry(), clock, SECRET, auto_grace=0)
    serverFromString(clock, "loopback:readme-master").listen(master)
    node = Node(1, clock, SECRET)
    with pytest.raises(ConfigurationError, match="listen first"):
        node.join_master("loopback:readme-master")
    node.listen("loopback:readme-h1")
    client = node.join_master("loopback:readme-master")
    settle(clock)
    assert client.connected
    (record,) = master.registry.snapshot().harbors
    assert (record.node, record.endpoint) == (f"harbor1@{short_hostname()}",
                                              "loopback:readme-h1")
    node.stop()
    settle(clock)


def test_join_master_keeps_what_it_is_given() -> None:
    clock = Clock()
    node = Node(0, clock, SECRET)  # no harbor yet: the master assigns one
    node.listen("loopback:readme-auto")
    client = node.join_master("loopback:nobody-here", harbor_endpoint="loopback:elsewhere")
    assert client.join is not None
    assert client.join.node == f"node{os.getpid()}@{short_hostname()}"
    assert client.join.endpoint == "loopback:elsewhere"
    node.stop()
    settle(clock)


@pytest_twisted.ensureDeferred
async def test_a_tcp_listener_is_advertised_as_its_address() -> None:
    from twisted.internet import reactor

    node = Node(3, reactor, SECRET)
    port: Any = await node.listen("tcp:0:interface=127.0.0.1")
    try:
        client = node.join_master("tcp:127.0.0.1:1", "three@here")  # nobody answers there
        assert client.join is not None
        assert client.join.endpoint == f"tcp:127.0.0.1:{port.getHost().port}"
        assert client.join.node == "three@here"
    finally:
        stopped: Deferred[Any] = node.stop()
        await stopped.addTimeout(10, reactor)
