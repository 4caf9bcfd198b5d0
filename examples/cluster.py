#!/usr/bin/env python3
"""Start and stop a three-process skyproto cluster on this host (loopback addresses only).

    python examples/cluster.py start      # master, SIMPLEDB node (harbor 1), gate node (harbor 2)
    python examples/cluster.py status
    python examples/cluster.py stop

The daemons are ordinary ``twistd`` daemons (no ``-n``): each gets its own ``--pidfile``
and ``--logfile`` in the run directory (``--dir``, default ``./cluster-run``), which also
holds ``cluster.json``, the ports this cluster uses, read by the other subcommands.

``start`` returns once the gate answers a request (so the gate node has joined the master
and learnt where SIMPLEDB is). ``stop`` sends SIGTERM to every daemon whose pid file is in
the directory, and SIGKILL to any still there after ``--timeout`` seconds.

For the failure demo: ``kill-master`` (SIGKILL, no goodbye), ``start-master`` (again, on
the same port: the nodes re-register by themselves) and ``start-gate --harbor N`` (one more
gate node; ``--service`` and ``--gate-service`` put a service of your own behind it).

The daemons' ``PYTHONPATH`` starts with this repository's root, so ``--service
examples.greeter:Greeter`` imports from any working directory. They use the cluster secret
``~/.skyproto.cookie`` (created with mode 0600 on first use) unless ``start --secret-file``
names another, and this host's port mapper at ``$ERL_EPMD_PORT`` or 4369 (the first node
hosts one if none runs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

PROGRAM = "cluster.py"
DESCRIPTION = "Start and stop a three-process skyproto cluster on this host."
REPO = Path(__file__).resolve().parent.parent
STATE_FILE = "cluster.json"
LOOPBACK = "127.0.0.1"
#: a request any SIMPLEDB answers (NOTFOUND); the errors below mean "not there yet" (the
#: gate's own, or a service's in front of SIMPLEDB, like GREETER's, passed on)
PROBE = "GET cluster.py-probe"
NOT_READY = re.compile(r"ERROR (no such service|no service is named|unavailable|timeout)")
POLL = 0.1  # seconds between two looks at a log, a pid or the gate
T = TypeVar("T")


class ClusterError(Exception):
    """Something the user can act on: printed as one line, exit status 1."""


@dataclass
class State:
    """What ``start`` chose, for the subcommands that come after it (``cluster.json``)."""

    master_port: int
    secret_file: str
    gates: dict[str, int] = field(default_factory=dict)  #: daemon name -> gate port
    roles: dict[str, str] = field(default_factory=dict)  #: daemon name -> what it does

    @property
    def master(self) -> str:
        return f"tcp:{LOOPBACK}:{self.master_port}"

    @classmethod
    def load(cls, run_dir: Path) -> State:
        path = run_dir / STATE_FILE
        try:
            data = json.loads(path.read_text())
            return cls(int(data["master_port"]), str(data["secret_file"]),
                       {str(k): int(v) for k, v in data["gates"].items()},
                       {str(k): str(v) for k, v in data["roles"].items()})
        except FileNotFoundError:
            raise ClusterError(f"no cluster in {run_dir} (no {STATE_FILE}): "
                               f"run '{PROGRAM} start' first") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ClusterError(f"cannot read {path}: {e}") from None

    def save(self, run_dir: Path) -> None:
        path = run_dir / STATE_FILE
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(self), indent=2) + "\n")
        temporary.replace(path)


# ---------------------------------------------------------------------------- processes


def twistd_command() -> str:
    """The ``twistd`` of the Python running this script (a virtualenv's), else PATH's."""
    beside = Path(sys.executable).with_name("twistd")
    if beside.exists():
        return str(beside)
    found = shutil.which("twistd")
    if found is None:
        raise ClusterError("twistd not found: install skyproto (python -m pip install .)")
    return found


def daemon_environment() -> dict[str, str]:
    """This environment, with the repository root first on PYTHONPATH (as an absolute path:
    the daemons change directory)."""
    paths = [str(REPO)]
    paths += [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
              if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def running(pid: int, pidfile: Path) -> bool:
    """Whether ``pid`` is still the daemon that wrote ``pidfile``.

    A zombie counts as gone (it has exited; only its parent has not collected it), and so
    does a process whose command line does not name ``pidfile``: the pid was reused.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, but is not ours to signal
    proc = Path("/proc") / str(pid)
    try:
        stat = (proc / "stat").read_text()
        cmdline = (proc / "cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return not proc.parent.joinpath("self").exists()  # gone, unless there is no /proc
    except OSError:
        return True
    state = stat.rpartition(")")[2].split()[0]
    if state in ("Z", "X"):
        return False
    return os.fsencode(str(pidfile)) in cmdline


def poll(condition: Callable[[], T | None], what: str, timeout: float) -> T:
    """Call ``condition`` until it returns something other than None; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(POLL)


@dataclass
class Daemon:
    """One daemon of the run directory: ``NAME.pid`` and ``NAME.log``."""

    run_dir: Path
    name: str

    @property
    def pidfile(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    @property
    def logfile(self) -> Path:
        return self.run_dir / f"{self.name}.log"

    def pid(self) -> int | None:
        """The pid, if the daemon runs."""
        pid = read_pid(self.pidfile)
        return pid if pid is not None and running(pid, self.pidfile) else None

    def log_size(self) -> int:
        try:
            return self.logfile.stat().st_size
        except FileNotFoundError:
            return 0

    def last_log_line(self, since: int = 0) -> str:
        try:
            with self.logfile.open("rb") as log:
                log.seek(since)
                lines = log.read().decode(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return "(no log)"
        return lines[-1] if lines else "(empty log)"

    def start(self, args: list[str], timeout: float) -> tuple[int, int]:
        """Run ``twistd ARGS`` as a daemon: (its pid, where its log had got to before)."""
        running_pid = self.pid()
        if running_pid is not None:
            raise ClusterError(f"{self.name} already runs (pid {running_pid}); "
                               f"run '{PROGRAM} stop --dir {self.run_dir}' first")
        self.pidfile.unlink(missing_ok=True)  # stale: twistd would refuse to start
        offset = self.log_size()  # twistd appends: a restart's lines come after this
        command = [twistd_command(), "--pidfile", str(self.pidfile), "--logfile",
                   str(self.logfile), "--rundir", str(self.run_dir), *args]
        # twistd builds the service (parses options, listens) before it daemonizes, so a
        # mistake is reported here, on stderr, with a non-zero exit status.
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                                text=True, timeout=timeout, env=daemon_environment())
        if result.returncode != 0:
            lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
            why = lines[-1] if lines else f"exit status {result.returncode}"
            raise ClusterError(f"{self.name} did not start: {why}")
        pid = poll(self.pid, f"{self.name} to write {self.pidfile}", timeout)
        return pid, offset

    def wait_for(self, pattern: str, since: int, timeout: float,
                 what: str) -> re.Match[str]:
        """Wait for a line matching ``pattern`` written to the log after offset ``since``."""

        def look() -> re.Match[str] | None:
            try:
                with self.logfile.open("rb") as log:
                    log.seek(since)
                    found = re.search(pattern, log.read().decode(errors="replace"))
            except FileNotFoundError:
                found = None
            if found is None and self.pid() is None:
                raise ClusterError(f"{self.name} exited before {what}: "
                                   f"{self.last_log_line(since)} (see {self.logfile})")
            return found

        try:
            return poll(look, f"{self.name}: {what}", timeout)
        except ClusterError as e:
            raise ClusterError(f"{e} (see {self.logfile})") from None

    def signal(self, sig: signal.Signals) -> int | None:
        """Send ``sig`` if the daemon runs; return its pid, or None if it does not run."""
        pid = self.pid()
        if pid is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return None
            except PermissionError:
                raise ClusterError(f"{self.name} (pid {pid}) is not yours to stop") from None
        return pid


def daemons_in(run_dir: Path) -> list[Daemon]:
    """Every daemon with a pid file in ``run_dir``, the master last."""
    names = sorted(path.stem for path in run_dir.glob("*.pid"))
    names.sort(key=lambda name: name == "master")
    return [Daemon(run_dir, name) for name in names]


def stop(daemons: list[Daemon], timeout: float) -> list[str]:
    """SIGTERM each daemon, SIGKILL those still there after ``timeout``; what happened."""
    signalled = {d.name: pid for d in daemons if (pid := d.signal(signal.SIGTERM)) is not None}
    report = []

    def all_gone() -> bool | None:
        return True if all(d.pid() is None for d in daemons) else None

    try:
        poll(all_gone, "the daemons to stop", timeout)
    except ClusterError:
        for daemon in daemons:
            pid = daemon.signal(signal.SIGKILL)
            if pid is not None:
                report.append(f"{daemon.name} (pid {pid}) ignored SIGTERM for {timeout:g} s: "
                              "sent SIGKILL")
        poll(all_gone, "the daemons to die after SIGKILL", 10)
    for daemon in daemons:
        daemon.pidfile.unlink(missing_ok=True)  # left behind by SIGKILL
        if daemon.name in signalled:
            report.append(f"stopped {daemon.name} (pid {signalled[daemon.name]})")
    return report


# ---------------------------------------------------------------------------- the gate


def gate_reply(port: int, request: str, timeout: float = 2.0) -> str | None:
    """The gate's reply to one request line, or None if it cannot be reached."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as conn:
            conn.sendall(request.encode() + b"\n")
            with conn.makefile("rb") as replies:
                reply = replies.readline()
    except OSError:
        return None
    return reply.decode(errors="replace").strip() if reply.endswith(b"\n") else None


def wait_for_gate(daemon: Daemon, port: int, timeout: float) -> str:
    """Wait until the gate answers a request with something other than "not there yet"."""

    def answered() -> str | None:
        reply = gate_reply(port, PROBE)
        if reply is None or NOT_READY.match(reply):
            if daemon.pid() is None:
                raise ClusterError(f"{daemon.name} exited: {daemon.last_log_line()} "
                                   f"(see {daemon.logfile})")
            return None
        return reply

    return poll(answered, f"the gate on port {port} to answer (see {daemon.logfile})",
                timeout)


# ---------------------------------------------------------------------------- subcommands


def start_master(run_dir: Path, port: int, secret_file: str, timeout: float) -> tuple[int, int]:
    """Start the master on ``port`` (0: any free port); its pid and the port it took."""
    master = Daemon(run_dir, "master")
    pid, since = master.start(["skymaster", "--listen", f"tcp:{port}:interface={LOOPBACK}",
                               "--secret-file", secret_file], timeout)
    found = master.wait_for(rf"skymaster listening on tcp:{re.escape(LOOPBACK)}:(\d+)", since,
                            timeout, "the master to listen")
    return pid, int(found.group(1))


def start_node(run_dir: Path, state: State, harbor: str, services: list[str],
               timeout: float, gate_port: int | None = None,
               gate_service: str = "SIMPLEDB") -> tuple[int, int | None]:
    """Start node ``harborN`` and wait until it has joined the master (and, with a gate,
    until the gate answers); its pid and the gate's port."""
    node = Daemon(run_dir, f"harbor{harbor}")
    args = ["skynode", "--harbor", harbor, "--master", state.master,
            "--secret-file", state.secret_file]
    for service in services:
        args += ["--service", service]
    if gate_port is not None:
        args += ["--gate", f"tcp:{gate_port}:interface={LOOPBACK}",
                 "--gate-service", gate_service]
    pid, since = node.start(args, timeout)
    if gate_port is not None:
        found = node.wait_for(rf"gate for \S+ listening on tcp:{re.escape(LOOPBACK)}:(\d+)",
                              since, timeout, "the gate to listen")
        gate_port = int(found.group(1))
    node.wait_for(rf"joined the master .* as harbor {re.escape(harbor)}\b", since, timeout,
                  "it to join the master")
    if gate_port is not None:
        wait_for_gate(node, gate_port, timeout)
    return pid, gate_port


def command_start(args: argparse.Namespace) -> None:
    run_dir: Path = args.dir
    run_dir.mkdir(parents=True, exist_ok=True)
    live = [d.name for d in daemons_in(run_dir) if d.pid() is not None]
    if live:
        raise ClusterError(f"{', '.join(live)} already running in {run_dir}: "
                           f"run '{PROGRAM} stop --dir {run_dir}' first")
    secret_file = str(Path(args.secret_file).expanduser().resolve())
    started: list[Daemon] = []
    try:
        started.append(Daemon(run_dir, "master"))
        master_pid, master_port = start_master(run_dir, args.master_port, secret_file,
                                               args.timeout)
        state = State(master_port, secret_file)
        state.roles["master"] = f"master on {state.master}"
        state.save(run_dir)
        started.append(Daemon(run_dir, "harbor1"))
        db_pid, _ = start_node(run_dir, state, "1", ["simpledb"], args.timeout)
        started.append(Daemon(run_dir, "harbor2"))
        gate_pid, gate_port = start_node(run_dir, state, "2", [], args.timeout,
                                         gate_port=args.gate_port)
        assert gate_port is not None
        state.roles["harbor1"] = "SIMPLEDB (harbor 1)"
        state.gates["harbor2"] = gate_port
        state.roles["harbor2"] = f"gate for SIMPLEDB on tcp:{LOOPBACK}:{gate_port} (harbor 2)"
        state.save(run_dir)
    except (ClusterError, subprocess.TimeoutExpired):
        stop(started, 10)
        (run_dir / STATE_FILE).unlink(missing_ok=True)
        raise
    for name, pid in (("master", master_pid), ("harbor1", db_pid), ("harbor2", gate_pid)):
        print(describe(name, pid, state))
    print(f"logs and pid files in {run_dir}; try: nc {LOOPBACK} {gate_port}")


def command_stop(args: argparse.Namespace) -> None:
    run_dir: Path = args.dir
    daemons = daemons_in(run_dir) if run_dir.is_dir() else []
    report = stop(daemons, args.timeout)
    (run_dir / STATE_FILE).unlink(missing_ok=True)
    print("\n".join(report) if report else f"nothing was running in {run_dir}")


def describe(name: str, pid: int | None, state: State) -> str:
    """One line of ``start`` and ``status``: name, pid, what it does."""
    return (f"{name:<9} {f'pid {pid}' if pid else 'not running':<12} "
            f"{state.roles.get(name, '')}").rstrip()


def command_status(args: argparse.Namespace) -> None:
    run_dir: Path = args.dir
    state = State.load(run_dir)
    names = {d.name for d in daemons_in(run_dir)} | set(state.roles)
    for name in sorted(names, key=lambda n: (n != "master", len(n), n)):
        print(describe(name, Daemon(run_dir, name).pid(), state))


def command_kill_master(args: argparse.Namespace) -> None:
    master = Daemon(args.dir, "master")
    pid = master.signal(signal.SIGKILL)
    if pid is None:
        raise ClusterError(f"the master is not running in {args.dir}")
    poll(lambda: True if master.pid() is None else None, "the master to die", args.timeout)
    master.pidfile.unlink(missing_ok=True)  # SIGKILL leaves it; twistd would refuse to start
    print(f"killed the master (pid {pid}) with SIGKILL")


def command_start_master(args: argparse.Namespace) -> None:
    state = State.load(args.dir)
    pid, _ = start_master(args.dir, state.master_port, state.secret_file, args.timeout)
    print(describe("master", pid, state))


def command_start_gate(args: argparse.Namespace) -> None:
    state = State.load(args.dir)
    harbor = str(args.harbor)
    pid, gate_port = start_node(args.dir, state, harbor, args.service, args.timeout,
                                gate_port=args.gate_port, gate_service=args.gate_service)
    assert gate_port is not None
    name = f"harbor{harbor}"
    state.gates[name] = gate_port
    services = f", services {' '.join(args.service)}" if args.service else ""
    state.roles[name] = (f"gate for {args.gate_service} on tcp:{LOOPBACK}:{gate_port} "
                         f"(harbor {harbor}{services})")
    state.save(args.dir)
    print(describe(name, pid, state))


def harbor_id(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 255:
        raise ValueError(text)
    return value


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", type=lambda text: Path(text).resolve(),
                        default=Path("cluster-run").resolve(),
                        help="where the pid files, logs and cluster.json are "
                             "(default ./cluster-run)")

    def timeout_option(sub: argparse.ArgumentParser, default: float, meaning: str) -> None:
        sub.add_argument("--timeout", type=float, default=default,
                         help=f"{meaning} (default {default:g})")

    top = argparse.ArgumentParser(prog=PROGRAM, description=DESCRIPTION)
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    start = commands.add_parser("start", parents=[common], help="start the three daemons")
    start.add_argument("--master-port", type=int, default=2013,
                       help="the master's port (default 2013; 0: any free port)")
    start.add_argument("--gate-port", type=int, default=8888,
                       help="the gate's port (default 8888; 0: any free port)")
    start.add_argument("--secret-file", default="~/.skyproto.cookie",
                       help="the cluster secret (default ~/.skyproto.cookie, created with "
                            "mode 0600 if missing)")
    timeout_option(start, 30, "seconds to wait for each daemon to be ready")
    start.set_defaults(run=command_start)

    stop_ = commands.add_parser("stop", parents=[common], help="stop every daemon")
    timeout_option(stop_, 10, "seconds between SIGTERM and SIGKILL")
    stop_.set_defaults(run=command_stop)

    status = commands.add_parser("status", parents=[common], help="which daemons run")
    status.set_defaults(run=command_status)

    kill = commands.add_parser("kill-master", parents=[common], help="SIGKILL the master")
    timeout_option(kill, 10, "seconds to wait for it to die")
    kill.set_defaults(run=command_kill_master)

    master = commands.add_parser("start-master", parents=[common],
                                 help="start the master again, on the same port")
    timeout_option(master, 30, "seconds to wait for it to listen")
    master.set_defaults(run=command_start_master)

    gate = commands.add_parser("start-gate", parents=[common],
                               help="start one more node, with a gate")
    gate.add_argument("--harbor", type=harbor_id, required=True,
                      help="its harbor id (3..255: 1 and 2 are taken)")
    gate.add_argument("--gate-port", type=int, default=0,
                      help="its gate's port (default 0: any free port)")
    gate.add_argument("--gate-service", default="SIMPLEDB",
                      help="the service its gate sends requests to (default SIMPLEDB)")
    gate.add_argument("--service", action="append", default=[],
                      help="a service to run on it: a built-in (echo, relay, simpledb) or "
                           "package.module:Class (repeatable)")
    timeout_option(gate, 30, "seconds to wait for its gate to answer")
    gate.set_defaults(run=command_start_gate)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except ClusterError as e:
        print(f"{PROGRAM}: error: {e}", file=sys.stderr)
        return 1
    except subprocess.TimeoutExpired as e:
        print(f"{PROGRAM}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
