"""Hosts for tests: network namespaces joined by a switch, with daemons running on them.

The ``hosts`` fixture makes a :class:`Network`: N network namespaces (the hosts ``hosta``,
``hostb``, ...), each cabled to a bridge in a namespace of its own (the switch), so nothing
touches the machine's own interfaces. Each host has

* one interface, ``eth0``, with an address of 10.250.0.0/24 that exists only inside this
  network (every network has a switch of its own, so two tests may use the same addresses);
* loopback up, and its own ``/etc/hosts`` naming every host of the network (``ip netns
  exec`` bind-mounts ``/etc/netns/NAMESPACE/hosts`` over ``/etc/hosts``) and a resolv.conf
  pointing at its own loopback, so no name lookup ever leaves the network;
* its own host name for the processes run on it (a UTS namespace per process), so a node
  called ``alpha`` is ``alpha@hostb`` there, as on a real machine;
* its own HOME, holding the network's cluster secret as ``~/.skyproto.cookie``.

A test runs daemons on a host (:meth:`Host.start`: ``twistd -n ...`` under ``ip netns
exec``, watched through its log as :class:`tests.processes.Daemon` is) and commands
(:meth:`Host.run`), and can

* cut a host off (:meth:`Host.partition`): nftables drops every frame in and out of its
  ``eth0`` (netdev ingress and egress hooks), so peers see silence, no RST, and the host's
  own sockets see no error either, like a pulled cable; :meth:`Host.heal` reconnects it;
* shape the rate of a host's link with ``tc tbf``, both ways (:meth:`Host.shape`);
* delay and drop frames on a host's link (:meth:`Host.set_link`) when the network was made
  with a shim for that host (``hosts(3, shim=["hostb"])``): ``tc netem`` is missing from
  this kernel, so a user-space process (tests/netshim.py) carries that host's frames
  between two TAP devices.

Everything a network made is removed when the test ends, passed or failed: its processes
(every pid left in its namespaces too), namespaces (and with them interfaces, nftables
tables and qdiscs), ``/etc/netns`` entries and files (``SKYH_KEEP_LOGS=DIR`` keeps a copy
of the daemons' logs in DIR). A session-wide sweep also removes ``skyh-`` namespaces left
by test runs that died. Without root, ``ip``, ``nft``, ``tc``,
``unshare`` or working namespaces the fixture skips, saying which.

Traffic stays inside: a host has no route but its own /24 and loopback.

The module also holds two services for the daemons (imported by ``twistd skynode
--service tests.hosts:Prober``; the repository root is on their PYTHONPATH):
:class:`HostEcho` (an echo under a name from ``$SKYH_ECHO``) and :class:`Prober` (calls
names every 0.1 s and logs each change of outcome with the time).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest

from skyproto.errors import NoSuchService
from skyproto.node.service import Service
from skyproto.services import SimpleDB
from skyproto.testing import wait_until

from .processes import TWISTD, Daemon

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
PREFIX = "skyh-"  #: every namespace this module makes is named skyh-<pid>-<n>-<host>
SUBNET = "10.250.0"  #: host i (from 1) is SUBNET.i/24, only inside its network
SHIM = Path(__file__).with_name("netshim.py")
CUT_TABLE = "skyh_cut"
EXTRA_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"
COMMAND_TIMEOUT = 30.0
#: Run as the first program in a host: its own host name, then exec the real command.
SET_HOSTNAME = "import os, socket, sys; socket.sethostname(sys.argv[1]); " \
               "os.execvp(sys.argv[2], sys.argv[2:])"

_counter = itertools.count(1)
_netns_dir_made = False


class HostSetupError(RuntimeError):
    """A command that builds or tears down a network failed."""


def tool(name: str) -> str | None:
    """The path of a system tool, looking in the sbin directories too."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), EXTRA_PATH]))


def _tool(name: str) -> str:
    found = tool(name)
    if found is None:
        raise HostSetupError(f"{name} is not installed")
    return found


