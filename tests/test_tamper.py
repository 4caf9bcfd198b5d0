"""A man in the middle on a live cluster: a relay process that flips, drops, reorders and
replays bytes of a harbor link and of a master connection after their handshakes.

Both are sealed (AES-256-GCM records with per-direction counters, keys from the handshake),
so every manipulation must end that connection at once with a logged reason, the caller
must get an error (or, when the tampered record was a copy of one already delivered, the
true answer), never a changed value, and the relay must never see a payload in the clear.
The rest of the cluster goes on serving.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import LogEvent, formatEvent

from skyproto.auth import load_secret
from skyproto.errors import SkyprotoError
from skyproto.node.node import Node
from skyproto.services import Echo
from skyproto.tap import describe_address

from .processes import daemons, wait_for, wait_for_line
from .test_auth_faults import LISTENING, still_serves
from .test_faults import ALPHA_ECHO, TIMEOUT, Cluster, log

__all__ = ["daemons"]

RELAY = Path(__file__).with_name("tamper_relay.py")
FAILED_TO_OPEN = "failed to open: bytes on the connection were altered"


class TamperRelay:
    """tests/tamper_relay.py as a child process, driven through its stdin."""

    def __init__(self, target: str, workdir: Path, name: str) -> None:
        self.log_path = workdir / f"{name}.log"
        self.record_path = workdir / f"{name}.bytes"
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, str(RELAY), target.rsplit(":", 1)[1], str(self.record_path)],
                stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
        self.endpoint = ""

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def started(self) -> str:
        port = await wait_for(lambda: _match(self.output(), "listening on "), "the relay")
        self.endpoint = f"tcp:127.0.0.1:{port}"
        return self.endpoint

    async def arm(self, mode: str, way: str) -> None:
        before = self.output().count(f"armed {mode} {way}")
        assert self.process.stdin is not None
        self.process.stdin.write(f"arm {mode} {way}\n".encode())
        self.process.stdin.flush()
        await wait_for(lambda: self.output().count(f"armed {mode} {way}") > before,
                       f"the relay to arm {mode} {way}")

    def applied(self, mode: str, way: str) -> int:
        return self.output().count(f"applied {mode} {way}")

    def recorded(self) -> bytes:
        return self.record_path.read_bytes() if self.record_path.exists() else b""

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def _match(text: str, prefix: str) -> str | None:
    for line in text.splitlines():
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    return None


@pytest.fixture
def relays(daemons: Any) -> Iterator[list[TamperRelay]]:
    started: list[TamperRelay] = []
    yield started
    for relay in started:
        relay.stop()


def logged(events: list[LogEvent], since: int, text: str) -> bool:
    return any(text in formatEvent(e) for e in events[since:])


#: (mode, way): every manipulation, both ways where the outcome differs
CASES = [("flip", "up"), ("flip", "down"), ("drop", "up"), ("drop", "down"),
         ("reorder", "up"), ("reorder", "down"), ("replay", "up"), ("replay", "down")]


async def outcome_of(call: Any) -> Any:
    try:
        return await call
    except SkyprotoError as e:
        return e


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_a_tampered_harbor_link_fails_at_once_and_never_changes_a_value(
        daemons, relays, events):
    cluster = Cluster(daemons)
    callers: list[Node] = []
    try:
        await cluster.start()
        alpha = cluster.alpha
        assert alpha is not None
        alpha_at = (await wait_for_line(alpha, LISTENING)).group(1)
        relay = TamperRelay(alpha_at, cluster.workdir, "harbor-relay")
        relays.append(relay)
        await relay.started()
        secret = load_secret(cluster.secret)
        tokens = []
        for number, (mode, way) in enumerate(CASES):
            caller = Node(20 + number, reactor, secret, default_timeout=TIMEOUT)
            callers.append(caller)
            caller.add_peer(1, relay.endpoint)  # alpha, through the man in the middle
            assert await caller.call(ALPHA_ECHO, "clean") == "clean"
            alpha_offset, event_offset = len(alpha.output()), len(events)
            token = f"hello-from-alpha-{number}"
            tokens.append(token)
            await relay.arm(mode, way)
            outcome = await outcome_of(caller.call(ALPHA_ECHO, token))
            # The relay says so after it sent the frame: the caller may have its answer first.
            await wait_for(lambda m=mode, w=way: relay.applied(m, w) >= 1,
                           f"the relay to apply {mode} {way}", 10)
            assert relay.applied(mode, way) == 1
            # never a changed value: an error, or the true answer when only a copy was hurt
            if (mode, way) == ("replay", "down"):
                assert outcome == token, outcome
            elif mode == "replay":
                assert outcome == token or isinstance(outcome, SkyprotoError), outcome
            else:
                assert isinstance(outcome, SkyprotoError), f"{mode} {way}: {outcome!r}"
            # the link ended, and the side that received the bad record said why
            if way == "up":
                await wait_for_line(alpha, FAILED_TO_OPEN, timeout=10)
                assert FAILED_TO_OPEN in alpha.output()[alpha_offset:]
            else:
                await wait_for(lambda since=event_offset: logged(events, since, FAILED_TO_OPEN),
                               f"the caller to log why ({mode} {way})", timeout=10)
            await wait_for(lambda node=caller: node.router.state(1) != "up",
                           "the link to end", 10)
            log(f"harbor link, {mode} {way}: "
                f"{outcome if isinstance(outcome, str) else type(outcome).__name__}")
            await caller.stop()
        recorded = relay.recorded()
        assert len(recorded) > 1000
        for token in tokens:  # the relay carried every call but could read none
            assert token.encode() not in recorded
        await still_serves(cluster, "after a tampered harbor link")
    finally:
        for caller in callers:
            await caller.stop()
        await cluster.stop()


@pytest.mark.process
@pytest_twisted.ensureDeferred
async def test_a_tampered_master_connection_fails_at_once_and_never_changes_a_value(
        daemons, relays, events):
    cluster = Cluster(daemons)
    nodes: list[Node] = []
    try:
        await cluster.start()
        relay = TamperRelay(cluster.master_at, cluster.workdir, "master-relay")
        relays.append(relay)
        await relay.started()
        secret = load_secret(cluster.secret)
        before = await cluster.status()
        for number, (mode, way) in enumerate(CASES):
            node = Node(40 + number, reactor, secret, default_timeout=TIMEOUT)
            nodes.append(node)
            port = await node.listen("tcp:0:interface=127.0.0.1")
            node.join_master(relay.endpoint, f"tamper{number}@test", describe_address(port))
            client = node.master
            assert client is not None
            await wait_for(lambda c=client: c.connected, "the node to join through the relay")
            master_offset, event_offset = len(cluster.master.output()), len(events)
            await relay.arm(mode, way)
            # a name registered through the relay: a changed value would bind another handle
            handle = node.spawn(Echo())
            outcome = await outcome_of(client.register_name(f"TAMPER{number}", handle))
            await wait_for(lambda m=mode, w=way: relay.applied(m, w) >= 1,
                           f"the relay to apply {mode} {way}", 10)
            assert relay.applied(mode, way) == 1
            if mode == "replay":
                assert outcome is None or isinstance(outcome, SkyprotoError), outcome
            else:
                assert isinstance(outcome, SkyprotoError), f"{mode} {way}: {outcome!r}"
            if way == "up":
                await wait_for(
                    lambda since=master_offset: FAILED_TO_OPEN in cluster.master.output()[since:],
                    f"the master to log why ({mode} {way})", timeout=10)
            else:
                await wait_for(lambda since=event_offset: logged(events, since, FAILED_TO_OPEN),
                               f"the node to log why ({mode} {way})", timeout=10)
            status = await cluster.status()
            bound = status["names"].get(f"TAMPER{number}")
            assert bound in (None, handle), f"{mode} {way}: bound to {bound}"
            log(f"master connection, {mode} {way}: "
                f"{'bound' if outcome is None else type(outcome).__name__}")
            await node.stop()
        names = set((await cluster.status())["names"])
        assert names - {f"TAMPER{n}" for n in range(len(CASES))} == set(before["names"])
        await still_serves(cluster, "after a tampered master connection")
    finally:
        for node in nodes:
            await node.stop()
        await cluster.stop()
