"""The README's commands do what they say."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import pytest_twisted

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
async def test_main_command_starts_a_node(daemons):
    command = marked_command("readme:main-command")
    install, _, run = command.partition(" && ")
    assert install == "python -m pip install ."  # the suite runs from an install already
    args = shlex.split(run)
    assert args[:3] == ["twistd", "-n", "--pidfile="]
    # The README's fixed port may be taken on a developer's machine: listen on port 0.
    args = [re.sub(r"^tcp:7001:", "tcp:0:", a) for a in args[3:]]
    node = daemons(*args, "--secret-file", str(daemons.secret), name="readme")
    await wait_for_line(node, r"service Echo is :01000002 \(ECHO\)")
    await wait_for_line(
        node, r"skynode alpha@\S+ is harbor 1, .* listening on tcp:127\.0\.0\.1:\d+"
    )