def sh(*argv: str, check: bool = True, timeout: float = COMMAND_TIMEOUT,
       stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command (the first word looked up with :func:`tool`); HostSetupError if it fails."""
    command = [_tool(argv[0]), *argv[1:]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise HostSetupError(f"{' '.join(command)} exited {done.returncode}: "
                             f"{(done.stderr or done.stdout).strip()}")
    return done


# --------------------------------------------------------------------------- support


@functools.cache
def host_support() -> str | None:
    """None if this machine can run host tests, else why not (the skip reason)."""
    if not sys.platform.startswith("linux"):
        return "host tests need Linux network namespaces"
    if os.geteuid() != 0:
        return "host tests need root (ip netns, nftables, tc); run them as root"
    for name in ("ip", "nft", "tc", "unshare"):
        if tool(name) is None:
            return f"host tests need {name!r} (iproute2, nftables, util-linux), not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        sh("ip", "netns", "add", probe)
        try:
            sh("ip", "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "eth0")
            sh("ip", "-n", probe, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", probe, "link", "set", "eth0", "up")
            sh("ip", "netns", "exec", probe, "nft", "-f", "-", stdin=_cut_rules())
            sh("ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "eth0", "root",
               "tbf", "rate", "1mbit", "burst", "32kb", "latency", "50ms")
            sh("ip", "netns", "exec", probe, "unshare", "--uts", "--", "true")
        finally:
            sh("ip", "netns", "del", probe, check=False)
    except (HostSetupError, OSError, subprocess.TimeoutExpired) as e:
        return f"host tests need working network namespaces, nftables and tc: {e}"
    return None


def shim_support() -> str | None:
    """None if link shims (TAP devices) work here, else why not."""
    if not Path("/dev/net/tun").exists():
        return "the delay/loss shim needs /dev/net/tun (TAP devices)"
    return None


def _cut_rules(count_syns_to: int | None = None) -> str:
    """nftables rules that drop every frame in and out of eth0 (a pulled cable); with
    ``count_syns_to``, the TCP SYNs sent to that port are counted as they are dropped."""
    count = "" if count_syns_to is None else (
        f"meta protocol ip tcp dport {count_syns_to} tcp flags & (syn | ack) == syn counter;")
    return f"""
table netdev {CUT_TABLE} {{
    chain cut_in {{ type filter hook ingress device "eth0" priority 0; policy drop; }}
    chain cut_out {{ type filter hook egress device "eth0" priority 0; policy drop; {count} }}
}}
"""


# --------------------------------------------------------------------------- cleanup


def namespace_pids(namespace: str) -> list[int]:
    done = sh("ip", "netns", "pids", namespace, check=False)
    return [int(word) for word in done.stdout.split() if word.isdigit()]


def remove_namespace(namespace: str) -> list[str]:
    """Kill whatever runs in ``namespace``, delete it and its /etc/netns entry; problems."""
    problems = []
    for pid in namespace_pids(namespace):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    try:
        wait_until(lambda: not namespace_pids(namespace), f"the processes in {namespace} to end",
                   timeout=10)
    except TimeoutError as e:
        problems.append(str(e))
    done = sh("ip", "netns", "del", namespace, check=False)
    if done.returncode != 0 and namespace in list_namespaces():
        problems.append(f"ip netns del {namespace}: {done.stderr.strip()}")
    shutil.rmtree(Path("/etc/netns") / namespace, ignore_errors=True)
    return problems


def list_namespaces() -> list[str]:
    done = sh("ip", "netns", "list", check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def _owner_alive(namespace: str) -> bool:
    match = re.match(rf"{re.escape(PREFIX)}(\d+)-", namespace)
    if match is None:
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(everything_of_ours: bool = False) -> list[str]:
    """Remove ``skyh-`` namespaces and /etc/netns entries whose test run died (and, with
    ``everything_of_ours``, this process's own); problems found."""
    mine = f"{PREFIX}{os.getpid()}-"
    problems: list[str] = []

    def stale(name: str) -> bool:
        return name.startswith(PREFIX) and (
            not _owner_alive(name) or (everything_of_ours and name.startswith(mine)))

    for namespace in list_namespaces():
        if stale(namespace):
            problems += remove_namespace(namespace)
    etc = Path("/etc/netns")
    if etc.is_dir():
        for entry in etc.iterdir():
            if stale(entry.name):
                shutil.rmtree(entry, ignore_errors=True)
        if everything_of_ours and _netns_dir_made:
            with contextlib.suppress(OSError):
                etc.rmdir()  # only if empty: ours, made by this run
    return problems


# --------------------------------------------------------------------------- daemons


class HostDaemon(Daemon):
    """A ``twistd -n`` process on a host: :class:`tests.processes.Daemon`'s log, search,
    kill and stop, started under ``ip netns exec`` with the host's name, HOME and secret."""

    def __init__(self, host: Host, args: list[str], name: str,
                 env: dict[str, str] | None = None) -> None:
        self.host = host
        self.name = name
        self.log_path = host.network.workdir / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                host.command(TWISTD, "-n", "--pidfile=", *args),
                cwd=host.home, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=host.environment(env))

    def __repr__(self) -> str:
        return f"<HostDaemon {self.name} on {self.host.name} pid {self.process.pid}>"


class Host:
    """One namespace of a :class:`Network`: a machine with one address."""

    def __init__(self, network: Network, index: int, name: str) -> None:
        self.network = network
        self.index = index
        self.name = name  #: its host name, in every host's /etc/hosts
        self.namespace = f"{network.prefix}{name}"
        self.address = f"{SUBNET}.{index}"
        self.port = f"p{index}"  #: its cable's end on the switch
        self.home = network.workdir / name
        self.shim: subprocess.Popen[str] | None = None
        self.cut = False
        self.shaped: str | None = None

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.address} ({self.namespace})>"

    # ---- running things

    def command(self, *argv: str) -> list[str]:
        """``argv`` as run on this host: in its namespace, with its own host name."""
        return [_tool("ip"), "netns", "exec", self.namespace, _tool("unshare"), "--uts", "--",
                sys.executable, "-c", SET_HOSTNAME, self.name, *argv]

    def environment(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a process on this host: its HOME, the well-known mapper port
        (each host has its own ports), the repository on PYTHONPATH."""
        env = {k: v for k, v in os.environ.items() if k != "ERL_EPMD_PORT"}
        env.update(HOME=str(self.home), PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
        env.update(extra or {})
        return env

    def run(self, *argv: str, timeout: float = COMMAND_TIMEOUT, check: bool = False,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command on this host to its end (``timeout`` seconds at most)."""
        done = subprocess.run(self.command(*argv), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, cwd=self.home,
                              env=self.environment(env))
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} on {self.name} exited {done.returncode}:\n"
                                 f"{done.stdout}{done.stderr}")
        return done

    def python(self, code: str, *args: str, timeout: float = COMMAND_TIMEOUT,
               check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a Python snippet on this host."""
        return self.run(sys.executable, "-c", code, *args, timeout=timeout, check=check)

    def skyproto(self, *args: str, timeout: float = COMMAND_TIMEOUT,
                 check: bool = False) -> subprocess.CompletedProcess[str]:
        """The console tool on this host (``skyproto status``, ``skyproto names``)."""
        return self.run(str(Path(TWISTD).with_name("skyproto")), *args, timeout=timeout,
                        check=check)

    def start(self, *args: str, name: str | None = None,
              env: dict[str, str] | None = None) -> HostDaemon:
        """Start ``twistd -n ARGS`` on this host; stopped at the end of the test."""
        return self.network.start(self, list(args), name=name, env=env)

    def spawn(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """Start any program on this host, its standard output a pipe (text); killed at
        the end of the test."""
        process = subprocess.Popen(self.command(*argv), stdout=subprocess.PIPE,
                                   stdin=subprocess.DEVNULL, text=True, cwd=self.home,
                                   env=self.environment(env))
        self.network.processes.append(process)
        return process

    # ---- faults

    def partition(self, count_syns_to: int | None = None) -> None:
        """Cut this host off: every frame in or out of its eth0 is dropped, silently.
        ``count_syns_to``: count the connection attempts (SYNs) it makes to that port
        meanwhile (:meth:`dropped_syns`)."""
        sh("ip", "netns", "exec", self.namespace, "nft", "-f", "-",
           stdin=_cut_rules(count_syns_to))
        self.cut = True

    def dropped_syns(self) -> int:
        """How many SYNs to the port given to :meth:`partition` the cut has dropped."""
        listed = sh("ip", "netns", "exec", self.namespace, "nft", "list", "chain", "netdev",
                    CUT_TABLE, "cut_out").stdout
        match = re.search(r"counter packets (\d+)", listed)
        return int(match.group(1)) if match else 0

    def heal(self) -> None:
        """Undo :meth:`partition`."""
        sh("ip", "netns", "exec", self.namespace, "nft", "delete", "table", "netdev", CUT_TABLE)
        self.cut = False

    def shape(self, rate: str, burst: str = "64kb", latency: str = "200ms") -> None:
        """Limit this host's link to ``rate`` (tc syntax: ``20mbit``) in both directions:
        a token bucket on its eth0 and on its port of the switch."""
        for namespace, device in ((self.namespace, "eth0"),
                                  (self.network.switch, self.port)):
            sh("ip", "netns", "exec", namespace, "tc", "qdisc", "replace", "dev", device, "root",
               "tbf", "rate", rate, "burst", burst, "latency", latency)
        self.shaped = rate

    def unshape(self) -> None:
        for namespace, device in ((self.namespace, "eth0"),
                                  (self.network.switch, self.port)):
            sh("ip", "netns", "exec", namespace, "tc", "qdisc", "del", "dev", device, "root",
               check=False)
        self.shaped = None

    def set_link(self, delay: float = 0.0, loss: float = 0.0) -> None:
        """Delay (seconds, each way) and drop (probability, each frame each way) this host's
        frames: needs a network made with a shim for this host."""
        if self.shim is None or self.shim.stdin is None or self.shim.stdout is None:
            raise RuntimeError(f"{self.name} has no link shim: make the network with "
                               f"shim=[{self.name!r}]")
        self.shim.stdin.write(f"set {delay} {loss}\n")
        self.shim.stdin.flush()
        answer = self.shim.stdout.readline().strip()
        if not answer.startswith("ok"):
            raise HostSetupError(f"the link shim of {self.name} answered {answer!r}")

    def link_stats(self) -> tuple[int, int]:
        """(frames forwarded, frames dropped) by this host's shim."""
        if self.shim is None or self.shim.stdin is None or self.shim.stdout is None:
            raise RuntimeError(f"{self.name} has no link shim")
        self.shim.stdin.write("stats\n")
        self.shim.stdin.flush()
        words = self.shim.stdout.readline().split()
        return int(words[1]), int(words[2])


class Network:
    """A switch and the hosts cabled to it (see the module's docstring)."""

    def __init__(self, count: int, shim: Iterable[str] = ()) -> None:
        if not 1 <= count <= 26:
            raise ValueError("1 to 26 hosts")
        self.prefix = f"{PREFIX}{os.getpid()}-{next(_counter)}-"
        self.switch = f"{self.prefix}switch"
        self.workdir = Path(tempfile.mkdtemp(prefix="skyh"))
        self.secret = secrets.token_hex(32)
        self.hosts = [Host(self, i + 1, f"host{chr(ord('a') + i)}") for i in range(count)]
        self.shimmed = set(shim)
        unknown = self.shimmed - {host.name for host in self.hosts}
        if unknown:
            raise ValueError(f"no such hosts for a shim: {sorted(unknown)}")
        self.daemons: list[HostDaemon] = []
        self.processes: list[subprocess.Popen[str]] = []  #: other programs started
        self.made: list[str] = []  #: namespaces made, to remove

    def __getitem__(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def hosts_file(self) -> str:
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        lines += [f"{host.address}\t{host.name}" for host in self.hosts]
        return "\n".join(lines) + "\n"

    def create(self) -> None:
        """Make the switch and every host (call :meth:`cleanup` even if this fails)."""
        global _netns_dir_made
        sh("ip", "netns", "add", self.switch)
        self.made.append(self.switch)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        etc = Path("/etc/netns")
        if not etc.exists():
            etc.mkdir(mode=0o755)
            _netns_dir_made = True
        for host in self.hosts:
            sh("ip", "netns", "add", host.namespace)
            self.made.append(host.namespace)
            config = etc / host.namespace
            config.mkdir(mode=0o755)
            (config / "hosts").write_text(self.hosts_file())
            (config / "resolv.conf").write_text(
                "# no DNS: names come from /etc/hosts\nnameserver 127.0.0.1\n"
                "options timeout:1 attempts:1\n")
            host.home.mkdir(mode=0o700)
            cookie = host.home / ".skyproto.cookie"
            cookie.write_text(self.secret + "\n")
            cookie.chmod(0o600)
            if host.name in self.shimmed:
                self._start_shim(host)
            else:
                sh("ip", "-n", self.switch, "link", "add", host.port, "type", "veth", "peer",
                   "name", "eth0", "netns", host.namespace)
            sh("ip", "-n", self.switch, "link", "set", host.port, "master", "br0")
            sh("ip", "-n", self.switch, "link", "set", host.port, "up")
            sh("ip", "-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
            sh("ip", "-n", host.namespace, "link", "set", "eth0", "up")
            sh("ip", "-n", host.namespace, "link", "set", "lo", "up")

    def _start_shim(self, host: Host) -> None:
        reason = shim_support()
        if reason is not None:
            raise HostSetupError(reason)
        host.shim = subprocess.Popen(
            [sys.executable, str(SHIM), host.namespace, "eth0", self.switch, host.port,
             str(host.index)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert host.shim.stdout is not None
        ready = host.shim.stdout.readline().strip()
        if ready != "ready":
            host.shim.kill()
            _, errors = host.shim.communicate(timeout=10)
            raise HostSetupError(f"the link shim of {host.name} did not start: {ready!r} "
                                 f"{errors.strip()}")

    def start(self, host: Host, args: list[str], name: str | None = None,
              env: dict[str, str] | None = None) -> HostDaemon:
        daemon = HostDaemon(host, args, name or f"{host.name}-{len(self.daemons)}", env)
        self.daemons.append(daemon)
        return daemon

    def cleanup(self) -> list[str]:
        """Remove everything this network made; what could not be removed (to report).
        Idempotent."""
        problems: list[str] = []
        processes = [daemon.process for daemon in self.daemons] + self.processes
        for process in processes:  # SIGTERM all first: they stop in parallel
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
        deadline = time.monotonic() + 10
        for process in processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    problems.append(f"pid {process.pid} ({process.args!r}) would not die")
        for process in self.processes:
            if process.stdout is not None:
                process.stdout.close()
        self.processes.clear()
        for host in self.hosts:
            if host.shim is not None:
                if host.shim.stdin is not None:
                    with contextlib.suppress(OSError):
                        host.shim.stdin.close()
                try:
                    host.shim.wait(5)
                except subprocess.TimeoutExpired:
                    host.shim.kill()
                    host.shim.wait(10)
                for stream in (host.shim.stdout, host.shim.stderr):
                    if stream is not None:
                        stream.close()
                host.shim = None
        for namespace in reversed(self.made):
            try:
                problems += remove_namespace(namespace)
            except (HostSetupError, OSError, subprocess.TimeoutExpired) as e:
                problems.append(f"removing {namespace}: {e}")
        self.made.clear()
        keep = os.environ.get("SKYH_KEEP_LOGS")
        if keep and self.workdir.exists():  # for a look after the run: the daemons' logs
            target = Path(keep) / self.prefix.rstrip("-")
            target.mkdir(parents=True, exist_ok=True)
            for log in self.workdir.glob("*.log"):
                shutil.copy(log, target / log.name)
        shutil.rmtree(self.workdir, ignore_errors=True)
        left = [ns for ns in list_namespaces() if ns.startswith(self.prefix)]
        if left:
            problems.append(f"namespaces left: {left}")
        return problems

    def logs(self, tail: int | None = None) -> str:
        """Every daemon's log (its last ``tail`` lines), for a failure message."""
        shown = []
        for daemon in self.daemons:
            try:
                lines = daemon.output().splitlines()
            except OSError as e:
                lines = [f"(no log: {e})"]
            shown.append(f"----- {daemon.name} on {daemon.host.name}\n" +
                         "\n".join(lines[-tail:] if tail else lines))
        return "\n".join(shown)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def hosts_sweep() -> Iterator[None]:
    """Before the first host test: remove what dead test runs left; after the session:
    remove anything of this run's still there."""
    if host_support() is None:
        sweep()
    yield
    if host_support() is None:
        problems = sweep(everything_of_ours=True)
        assert not problems, problems


@pytest.fixture
def hosts(hosts_sweep: None, request: pytest.FixtureRequest) -> Iterator[Callable[..., Network]]:
    """``hosts(count=3, shim=())``: a new :class:`Network` of ``count`` hosts, removed
    with all it ran at the end of the test (after printing the end of every daemon's log
    if the test failed). Skips where host tests cannot run."""
    reason = host_support()
    if reason is not None:
        pytest.skip(reason)
    made: list[Network] = []
    failed_before = request.session.testsfailed

    def make(count: int = 3, *, shim: Iterable[str] = ()) -> Network:
        network = Network(count, shim)
        made.append(network)
        network.create()
        return network

    try:
        yield make
    finally:
        if request.session.testsfailed > failed_before:  # the test failed: show the logs
            for network in made:
                print(network.logs(tail=80))
        problems = [problem for network in made for problem in network.cleanup()]
        if problems:
            pytest.fail("host cleanup: " + "; ".join(problems))


# --------------------------------------------------------------------------- waiting


def wait_line(daemon: Daemon, pattern: str, timeout: float = 15.0) -> re.Match[str]:
    """Block until ``pattern`` is in the daemon's log (AssertionError if it exits first)."""

    def found() -> re.Match[str] | None:
        match = daemon.search(pattern)
        if match is None and daemon.process.poll() is not None:
            raise AssertionError(f"{daemon.name} exited ({daemon.process.returncode}):\n"
                                 f"{daemon.output()}")
        return match

    return wait_until(found, f"{pattern!r} in {daemon.name}'s log", timeout)


# --------------------------------------------------------------------------- services


class HostEcho(Service):
    """Echo under the name in ``$SKYH_ECHO`` (each host's own echo: ``ECHO_B``)."""

    default_name: ClassVar[str | None] = os.environ.get("SKYH_ECHO") or None

    def receive(self, source: int, session: int, payload: Any) -> Any:
        return payload


PROBE_LINE = re.compile(
    r"probe (?P<target>\S+) (?P<outcome>\S+) at (?P<at>[\d.]+) sent (?P<sent>[\d.]+)"
    r"(?: (?P<detail>.*))?")
EVENT_LINE = re.compile(r"probe event (?P<event>.+) at (?P<at>[\d.]+)$", re.MULTILINE)
NAME_LINE = re.compile(r"probe name (?P<name>\S+) is (?P<handle>\S+) at (?P<at>[\d.]+)")


class Prober(Service):
    """Calls each name in ``$SKYH_PROBE`` (comma-separated) every ``$SKYH_PROBE_INTERVAL``
    seconds (0.1) with ``["GET", "probe"]`` and the node's default timeout, and logs, with
    wall-clock times (comparable across the processes of one machine):

    * ``probe NAME OUTCOME at T sent S DETAIL`` when a call's outcome (``ok`` or the
      exception's type) differs from the previous one for that name;
    * ``probe name NAME is HANDLE at T`` when this node's idea of who holds NAME (a
      target, or one in ``$SKYH_WATCH``) changes (``-`` for nobody);
    * ``probe event EVENT at T`` for every cluster event (harbor up/down, names).
    """

    MAX_IN_FLIGHT = 40

    def __init__(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.targets = [t for t in os.environ.get("SKYH_PROBE", "").split(",") if t]
        self.watched = self.targets + [
            t for t in os.environ.get("SKYH_WATCH", "").split(",") if t and t not in self.targets]
        self.interval = float(os.environ.get("SKYH_PROBE_INTERVAL", "0.1"))
        self.last: dict[str, str] = {}
        self.holders: dict[str, str] = {}
        self.in_flight: dict[str, int] = dict.fromkeys(self.targets, 0)
        self.subscribed = False
        self.running = True
        self.timer = self.reactor.callLater(self.interval, self.tick)

    def tick(self) -> None:
        if not self.running:
            return
        self.timer = self.reactor.callLater(self.interval, self.tick)
        node = getattr(self, "node", None)
        if node is None:
            return
        if not self.subscribed:
            self.subscribed = True
            node.subscribe(self.event)
        for name in self.watched:
            self.note_holder(name, holder(node, name))
        for target in self.targets:
            if self.in_flight[target] >= self.MAX_IN_FLIGHT:
                continue
            self.in_flight[target] += 1
            sent = time.time()
            try:
                call = self.call(target, ["GET", "probe"])
            except Exception as e:
                self.done(target, sent, type(e).__name__, str(e))
                continue
            call.addCallbacks(
                lambda _, target=target, sent=sent: self.done(target, sent, "ok", ""),
                lambda f, target=target, sent=sent: self.done(
                    target, sent, _remote_type(f.value), f.getErrorMessage()))

    def done(self, target: str, sent: float, outcome: str, detail: str) -> None:
        self.in_flight[target] = max(0, self.in_flight[target] - 1)
        if self.last.get(target) != outcome:
            self.last[target] = outcome
            self.log_line(f"probe {target} {outcome} at {time.time():.3f} sent {sent:.3f} "
                          f"{detail}".rstrip())

    def note_holder(self, name: str, handle: int | None) -> None:
        shown = "-" if handle is None else f":{handle:08x}"
        if self.holders.get(name) != shown:
            self.holders[name] = shown
            self.log_line(f"probe name {name} is {shown} at {time.time():.3f}")

    def event(self, event: Any) -> None:
        self.log_line(f"probe event {event!r} at {time.time():.3f}")
        node = getattr(self, "node", None)
        if node is not None:
            for name in self.watched:
                self.note_holder(name, holder(node, name))

    def log_line(self, text: str) -> None:
        print(text, flush=True)  # twistd -n logs print()s as lines of its log

    def stopped(self) -> None:
        self.running = False
        if self.timer.active():
            self.timer.cancel()


class Standby(Service):
    """A warm standby SIMPLEDB: unnamed until the master says SIMPLEDB is gone (its node
    left), then it asks for the name, once each time; logs ``standby holds SIMPLEDB at T``
    when granted and ``standby refused SIMPLEDB at T: WHY`` when not."""

    default_name: ClassVar[str | None] = None
    NAME = "SIMPLEDB"

    def __init__(self) -> None:
        from twisted.internet import reactor

        self.db = SimpleDB()
        self.reactor: Any = reactor
        self.timer = self.reactor.callLater(0.1, self.subscribe)

    def receive(self, source: int, session: int, payload: Any) -> Any:
        return self.db.receive(source, session, payload)

    def subscribe(self) -> None:
        node = getattr(self, "node", None)
        if node is None:
            self.timer = self.reactor.callLater(0.1, self.subscribe)
            return
        node.subscribe(self.event)

    def event(self, event: Any) -> None:
        if type(event).__name__ == "NameUnbound" and getattr(event, "name", None) == self.NAME:
            self.reactor.callLater(0, self.claim)

    def claim(self) -> None:
        if holder(self.node, self.NAME) is not None:
            return
        self.node.register_name(self.NAME, self.handle).addCallbacks(
            lambda _: print(f"standby holds {self.NAME} at {time.time():.3f}", flush=True),
            lambda f: print(f"standby refused {self.NAME} at {time.time():.3f}: "
                            f"{f.getErrorMessage()}", flush=True))

    def stopped(self) -> None:
        if self.timer.active():
            self.timer.cancel()


def holder(node: Any, name: str) -> int | None:
    """The handle ``node`` would send to for ``name`` (its own or the master's), or None."""
    try:
        handle: int = node.resolve(name)
    except NoSuchService:
        return None
    return handle


def _remote_type(error: BaseException) -> str:
    """``RemoteError(HarborDown)`` shows as ``HarborDown``: the type the callee raised."""
    remote = getattr(error, "remote_type", None)
    return f"Remote{remote}" if isinstance(remote, str) else type(error).__name__
