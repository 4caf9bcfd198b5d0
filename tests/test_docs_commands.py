"""Every twistd and skyproto command line in the docs names real options.

The commands that can run here are run by other tests (README, services, examples); this
one checks all of them, including the ones for other hosts and systemd units, against the
real option parsers, so no page can show an option that does not exist.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from skyproto import cli, tap

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "examples" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OPTIONS = {"skymaster": tap.MasterOptions, "skynode": tap.NodeOptions,
           "skymapper": tap.MapperOptions}
COMMAND = re.compile(
    r"^\s*(?:\$\s+|ExecStart=\S*?)?((?:PYTHONPATH=\S+\s+)?(?:twistd|skyproto)\s.*)$")


def command_lines() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        in_code = False
        for line in page.read_text().splitlines():
            if line.strip().startswith("```"):
                in_code = not in_code
                continue
            match = COMMAND.match(line) if in_code else None
            if match:
                found.append((page.name, match.group(1)))
    return found


def test_the_docs_show_commands():
    assert len(command_lines()) >= 15


@pytest.mark.parametrize(("page", "command"), command_lines())
def test_command_parses(page, command, tmp_path, monkeypatch):
    words = shlex.split(command.replace("$SKYNODE_OPTIONS", "--harbor 1"))
    words = [w for w in words if not w.startswith("PYTHONPATH=")]
    if "&&" in words:
        words = words[words.index("&&") + 1:]
    monkeypatch.setenv("HOME", str(tmp_path))
    if words[0] == "skyproto":
        cli.build_parser().parse_args(words[1:])
        return
    assert words[0] == "twistd"
    daemon = next(w for w in words if w in OPTIONS)
    options = OPTIONS[daemon]()
    options.parseOptions(words[words.index(daemon) + 1:])  # exits with one line if wrong
