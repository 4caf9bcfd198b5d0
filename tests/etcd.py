"""Real etcd clusters for the tests: members on random loopback ports, in the foreground.

Each member is a child process (``etcd`` from Debian's etcd-server package) with a data
dir of its own in a temporary directory; the cluster waits, with a deadline, until every
member says it is healthy, and is stopped by PID (and its directory removed) whatever the
test did. Tests that need etcd skip, saying why, when ``etcd`` is not on PATH.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ETCD = shutil.which("etcd")
NO_ETCD = "etcd is not on PATH (Debian: apt-get install etcd-server; .ci/run installs it)"
#: a quick election (the default 1000 ms would slow the leader-kill tests down)
ELECTION_MS = 500
HEARTBEAT_MS = 50


def need_etcd() -> str:
    if ETCD is None:
        pytest.skip(NO_ETCD)
    return ETCD


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports nobody listens on now (held together while chosen)."""
    probes = []
    try:
        for _ in range(count):
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            probes.append(probe)
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _get(url: str, path: str, body: dict[str, Any] | None = None,
         timeout: float = 1.0) -> Any:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        if body is None:
            connection.request("GET", path)
        else:
            connection.request("POST", path, json.dumps(body),
                               {"Content-Type": "application/json"})
        response = connection.getresponse()
        return json.loads(response.read())
    finally:
        connection.close()


class Member:
    def __init__(self, name: str, client_port: int, peer_port: int, workdir: Path) -> None:
        self.name = name
        self.client_url = f"http://127.0.0.1:{client_port}"
        self.peer_url = f"http://127.0.0.1:{peer_port}"
        self.data_dir = workdir / f"{name}.etcd"
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, initial_cluster: str, state: str = "new") -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [need_etcd(), "--name", self.name, "--data-dir", str(self.data_dir),
                 "--listen-client-urls", self.client_url,
                 "--advertise-client-urls", self.client_url,
                 "--listen-peer-urls", self.peer_url,
                 "--initial-advertise-peer-urls", self.peer_url,
                 "--initial-cluster", initial_cluster,
                 "--initial-cluster-state", state,
                 "--initial-cluster-token", f"skyproto-test-{os.getpid()}",
                 "--heartbeat-interval", str(HEARTBEAT_MS),
                 "--election-timeout", str(ELECTION_MS),
                 "--log-level", "warn", "--logger", "zap"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self) -> bool:
        try:
            return bool(_get(self.client_url, "/health").get("health") == "true")
        except (OSError, ValueError, http.client.HTTPException):
            return False

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = _get(self.client_url, "/v3/maintenance/status", {})
        return result

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop this member by its PID (SIGKILL unless told) and wait for it."""
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class EtcdCluster:
    """``size`` members on 127.0.0.1; ``urls`` are their client URLs."""

    def __init__(self, size: int = 3) -> None:
        need_etcd()
        self.workdir = Path(tempfile.mkdtemp(prefix="skyetcd"))
        ports = free_ports(2 * size)
        self.members = [Member(f"m{i}", ports[2 * i], ports[2 * i + 1], self.workdir)
                        for i in range(size)]
        self.initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def urls(self) -> list[str]:
        return [m.client_url for m in self.members]

    def start(self, timeout: float = 30.0) -> None:
        for member in self.members:
            member.start(self.initial_cluster)
        self.wait_healthy(self.members, timeout)

    def wait_healthy(self, members: list[Member], timeout: float = 30.0) -> None:
        """Poll /health (with a deadline) until every one of ``members`` answers healthy."""
        deadline = time.monotonic() + timeout
        waiting = list(members)
        while waiting:
            for member in list(waiting):
                if not member.alive:
                    raise RuntimeError(f"etcd member {member.name} exited:\n{member.log()}")
                if member.healthy():
                    waiting.remove(member)
            if not waiting:
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {m.name}\n{m.log()}" for m in waiting)
                raise RuntimeError(f"etcd not healthy within {timeout:g} s:\n{logs}")
            time.sleep(0.05)

    def leader(self) -> Member:
        """The member that leads now (asked of the live members)."""
        for member in self.members:
            if not member.alive:
                continue
            try:
                status = member.status()
            except (OSError, ValueError, http.client.HTTPException):
                continue
            leader = status.get("leader")
            for candidate in self.members:
                if candidate.alive and _member_id(candidate) == leader:
                    return candidate
        raise RuntimeError("no etcd member knows a leader")

    def stop(self) -> None:
        for member in self.members:
            member.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _member_id(member: Member) -> str | None:
    try:
        header = member.status().get("header", {})
    except (OSError, ValueError, http.client.HTTPException):
        return None
    member_id = header.get("member_id")
    return str(member_id) if member_id is not None else None


def running_cluster(size: int = 3) -> Iterator[EtcdCluster]:
    """A started cluster, stopped and removed afterwards even if the test failed."""
    cluster = EtcdCluster(size)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def etcd_cluster() -> Iterator[EtcdCluster]:
    """One three-member cluster for every test that only reads and writes keys (each test
    uses a prefix of its own); tests that kill members use ``fresh_etcd``."""
    yield from running_cluster()


@pytest.fixture
def fresh_etcd() -> Iterator[EtcdCluster]:
    """A three-member cluster of this test's own, to kill members of."""
    yield from running_cluster()


