"""Issue 15's "Friction to remove": what a new user stumbled on, each with its test.

* a master that is unreachable, silent or not a master is one log line per attempt
  series (the first failure, every 10th, a change of reason), never Twisted's
  ``Scheduling retry N to connect <... object at 0x...>``; ``--master-wait`` exits 1;
* every user mistake is one line on the real stderr naming the option, exit 1, also the
  ones found after start-up (refused by the master, a node name taken on the host);
* a ``--service`` that is no service is refused, a ``--gate-service`` nobody serves warned of;
* no object reprs and no ``[Uninitialized]`` in a daemon's log;
* ``skyproto names`` over ``unix:``, the status table's columns, ``--version``;
* LICENSE, CHANGELOG.md and project URLs in the package metadata.
"""

from __future__ import annotations

import configparser
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel, formatEvent
from zope.interface import implementer

from skyproto import __version__, tap
from skyproto.master.client import JoinInfo, MasterClient

from .cluster import SECRET
from .processes import TWISTD, daemons, free_port, run_twistd, wait_for_line
from .test_master_timeouts import Listener

__all__ = ["daemons"]

ROOT = Path(__file__).resolve().parent.parent
SKYPROTO = str(Path(sys.executable).with_name("skyproto"))
NOISE = re.compile(r"object at 0x|Uninitialized|Scheduling retry")


# --------------------------------------------------------------------- the master client


def texts(events: list[LogEvent]) -> list[str]:
    return [formatEvent(event) for event in events]


def series_lines(events: list[LogEvent]) -> list[str]:
    return [text for text in texts(events) if text.startswith("no master at ")]


def joining(clock: Clock, endpoint: str | IStreamClientEndpoint) -> MasterClient:
    client = MasterClient(clock, endpoint, SECRET, Listener(),
                          JoinInfo(1, 7, "n1@test", "loopback:n1"), rng=_Fixed())
    client.start()
    return client


class _Fixed(random.Random):
    """The rng of a client whose retry delays are exactly the cap (no jitter)."""

    def uniform(self, a: float, b: float) -> float:
        return b


def run(clock: Clock, seconds: float, step: float = 0.05) -> None:
    for _ in range(round(seconds / step)):
        clock.advance(step)


class Quiet(protocol.Factory):
    noisy = False


class Junk(protocol.Protocol):
    """Not a master: answers the hello with an HTTP error, as a web server would."""

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")


class Silent(protocol.Protocol):
    """Accepts the connection and never says anything."""


def test_a_refused_master_is_one_line_per_attempt_series(events: list[LogEvent]) -> None:
    clock = Clock()
    client = joining(clock, "loopback:nobody")
    try:
        run(clock, 25)
        attempts = client._attempts
        assert attempts >= 21
        lines = series_lines(events)
        # the first failure, then every 10th: never one line per attempt
        assert lines[0] == "no master at loopback:nobody: connection refused (attempt 1; retrying)"
        assert lines[1:] == [
            f"no master at loopback:nobody: connection refused (attempt {n}; retrying)"
            for n in range(10, attempts + 1, 10)]
        assert not [text for text in texts(events) if NOISE.search(text)]
        assert client.last_failure == "loopback:nobody: connection refused"
    finally:
        client.stop()
        run(clock, 1)


def attempt_of(line: str) -> int:
    match = re.search(r"\(attempt (\d+); retrying\)$", line)
    assert match, line
    return int(match.group(1))


def test_a_change_of_reason_is_logged_at_once(events: list[LogEvent]) -> None:
    clock = Clock()
    client = joining(clock, "loopback:later")
    try:
        run(clock, 3)  # refused a few times: one line
        assert len(series_lines(events)) == 1
        port = serverFromString(clock, "loopback:later").listen(
            Quiet.forProtocol(Junk))
        run(clock, 3)
        junk = series_lines(events)[1:]
        # at once, the new reason; then only every 10th attempt
        assert junk[0].startswith("no master at loopback:later: not a skyproto master (frame "
                                  "of 1213486160 bytes exceeds the limit of 4096 bytes)"), junk
        assert all(attempt_of(line) % 10 == 0 for line in junk[1:]), junk
        # the junk server's drops are in that line, not one warning per attempt
        assert not [formatEvent(e) for e in events if e["log_level"] >= LogLevel.warn and
                    formatEvent(e).startswith("dropping connection")]
        assert client.welcomes == 0
        port.addCallback(lambda listening: listening.stopListening())
        before = len(series_lines(events))
        run(clock, 3)
        assert series_lines(events)[before].startswith(
            "no master at loopback:later: connection refused (attempt ")
        assert not [text for text in texts(events) if NOISE.search(text)]
    finally:
        client.stop()
        run(clock, 1)


