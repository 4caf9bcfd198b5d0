"""Real twistd daemons for the process tests: started, watched through their logs, killed."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from skyproto import testing

TWISTD = str(Path(sys.executable).with_name("twistd"))
T = TypeVar("T")


class Daemon:
    """One ``twistd -n`` process whose output goes to a log file we can search."""

    def __init__(self, args: list[str], workdir: Path, name: str,
                 env: dict[str, str] | None = None) -> None:
        self.log_path = workdir / f"{name}.log"
        self.name = name
        log = self.log_path.open("wb")
        env = dict(os.environ, HOME=str(workdir), PYTHONUNBUFFERED="1", **(env or {}))
        # a daemon may load services from modules a test wrote into its working directory
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(workdir), os.environ.get("PYTHONPATH", "")) if p)
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", *args],
            cwd=workdir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )
        log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def search(self, pattern: str) -> re.Match[str] | None:
        return re.search(pattern, self.output())

    def search_all(self, pattern: str) -> list[str]:
        return re.findall(pattern, self.output())

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not gone within 10 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture
def daemons() -> Iterator[Callable[..., Daemon]]:
    """Start daemons in a short temp dir (UNIX socket paths are short); kill all at the end."""
    workdir = Path(tempfile.mkdtemp(prefix="sky"))
    started: list[Daemon] = []
    secret = workdir / "cookie"
    secret.write_text("process-test-secret\n")
    secret.chmod(0o600)
    # Every node registers with its host's port mapper: give this test a mapper port of
    # its own, never the well-known 4369 (a genuine epmd may hold it).
    mapper_port = free_port()

    def start(*args: str, name: str | None = None) -> Daemon:
        daemon = Daemon(list(args), workdir, name or f"d{len(started)}",
                        env={"ERL_EPMD_PORT": str(mapper_port)})
        started.append(daemon)
        return daemon

    start.workdir = workdir  # type: ignore[attr-defined]
    start.secret = secret  # type: ignore[attr-defined]
    start.mapper_port = mapper_port  # type: ignore[attr-defined]
    yield start
    for daemon in started:
        daemon.stop()
    for path in workdir.iterdir():
        path.unlink()
    workdir.rmdir()


async def wait_for(condition: Callable[[], T | None], what: str, timeout: float = 15.0) -> T:
    """:func:`skyproto.testing.wait_for` on the running reactor (15 s unless told)."""
    from twisted.internet import reactor

    return await testing.wait_for(condition, what, timeout, clock=reactor)


async def wait_for_line(daemon: Daemon, pattern: str, timeout: float = 15.0) -> re.Match[str]:
    def found() -> re.Match[str] | None:
        if daemon.process.poll() is not None and not daemon.search(pattern):
            raise AssertionError(f"{daemon.name} exited:\n{daemon.output()}")
        return daemon.search(pattern)

    return await wait_for(found, f"{pattern!r} in {daemon.name}'s log", timeout)


def free_port() -> int:
    """A TCP port nobody listens on right now (on 127.0.0.1)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def run_twistd(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a twistd command that should exit by itself (a user mistake)."""
    env: dict[str, Any] = dict(os.environ, HOME=str(cwd))
    env.setdefault("ERL_EPMD_PORT", str(free_port()))
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", *args], cwd=cwd, capture_output=True, text=True,
        timeout=timeout, env=env, stdin=subprocess.DEVNULL,
    )
