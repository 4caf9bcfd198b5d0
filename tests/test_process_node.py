"""Two real ``twistd skynode`` processes calling each other, over tcp: and unix:."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import reactor

from skyproto.auth import load_secret
from skyproto.errors import RemoteError
from skyproto.node.node import Node

from .processes import daemons, run_twistd, wait_for, wait_for_line

__all__ = ["daemons"]

pytestmark = pytest.mark.process

LISTENING = r"listening on (\S+)"
TIMEOUT = 10


def listen_endpoint(kind: str, workdir, harbor: int) -> str:
    if kind == "tcp":
        return "tcp:0:interface=127.0.0.1"
    return f"unix:{workdir}/h{harbor}.sock:mode=600"


@pytest.mark.parametrize("kind", ["tcp", "unix"])
@pytest_twisted.ensureDeferred
async def test_two_nodes_call_each_other_and_fail_fast_when_one_dies(daemons, kind):
    workdir, secret_file = daemons.workdir, str(daemons.secret)
    common = ["--secret-file", secret_file, "--service", "echo", "--service", "relay"]
    alpha = daemons("skynode", "--harbor", "1", "--name", "alpha",
                    "--listen", listen_endpoint(kind, workdir, 1), *common, name="alpha")
    alpha_at = (await wait_for_line(alpha, LISTENING)).group(1)
    beta = daemons("skynode", "--harbor", "2", "--name", "beta",
                   "--listen", listen_endpoint(kind, workdir, 2), "--peer", f"1={alpha_at}",
                   *common, name="beta")
    beta_at = (await wait_for_line(beta, LISTENING)).group(1)
    await wait_for_line(beta, r"harbor 1 link up")
    assert alpha_at.startswith(f"{kind}:")

    # This test process is harbor 3 of the same cluster, to drive the two daemons.
    driver = Node(3, reactor, load_secret(secret_file), default_timeout=TIMEOUT)
    try:
        driver.add_peer(1, alpha_at)
        driver.add_peer(2, beta_at)
        await wait_for(lambda: driver.router.state(1) == driver.router.state(2) == "up",
                       "the driver's links")
        # relay on alpha (:01000003) calls echo on beta (:02000002), and back again
        reply = await driver.call(0x01000003, [":02000002", "alpha calls beta"])
        assert reply == "alpha calls beta"
        reply = await driver.call(0x02000003, [":01000002", "beta calls alpha"])
        assert reply == "beta calls alpha"

        beta.kill()  # SIGKILL: alpha's link drops, so alpha's call to beta fails at once
        await wait_for(lambda: driver.router.state(2) != "up", "harbor 2 down at the driver")
        call = driver.call(0x01000003, [":02000002", "anyone there?"])
        call.addTimeout(TIMEOUT, reactor)
        with pytest.raises(RemoteError) as info:
            await call
        assert info.value.remote_type == "HarborDown"
    finally:
        await driver.stop()


@pytest_twisted.ensureDeferred
async def test_unreachable_peer_is_one_clear_line_and_the_node_keeps_running(daemons):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    node = daemons("skynode", "--harbor", "1", "--secret-file", str(daemons.secret),
                   "--peer", f"2=tcp:127.0.0.1:{port}", name="lonely")
    line = await wait_for_line(node, r".*harbor 2 at tcp:127\.0\.0\.1:\d+ is unreachable.*")
    assert "retrying in" in line.group(0)
    await wait_for(lambda: len(node.search_all(r"is unreachable")) >= 2, "a second retry")
    assert node.process.poll() is None
    assert "Traceback" not in node.output()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--harbor", "0"], "--harbor must be 'auto' or an integer from 1 to 255, not '0'"),
        (["--harbor", "x1"], "--harbor must be 'auto' or an integer from 1 to 255"),
        ([], "--harbor is required"),
        (["--harbor", "1", "--bogus"], "option --bogus not recognized"),
        (["--harbor", "1", "--peer", "2"], "--peer takes HARBOR=ENDPOINT"),
        (["--harbor", "1", "--peer", "1=tcp:127.0.0.1:1"], "that is this node's own harbor"),
        (["--harbor", "1", "--service", "nope"], "unknown service 'nope'"),
        (["--harbor", "1", "--service", "no.such.module:X"], "cannot import service"),
        (["--harbor", "1", "--listen", "bogus:1"], "bad listen endpoint"),
        (["--harbor", "1", "--timeout", "-1"], "-1 is not a positive number"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_1(tmp_path, args, message):
    secret = tmp_path / "cookie"
    result = run_twistd("skynode", "--secret-file", str(secret), *args, cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("skynode: error: ")
    assert message in lines[0]
    assert "Traceback" not in result.stdout + result.stderr


def test_secret_readable_by_others_is_refused(tmp_path):
    secret = tmp_path / "cookie"
    secret.write_text("shared-secret\n")
    secret.chmod(0o644)
    result = run_twistd("skynode", "--harbor", "1", "--secret-file", str(secret), cwd=tmp_path)
    assert result.returncode == 1
    assert "chmod 600" in result.stderr
    assert "shared-secret" not in result.stdout + result.stderr


def test_port_in_use_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_twistd("skynode", "--harbor", "1", "--secret-file", str(tmp_path / "c"),
                            "--listen", f"tcp:{port}:interface=127.0.0.1", cwd=tmp_path)
    assert result.returncode == 1
    assert "cannot listen on" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_advertised_ipv6_addresses_are_client_endpoints():
    from twisted.internet.address import IPv6Address
    from twisted.internet.endpoints import clientFromString
    from twisted.internet.task import Clock

    from skyproto.tap import describe_address

    class Port:
        def getHost(self):
            return IPv6Address("TCP", "::1", 7001)

    text = describe_address(Port())
    endpoint = clientFromString(Clock(), text)
    assert (endpoint._host, endpoint._port) == ("::1", 7001)
