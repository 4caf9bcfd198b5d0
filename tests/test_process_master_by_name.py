"""Real processes on 127.0.0.1: a node given ``--master skymaster@127.0.0.1`` and no port.

The master listens on an ephemeral port and registers ``skymaster`` with the host's mapper
(on the test's own ``ERL_EPMD_PORT``, which it hosts, being the first there); the node
asks that mapper at every attempt, so it finds the master again after a restart on another
port. ``--master-wait`` says what the mapper answered when there is no such master.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from .processes import TWISTD, Daemon, daemons, wait_for, wait_for_line

__all__ = ["daemons"]

pytestmark = pytest.mark.process
SKYPROTO = str(Path(sys.executable).with_name("skyproto"))
BY_NAME = "skymaster@127.0.0.1"
LISTENING = r"skymaster listening on tcp:127\.0\.0\.1:(\d+)"


def status_by_name(daemons: Any) -> dict[str, Any]:
    """``skyproto status --master skymaster@127.0.0.1`` (the mapper on the test's port)."""
    result = subprocess.run(
        [SKYPROTO, "status", "--master", BY_NAME, "--secret-file", str(daemons.secret),
         "--json"], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        env=dict(os.environ, ERL_EPMD_PORT=str(daemons.mapper_port)))
    assert result.returncode == 0, result.stderr
    table: dict[str, Any] = json.loads(result.stdout)
    return table


def start_master(daemons: Any, name: str) -> Daemon:
    master: Daemon = daemons("skymaster", "--listen", "tcp:0:interface=127.0.0.1",
                             "--secret-file", str(daemons.secret), name=name)
    return master


@pytest_twisted.ensureDeferred
async def test_a_node_finds_a_master_on_an_ephemeral_port_by_name_and_again_after_a_restart(
        daemons: Any) -> None:
    master = start_master(daemons, "master")
    first = int((await wait_for_line(master, LISTENING))[1])
    await wait_for_line(master, r"registered as skymaster@\S+ with the mapper at "
                                rf"tcp:127\.0\.0\.1:{daemons.mapper_port}")
    node = daemons("skynode", "--harbor", "1", "--name", "alpha", "--master", BY_NAME,
                   "--secret-file", str(daemons.secret), "--service", "echo", name="alpha")
    await wait_for_line(node, rf"joined the master at {re.escape(BY_NAME)} as harbor 1")
    table = status_by_name(daemons)
    assert [row["name"].split("@")[0] for row in table["harbors"]] == ["alpha"], table

    master.kill()  # kill -9: the mapper it hosted goes too; alpha takes the mapper over
    await wait_for_line(node, r"lost the master at skymaster@127\.0\.0\.1")
    master2 = start_master(daemons, "master2")
    second = int((await wait_for_line(master2, LISTENING))[1])
    assert second != first
    await wait_for(lambda: len(node.search_all(
        rf"joined the master at {re.escape(BY_NAME)} as harbor 1")) >= 2 or None,
        "alpha to re-join the restarted master by name")
    assert node.search(rf"skymaster@127\.0\.0\.1 is at tcp:127\.0\.0\.1:{second}"), \
        node.output()[-3000:]
    # every failed attempt meanwhile was said in words, naming the mapper's answer
    said = node.search_all(r"no master at skymaster@127\.0\.0\.1: ([^\n]*) \(attempt")
    assert said and all(
        "mapper on 127.0.0.1" in line or "connection refused" in line for line in said), said
    assert [row["name"].split("@")[0] for row in status_by_name(daemons)["harbors"]] == [
        "alpha"]


def master_wait(daemons: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", "skynode", "--harbor", "1", "--master", BY_NAME,
         "--master-wait", "2", "--secret-file", str(daemons.secret), *args],
        cwd=daemons.workdir, capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL,
        env=dict(os.environ, HOME=str(daemons.workdir),
                 ERL_EPMD_PORT=str(daemons.mapper_port)))


@pytest_twisted.ensureDeferred
async def test_master_wait_says_what_the_mapper_answered(daemons: Any) -> None:
    mapper_at = f"127.0.0.1:{daemons.mapper_port}"
    nothing = master_wait(daemons, "--no-mapper")  # no mapper on this host at all
    assert nothing.returncode == 1, nothing
    assert f"no master answered within 2 s (last attempt: {BY_NAME}: no mapper answers on " \
           f"127.0.0.1 ({mapper_at}): connection refused)" in nothing.stderr, nothing.stderr

    mapper = daemons("skymapper", name="mapper")
    await wait_for_line(mapper, r"skymapper listening")
    missing = master_wait(daemons)  # a mapper (the node registers with it), no master
    assert missing.returncode == 1, missing
    assert f"no master answered within 2 s (last attempt: {BY_NAME}: no skymaster " \
           f"registered with the mapper on 127.0.0.1 ({mapper_at}))" in missing.stderr, \
        missing.stderr
