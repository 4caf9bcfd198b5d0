"""Real skymaster and skynode processes: registration, refusal, id reuse, master kill -9."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from skyproto.auth import load_secret
from skyproto.node.node import Node

from .processes import daemons, run_twistd, wait_for, wait_for_line

__all__ = ["daemons"]

pytestmark = pytest.mark.process
SKYPROTO = str(Path(sys.executable).with_name("skyproto"))
TIMEOUT = 10


def status(port: int, secret: Path) -> Any:
    result = subprocess.run(
        [SKYPROTO, "status", "--master", f"tcp:127.0.0.1:{port}", "--secret-file", str(secret),
         "--json"], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def registered(driver: Node) -> tuple[list[int], dict[str, int]]:
    assert driver.master is not None
    return sorted(driver.master.harbors), dict(driver.master.names)


@pytest_twisted.ensureDeferred
async def test_registration_refusal_reuse_and_master_kill(daemons):
    secret = daemons.secret
    master = daemons("skymaster", "--listen", "tcp:0:interface=127.0.0.1",
                     "--secret-file", str(secret), name="master")
    port = int((await wait_for_line(master, r"skymaster listening on tcp:127\.0\.0\.1:(\d+)"))
               .group(1))
    master_at = f"tcp:127.0.0.1:{port}"

    def node(harbor: str, name: str, *services: str):
        args = ["skynode", "--harbor", harbor, "--name", name, "--master", master_at,
                "--secret-file", str(secret)]
        for service in services:
            args += ["--service", service]
        return daemons(*args, name=name)

    alpha = node("1", "alpha", "echo")
    await wait_for_line(alpha, r"joined the master .* as harbor 1")
    beta = node("auto", "beta", "relay")  # auto ids come from the top: 255
    await wait_for_line(beta, r"joined the master .* as harbor 255\b")

    # names are granted once the master's start-up grace (2 s) is over
    table = await wait_for(lambda: (t := status(port, secret))["names"] and len(t["names"]) == 2
                           and t, "both names")
    assert [(h["id"], h["name"].split("@")[0], h["up"]) for h in table["harbors"]] == [
        (1, "alpha", True), (255, "beta", True)]
    assert table["names"] == {"ECHO": 0x01000002, "RELAY": 0xFF000002}

    # A second node claiming live harbor 1 is refused and exits 1 with one clear line.
    impostor = node("1", "impostor")
    exit_code = await wait_for(lambda: impostor.process.poll(), "the impostor to exit")
    assert exit_code == 1
    refusal = impostor.search(r"skynode: error: the master at \S+ refused this node: (.*)")
    assert refusal and "harbor 1 is held by live node alpha@" in refusal.group(1)

    # The test process joins as harbor 9, to watch the table and make calls.
    driver = Node(9, reactor, load_secret(secret), default_timeout=TIMEOUT)
    driver.listen("tcp:0:interface=127.0.0.1")
    driver.join_master(master_at, "driver@test", "tcp:127.0.0.1:1")
    try:
        await wait_for(lambda: registered(driver)[0] == [1, 9, 255], "the driver's table")
        reply = await driver.call(0xFF000002, ["ECHO", "beta relays to alpha"])
        assert reply == "beta relays to alpha"

        # kill -9 a node: its id is free at once for its next incarnation.
        alpha.kill()
        await wait_for(lambda: 1 not in registered(driver)[0], "harbor 1 to leave")
        alpha = node("1", "alpha", "echo")
        await wait_for_line(alpha, r"joined the master .* as harbor 1")
        await wait_for(lambda: registered(driver)[1].get("ECHO") == 0x01000002,
                       "ECHO to come back")

        # kill -9 the master: calls between nodes go on; everyone re-registers on restart.
        master.kill()
        reply = await driver.call(0xFF000002, [0x01000002, "no master needed"])
        assert reply == "no master needed"
        master = daemons("skymaster", "--listen", f"tcp:{port}:interface=127.0.0.1",
                         "--secret-file", str(secret), name="master2")
        await wait_for_line(master, r"skymaster listening")
        restarted = time.monotonic()
        await wait_for(lambda: sorted(h["id"] for h in status(port, secret)["harbors"]) ==
                       [1, 9, 255], "every node to re-register", timeout=15)
        rejoin_seconds = time.monotonic() - restarted
        # Not a speed figure (benchmarks/master.py measures that): a node waiting out a
        # long backoff would take 15 s. Each poll runs the ``skyproto status`` CLI, which
        # takes up to a second on a loaded machine, so the bound leaves room for that.
        assert rejoin_seconds < 6.0, f"re-registration took {rejoin_seconds:.2f} s"
        print(f"every node re-registered {rejoin_seconds:.2f} s after the restart")
        assert status(port, secret)["names"] == {"ECHO": 0x01000002, "RELAY": 0xFF000002}

        # A node started after the restart reaches the old node by its global name.
        gamma = node("auto", "gamma", "relay")
        await wait_for_line(gamma, r"joined the master .* as harbor 254\b")
        await wait_for_line(gamma, r"RELAY.*already taken by :ff000002")
        reply = await driver.call(0xFE000002, ["ECHO", "late joiner calls old node"])
        assert reply == "late joiner calls old node"
    finally:
        await driver.stop()


@pytest_twisted.ensureDeferred
async def test_a_restarted_node_takes_its_id_over_and_a_refused_one_exits_with_one_line(daemons):
    secret = daemons.secret
    master = daemons("skymaster", "--listen", "tcp:0:interface=127.0.0.1",
                     "--secret-file", str(secret), name="master")
    port = int((await wait_for_line(master, r"skymaster listening on tcp:127\.0\.0\.1:(\d+)"))
               .group(1))
    master_at = f"tcp:127.0.0.1:{port}"
    args = ["--master", master_at, "--secret-file", str(secret), "--no-mapper"]

    alpha = daemons("skynode", "--harbor", "1", "--name", "alpha", *args, name="alpha")
    await wait_for_line(alpha, r"joined the master .* as harbor 1")
    # Frozen (like a hung process or a dead host): its master connection stays open, silent.
    alpha.process.send_signal(signal.SIGSTOP)
    try:
        again = daemons("skynode", "--harbor", "1", "--name", "alpha", *args, name="alpha2")
        await wait_for_line(again, r"joined the master .* as harbor 1", timeout=TIMEOUT)
        assert again.process.poll() is None
        assert master.search(r"harbor 1 \(alpha@\S+\) waits up to")
        assert master.search(r"harbor 1 left: harbor 1 silent for")
    finally:
        alpha.kill()  # SIGKILL ends a stopped process too

    # Refused for a real reason: exit status 1 and one line on the real stderr.
    result = run_twistd("skynode", "--harbor", "1", "--name", "impostor", *args,
                        cwd=daemons.workdir)
    assert result.returncode == 1, result.stdout[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.fullmatch(rf"skynode: error: the master at {re.escape(master_at)} refused this "
                        r"node: harbor 1 is held by live node alpha@\S+ \(incarnation \d+\)",
                        lines[0]), lines[0]
