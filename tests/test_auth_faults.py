"""Authentication faults against a live cluster: bad secret files, a wrong secret, replayed
handshakes, and a node claiming a live node's harbor id.

Each process test runs a real cluster (tests/test_faults.py's :class:`Cluster`: a skymaster,
alpha with ``echo``, beta with ``relay``, and the in-test driver joined as harbor 9) and
asserts that the fault changed nothing: ``skyproto status --json`` is identical before and
after (harbors, endpoints, incarnations, names and the table's sequence number), and alpha's
names and links still carry calls. What a Clock and the loopback transport show exactly is
tested that way, without processes.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.protocols import portforward
from twisted.protocols.basic import IntNStringReceiver
from twisted.python.failure import Failure

from skyproto.errors import HarborDown
from skyproto.harbor.messages import HARBOR_CODEC, LinkChallenge, LinkHello, LinkProof, LinkRefused
from skyproto.master.messages import MASTER_CODEC, MasterChallenge, MasterHello
from skyproto.node.node import Node
from skyproto.services import Echo
from skyproto.tap import describe_address
from skyproto.wire.codec import FrameKind
from skyproto.wire.seal import SEALED

from .cluster import failure_of, make_node
from .processes import Daemon, daemons, wait_for, wait_for_line
from .test_faults import ALPHA_ECHO, BETA_RELAY, SKYPROTO, TIMEOUT, Cluster, log

__all__ = ["daemons"]

WRONG_SECRET = "not-the-cluster-secret\n"
LISTENING = r"listening on (tcp:\S+)"


# --- helpers -------------------------------------------------------------------------------

async def exited(daemon: Daemon, timeout: float = 15.0) -> int:
    """Wait (bounded) for a daemon that should stop by itself; its exit status."""
    await wait_for(lambda: daemon.process.poll() is not None, f"{daemon.name} to exit", timeout)
    return daemon.process.returncode


def error_lines(daemon: Daemon, program: str = "skynode") -> list[str]:
    """The one-line errors a daemon printed (once twistd runs, its stderr goes to the log)."""
    marker = f"{program}: error: "
    return [marker + line.split(marker, 1)[1] for line in daemon.output().splitlines()
            if marker in line]


async def still_serves(cluster: Cluster, token: str) -> None:
    """alpha's name and handle, and the beta -> alpha link, all still answer."""
    driver = cluster.driver
    assert driver is not None
    assert await driver.call(ALPHA_ECHO, token) == token
    assert await driver.call(BETA_RELAY, [ALPHA_ECHO, token]) == token
    assert await driver.call("RELAY", ["ECHO", token]) == token


def write_secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def split_frames(data: bytes) -> list[bytes]:
    """The complete length-prefixed frames at the start of ``data``."""
    frames, at = [], 0
    while at + 4 <= len(data):
        (size,) = struct.unpack(">I", data[at:at + 4])
        if at + 4 + size > len(data):
            break
        frames.append(bytes(data[at + 4:at + 4 + size]))
        at += 4 + size
    return frames


def harbor_message(frame: bytes) -> object:
    assert frame[0] == FrameKind.CONTROL
    return HARBOR_CODEC.decode(frame[1:])


class _Recorder(portforward.ProxyServer):
    """Forwards a connection and keeps every byte the client sent."""

    factory: RecordingProxy

    def connectionMade(self) -> None:
        self.recording = bytearray()
        self.factory.recordings.append(self.recording)
        self.factory.open.append(self)
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        self.recording += data
        super().dataReceived(data)


class RecordingProxy(portforward.ProxyFactory):
    """A tiny TCP proxy in this process, recording what its clients say."""

    protocol = _Recorder
    noisy = False

    def __init__(self, target: str) -> None:
        host, port = target.split(":")[1:3]
        super().__init__(host, int(port))
        self.recordings: list[bytearray] = []
        self.open: list[_Recorder] = []
        # (self.host and self.port are the target's: ProxyFactory's own attributes)
        self.listening: Any = reactor.listenTCP(0, self,  # type: ignore[arg-type]
                                                interface="127.0.0.1")
        self.address = describe_address(self.listening)

    def close(self) -> None:
        self.listening.stopListening()
        for server in self.open:
            if server.transport is not None:
                server.transport.loseConnection()


