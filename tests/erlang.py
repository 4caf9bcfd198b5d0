"""Helpers for tests that run genuine Erlang (``erl``) and ``epmd`` next to the reactor.

Every process is spawned through the reactor (so an in-process mapper keeps serving
while we wait), tracked by a :class:`Processes` registry, and killed by
:meth:`Processes.cleanup`. Waiting is always on a condition with a deadline. Nothing
touches the real HOME or the well-known port 4369: each node gets a temporary HOME,
``-setcookie``, ``-start_epmd false`` and an explicit ``ERL_EPMD_PORT``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

__all__ = [
    "ErlangProcess",
    "Processes",
    "epmd_executable",
    "erl_executable",
    "free_port",
    "node_argv",
    "node_env",
]


def erl_executable() -> str | None:
    """The ``erl`` on PATH, or None (the interop tests then skip)."""
    return shutil.which("erl")


def epmd_executable() -> str | None:
    """The ``epmd`` on PATH, or the one inside the Erlang installation, or None."""
    found = shutil.which("epmd")
    if found:
        return found
    erl = erl_executable()
    if erl is None:
        return None
    root = os.path.dirname(os.path.dirname(os.path.realpath(erl)))
    for candidate in sorted(glob.glob(os.path.join(root, "erts-*", "bin", "epmd"))):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for programs that cannot use 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def node_env(home: str, epmd_port: int, **extra: str) -> dict[str, str]:
    """A clean environment for erl/epmd: temp HOME, our epmd port, nothing inherited."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": home,
        "ERL_EPMD_PORT": str(epmd_port),
        "LANG": "C.UTF-8",
    }
    env.update(extra)
    return env


def node_argv(erl: str, sname: str, script: str, cookie: str = "x") -> list[str]:
    """``erl`` for a node that uses only an already running mapper and runs ``script``."""
    return [
        erl,
        "-sname",
        sname,
        "-start_epmd",
        "false",
        "-noshell",
        "-setcookie",
        cookie,
        "-kernel",
        "inet_dist_use_interface",
        "{127,0,0,1}",
        "-eval",
        script,
    ]


class ErlangProcess(ProcessProtocol):
    """A child process whose output we collect and whose conditions we can await."""

    def __init__(self, name: str, clock: IReactorTime) -> None:
        self.name = name
        self.clock = clock
        self.out = b""
        self.err = b""
        self.exit_code: int | None = None
        self.running = False
        self.ended: Deferred[int | None] = Deferred()
        self._watchers: list[tuple[Callable[[], bool], Deferred[None]]] = []

    def connectionMade(self) -> None:
        self.running = True

    def outReceived(self, data: bytes) -> None:
        self.out += data
        self._check()

    def errReceived(self, data: bytes) -> None:
        self.err += data
        self._check()

    def processEnded(self, reason: Failure) -> None:
        self.running = False
        if isinstance(reason.value, ProcessDone):
            self.exit_code = 0
        else:
            self.exit_code = getattr(reason.value, "exitCode", None)
        self._check()
        watchers, self._watchers = self._watchers, []
        for _, d in watchers:
            if not d.called:
                d.errback(RuntimeError(f"{self.name} exited ({self.exit_code}): {self.output}"))
        self.ended.callback(self.exit_code)

    @property
    def output(self) -> str:
        """stdout and stderr, decoded, for assertions and failure messages."""
        return (self.out + self.err).decode("utf-8", "replace")

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> Deferred[None]:
        """Fires when ``predicate()`` holds after new output; errbacks on exit or timeout."""
        d: Deferred[None] = Deferred()
        if predicate():
            d.callback(None)
            return d
        if not self.running and self.ended.called:
            d.errback(RuntimeError(f"{self.name} already exited: {self.output}"))
            return d
        self._watchers.append((predicate, d))
        return d.addTimeout(timeout, self.clock, onTimeoutCancel=self._timed_out)

    def wait_for_text(self, text: str, timeout: float) -> Deferred[None]:
        return self.wait_for(lambda: text in self.output, timeout)

    def wait_exit(self, timeout: float) -> Deferred[int | None]:
        """The exit code, once the process has ended (killing it after ``timeout``)."""
        if self.ended.called:
            d: Deferred[int | None] = Deferred()
            d.callback(self.exit_code)
            return d
        waiter: Deferred[int | None] = Deferred()

        def passed_on(code: int | None) -> int | None:
            if not waiter.called:
                waiter.callback(code)
            return code

        self.ended.addCallback(passed_on)
        return waiter.addTimeout(timeout, self.clock, onTimeoutCancel=self._timed_out)

    def _timed_out(self, result: Any, timeout: float) -> Any:
        self.kill()
        if isinstance(result, Failure):
            return Failure(TimeoutError(f"{self.name}: no result in {timeout} s: {self.output}"))
        return result

    def _check(self) -> None:
        keep = []
        for predicate, d in self._watchers:
            if d.called:
                continue
            if predicate():
                d.callback(None)
            else:
                keep.append((predicate, d))
        self._watchers = keep

    def close_stdin(self) -> None:
        if self.running and self.transport is not None:
            self.transport.closeStdin()

    def kill(self) -> None:
        """SIGKILL the process if it still runs (only ever this process, by its pid)."""
        if self.running and self.transport is not None:
            with contextlib.suppress(ProcessExitedAlready):
                self.transport.signalProcess("KILL")


class Processes:
    """Every process a test started, so that all of them are killed at the end."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.started: list[ErlangProcess] = []

    def spawn(self, name: str, argv: Sequence[str], env: dict[str, str]) -> ErlangProcess:
        process = ErlangProcess(name, self.reactor)
        spawner: IReactorProcess = self.reactor
        spawner.spawnProcess(process, argv[0], list(argv), env=env)
        self.started.append(process)
        return process

    async def run(
        self, name: str, argv: Sequence[str], env: dict[str, str], timeout: float = 30
    ) -> ErlangProcess:
        """Run a command to completion (killed after ``timeout``) and return it."""
        process = self.spawn(name, argv, env)
        process.close_stdin()
        await process.wait_exit(timeout)
        return process

    async def cleanup(self, timeout: float = 15) -> None:
        """Kill whatever still runs and wait until every process has been reaped."""
        for process in self.started:
            process.kill()
        for process in self.started:
            if not process.ended.called:
                await process.wait_exit(timeout)