def test_a_silent_master_is_a_timed_out_handshake(events: list[LogEvent]) -> None:
    clock = Clock()
    serverFromString(clock, "loopback:silent").listen(Quiet.forProtocol(Silent))
    client = joining(clock, "loopback:silent")
    try:
        run(clock, 6)
        # the heartbeat timeout (3 s) comes before the attempt's bound (5 s)
        assert series_lines(events) == [
            "no master at loopback:silent: no handshake within 3 s: not a skyproto master, "
            "or an overloaded one (attempt 1; retrying)"]
    finally:
        client.stop()
        run(clock, 1)


@implementer(IStreamClientEndpoint)
class Hanging:
    """A connect that never completes (packets dropped on the way)."""

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        return Deferred()


def test_a_connect_that_hangs_is_timed_out(events: list[LogEvent]) -> None:
    clock = Clock()
    client = joining(clock, Hanging())
    try:
        run(clock, 6)
        assert series_lines(events) == [
            "no master at Hanging: no connection within 5 s (timed out) (attempt 1; retrying)"]
    finally:
        client.stop()
        run(clock, 1)


def test_master_wait_gives_up_only_without_a_welcome() -> None:
    clock = Clock()
    gave_up: list[str] = []

    class Client:
        welcomes = 0
        last_failure: str | None = "tcp:127.0.0.1:2013: connection refused"

    client = Client()
    wait = tap.MasterWait(clock, lambda: cast(MasterClient, client), 2.0, gave_up.append)
    wait.startService()
    clock.advance(1.9)
    assert gave_up == []
    clock.advance(0.2)
    assert gave_up == ["no master answered within 2 s (last attempt: "
                       "tcp:127.0.0.1:2013: connection refused)"]

    welcomed = Client()
    welcomed.welcomes = 1
    gave_up.clear()
    wait = tap.MasterWait(clock, lambda: cast(MasterClient, welcomed), 2.0,
                          gave_up.append)
    wait.startService()
    clock.advance(3)
    assert gave_up == []

    stopped = tap.MasterWait(clock, lambda: cast(MasterClient, client), 2.0, gave_up.append)
    stopped.startService()
    stopped.stopService()
    clock.advance(3)
    assert gave_up == [] and not clock.getDelayedCalls()


# --------------------------------------------------------------------- real processes


