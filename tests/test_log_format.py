"""``--log-format json``: a real daemon's every log line is one JSON object, with fields."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import Logger, eventsFromJSONLogFile

from skyproto.logformat import JSONLinesObserver, log_file

from .processes import daemons, wait_for, wait_for_line

__all__ = ["daemons"]


def events(text: str) -> list[dict[str, Any]]:
    """Every line as JSON (each must parse on its own)."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines
    return [json.loads(line) for line in lines]


def find(found: list[dict[str, Any]], namespace: str, start: str) -> dict[str, Any]:
    matches = [e for e in found if e.get("log_namespace") == namespace
               and e.get("log_format", "").startswith(start)]
    assert matches, f"no {namespace} event {start!r} in {found}"
    return matches[0]


def test_an_event_is_one_line_with_its_fields_and_its_text() -> None:
    out = io.StringIO()
    log = Logger(namespace="test", observer=JSONLinesObserver(out))
    log.info("harbor {harbor} joined at {endpoint}", harbor=3, endpoint="tcp:a:1")
    try:
        raise ValueError("broken")
    except ValueError:
        log.failure("handler of {handle} failed", handle=":01000002")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["harbor"] == 3 and first["endpoint"] == "tcp:a:1"
    assert first["log_text"] == "harbor 3 joined at tcp:a:1"
    assert first["log_level"]["name"] == "info" and first["log_namespace"] == "test"
    assert "log_logger" not in first
    assert second["log_level"]["name"] == "critical"
    assert second["log_text"].startswith("handler of :01000002 failed\nTraceback")
    assert "ValueError: broken" in second["log_text"]
    # twisted.logger reads the lines back
    back = list(eventsFromJSONLogFile(io.StringIO(out.getvalue())))
    assert back[0]["harbor"] == 3


def test_the_log_goes_where_twistd_would_write_it(tmp_path: Path) -> None:
    import sys

    assert log_file({"logfile": "-", "nodaemon": True}) is sys.stdout
    assert log_file({"logfile": "", "nodaemon": True}) is sys.stdout
    assert log_file(None) is sys.stdout
    opened = log_file({"logfile": str(tmp_path / "sky.log"), "nodaemon": True})
    try:
        opened.write("a line\n")
        opened.flush()
        assert (tmp_path / "sky.log").read_text() == "a line\n"
    finally:
        opened.close()


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_a_real_node_and_mapper_log_json_lines(daemons: Any) -> None:
    node = daemons("skynode", "--harbor", "1", "--name", "alpha", "--service", "echo",
                   "--secret-file", str(daemons.secret), "--log-format", "json",
                   "--http", "tcp:0", name="alpha")
    await wait_for_line(node, r'"log_text": "started the mapper on')
    found = events(node.output())
    started = find(found, "skyproto.tap", "skynode {node} is harbor {harbor}")
    assert started["harbor"] == 1 and started["node"].startswith("alpha@")
    assert started["address"].startswith("tcp:127.0.0.1:")
    assert started["log_level"]["name"] == "info"
    assert started["log_text"] == (f"skynode {started['node']} is harbor 1, incarnation "
                                   f"{started['incarnation']}, listening on "
                                   f"{started['address']}")
    web = find(found, "skyproto.tap", "{what} on {url}")
    assert web["url"].startswith("http://127.0.0.1:")
    assert find(found, "skyproto.node.node.Node", "service {service} is {handle}")[
        "service"] == "Echo"

    # twistd's own --logfile: the JSON lines go there
    logfile = daemons.workdir / "mapper.json"
    mapper = daemons("--logfile", str(logfile), "skymapper", "--listen",
                     "tcp:0:interface=127.0.0.1", "--log-format", "json", name="mapper")
    await wait_for(lambda: logfile.exists() and "skymapper listening" in logfile.read_text(),
                   "the mapper's JSON log file")
    listening = find(events(logfile.read_text()), "skyproto.tap", "skymapper listening")
    assert listening["address"].startswith("tcp:127.0.0.1:")
    assert listening["relaxed"] is False
    assert mapper.output().strip() == ""  # nothing on standard output


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_text_stays_the_default(daemons: Any) -> None:
    mapper = daemons("skymapper", "--listen", "tcp:0:interface=127.0.0.1", name="mapper")
    line = await wait_for_line(mapper, r".*\[skyproto\.tap#info\] skymapper listening on .*")
    assert not line.group(0).lstrip().startswith("{")
