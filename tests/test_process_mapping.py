"""skynode and the host's port mapper, as real processes (issue 5, node side)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted

from .processes import daemons, wait_for, wait_for_line

__all__ = ["daemons"]

pytestmark = pytest.mark.process
SKYPROTO = str(Path(sys.executable).with_name("skyproto"))


def names(mapper_port: int) -> list[str]:
    result = subprocess.run([SKYPROTO, "names"], capture_output=True, text=True, timeout=30,
                            env=dict(os.environ, ERL_EPMD_PORT=str(mapper_port)),
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        return []
    return sorted(line.split()[1] for line in result.stdout.splitlines()[1:])


@pytest_twisted.ensureDeferred
async def test_nodes_share_a_mapper_resolve_by_name_and_survive_its_host(daemons):
    common = ["--secret-file", str(daemons.secret)]
    alpha = daemons("skynode", "--harbor", "1", "--name", "alpha", "--service", "echo", *common,
                    name="alpha")
    await wait_for_line(alpha, r"started the mapper on")
    beta = daemons("skynode", "--harbor", "2", "--name", "beta", "--service", "relay",
                   "--peer", "1=alpha@localhost", *common, name="beta")
    await wait_for_line(beta, r"registered beta with the mapper")
    await wait_for_line(beta, r"harbor 1 link up")  # alpha@localhost resolved via the mapper
    gamma = daemons("skynode", "--harbor", "3", "--name", "gamma", *common, name="gamma")
    await wait_for_line(gamma, r"registered gamma with the mapper")
    assert names(daemons.mapper_port) == ["alpha", "beta", "gamma"]

    alpha.kill()  # SIGKILL the node hosting the mapper
    killed = time.monotonic()
    await wait_for(lambda: names(daemons.mapper_port) == ["beta", "gamma"],
                   "a survivor to host the mapper with every remaining name", timeout=10)
    took = time.monotonic() - killed
    print(f"names back {took:.2f} s after the mapper's host was killed")
    assert took < 3.0
    hosts = [d for d in (beta, gamma) if d.search(r"started the mapper on")]
    assert len(hosts) == 1


@pytest.mark.skipif(shutil.which("epmd") is None, reason="genuine epmd (erlang-base) missing")
@pytest_twisted.ensureDeferred
async def test_a_skynode_registers_with_a_genuine_epmd(daemons):
    epmd = subprocess.Popen(
        [shutil.which("epmd") or "epmd", "-port", str(daemons.mapper_port), "-d"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        await wait_for(lambda: names(daemons.mapper_port) == [] and _answers(daemons.mapper_port),
                       "genuine epmd to listen")
        node = daemons("skynode", "--harbor", "1", "--name", "alpha",
                       "--secret-file", str(daemons.secret), name="alpha")
        await wait_for_line(node, r"registered alpha with the mapper")
        listing = subprocess.run(
            [shutil.which("epmd") or "epmd", "-port", str(daemons.mapper_port), "-names"],
            capture_output=True, text=True, timeout=30)
        assert "name alpha at port" in listing.stdout
        assert not node.search(r"started the mapper")
    finally:
        epmd.kill()
        epmd.wait(10)
        assert epmd.stdout is not None
        epmd.stdout.close()


def _answers(port: int) -> bool:
    result = subprocess.run([SKYPROTO, "names"], capture_output=True, text=True, timeout=30,
                            env=dict(os.environ, ERL_EPMD_PORT=str(port)),
                            stdin=subprocess.DEVNULL)
    return result.returncode == 0