class Replayer(IntNStringReceiver):
    """A raw framed connection: sends recorded frames, keeps what comes back."""

    structFormat = ">I"
    prefixLength = 4
    MAX_LENGTH = 1 << 20

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.closed: Deferred[str] = Deferred()

    def stringReceived(self, frame: bytes) -> None:
        self.frames.append(frame)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.closed.called:
            self.closed.callback(reason.getErrorMessage() if reason else "")


async def replay(endpoint: str, steps: list[list[bytes]]) -> Replayer:
    """Connect, then send each step's frames once as many frames have come back as steps
    sent before it (a real peer's pace); wait (bounded) for the other side to hang up."""
    replayer = Replayer()
    await connectProtocol(clientFromString(reactor, endpoint), replayer).addTimeout(5, reactor)
    for sent, frames in enumerate(steps):
        if sent:
            def answered(count: int = sent) -> bool:
                return len(replayer.frames) >= count

            await wait_for(answered, f"answer {sent} to the replay", timeout=5)
        assert replayer.transport is not None
        replayer.transport.write(b"".join(struct.pack(">I", len(f)) + f for f in frames))
    await replayer.closed.addTimeout(10, reactor)
    return replayer


# --- secret files --------------------------------------------------------------------------

@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_unusable_secret_files_are_one_line_and_exit_1_and_change_nothing(
        daemons, tmp_path):
    cluster = Cluster(daemons)
    try:
        await cluster.start()
        before = await cluster.status()
        workdir = cluster.workdir
        cases: list[tuple[str, str, Path, str]] = [  # program, case, file, what the line says
            ("skynode", "mode 0644", write_secret(workdir / "c644", "secret\n", 0o644),
             "is accessible by others (mode 0644); run: chmod 600"),
            ("skynode", "a directory", tmp_path, "cannot read secret file"),
            ("skynode", "empty", write_secret(workdir / "empty", ""), "is empty"),
            ("skynode", "too short", write_secret(workdir / "short", "fifteen-bytes!!\n"),
             "holds 15 bytes; at least 16 are needed"),
            ("skymaster", "too short", workdir / "short",
             "holds 15 bytes; at least 16 are needed"),
            ("skymaster", "mode 0644", workdir / "c644",
             "is accessible by others (mode 0644); run: chmod 600"),
        ]
        if os.geteuid() != 0:
            cases.append(("skynode", "mode 0000", write_secret(workdir / "c000", "secret\n", 0),
                          "cannot read secret file"))
        else:  # root reads a mode 0000 file, so there is nothing to refuse
            log("secret file mode 0000: not tested, running as root (a directory stands in)")
        started = []
        for program, case, path, _ in cases:
            args = ["--secret-file", str(path)]
            if program == "skynode":
                args += ["--harbor", "3", "--master", cluster.master_at, "--no-mapper"]
            else:
                args += ["--listen", "tcp:0:interface=127.0.0.1"]
            started.append(daemons(program, *args, name=f"{program}-{case.replace(' ', '')}"))
        for (program, case, path, says), daemon in zip(cases, started, strict=True):
            assert await exited(daemon) == 1, f"{program} with a secret file {case}"
            lines = daemon.output().strip().splitlines()
            assert len(lines) == 1, f"{program}, {case}: {daemon.output()}"
            assert lines[0].startswith(f"{program}: error: ") and says in lines[0], lines[0]
            assert str(path) in lines[0] and "secret\n" not in daemon.output()
            log(f"secret file {case}: {lines[0]}")

        # skyproto status refuses the same way
        _, err, code = await getProcessOutputAndValue(
            SKYPROTO, ("status", "--master", cluster.master_at, "--secret-file",
                       str(workdir / "c644")), env=dict(os.environ), reactor=reactor)
        assert code == 1 and b"chmod 600" in err and len(err.strip().splitlines()) == 1, err
        assert await cluster.status() == before
        await still_serves(cluster, "secret files")
    finally:
        await cluster.stop()


