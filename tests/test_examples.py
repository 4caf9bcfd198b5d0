"""The examples: examples/README.md's commands, the three-process cluster surviving its
master's kill -9, the gate client, and GREETER (a service that awaits another service).

Every daemon runs with a temporary HOME (so the default secret file is a fresh one) and a
port mapper port of its own (ERL_EPMD_PORT), never 4369, and listens on free ports of
127.0.0.1. Everything started is stopped at the end, by pid, even when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from examples.client import endpoint_address
from examples.greeter import Greeter
from skyproto.errors import RemoteError
from skyproto.services import Echo, SimpleDB
from skyproto.testing import settle, wait_until

from .cluster import failure_of, mesh, result_of
from .processes import free_port

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
README = EXAMPLES / "README.md"
CLUSTER = EXAMPLES / "cluster.py"
CLIENT = EXAMPLES / "client.py"
BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
COMMAND_TIMEOUT = 120  # seconds for one command; the script's own waits are 30 s at most
WAIT = 20.0  #: seconds to wait for a daemon to get somewhere


def talk(port: int, requests: list[str], timeout: float = 10.0) -> list[str]:
    """Send request lines to a gate on 127.0.0.1, one at a time; its reply lines."""
    replies = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn, \
            conn.makefile("rb") as lines:
        for request in requests:
            conn.sendall(request.encode() + b"\n")
            reply = lines.readline()
            assert reply.endswith(b"\n"), f"the gate closed the connection after {request!r}"
            replies.append(reply.decode().rstrip("\r\n"))
    return replies


def try_talk(port: int, requests: list[str]) -> list[str] | None:
    try:
        return talk(port, requests, timeout=3)
    except (OSError, AssertionError):
        return None


def proc_state(pid: int) -> tuple[str, bytes] | None:
    """(state letter, command line) from /proc, or None if there is no such process."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone (or, with hidepid, not ours to see)
        return None
    return status.rpartition(")")[2].split()[0], cmdline


def alive(pid: int, marker: str) -> bool:
    """Whether ``pid`` runs and is ours (its command line names ``marker``, our temporary
    directory). A zombie has exited: it is only waiting for its parent (here often pid 1,
    which may not reap) to collect it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    found = proc_state(pid)
    if found is None:
        return not Path("/proc/self").exists()
    state, cmdline = found
    return state not in ("Z", "X") and marker.encode() in cmdline


def processes_naming(marker: str) -> list[int]:
    """Every live (not zombie) process whose command line names ``marker``, from /proc."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        state = proc_state(int(entry.name))
        if state is not None and state[0] not in ("Z", "X") and marker.encode() in state[1]:
            found.append(int(entry.name))
    return found


