"""The example in docs/services.md runs as printed."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from skyproto.errors import RemoteError
from skyproto.node.node import Node
from skyproto.services import SimpleDB

from .cluster import SECRET, failure_of, result_of
from .processes import daemons, wait_for_line
from .test_readme import talk

__all__ = ["daemons"]

DOC = Path(__file__).resolve().parent.parent / "docs" / "services.md"


def example_namespace() -> dict[str, Any]:
    text = DOC.read_text()
    match = re.search(r"<!-- example: service -->\s*```python\n(.+?)```", text, re.S)
    assert match, "docs/services.md lost its marked example"
    namespace: dict[str, Any] = {}
    exec(compile(match.group(1), str(DOC), "exec"), namespace)
    return namespace


def test_the_greeter_example_calls_simpledb():
    greeter_class = example_namespace()["Greeter"]
    clock = Clock()
    node = Node(1, clock, SECRET)
    node.spawn(SimpleDB())
    node.spawn(greeter_class())
    node.call("SIMPLEDB", ["SET", "ann", "Ann Smith"])
    clock.advance(0)
    hello = node.call("GREETER", ["GREET", "ann"])
    nobody = node.call("GREETER", ["GREET", "bob"])
    wrong = node.call("GREETER", ["HELLO"])
    clock.advance(0)
    assert result_of(hello) == "Hello, Ann Smith!"
    assert result_of(nobody) == "nobody called bob"
    assert failure_of(wrong, RemoteError).value.message == "usage: GREET <key>"


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_the_documented_command_runs_the_greeter_behind_a_gate(daemons):
    text = DOC.read_text()
    code = re.search(r"<!-- example: service -->\s*```python\n(.+?)```", text, re.S)
    command = re.search(r"\n(twistd -n --pidfile= skynode --standalone [^\n]+)\n", text)
    assert code and command
    (daemons.workdir / "mymodule.py").write_text(code.group(1))
    args = shlex.split(command.group(1))[3:]
    node = daemons(*args, "--gate", "tcp:0:interface=127.0.0.1",
                   "--master-listen", "tcp:0:interface=127.0.0.1",
                   "--secret-file", str(daemons.secret), name="greeter")
    gate = await wait_for_line(node, r"gate for GREETER listening on tcp:127\.0\.0\.1:(\d+)")
    await wait_for_line(node, r"joined the master")
    replies = await deferToThread(talk, int(gate.group(1)), ["GREET ann", "HELLO"])
    assert replies == ["nobody called ann", "ERROR usage: GREET <key>"]


def test_the_testing_example_runs_as_printed():
    text = (Path(__file__).parent.parent / "docs" / "services.md").read_text()
    match = re.search(r"<!-- example: testing -->\s*```python\n(.+?)```", text, re.S)
    assert match, "docs/services.md lost its testing example"
    exec(compile(match.group(1), "docs/services.md:testing", "exec"), {})
