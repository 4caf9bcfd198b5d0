"""``twistd skymapper`` and ``skyproto names`` as real processes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint

from skyproto.mapper.client import MapperClient

from .processes import daemons, run_twistd, wait_for_line

__all__ = ["daemons"]

pytestmark = pytest.mark.process
SKYPROTO = str(Path(sys.executable).with_name("skyproto"))


def skyproto(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SKYPROTO, *args], capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, **(env or {})), stdin=subprocess.DEVNULL)


@pytest_twisted.ensureDeferred
async def test_skymapper_serves_registrations_that_skyproto_names_lists(daemons):
    mapper = daemons("skymapper", "--listen", "tcp:0:interface=127.0.0.1", name="mapper")
    port = int((await wait_for_line(mapper, r"skymapper listening on tcp:127\.0\.0\.1:(\d+)"))
               .group(1))
    client = MapperClient(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", port), timeout=10)
    registration = await client.register("alpha", 7001)
    assert registration.creation >= 4
    try:
        found = await client.port_please("alpha")
        assert found is not None and found.port == 7001

        listed = skyproto("names", "--mapper", f"tcp:127.0.0.1:{port}")
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.splitlines() == [
            f"epmd: up and running on port {port} with data:",
            "name alpha at port 7001",
        ]
        epmd = shutil.which("epmd")
        if epmd is not None:  # the genuine epmd client reads our mapper too
            real = subprocess.run([epmd, "-port", str(port), "-names"], capture_output=True,
                                  text=True, timeout=30)
            assert "name alpha at port 7001" in real.stdout
    finally:
        await registration.unregister()


def test_second_mapper_on_a_taken_port_exits_0_like_epmd(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_twistd("skymapper", "--listen", f"tcp:{port}:interface=127.0.0.1",
                            cwd=tmp_path)
    assert result.returncode == 0
    assert "there is already a mapper running" in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--bogus"], {}, "option --bogus not recognized"),
        (["--packet-timeout", "0"], {}, "0 is not a positive integer"),
        (["--packet-timeout", "0.5"], {}, "invalid literal"),
        ([], {"ERL_EPMD_PORT": "http"}, "ERL_EPMD_PORT must be a port number"),
        (["--listen", "nope:1"], {}, "bad listen endpoint"),
    ],
)
def test_skymapper_mistakes_are_one_line(tmp_path, monkeypatch, args, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = run_twistd("skymapper", *args, cwd=tmp_path)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr


def test_skyproto_names_without_a_mapper_is_one_line():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = skyproto("names", env={"ERL_EPMD_PORT": str(port)})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"skyproto: error: cannot list names at tcp:127.0.0.1:{port}: "
        "Connection was refused by other side: 111: Connection refused."
    ]
