"""``skyproto services`` and ``skyproto status --watch`` against real skymaster and skynode
processes on 127.0.0.1 (issue 15)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from .processes import daemons, wait_for, wait_for_line

__all__ = ["daemons"]

pytestmark = pytest.mark.process
TIMEOUT = 20.0


def skyproto(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m skyproto ...``, to its end."""
    return subprocess.run([sys.executable, "-m", "skyproto", *args], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL, cwd=cwd,
                          env=dict(os.environ, HOME=str(cwd)))


class Watch:
    """A ``skyproto status --watch`` process whose output is read as it comes, without
    blocking the reactor."""

    def __init__(self, *args: str, cwd: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "skyproto", "status", "--watch", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=cwd,
            env=dict(os.environ, HOME=str(cwd), PYTHONUNBUFFERED="1"))
        assert self.process.stdout is not None
        os.set_blocking(self.process.stdout.fileno(), False)
        self._out = b""

    def lines(self) -> list[str]:
        """Every whole line printed so far."""
        assert self.process.stdout is not None
        try:
            chunk = os.read(self.process.stdout.fileno(), 65536)
        except BlockingIOError:
            chunk = b""
        self._out += chunk
        return self._out.decode(errors="replace").splitlines()[
            : self._out.count(b"\n")]

    async def line(self, text: str) -> list[str]:
        """Wait until a line contains ``text``; all lines so far."""
        def found() -> list[str] | None:
            lines = self.lines()
            if any(text in line for line in lines):
                return lines
            if self.process.poll() is not None:
                raise AssertionError(f"the watch exited {self.process.returncode}: "
                                     f"{lines} {self.stderr()}")
            return None

        return await wait_for(found, f"{text!r} from the watch", TIMEOUT)

    async def exited(self) -> int:
        def ended() -> tuple[int] | None:
            code = self.process.poll()
            return None if code is None else (code,)  # 0 is an exit status too

        (code,) = await wait_for(ended, "the watch to exit", TIMEOUT)
        return code

    def stderr(self) -> str:
        if self.process.poll() is None:
            return ""
        assert self.process.stderr is not None
        return self.process.stderr.read().decode(errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest_twisted.ensureDeferred
async def test_services_and_watch_against_real_daemons(daemons: Any) -> None:
    secret = str(daemons.secret)
    cwd = daemons.workdir
    master = daemons("skymaster", "--listen", "tcp:0:interface=127.0.0.1",
                     "--secret-file", secret, name="master")
    port = int((await wait_for_line(master, r"skymaster listening on tcp:127\.0\.0\.1:(\d+)"))
               .group(1))
    master_at = f"tcp:127.0.0.1:{port}"
    common = ["--master", master_at, "--secret-file", secret]

    def node(harbor: str, name: str, *extra: str) -> Any:
        return daemons("skynode", "--harbor", harbor, "--name", name, "--no-mapper", *common,
                       *extra, name=name)

    alpha = node("1", "alpha", "--service", "echo", "--join-group", "workers")
    await wait_for_line(alpha, r"joined the master .* as harbor 1")
    watches = [Watch(*common, cwd=cwd), Watch(*common, "--json", cwd=cwd)]
    try:
        # both print the table first, then wait for changes
        await watches[0].line("watching the master at")
        table = json.loads((await watches[1].line('"harbors"'))[0])
        assert [h["id"] for h in table["harbors"]] == [1]

        # the services of harbor 1, for people and as JSON (ECHO once the grace is over)
        def listed() -> subprocess.CompletedProcess[str] | None:
            result = skyproto("services", *common, "--harbor", "1", cwd=cwd)
            assert result.returncode == 0, result.stderr
            return result if "ECHO" in result.stdout else None

        result = await wait_for(listed, "ECHO in harbor 1's services", TIMEOUT)
        lines = result.stdout.splitlines()
        assert lines[0].startswith("harbor 1 (alpha@") and lines[0].endswith("1 service")
        assert lines[1].split() == ["handle", "service", "names", "groups", "queue"]
        assert lines[2].split() == [":01000002", "Echo", "ECHO", "workers", "0"]
        assert lines[1].index("queue") == lines[2].rindex(" 0") + 1  # aligned columns
        result = skyproto("services", *common, "--harbor", "1", "--json", cwd=cwd)
        assert result.returncode == 0, result.stderr
        listing = json.loads(result.stdout)
        assert listing["harbor"] == 1 and listing["node"].startswith("alpha@")
        assert listing["services"] == [{"handle": 0x01000002, "service": "Echo",
                                        "names": ["ECHO"], "groups": ["workers"], "queue": 0}]

        # a harbor nobody holds: one line on stderr, exit 1
        result = skyproto("services", *common, "--harbor", "7", cwd=cwd)
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            f"skyproto: error: cannot list the services of harbor 7 at {master_at}: "
            "harbor 7 is not in the master's table"]
        assert result.stdout == ""

        # a node joins: both watches print it as it happens
        beta = node("2", "beta", "--service", "relay")
        await wait_for_line(beta, r"joined the master .* as harbor 2")
        lines = await watches[0].line("name RELAY bound to :02000002")
        joins = [i for i, line in enumerate(lines) if "harbor 2 joined: beta@" in line]
        assert joins and joins[0] < len(lines) - 1, lines  # joined, then named
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} harbor 2 joined",
                        lines[joins[0]])
        joined = [json.loads(line) for line in await watches[1].line('"harbor": 2')]
        beta_joined = next(e for e in joined[1:] if e["event"] == "harbor_joined")
        assert beta_joined["harbor"] == 2 and beta_joined["name"].startswith("beta@")
        assert isinstance(beta_joined["time"], float) and beta_joined["sequence"] > 0

        # Ctrl-C: a clean end, status 0
        watches[0].process.send_signal(signal.SIGINT)
        assert await watches[0].exited() == 0
        assert watches[0].stderr() == ""

        # the master goes: one line on stderr, status 1
        master.kill()
        assert await watches[1].exited() == 1
        stderr = watches[1].stderr().splitlines()
        assert len(stderr) == 1, stderr
        assert stderr[0].startswith(
            f"skyproto: error: watching the master at {master_at}: lost the master at "
            f"{master_at}: ")
    finally:
        for watch in watches:
            watch.kill()