@dataclass
class Sandbox:
    """A temporary HOME, run directory and mapper port, and every pid seen in them."""

    root: Path
    env: dict[str, str]
    pids: dict[int, str] = field(default_factory=dict)  #: every daemon pid seen -> name
    background: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return self.root / "cluster-run"

    @property
    def home(self) -> Path:
        return self.root / "home"

    def cluster(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``python examples/cluster.py ARGS --dir RUN_DIR``."""
        result = subprocess.run(
            [sys.executable, str(CLUSTER), *args, "--dir", str(self.run_dir)], cwd=REPO,
            env=self.env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
            stdin=subprocess.DEVNULL)
        self.note_pids()
        if check:
            assert result.returncode == 0, (
                f"cluster.py {' '.join(args)} failed:\n{result.stdout}{result.stderr}"
                f"{self.logs()}")
        return result

    def shell(self, command: str) -> subprocess.CompletedProcess[str]:
        """A README command line, run by bash from the repository root; stderr in stdout."""
        return subprocess.run(
            ["bash", "-c", command], cwd=REPO, env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, timeout=COMMAND_TIMEOUT,
            stdin=subprocess.DEVNULL)

    def start_background(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        """A foreground daemon (``twistd -n``) in a process group of its own."""
        with log.open("wb") as out:
            process = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        self.background.append(process)
        return process

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.run_dir / "cluster.json").read_text())
        return data

    def pidfiles(self) -> dict[str, int]:
        found = {}
        for path in self.run_dir.glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):  # removed, or being written
                found[path.stem] = int(path.read_text())
        return found

    def note_pids(self) -> None:
        if self.run_dir.is_dir():
            for name, pid in self.pidfiles().items():
                self.pids.setdefault(pid, name)

    def live_pids(self) -> list[tuple[int, str]]:
        """Our daemons still running: those whose pids we saw, and any other process whose
        command line names our temporary directory (one we never saw a pid file of)."""
        pids = set(self.pids) | set(processes_naming(str(self.root)))
        return [(pid, self.pids.get(pid, "?")) for pid in sorted(pids)
                if alive(pid, str(self.root))]

    def logs(self) -> str:
        if not self.run_dir.is_dir():
            return ""
        return "".join(f"\n--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
                       for path in sorted(self.run_dir.glob("*.log")))

    def clean_up(self) -> None:
        if self.run_dir.is_dir():
            self.cluster("stop", "--timeout", "5", check=False)
        for pid, _ in self.live_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for process in self.background:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait(10)
        if self.live_pids():
            wait_until(lambda: not self.live_pids(), "our daemons to die", 10)


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    root = Path(tempfile.mkdtemp(prefix="skyex"))
    (root / "home").mkdir()
    env = dict(os.environ, HOME=str(root / "home"), ERL_EPMD_PORT=str(free_port()),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="1")
    box = Sandbox(root, env)
    try:
        yield box
    finally:
        box.clean_up()
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------- the bar


@pytest.mark.process
def test_cluster_survives_kill_9_of_its_master_and_a_new_gate_reaches_the_old_simpledb(
        sandbox: Sandbox) -> None:
    started = time.monotonic()
    sandbox.cluster("start", "--master-port", "0", "--gate-port", "0")
    state = sandbox.state()
    master_port, gate = state["master_port"], state["gates"]["harbor2"]
    first = sandbox.pidfiles()
    assert sorted(first) == ["harbor1", "harbor2", "master"]
    again = sandbox.cluster("start", check=False)
    assert again.returncode == 1
    assert again.stderr.startswith("cluster.py: error: harbor1, harbor2, master already running")
    assert all(alive(pid, str(sandbox.root)) for pid in first.values())
    # the default secret file, created by the daemons, readable by its owner only
    secret = sandbox.home / ".skyproto.cookie"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert state["secret_file"] == str(secret)
    # asked for port 0 (any free one): the master listens on 0, the nodes dial the real port
    check_command_lines(first, "0", master_port, "0", sandbox.root)

    assert talk(gate, ["SET color blue", "GET color"]) == ["OK", "VALUE blue"]

    # kill -9 the master: the existing gate still reaches SIMPLEDB, reads and writes
    killed = sandbox.cluster("kill-master")
    assert killed.stdout.strip() == f"killed the master (pid {first['master']}) with SIGKILL"
    assert not alive(first["master"], str(sandbox.root))
    assert "master" not in sandbox.pidfiles()
    twice = sandbox.cluster("kill-master", check=False)
    assert (twice.returncode, twice.stderr) == (
        1, f"cluster.py: error: the master is not running in {sandbox.run_dir}\n")
    assert talk(gate, ["GET color", "SET shape round", "GET shape"]) == [
        "VALUE blue", "OK", "VALUE round"]

    # the master again, on the same port; a new gate node joins and finds the old SIMPLEDB
    sandbox.cluster("start-master")
    assert sandbox.state()["master_port"] == master_port
    new_master = sandbox.pidfiles()["master"]
    assert new_master != first["master"] and alive(new_master, str(sandbox.root))
    sandbox.cluster("start-gate", "--harbor", "3", "--gate-port", "0")
    new_gate = sandbox.state()["gates"]["harbor3"]
    assert new_gate != gate
    replies = wait_until(
        lambda: (r := try_talk(new_gate, ["GET color", "GET shape"])) and
        r == ["VALUE blue", "VALUE round"] and r,
        "the new gate to reach the old SIMPLEDB", WAIT)
    assert replies == ["VALUE blue", "VALUE round"]
    # and the old gate still works, now that everyone has re-registered
    assert talk(gate, ["GET shape"]) == ["VALUE round"]

    running = sandbox.pidfiles()
    assert sorted(running) == ["harbor1", "harbor2", "harbor3", "master"]
    stopped = sandbox.cluster("stop")
    assert sorted(stopped.stdout.splitlines()) == sorted(
        f"stopped {name} (pid {pid})" for name, pid in running.items())
    assert sandbox.live_pids() == [], "processes left after stop"
    assert len(sandbox.pids) == 5  # two masters, three nodes
    assert list(sandbox.run_dir.glob("*.pid")) == []
    assert not (sandbox.run_dir / "cluster.json").exists()
    print(f"failure demo took {time.monotonic() - started:.1f} s")


def check_command_lines(pids: dict[str, int], master_listen: str, master_port: int,
                        gate: str, root: Path) -> None:
    """The daemons are the ones examples/README.md describes (where /proc tells us)."""
    expected = {
        "master": ["skymaster", "--listen", f"tcp:{master_listen}:interface=127.0.0.1"],
        "harbor1": ["skynode", "--harbor", "1", "--master", f"tcp:127.0.0.1:{master_port}",
                    "--service", "simpledb"],
        "harbor2": ["skynode", "--harbor", "2", "--master", f"tcp:127.0.0.1:{master_port}",
                    "--gate", f"tcp:{gate}:interface=127.0.0.1"],
    }
    for name, pid in pids.items():
        found = proc_state(pid)
        if found is None:
            pytest.skip("no /proc to read command lines from")
        argv = [arg.decode() for arg in found[1].split(b"\0") if arg]
        assert "--pidfile" in argv and argv[argv.index("--pidfile") + 1].startswith(str(root))
        tail = argv[argv.index(expected[name][0]):]
        pairs = list(zip(tail[1::2], tail[2::2], strict=False))
        for option, value in zip(expected[name][1::2], expected[name][2::2], strict=True):
            assert (option, value) in pairs, f"{name}: {option} {value} not in {argv}"


@pytest.mark.process
def test_start_that_fails_says_why_in_one_line_and_leaves_nothing_running(
        sandbox: Sandbox) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = sandbox.cluster("start", "--master-port", "0", "--gate-port", str(port),
                                 check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(
        f"cluster.py: error: harbor2 did not start: skynode: error: cannot listen on "
        f"tcp:{port}:interface=127.0.0.1")
    # the master and harbor1 had started (and harbor2 had been refused its port) ...
    logs = {name: (sandbox.run_dir / f"{name}.log").read_text() for name in
            ("master", "harbor1")}
    assert "skymaster listening" in logs["master"]
    assert "joined the master" in logs["harbor1"]
    # ... and were stopped, cleanly
    assert all("Server Shut Down." in log for log in logs.values())
    assert sandbox.live_pids() == []
    assert list(sandbox.run_dir.glob("*.pid")) == []
    assert not (sandbox.run_dir / "cluster.json").exists()


@pytest.mark.process
def test_stop_kills_what_ignores_sigterm_and_leaves_reused_pids_alone(
        sandbox: Sandbox) -> None:
    sandbox.run_dir.mkdir()
    stubborn_pidfile = sandbox.run_dir / "stubborn.pid"
    # a "daemon" whose command line names its pid file, as twistd's does, and which
    # ignores SIGTERM
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time\n"
         "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
         "print('ready', flush=True)\ntime.sleep(60)", str(stubborn_pidfile)],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    # a pid file left by a daemon that died, whose pid now belongs to someone else
    bystander = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    try:
        assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"
        stubborn_pidfile.write_text(f"{stubborn.pid}\n")
        (sandbox.run_dir / "harbor7.pid").write_text(f"{bystander.pid}\n")
        started = time.monotonic()
        result = sandbox.cluster("stop", "--timeout", "1")
        assert time.monotonic() - started < 15
        assert result.stdout.splitlines() == [
            f"stubborn (pid {stubborn.pid}) ignored SIGTERM for 1 s: sent SIGKILL",
            f"stopped stubborn (pid {stubborn.pid})"]
        assert stubborn.wait(10) == -signal.SIGKILL
        assert bystander.poll() is None, "stop killed a process that was not its daemon"
        assert list(sandbox.run_dir.glob("*.pid")) == []
    finally:
        for process in (stubborn, bystander):
            if process.poll() is None:
                process.kill()
                process.wait(10)


# ---------------------------------------------------------------------------- the README


@dataclass
class Step:
    command: str
    output: list[str]


def readme_steps() -> list[Step]:
    """Every ``$ command`` of examples/README.md's console blocks, with the output under it."""
    text = README.read_text()
    assert not re.search(r"^```(sh|bash|shell)\b", text, re.M), \
        "put commands in ```console blocks, as '$ command', so that they are tested"
    steps: list[Step] = []
    for block in re.findall(r"^```console\n(.*?)^```", text, re.M | re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append(Step(line[2:], []))
            else:
                assert steps, f"output before any command in examples/README.md: {line!r}"
                steps[-1].output.append(line)
    return steps


README_PORTS = {"2013": "master", "8888": "harbor2", "8889": "harbor3", "8890": "harbor4"}


def output_matches(expected: list[str], actual: str) -> bool:
    """Line by line; ``...`` is anything, and a run of spaces is one or more spaces."""
    lines = actual.rstrip("\n").split("\n") if actual.strip() else []
    if len(lines) != len(expected):
        return False
    for want, got in zip(expected, lines, strict=True):
        pattern = ".*".join(re.escape(part) for part in want.split("..."))
        pattern = re.sub(r"(?: |\\ ){2,}", " +", pattern)
        if not re.fullmatch(pattern, got):
            return False
    return True


@pytest.mark.process
def test_every_command_in_the_examples_readme(sandbox: Sandbox) -> None:
    """Each ``$`` line of examples/README.md, in order, with the README's ports mapped to the
    free ports the daemons really took; its output must match the README's."""
    ports: dict[str, int] = {}

    def mapped(text: str) -> str:
        def port(match: re.Match[str]) -> str:
            assert match.group(1) in ports, f"port {match.group(1)} used before it is known"
            return str(ports[match.group(1)])

        return re.sub(r"(?<!\d)(2013|8888|8889|8890)(?!\d)", port, text)

    steps = readme_steps()
    kinds = set()
    for step in steps:
        words = shlex.split(step.command)
        expected = step.output
        if words[:2] == ["python", "examples/cluster.py"]:
            kinds.add("cluster.py " + words[2])
            args = words[2:]
            if args[0] == "start":
                args += ["--master-port", "0", "--gate-port", "0"]
            args = ["0" if i and args[i - 1] == "--gate-port" else arg  # any free port
                    for i, arg in enumerate(args)]
            result = sandbox.cluster(*args)
            output = result.stdout + result.stderr
            if (sandbox.run_dir / "cluster.json").exists():
                state = sandbox.state()
                for readme_port, name in README_PORTS.items():
                    port = state["master_port"] if name == "master" else state["gates"].get(name)
                    if port is not None:
                        ports[readme_port] = port
        elif words[0] == "nc":
            kinds.add("nc")
            # nc is not always installed: the same conversation over a socket. The lines
            # under the command alternate: a request, its reply.
            assert words[1] == "127.0.0.1" and len(words) == 3
            requests, replies = expected[0::2], expected[1::2]
            assert talk(ports[words[2]], requests) == replies
            continue
        elif "twistd" in words and "-n" in words:
            kinds.add("twistd -n")
            # runs in the foreground until Ctrl-C: in the background here, on free ports
            log = sandbox.root / "foreground.log"
            process = sandbox.start_background(
                ["bash", "-c", step.command + " --master-listen tcp:0:interface=127.0.0.1"
                 " --gate tcp:0:interface=127.0.0.1"], log)

            def gate_port(log: Path = log, process: subprocess.Popen[bytes] = process) -> (
                    re.Match[str] | None):
                assert process.poll() is None, f"it exited:\n{log.read_text()}"
                text = log.read_text()
                return re.search(r"joined the master", text) and re.search(
                    r"gate for GREETER listening on tcp:127\.0\.0\.1:(\d+)", text)

            found = wait_until(gate_port, f"{step.command!r} to start", WAIT)
            ports["8888"] = int(found.group(1))
            output = ""
        else:
            kinds.add(words[0] if words[0] != "printf" else "printf | client.py")
            result = sandbox.shell(mapped(step.command))
            output = result.stdout
            if "exit status $?" not in step.command:
                assert result.returncode == 0, f"{step.command}:\n{output}{sandbox.logs()}"
        assert output_matches([mapped(line) for line in expected], output), (
            f"$ {step.command}\nexpected:\n" + "\n".join(expected) + f"\ngot:\n{output}")
    assert kinds == {
        "cluster.py start", "cluster.py status", "cluster.py kill-master",
        "cluster.py start-master", "cluster.py start-gate", "cluster.py stop", "nc",
        "python", "printf | client.py", "twistd -n"}
    assert sandbox.live_pids() == [], "cluster.py stop left processes"


# ---------------------------------------------------------------------------- the client


@pytest.mark.process
def test_client_says_in_one_line_that_the_gate_is_unreachable_and_exits_1(
        sandbox: Sandbox) -> None:
    port = free_port()  # nobody listens there
    result = subprocess.run(
        [sys.executable, str(CLIENT), "--gate", f"tcp:127.0.0.1:{port}", "GET", "k"],
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT, env=sandbox.env,
        stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (f"client.py: error: cannot reach the gate at "
                             f"tcp:127.0.0.1:{port}: Connection refused\n")
    bad = subprocess.run([sys.executable, str(CLIENT), "--gate", "nonsense", "GET", "k"],
                         capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                         stdin=subprocess.DEVNULL)
    assert (bad.returncode, bad.stderr.count("\n")) == (1, 1)
    assert "use tcp:HOST:PORT or unix:PATH" in bad.stderr


def test_client_endpoints() -> None:
    assert endpoint_address("tcp:127.0.0.1:8888") == (socket.AF_INET, ("127.0.0.1", 8888))
    assert endpoint_address("tcp:host=127.0.0.1:port=8888") == (
        socket.AF_INET, ("127.0.0.1", 8888))
    assert endpoint_address("localhost:8888") == (socket.AF_INET, ("localhost", 8888))
    assert endpoint_address(r"tcp:\:\:1:8888") == (socket.AF_INET6, ("::1", 8888))
    assert endpoint_address("unix:/tmp/gate.sock") == (socket.AF_UNIX, "/tmp/gate.sock")
    assert endpoint_address("unix:path=/tmp/gate.sock") == (socket.AF_UNIX, "/tmp/gate.sock")
    for bad in ("tcp:127.0.0.1", "tcp:127.0.0.1:http", "unix:", "nonsense"):
        with pytest.raises(ValueError):
            endpoint_address(bad)


# ---------------------------------------------------------------------------- GREETER


def test_greeter_awaits_simpledb_on_another_node() -> None:
    clock, (front, back) = mesh(2, default_timeout=2)
    front.register_name("SIMPLEDB", back.spawn(SimpleDB()))
    front.spawn(Greeter())

    def call(*payload: str) -> Any:
        d = front.call("GREETER", list(payload))
        settle(clock)
        return d

    assert result_of(call("GREET", "name")) == "NOTFOUND"
    assert result_of(call("SET", "name", "Ada Lovelace")) == "OK"
    assert result_of(call("GREET", "name")) == "Hello, Ada Lovelace!"
    assert result_of(call("GET", "name")) == "VALUE Ada Lovelace"
    assert "usage: GREET <key>" in str(failure_of(call("GREET"), RemoteError).value)
    assert "unknown command FROB" in str(failure_of(call("FROB", "x"), RemoteError).value)


def test_greeter_refuses_a_database_that_does_not_answer_like_simpledb() -> None:
    clock, (node,) = mesh(1)
    node.spawn(Echo(), name="SIMPLEDB")  # replies with the request itself, a list
    node.spawn(Greeter())
    d = node.call("GREETER", ["GREET", "name"])
    clock.advance(0)
    assert "unexpected reply from SIMPLEDB" in str(failure_of(d, RemoteError).value)


@pytest.mark.process
def test_greeter_behind_a_gate_on_a_node_with_simpledb(sandbox: Sandbox) -> None:
    """One node, no master: ``--service simpledb --service examples.greeter:Greeter`` and a
    gate in front of GREETER, which answers GREET and hands SET and GET to SIMPLEDB."""
    log = sandbox.root / "greeter.log"
    node = sandbox.start_background(
        [TWISTD, "-n", "--pidfile=", "skynode", "--harbor", "1", "--no-mapper",
         "--service", "simpledb", "--service", "examples.greeter:Greeter",
         "--gate", "tcp:0:interface=127.0.0.1", "--gate-service", "GREETER"], log)

    def gate_port() -> re.Match[str] | None:
        assert node.poll() is None, f"the node exited:\n{log.read_text()}"
        return re.search(r"gate for GREETER listening on tcp:127\.0\.0\.1:(\d+)",
                         log.read_text())

    port = int(wait_until(gate_port, "the gate", WAIT).group(1))
    assert re.search(r"service Greeter is :0100000\d \(GREETER\)", log.read_text())
    assert talk(port, ["GREET name", "SET name world", "GREET name", "GET name", "GREET",
                       "GREET a b"]) == [
        "NOTFOUND", "OK", "Hello, world!", "VALUE world", "ERROR usage: GREET <key>",
        "ERROR usage: GREET <key>"]


@pytest.mark.process
def test_twistd_needs_pythonpath_for_a_service_module_in_the_current_directory(
        sandbox: Sandbox) -> None:
    """What examples/README.md says: twistd does not put the current directory on sys.path,
    so ``PYTHONPATH=.`` is what makes ``--service module:Class`` find a module there."""
    workdir = sandbox.root / "work"
    workdir.mkdir()
    (workdir / "probe_service.py").write_text(
        "from skyproto.node.service import Service\n\n\n"
        "class Probe(Service):\n    default_name = 'PROBE'\n")
    argv = [TWISTD, "-n", "--pidfile=", "skynode", "--harbor", "1", "--no-mapper",
            "--listen", "tcp:0:interface=127.0.0.1", "--service", "probe_service:Probe"]
    env = {k: v for k, v in sandbox.env.items() if k != "PYTHONPATH"}
    refused = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True,
                             timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL)
    assert refused.returncode == 1
    assert "cannot import service 'probe_service:Probe': No module named 'probe_service'" \
        in refused.stderr
    log = sandbox.root / "probe.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=workdir, env=dict(env, PYTHONPATH="."),
                                   stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    sandbox.background.append(process)

    def started() -> re.Match[str] | None:
        assert process.poll() is None, f"it exited:\n{log.read_text()}"
        return re.search(r"service Probe is :01000002 \(PROBE\)", log.read_text())

    wait_until(started, "the probe service", WAIT)