# --- a wrong secret ------------------------------------------------------------------------

@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_wrong_secret_is_refused_by_the_master_and_on_every_harbor_link(daemons):
    cluster = Cluster(daemons)
    wrong_caller: Node | None = None
    try:
        await cluster.start()
        alpha, driver = cluster.alpha, cluster.driver
        assert alpha is not None and driver is not None
        alpha_at = (await wait_for_line(alpha, LISTENING)).group(1)
        wrong = write_secret(cluster.workdir / "wrong", WRONG_SECRET)
        before = await cluster.status()

        # At the master: the node exits 1 with one line saying why; nothing registered.
        mallory = daemons("skynode", "--harbor", "3", "--name", "mallory", "--master",
                          cluster.master_at, "--secret-file", str(wrong), "--service", "echo",
                          "--no-mapper", name="mallory")
        assert await exited(mallory) == 1
        lines = error_lines(mallory)
        assert lines == [f"skynode: error: the master at {cluster.master_at} refused this "
                         f"node: authentication failed: the master does not know our cluster "
                         f"secret"], mallory.output()
        assert "Traceback" not in mallory.output()
        log(f"wrong secret at the master: {lines[0]}")
        _, err, code = await getProcessOutputAndValue(
            SKYPROTO, ("status", "--master", cluster.master_at, "--secret-file", str(wrong)),
            env=dict(os.environ), reactor=reactor)
        assert code == 1 and b"authentication failed" in err, err
        log(f"wrong secret, skyproto status: {err.decode().strip()}")

        # On a harbor link, as the dialer: gamma (wrong secret, static peer alpha) never
        # links; alpha is told, and stays up.
        alpha_offset = len(alpha.output())
        gamma = daemons("skynode", "--harbor", "3", "--name", "gamma", "--secret-file",
                        str(wrong), "--service", "echo", "--peer", f"1={alpha_at}",
                        "--no-mapper", name="gamma")
        gamma_at = (await wait_for_line(gamma, LISTENING)).group(1)
        unreachable = await wait_for_line(
            gamma, r"harbor 1 at \S+ is unreachable: (.*); retrying")
        assert "cluster secret" in unreachable.group(1)
        await wait_for(lambda: "refused the link: authentication failed"
                       in alpha.output()[alpha_offset:], "alpha to be told")
        assert "harbor 3 link up" not in alpha.output() and "link up" not in gamma.output()

        # As the acceptor: the driver (right secret) dials gamma; the call fails with
        # HarborDown saying why.
        driver.add_peer(3, gamma_at)
        with pytest.raises(HarborDown) as info:
            await driver.call(0x03000002, "hello?")
        assert "cluster secret" in str(info.value), info.value
        log(f"wrong secret on a link, dialing it: {info.value}")

        # A caller with the wrong secret dials alpha: same.
        wrong_caller = Node(8, reactor, WRONG_SECRET.strip().encode(), default_timeout=TIMEOUT)
        wrong_caller.add_peer(1, alpha_at)
        with pytest.raises(HarborDown) as info:
            await wrong_caller.call(ALPHA_ECHO, "hello?")
        assert "cluster secret" in str(info.value), info.value
        log(f"wrong secret on a link, its own call: {info.value}")

        assert await cluster.status() == before
        await still_serves(cluster, "wrong secret")
        assert "harbor 3 link up" not in alpha.output() and "link up" not in gamma.output()
    finally:
        if wrong_caller is not None:
            await wrong_caller.stop()
        await cluster.stop()