class FaultyHTTP:
    """An HTTP client for :class:`~skyproto.master.etcd_client.EtcdClient` that passes
    requests to a real one, with faults on request: ``lose_answer[path]`` requests to
    ``path`` reach etcd but their answer is lost (the caller times out), ``delay[path]``
    seconds before an answer is passed on, and ``silent_watches`` watches that connect but
    never deliver anything."""

    def __init__(self, inner: Any, clock: Any) -> None:
        self.inner = inner
        self.clock = clock
        self.lose_answer: dict[str, int] = {}
        self.delay: dict[str, float] = {}
        self.silent_watches = 0
        self.requests: list[str] = []

    def request(self, method: str, url: str, *, data: bytes, headers: Any) -> Any:
        from twisted.internet.defer import Deferred
        from twisted.internet.task import deferLater

        path = "/" + url.split("/", 3)[3]
        self.requests.append(path)
        if path == "/v3/watch" and self.silent_watches > 0:
            self.silent_watches -= 1
            return self.inner.request(method, url, data=data, headers=headers).addCallback(
                _Silent)
        answer = self.inner.request(method, url, data=data, headers=headers)
        if self.lose_answer.get(path, 0) > 0:
            self.lose_answer[path] -= 1
            lost: Deferred[Any] = Deferred()
            # it reached etcd: read and forget its answer, and never answer the caller
            answer.addCallback(lambda response: response.content()).addErrback(lambda _: None)
            return lost
        if self.delay.get(path):
            seconds = self.delay[path]
            return answer.addCallback(
                lambda response: deferLater(self.clock, seconds, lambda: response))
        return answer


class _Silent:
    """A response whose body never delivers (the stream stays open until cancelled)."""

    def __init__(self, response: Any) -> None:
        self.response = response
        self.code = response.code

    def deliverBody(self, protocol: Any) -> None:
        inner = self

        class Swallow:
            def makeConnection(self, transport: Any) -> None:
                protocol.makeConnection(transport)

            def dataReceived(self, data: bytes) -> None:
                pass

            def connectionLost(self, reason: Any) -> None:
                protocol.connectionLost(reason)

        inner.response.deliverBody(Swallow())


def faulty_client(urls: list[str], reactor: Any, **kwargs: Any) -> tuple[Any, FaultyHTTP]:
    """An EtcdClient over a FaultyHTTP over treq; close it with ``client.close()``."""
    from skyproto.master.etcd_client import EtcdClient

    client = EtcdClient.over_treq(urls, reactor, **kwargs)
    faulty = FaultyHTTP(client.http, reactor)
    client.http = faulty
    return client, faulty