def one_error_line(result: subprocess.CompletedProcess[str], program: str) -> str:
    """The single line a user mistake must be: on stderr, nothing on stdout but the log."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{program}: error: "), lines
    assert "Traceback" not in result.stdout + result.stderr
    assert "[stderr#" not in result.stdout, result.stdout
    return lines[0]


MISTAKES = [
    (["skynode", "--harbor", "1", "--master", "localhost:2013"], ["--master", "localhost:2013"]),
    (["skynode", "--harbor", "1", "--peer", "2=localhost:7002"], ["--peer", "localhost:7002"]),
    (["skynode", "--harbor", "1", "--peer", "2=beta"], ["--peer", "beta"]),
    (["skynode", "--harbor", "1", "--gate", "localhost:8888"], ["--gate", "localhost:8888"]),
    (["skynode", "--harbor", "1", "--listen", "nowhere:1"], ["--listen", "nowhere:1"]),
    (["skynode", "--harbor", "1", "--http", "nowhere:1"], ["--http", "nowhere:1"]),
    (["skynode", "--harbor", "1", "--service", "nosuch"], ["--service", "nosuch"]),
    (["skynode", "--harbor", "1", "--service", "collections:OrderedDict"],
     ["--service", "collections:OrderedDict", "not a skyproto service"]),
    (["skynode", "--harbor", "1", "--service", "os:getcwd"], ["--service", "os:getcwd"]),
    (["skynode", "--harbor", "1", "--master", "tcp:127.0.0.1:2013", "--master-wait", "0"],
     ["--master-wait"]),
    (["skynode", "--harbor", "1", "--master-wait", "5"], ["--master-wait", "--master"]),
    (["skymaster", "--listen", "nowhere:1"], ["--listen", "nowhere:1"]),
    (["skymapper", "--listen", "nowhere:1"], ["--listen", "nowhere:1"]),
]


@pytest.mark.process
@pytest.mark.parametrize(("args", "named"), MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_a_user_mistake_is_one_line_naming_the_option(args: list[str], named: list[str],
                                                      tmp_path: Path) -> None:
    secret = tmp_path / "cookie"
    secret.write_text("friction-test-secret\n")
    secret.chmod(0o600)
    extra = ["--secret-file", str(secret)] if args[0] != "skymapper" else []
    if args[0] == "skynode":
        extra.append("--no-mapper")
    line = one_error_line(run_twistd(*args, *extra, cwd=tmp_path), args[0])
    for word in named:
        assert word in line, line


@pytest.mark.process
def test_an_unreachable_master_is_one_line_and_master_wait_exits_1(tmp_path: Path) -> None:
    secret = tmp_path / "cookie"
    secret.write_text("friction-test-secret\n")
    secret.chmod(0o600)
    port = free_port()
    result = run_twistd("skynode", "--harbor", "1", "--master", f"tcp:127.0.0.1:{port}",
                        "--master-wait", "2", "--no-mapper", "--secret-file", str(secret),
                        cwd=tmp_path)
    line = one_error_line(result, "skynode")
    assert line == (f"skynode: error: no master answered within 2 s (last attempt: "
                    f"tcp:127.0.0.1:{port}: connection refused)")
    log = result.stdout
    assert len(re.findall(rf"no master at tcp:127\.0\.0\.1:{port}: connection refused "
                          rf"\(attempt 1; retrying\)", log)) == 1, log
    assert f"joining the master at tcp:127.0.0.1:{port}" in log
    assert not NOISE.search(log), log


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_errors_found_after_start_up_go_to_stderr(daemons: Any) -> None:
    secret = str(daemons.secret)
    master = daemons("skymaster", "--listen", "tcp:0:interface=127.0.0.1",
                     "--secret-file", secret, name="master")
    master_at = (await wait_for_line(master, r"skymaster listening on (tcp:\S+)")).group(1)

    other = daemons.workdir / "other-cookie"
    other.write_text("another-cluster-secret\n")
    other.chmod(0o600)
    wrong = run_twistd("skynode", "--harbor", "5", "--master", master_at, "--no-mapper",
                       "--secret-file", str(other), cwd=daemons.workdir)
    assert one_error_line(wrong, "skynode") == (
        f"skynode: error: the master at {master_at} refused this node: authentication "
        "failed: the master does not know our cluster secret")

    first = daemons("skynode", "--harbor", "1", "--name", "alpha", "--master", master_at,
                    "--secret-file", secret, name="first")
    await wait_for_line(first, r"joined the master")
    await wait_for_line(first, r"started the mapper on|registered alpha with the mapper")
    taken = run_twistd("skynode", "--harbor", "1", "--name", "beta", "--master", master_at,
                       "--no-mapper", "--secret-file", secret, cwd=daemons.workdir)
    assert "refused this node: harbor 1 is held by live node alpha@" in \
        one_error_line(taken, "skynode")

    # a second node named alpha on this host: the mapper keeps refusing the name
    same_name = twistd("skynode", "--harbor", "2", "--name", "alpha", "--master", master_at,
                       "--secret-file", secret, cwd=daemons.workdir,
                       env={"ERL_EPMD_PORT": str(daemons.mapper_port)})
    assert "the name alpha seems to be in use by another node on this host" in \
        one_error_line(same_name, "skynode")


def twistd(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """run_twistd with these environment variables."""
    return subprocess.run([TWISTD, "-n", "--pidfile=", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=30, env=dict(os.environ, HOME=str(cwd), **env),
                          stdin=subprocess.DEVNULL)


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_a_gate_service_nobody_serves_is_warned_of(daemons: Any) -> None:
    node = daemons("skynode", "--harbor", "1", "--gate", "tcp:0:interface=127.0.0.1",
                   "--gate-service", "ECHOO", "--service", "echo", "--no-mapper",
                   "--secret-file", str(daemons.secret), name="gate")
    line = await wait_for_line(node, r"\[skyproto\.tap#warn\] (.*ECHOO.*)")
    assert "the gate's service ECHOO is not running" in line.group(1)
    assert "names: ECHO" in line.group(1)

    # a node without a master checks at once, before twistd says it is starting up
    good = daemons("skynode", "--harbor", "2", "--gate", "tcp:0:interface=127.0.0.1",
                   "--gate-service", "ECHO", "--service", "echo", "--no-mapper",
                   "--secret-file", str(daemons.secret), name="good")
    await wait_for_line(good, r"reactor class:")
    assert not good.search(r"gate's service")


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_the_logs_have_no_object_reprs(daemons: Any) -> None:
    secret = str(daemons.secret)
    port = free_port()
    master_at = f"tcp:127.0.0.1:{port}"
    # the node starts first: its attempts to reach the master are in its log too
    node = daemons("skynode", "--harbor", "1", "--master", master_at, "--gate",
                   "tcp:0:interface=127.0.0.1", "--service", "simpledb", "--http", "tcp:0",
                   "--secret-file", secret, name="node")
    await wait_for_line(node, r"no master at|Scheduling retry")
    master = daemons("skymaster", "--listen", f"tcp:{port}:interface=127.0.0.1",
                     "--secret-file", secret, name="master")
    await wait_for_line(node, r"joined the master")
    other = daemons("skynode", "--harbor", "2", "--master", master_at, "--service", "echo",
                    "--secret-file", secret, name="other")
    await wait_for_line(node, r"harbor 2 link up")
    gate = int((await wait_for_line(node, r"gate for SIMPLEDB listening on "
                                          r"tcp:127\.0\.0\.1:(\d+)")).group(1))
    with socket.create_connection(("127.0.0.1", gate), timeout=10) as client:
        client.sendall(b"SET greeting hello\nGET greeting\n")
        received = b""
        while received.count(b"\n") < 2:
            chunk = client.recv(100)
            assert chunk, received
            received += chunk
    assert received == b"OK\nVALUE hello\n"
    for daemon in (other, node, master):
        daemon.stop()
    for daemon in (node, master, other):
        noisy = [line for line in daemon.output().splitlines() if NOISE.search(line)]
        assert not noisy, f"{daemon.name}: {noisy}"
    # a gate client comes and goes at debug level, not one info line each
    assert node.search(r"#debug\] gate client \S+ .*connected")
    assert not node.search(r"#(info|warn)\] gate client")


@pytest.mark.process
@pytest.mark.parametrize("daemon", ["skynode", "skymaster", "skymapper"])
def test_version_is_ours(daemon: str, tmp_path: Path) -> None:
    result = run_twistd(daemon, "--version", cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (
        0, f"skyproto {__version__}\n", "")


def skyproto(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SKYPROTO, *args], capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, **(env or {})), stdin=subprocess.DEVNULL)


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_names_over_unix_says_the_endpoint(daemons: Any) -> None:
    path = f"{daemons.workdir}/mapper.sock"
    mapper = daemons("skymapper", "--listen", f"unix:{path}:mode=600", name="mapper")
    await wait_for_line(mapper, r"skymapper listening on unix:")
    listed = skyproto("names", "--mapper", f"unix:{path}")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0] == f"epmd: up and running on unix:{path} with data:"
    assert "port 4369" not in listed.stdout


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_the_status_table_fits_long_endpoints(daemons: Any) -> None:
    secret = str(daemons.secret)
    master = daemons("skymaster", "--listen", "tcp:0:interface=127.0.0.1",
                     "--secret-file", secret, name="master")
    master_at = (await wait_for_line(master, r"skymaster listening on (tcp:\S+)")).group(1)
    long_name = "a-rather-long-host-name-for-a-node.cluster.example.org"
    nodes = [daemons("skynode", "--harbor", str(harbor), "--name", name, "--master",
                     master_at, "--no-mapper", "--secret-file", secret, *extra, name=name)
             for harbor, name, extra in [
                 (1, "a", []),
                 (2, "a-node-with-a-long-name", ["--advertise", f"tcp:{long_name}:7001"])]]
    for node in nodes:
        await wait_for_line(node, r"joined the master")
    listed = skyproto("status", "--master", master_at, "--secret-file", secret)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()[:3]
    assert f"tcp:{long_name}:7001" in listed.stdout
    starts = [match.start() for match in re.finditer(r"\S+", header)][:5]
    for row in rows:
        # every column starts where its heading does, and is separated by a space
        for start in starts[1:]:
            assert row[start - 1] == " " and row[start] != " ", (header, row)


def test_packaging_has_license_changelog_and_urls() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    metadata = config["metadata"]
    assert metadata["license"] == "MIT"
    assert metadata["license_files"].split() == ["LICENSE"]
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License")
    assert "Copyright (c) 2026 the skyproto authors" in license_text
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {__version__}" in changelog
    for capability in ("sealed", "skytls:", "etcd", "/metrics", "pieces", "--master-wait"):
        assert capability in changelog, capability
    for line in metadata.get("project_urls", "").strip().splitlines():
        label, _, url = (part.strip() for part in line.partition("="))
        # the project's own files only: no invented hosts
        assert not url.startswith(("http://", "https://")), (label, url)
        assert (ROOT / url).exists(), (label, url)