def test_every_call_to_a_harbor_refused_for_its_secret_says_why():
    from twisted.internet.task import Clock

    clock = Clock()
    a = make_node(clock, 1)
    b = make_node(clock, 2, secret=b"another secret, 16+")
    b.spawn(Echo())
    a.add_peer(2, "loopback:h2")
    first = a.call(0x02000002, "queued while dialing")
    clock.advance(0.01)
    assert "cluster secret" in str(failure_of(first, HarborDown).value)
    later = a.call(0x02000002, "while waiting to redial")
    clock.advance(0.01)
    message = str(failure_of(later, HarborDown).value)
    assert "cluster secret" in message, message


# --- replayed handshakes -------------------------------------------------------------------

@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_a_replayed_master_handshake_is_refused_and_registers_nothing(daemons):
    cluster = Cluster(daemons)
    proxy: RecordingProxy | None = None
    try:
        await cluster.start()
        driver = cluster.driver
        assert driver is not None and driver.master is not None
        proxy = RecordingProxy(cluster.master_at)
        delta = daemons("skynode", "--harbor", "3", "--name", "delta", "--master",
                        proxy.address, "--secret-file", str(cluster.secret), "--no-mapper",
                        "--service", "echo", name="delta")
        await wait_for_line(delta, r"joined the master .* as harbor 3")
        await wait_for(lambda: 3 in driver.master.harbors, "delta in the table")
        delta.kill()  # its id is free now: only the handshake can stop a replay taking it
        await wait_for(lambda: 3 not in driver.master.harbors, "delta to leave")
        recorded = split_frames(bytes(proxy.recordings[0]))
        hello = MASTER_CODEC.decode(recorded[0])
        assert isinstance(hello, MasterHello)
        assert recorded[1][:1] == bytes([SEALED])  # the Join travels sealed: unreadable here
        before = await cluster.status()
        master_offset = len(cluster.master.output())

        # Step by step, as the node did: a fresh challenge (so fresh keys), then the
        # recorded Join, sealed under the old connection's keys: it cannot open.
        stepped = await replay(cluster.master_at, [[recorded[0]], [recorded[1]]])
        answers = [MASTER_CODEC.decode(f) for f in stepped.frames]
        assert len(answers) == 1, answers
        assert isinstance(answers[0], MasterChallenge) and answers[0].key != hello.key
        # Blind: every recorded byte (hello, join, heartbeats) in one write.
        blind = await replay(cluster.master_at, [recorded])
        # (the challenge may not even leave: the drop aborts the connection at once)
        assert [type(MASTER_CODEC.decode(f)) for f in blind.frames] in ([], [MasterChallenge])

        assert await cluster.status() == before
        master_log = cluster.master.output()[master_offset:]
        assert master_log.count("sealed record 0 failed to open") == 2, master_log
        assert "harbor 3 joined" not in master_log
        log(f"replayed master handshake ({len(recorded)} frames recorded): dropped, "
            f"the recorded Join did not open under fresh keys; status unchanged")
        await still_serves(cluster, "replayed master handshake")
    finally:
        if proxy is not None:
            proxy.close()
        await cluster.stop()


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_a_replayed_harbor_handshake_is_refused_and_the_live_link_untouched(daemons):
    cluster = Cluster(daemons)
    proxy: RecordingProxy | None = None
    try:
        await cluster.start()
        alpha = cluster.alpha
        assert alpha is not None
        alpha_at = (await wait_for_line(alpha, LISTENING)).group(1)
        proxy = RecordingProxy(alpha_at)
        gamma = daemons("skynode", "--harbor", "3", "--name", "gamma", "--secret-file",
                        str(cluster.secret), "--peer", f"1={proxy.address}", "--no-mapper",
                        name="gamma")
        await wait_for_line(gamma, r"harbor 1 link up")
        await wait_for_line(alpha, r"harbor 3 link up")
        await wait_for(lambda: len(split_frames(bytes(proxy.recordings[0]))) >= 2,
                       "gamma's handshake to be recorded")
        recorded = split_frames(bytes(proxy.recordings[0]))
        hello, proof = (harbor_message(f) for f in recorded[:2])
        assert isinstance(hello, LinkHello) and hello.harbor == 3
        assert isinstance(proof, LinkProof)
        before = await cluster.status()

        for state in ("live", "killed"):  # the recorded node still linked, then gone
            alpha_offset, gamma_offset = len(alpha.output()), len(gamma.output())
            replayed = await replay(alpha_at, [[recorded[0]], [recorded[1]]])
            answers = [harbor_message(f) for f in replayed.frames]
            assert isinstance(answers[0], LinkChallenge) and answers[0].key != hello.key
            assert answers[1:] == [LinkRefused("authentication failed")]
            alpha_log = alpha.output()[alpha_offset:]
            assert "peer failed to prove the cluster secret" in alpha_log
            assert "harbor 3 link" not in alpha_log  # neither up nor lost
            if state == "live":
                assert "link lost" not in gamma.output()[gamma_offset:]
                gamma.kill()
                await wait_for_line(alpha, r"harbor 3 \(incarnation \d+\) link lost")
            log(f"replayed harbor handshake, recorded node {state}: {answers[1]}")

        assert await cluster.status() == before
        await still_serves(cluster, "replayed harbor handshake")
    finally:
        if proxy is not None:
            proxy.close()
        await cluster.stop()


