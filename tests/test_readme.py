"""The README's commands do what they say."""

from __future__ import annotations

import re
import shlex
import socket
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from .processes import daemons, wait_for_line

__all__ = ["daemons"]

README = Path(__file__).resolve().parent.parent / "README.md"


def marked_command(marker: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- {marker} -->\s*```\s*\n(.+?)\n```", text)
    assert match, f"README.md has no command after <!-- {marker} -->"
    return match.group(1).strip()


def test_test_command_is_the_one_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "ci:test-command" in ci
    expected = "python -m pip install -e '.[test]' && python -m pytest"
    assert marked_command("ci:test-command") == expected


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_main_command_runs_a_cluster_that_answers_set_and_get(daemons):
    command = marked_command("readme:main-command")
    install, _, run = command.partition(" && ")
    assert install == "python -m pip install ."  # the suite runs from an install already
    args = shlex.split(run)
    assert args[:3] == ["twistd", "-n", "--pidfile="]
    # The well-known ports may be taken on a developer's machine: the same command, with
    # ephemeral ports (the daemons fixture gives the mapper a port of its own).
    node = daemons(*args[3:], "--gate", "tcp:0:interface=127.0.0.1",
                   "--master-listen", "tcp:0:interface=127.0.0.1",
                   "--secret-file", str(daemons.secret), name="standalone")
    summary = await wait_for_line(node, r"skyproto standalone: master on (\S+), .* gate on "
                                        r"tcp:127\.0\.0\.1:(\d+)")
    await wait_for_line(node, r"joined the master")
    replies = await deferToThread(talk, int(summary.group(2)), [
        "SET greeting hello world", "GET greeting", "GET nothing", "FROB"])
    assert replies == ["OK", "VALUE hello world", "NOTFOUND", "ERROR unknown command FROB"]

    # The README's second command: another node joins with a gate of its own.
    join = shlex.split(marked_command("readme:join-command"))
    assert join[:3] == ["twistd", "-n", "--pidfile="]
    join = [re.sub(r"^tcp:127\.0\.0\.1:2013$", summary.group(1), a) for a in join[3:]]
    join = [re.sub(r"^tcp:8889:", "tcp:0:", a) for a in join]
    second = daemons(*join, "--secret-file", str(daemons.secret), name="gate2")
    gate2 = await wait_for_line(second, r"gate for SIMPLEDB listening on tcp:127\.0\.0\.1:(\d+)")
    await wait_for_line(second, r"joined the master .* as harbor 2")
    assert await deferToThread(talk, int(gate2.group(1)), ["GET greeting"]) == [
        "VALUE hello world"]


def talk(port: int, lines: list[str]) -> list[str]:
    """What ``nc 127.0.0.1 PORT`` shows for these lines (run in a thread: it blocks)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall("".join(f"{line}\n" for line in lines).encode())
        reader = sock.makefile("rb")
        return [reader.readline().decode().rstrip("\n") for _ in lines]
