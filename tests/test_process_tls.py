"""A whole cluster over TLS: a real master, two nodes and a gate (``twistd``), with
certificates made by ``skyproto.tls``; a node whose certificate comes from another CA is
refused."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from skyproto import tls as certs
from skyproto.auth import load_secret
from skyproto.node.node import Node
from skyproto.transports.tls import set_default_identity

from .processes import daemons, wait_for, wait_for_line

__all__ = ["daemons"]

pytestmark = pytest.mark.process
SKYPROTO = str(Path(sys.executable).with_name("skyproto"))
TIMEOUT = 10
LISTEN = "skytls:0:interface=127.0.0.1"


@pytest.fixture
def pki() -> Iterator[dict[str, Path]]:
    """A cluster CA and identities for master, alpha, beta and this test (the driver); and
    "rogue": it trusts the cluster CA but its own certificate comes from another CA."""
    root = Path(tempfile.mkdtemp(prefix="skypki"))
    try:
        ca = certs.create_ca()
        certs.save_ca(root / "cluster", ca)
        made = {"root": root / "cluster"}
        for name in ("master", "alpha", "beta", "driver"):
            node = certs.create_certificate(ca, name)
            made[name] = certs.save_identity(root / "cluster" / name, ca, node).directory
        other = certs.create_ca("another cluster's CA")
        made["rogue"] = certs.save_identity(
            root / "rogue", ca, certs.create_certificate(other, "rogue")).directory
        yield made
    finally:
        set_default_identity(None)
        shutil.rmtree(root, ignore_errors=True)


async def status(master_at: str, identity: Path, secret: Path,
                 timeout: float = 5) -> tuple[int, str, str]:
    """``skyproto status --json`` over skytls: with ``identity``, run without blocking the
    reactor (the test's own node keeps its heartbeats): (exit status, stdout, stderr)."""
    ran = getProcessOutputAndValue(
        SKYPROTO, ["status", "--master", f"{master_at}:dir={identity}", "--secret-file",
                   str(secret), "--json", "--timeout", str(timeout)], env=dict(os.environ))
    out, err, code = await ran.addTimeout(30, reactor)
    return code, out.decode(), err.decode()


async def table(master_at: str, identity: Path, secret: Path) -> Any:
    code, out, err = await status(master_at, identity, secret)
    assert code == 0, err
    return json.loads(out)


class LineClient(LineReceiver):
    """Sends lines, queues the lines that come back; ``lost`` fires with the reason."""

    delimiter = b"\n"

    def __init__(self) -> None:
        self.lines: DeferredQueue[str] = DeferredQueue()
        self.lost: Deferred[None] = Deferred()

    def lineReceived(self, line: bytes) -> None:
        self.lines.put(line.decode())

    def ask(self, line: str) -> Deferred[str]:
        self.sendLine(line.encode())
        reply: Deferred[str] = self.lines.get()
        return reply.addTimeout(TIMEOUT, reactor)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(None)


class Knocker(Protocol):
    """Connects, says something, and keeps why the connection ended."""

    def __init__(self) -> None:
        self.received = b""
        self.reason: Failure | None = None
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"let me in\n")

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.reason = reason
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_a_tls_cluster_calls_serves_its_gate_and_refuses_another_ca(daemons, pki):
    secret = daemons.secret
    master = daemons("skymaster", "--listen", LISTEN, "--tls-dir", str(pki["master"]),
                     "--secret-file", str(secret), name="master")
    master_port = int((await wait_for_line(
        master, r"skymaster listening on skytls:127\.0\.0\.1:(\d+)")).group(1))
    master_at = f"skytls:127.0.0.1:{master_port}"

    def node(harbor: str, name: str, *args: str):
        return daemons("skynode", "--harbor", harbor, "--name", name, "--listen", LISTEN,
                       "--tls-dir", str(pki[name]), "--master", master_at,
                       "--secret-file", str(secret), *args, name=name)

    beta_files = pki["beta"]
    alpha = node("1", "alpha", "--service", "simpledb", "--service", "echo")
    beta = node("2", "beta", "--service", "relay",
                "--gate", f"ssl:0:interface=127.0.0.1:privateKey={beta_files / 'node.key'}:"
                          f"certKey={beta_files / 'node.crt'}")
    # Each listener logs, and advertises, the scheme it really listens with.
    alpha_at = (await wait_for_line(alpha, r"listening on (skytls:127\.0\.0\.1:\d+)")).group(1)
    gate_port = int((await wait_for_line(
        beta, r"gate for SIMPLEDB listening on ssl:127\.0\.0\.1:(\d+)")).group(1))
    await wait_for_line(master, r"harbor 1 joined: alpha@\S+ at skytls:127\.0\.0\.1:\d+")
    await wait_for_line(master, r"harbor 2 joined: beta@\S+ at skytls:127\.0\.0\.1:\d+")
    # The harbor link between them: dialed at the advertised skytls: address, each node
    # presenting its own certificate (from --tls-dir).
    await wait_for_line(beta, r"harbor 1 link up")
    await wait_for_line(alpha, r"harbor 2 link up")

    # A call between the nodes: this test joins as harbor 9 over TLS (its own identity)
    # and asks beta's RELAY to call alpha's ECHO over their link.
    set_default_identity(pki["driver"])
    driver = Node(9, reactor, load_secret(str(secret)), default_timeout=TIMEOUT)
    try:
        port: Any = await driver.listen(LISTEN)
        driver.join_master(master_at, "driver@test", f"skytls:127.0.0.1:{port.getHost().port}")
        await wait_for(lambda: driver.master is not None and
                       sorted(driver.master.harbors) == [1, 2, 9] and
                       "SIMPLEDB" in driver.master.names, "the driver's table and SIMPLEDB")
        reply = await driver.call(0x02000002, [":01000003", "beta calls alpha over TLS"])
        assert reply == "beta calls alpha over TLS"

        # The gate: a TLS client that trusts the cluster CA (the cluster directory is a
        # trustRoots= directory: ca.pem is its only .pem file) talks to SIMPLEDB on alpha
        # through beta.
        client = LineClient()
        endpoint = clientFromString(
            reactor, f"tls:127.0.0.1:{gate_port}:trustRoots={pki['root']}")
        await connectProtocol(endpoint, client).addTimeout(TIMEOUT, reactor)
        assert await client.ask("SET greeting hello over tls") == "OK"
        assert await client.ask("GET greeting") == "VALUE hello over tls"
        assert client.transport is not None
        client.transport.loseConnection()
        await client.lost.addTimeout(TIMEOUT, reactor)

        # A node whose certificate another CA signed: the master and alpha refuse it, even
        # though it trusts the cluster CA and knows the cluster secret.
        rogue = daemons("skynode", "--harbor", "3", "--name", "rogue", "--listen", LISTEN,
                        "--tls-dir", str(pki["rogue"]), "--master", master_at,
                        "--peer", f"1={alpha_at}", "--secret-file", str(secret), name="rogue")
        await wait_for_line(rogue, rf"TLS with 127\.0\.0\.1:{master_port} failed: .*unknown ca")
        await wait_for_line(rogue, r"harbor 1 at skytls:127\.0\.0\.1:\d+ is unreachable: "
                                   r".*unknown ca")
        await wait_for_line(master, r"TLS with 127\.0\.0\.1:\d+ failed: certificate verify "
                                    r"failed")
        await wait_for_line(alpha, r"TLS with 127\.0\.0\.1:\d+ failed: certificate verify "
                                   r"failed")
        assert not rogue.search(r"joined the master|link up")
        harbors = (await table(master_at, pki["master"], secret))["harbors"]
        assert sorted(h["id"] for h in harbors) == [1, 2, 9]
        assert all(h["endpoint"].startswith("skytls:127.0.0.1:") for h in harbors)
        code, out, err = await status(master_at, pki["rogue"], secret, timeout=2)
        assert (code, out) == (1, "")
        assert err.count("\n") == 1, err
        assert err.startswith("skyproto: error: cannot read the status")

        # Nor does a client without any certificate get in.
        knocker = Knocker()
        endpoint = clientFromString(
            reactor, f"tls:127.0.0.1:{master_port}:trustRoots={pki['root']}")
        await connectProtocol(endpoint, knocker).addTimeout(TIMEOUT, reactor)
        await knocker.lost.addTimeout(TIMEOUT, reactor)
        assert knocker.received == b""
        assert knocker.reason is not None
        assert re.search(r"certificate required|handshake failure",
                         knocker.reason.getErrorMessage())
        assert "Traceback" not in master.output() + alpha.output() + beta.output()
    finally:
        await driver.stop().addTimeout(TIMEOUT, reactor)


@pytest_twisted.ensureDeferred
async def test_a_master_on_twisteds_own_ssl_endpoint_serves_status_and_closes(daemons, pki):
    """Twisted's TLS does not begin its shutdown while a streaming producer is registered;
    skyproto's connections unregister theirs before closing, so ``skyproto status`` over a
    plain ``ssl:``/``tls:`` pair prints its table and exits (it used to hang)."""
    files = pki["master"]
    master = daemons("skymaster", "--listen",
                     f"ssl:0:interface=127.0.0.1:privateKey={files / 'node.key'}:"
                     f"certKey={files / 'node.crt'}",
                     "--secret-file", str(daemons.secret), name="master")
    port = int((await wait_for_line(
        master, r"skymaster listening on ssl:127\.0\.0\.1:(\d+)")).group(1))
    ran = getProcessOutputAndValue(
        SKYPROTO, ["status", "--master", f"tls:127.0.0.1:{port}:trustRoots={pki['root']}",
                   "--secret-file", str(daemons.secret), "--json", "--timeout", "5"],
        env=dict(os.environ))
    out, err, code = await ran.addTimeout(20, reactor)
    assert code == 0, err.decode()
    assert json.loads(out)["harbors"] == []