# --- claiming a live node's harbor id ------------------------------------------------------

@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_claiming_a_live_harbor_id_at_the_master_is_refused_and_changes_nothing(daemons):
    # tests/test_process_master.py checks the refusal line; here, that nothing moved.
    cluster = Cluster(daemons)
    try:
        await cluster.start()
        alpha = cluster.alpha
        assert alpha is not None
        before = await cluster.status()
        alpha_offset = len(alpha.output())
        impostor = daemons("skynode", "--harbor", "1", "--name", "impostor", "--master",
                           cluster.master_at, "--secret-file", str(cluster.secret),
                           "--service", "echo", "--no-mapper", name="impostor")
        assert await exited(impostor) == 1
        lines = error_lines(impostor)
        assert len(lines) == 1 and "harbor 1 is held by live node alpha@" in lines[0], lines
        log(f"harbor id claim at the master: {lines[0]}")
        assert await cluster.status() == before
        await still_serves(cluster, "impostor refused")
        alpha_log = alpha.output()[alpha_offset:]
        assert "link lost" not in alpha_log and "lost the master" not in alpha_log
    finally:
        await cluster.stop()


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_claiming_a_live_harbor_id_on_a_harbor_link_leaves_the_live_node_alone(daemons):
    cluster = Cluster(daemons)
    try:
        await cluster.start()
        beta, driver = cluster.beta, cluster.driver
        assert beta is not None and driver is not None
        beta_at = (await wait_for_line(beta, LISTENING)).group(1)
        before = await cluster.status()
        beta_offset = len(beta.output())
        impostor = daemons("skynode", "--harbor", "1", "--name", "impostor", "--secret-file",
                           str(cluster.secret), "--peer", f"2={beta_at}", "--no-mapper",
                           name="impostor")
        await wait_for(lambda: impostor.search(r"harbor 2 (link up|at \S+ is unreachable)"),
                       "the impostor to link to beta, or fail to")
        try:
            answer: Any = await driver.call(BETA_RELAY, [ALPHA_ECHO, "alpha?"])
        except Exception as e:  # the impostor has no echo: NoSuchService through the relay
            answer = e
        beta_log = beta.output()[beta_offset:]
        log(f"harbor id claim on a link: impostor "
            f"{'linked' if 'link up' in impostor.output() else 'refused'}; beta: "
            f"{[line.split('] ', 1)[-1] for line in beta_log.splitlines() if 'harbor 1' in line]}"
            f"; beta -> alpha call answered {answer!r}")
        assert await cluster.status() == before
        assert answer == "alpha?"
        alpha = next(h for h in before["harbors"] if h["id"] == 1)
        assert f"harbor 1 (incarnation {alpha['incarnation']}) link lost" not in beta_log
        await still_serves(cluster, "impostor on a link")
    finally:
        await cluster.stop()
