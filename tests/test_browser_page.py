"""The live cluster page in headless Chromium: a real master with --http and two nodes.

Chromium renders the page (its script fetches status.json and re-renders), the DOM must
list both live nodes and their names, and a screenshot is saved, when
``$SKYPROTO_ARTIFACTS`` is set, to that directory (CI sets it), and with
``SKYPROTO_UPDATE_SCREENSHOT=1`` to docs/images/cluster-page.png (shown in the README).
Chromium runs with a temporary profile in a process group of its own, killed at the end:
no Chromium process outlives the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from skyproto.testing import wait_until

from .processes import daemons, wait_for_line
from .test_web_process import http_get, poll

__all__ = ["daemons"]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "images" / "cluster-page.png"
HTTP = r"cluster page, /metrics and /health on (http://127\.0\.0\.1:\d+/)"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.process,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (headless) on PATH; "
                                                ".ci/run installs it"),
]


def chromium(*args: str, timeout: float = 60) -> str:
    """Run headless Chromium once (blocking: call it in a thread) and return its stdout.

    A temporary profile, a new session (so its process group is ours), and the group
    killed whatever happens."""
    assert CHROMIUM is not None
    profile = tempfile.mkdtemp(prefix="sky-chromium-")
    process = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--no-default-browser-check", "--disable-extensions",
         "--hide-scrollbars", "--mute-audio", f"--user-data-dir={profile}", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        start_new_session=True, text=True)
    try:
        out, err = process.communicate(timeout=timeout)
        assert process.returncode == 0, f"chromium exited {process.returncode}: {err[-2000:]}"
        return out
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # its renderers and helpers too
        if process.poll() is None:
            process.wait(10)
        wait_until(lambda: not running_in_group(process.pid),
                   f"chromium's process group {process.pid} to end", timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


def running_in_group(pgid: int) -> list[int]:
    """The processes of group ``pgid`` that still run (zombies, dead and waiting for
    their parent to reap them, do not count)."""
    running = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        state, group = fields[0], int(fields[2])
        if group == pgid and state not in ("Z", "X"):
            running.append(int(stat.parent.name))
    return running


class Tables(HTMLParser):
    """The text of every cell, by table id; and the body's attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.body: dict[str, str | None] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.in_head = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body":
            self.body = dict(attrs)
        elif tag == "table":
            self._table = dict(attrs).get("id") or ""
            self.tables[self._table] = []
        elif tag == "thead":
            self.in_head = True
        elif tag == "tr" and self._table is not None and not self.in_head:
            self.tables[self._table].append([])
        elif tag == "td" and self._table is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        elif tag == "thead":
            self.in_head = False
        elif tag == "td" and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


@pytest_twisted.ensureDeferred
async def test_the_page_lists_the_live_nodes_in_chromium(daemons: Any) -> None:
    secret = ["--secret-file", str(daemons.secret)]
    master = daemons("skymaster", "--listen", "tcp:0:interface=127.0.0.1", "--http", "tcp:0",
                     *secret, name="master")
    master_at = (await wait_for_line(master, r"listening on (tcp:\S+)")).group(1)
    url = (await wait_for_line(master, HTTP)).group(1)
    daemons("skynode", "--harbor", "1", "--name", "alpha@db1", "--master", master_at,
            "--service", "simpledb", *secret, name="alpha")
    daemons("skynode", "--harbor", "2", "--name", "beta@web1", "--master", master_at,
            "--service", "echo", "--gate", "tcp:0:interface=127.0.0.1", *secret, name="beta")
    _, _, body = await poll(
        lambda: http_get(url + "status.json"),
        lambda reply: len(json.loads(reply[2])["harbors"]) == 2
        and len(json.loads(reply[2])["names"]) == 2, "both nodes and their names")
    status = json.loads(body)

    dom = await deferToThread(chromium, "--virtual-time-budget=5000", "--dump-dom", url)
    page = Tables()
    page.feed(dom)
    assert page.body.get("data-rendered") == "live", dom[:2000]  # the script re-rendered it
    harbors = page.tables["harbors"]
    assert [row[:2] for row in harbors] == [["1", "alpha@db1"], ["2", "beta@web1"]]
    assert [row[2] for row in harbors] == [h["endpoint"] for h in status["harbors"]]
    assert [row[3] for row in harbors] == [str(h["incarnation"]) for h in status["harbors"]]
    assert all(row[4].endswith(" UTC") for row in harbors)
    assert page.tables["names"] == [["ECHO", ":02000002", "2"], ["SIMPLEDB", ":01000002", "1"]]

    shot = Path(tempfile.mkdtemp(prefix="sky-shot-")) / "cluster-page.png"
    try:
        await deferToThread(chromium, "--virtual-time-budget=5000", f"--screenshot={shot}",
                            "--window-size=1200,800", url)
        data = shot.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and 10_000 < len(data) < 200_000
        if os.environ.get("SKYPROTO_UPDATE_SCREENSHOT"):
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, SCREENSHOT)
        artifacts = os.environ.get("SKYPROTO_ARTIFACTS")
        if artifacts:
            Path(artifacts).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, Path(artifacts) / "cluster-page.png")
    finally:
        shutil.rmtree(shot.parent, ignore_errors=True)


def test_chromium_leaves_nothing_running(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[int] = []
    real_popen = subprocess.Popen

    def spy(*args: Any, **kwargs: Any) -> Any:
        process = real_popen(*args, **kwargs)
        started.append(process.pid)
        return process

    monkeypatch.setattr(subprocess, "Popen", spy)
    assert "<p>hi</p>" in chromium("--dump-dom", "data:text/html,<p>hi</p>")
    assert started and not any(running_in_group(pid) for pid in started)
