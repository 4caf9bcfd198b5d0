"""Real ``twistd skymaster --store etcd:...`` processes on a real three-member etcd cluster:
two masters, one table; ten claimants of one name through both, one winner; the etcd
leader killed with -9; etcd gone altogether. Skips without ``etcd`` on PATH.

The nodes are skynode processes and, to watch and to claim, nodes in this process.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredList

from skyproto.auth import load_secret
from skyproto.errors import NameConflict
from skyproto.node.node import Node
from skyproto.services import Echo

from .etcd import ETCD, NO_ETCD, EtcdCluster
from .processes import Daemon, daemons, wait_for, wait_for_line

__all__ = ["daemons"]

pytestmark = [pytest.mark.process, pytest.mark.skipif(ETCD is None, reason=NO_ETCD)]
TIMEOUT = 10


async def start_masters(daemons: Any, urls: list[str], count: int = 2) -> list[str]:
    """``count`` skymasters sharing a prefix of this test's own; their endpoints."""
    prefix = f"/proc-{uuid.uuid4().hex[:8]}/"
    masters: list[Daemon] = [
        daemons("skymaster", "--listen", "tcp:0:interface=127.0.0.1",
                "--secret-file", str(daemons.secret), "--store", "etcd:" + ",".join(urls),
                "--store-prefix", prefix, name=f"master{i}")
        for i in range(count)]
    endpoints = []
    for master in masters:
        port = (await wait_for_line(master, r"skymaster listening on tcp:127\.0\.0\.1:(\d+)"))
        await wait_for_line(master, r"the registry loaded")
        endpoints.append(f"tcp:127.0.0.1:{port.group(1)}")
    daemons.masters = masters
    return endpoints


class Drivers:
    """Nodes in this process, each joined to one of the masters."""

    def __init__(self, secret: Any) -> None:
        self.secret = load_secret(secret)
        self.nodes: list[Node] = []

    def node(self, harbor: int, master: str, name: str | None = None) -> Node:
        node = Node(harbor, reactor, self.secret, default_timeout=TIMEOUT)
        node.listen("tcp:0:interface=127.0.0.1")
        node.join_master(master, name or f"driver{harbor}@test", request_timeout=TIMEOUT)
        self.nodes.append(node)
        return node

    async def stop(self) -> None:
        for node in self.nodes:
            await node.stop()


def table(node: Node) -> tuple[list[int], dict[str, int]]:
    assert node.master is not None
    return sorted(node.master.harbors), dict(node.master.names)


@pytest_twisted.ensureDeferred
async def test_two_masters_one_table_names_across_and_one_winner_of_ten(daemons, etcd_cluster):
    at = await start_masters(daemons, etcd_cluster.urls)

    def skynode(harbor: str, name: str, master: str, service: str) -> Daemon:
        daemon: Daemon = daemons("skynode", "--harbor", harbor, "--name", name, "--master",
                                 master, "--secret-file", str(daemons.secret), "--service",
                                 service, name=name)
        return daemon

    alpha = skynode("1", "alpha", at[0], "echo")
    beta = skynode("auto", "beta", at[1], "relay")
    drivers = Drivers(daemons.secret)
    try:
        left, right = drivers.node(9, at[0]), drivers.node(10, at[1])
        await wait_for_line(alpha, r"joined the master .* as harbor 1\b")
        await wait_for_line(beta, r"joined the master .* as harbor 255\b")
        want = ([1, 9, 10, 255], {"ECHO": 0x01000002, "RELAY": 0xFF000002})
        await wait_for(lambda: table(left) == want == table(right), "one table on both sides")

        # through the right master to a node of the left one, and back through a relay
        assert await right.call("ECHO", "hello") == "hello"
        assert await left.call("RELAY", ["ECHO", "relayed"]) == "relayed"

        # a name registered through one master is seen by the nodes of the other
        seen = []
        for i in range(5):
            handle = left.spawn(Echo(), f".mine{i}")
            await left.register_name(f"LEFT{i}", handle)
            started = time.monotonic()
            await wait_for(lambda i=i: f"LEFT{i}" in table(right)[1], f"LEFT{i} on the right")
            seen.append(time.monotonic() - started)
        print(f"a name registered through one master reached a node of the other within "
              f"{max(seen) * 1000:.0f} ms (worst of {len(seen)})")

        # ten claimants of one name, through both masters at once: exactly one wins
        claimants = [drivers.node(h, at[h % 2]) for h in range(20, 30)]
        await wait_for(lambda: all(len(table(n)[0]) == 14 for n in claimants), "all joined")
        handles = [n.spawn(Echo(), ".claim") for n in claimants]
        outcomes = await DeferredList(
            [n.register_name("ONE", h) for n, h in zip(claimants, handles, strict=True)],
            consumeErrors=True).addTimeout(2 * TIMEOUT, reactor)
        won = [n for n, (ok, _) in zip(claimants, outcomes, strict=True) if ok]
        assert len(won) == 1, outcomes
        assert all(f.check(NameConflict) and "already taken" in f.getErrorMessage()
                   for ok, f in outcomes if not ok)
        owner = won[0].names["ONE"]
        await wait_for(lambda: all(table(n)[1].get("ONE") == owner
                                   for n in [*claimants, left, right]), "one owner everywhere")
    finally:
        await drivers.stop()


@pytest_twisted.ensureDeferred
async def test_etcd_leader_killed_then_etcd_gone(daemons, fresh_etcd: EtcdCluster):
    at = await start_masters(daemons, fresh_etcd.urls)
    drivers = Drivers(daemons.secret)
    try:
        left, right = drivers.node(1, at[0]), drivers.node(2, at[1])
        await wait_for(lambda: table(left)[0] == [1, 2] == table(right)[0], "both joined")
        await wait_for(lambda: left.master and right.master and
                       left.master.connected and right.master.connected, "connected")

        # kill -9 the leader; both sides register at once, and the same name too
        leader = fresh_etcd.leader()
        killed = time.monotonic()
        leader.kill()
        contested = DeferredList([
            left.register_name("BOTH", left.spawn(Echo(), ".l")),
            right.register_name("BOTH", right.spawn(Echo(), ".r"))], consumeErrors=True)
        await left.register_name("AFTER", left.spawn(Echo(), ".a"))
        gap = time.monotonic() - killed
        await right.register_name("AFTER2", right.spawn(Echo(), ".a2"))
        print(f"registrations resumed {gap:.2f} s after the etcd leader was killed")
        outcomes = await contested.addTimeout(2 * TIMEOUT, reactor)
        assert sum(ok for ok, _ in outcomes) == 1, outcomes  # never held twice
        await wait_for(lambda: table(left) == table(right) and
                       {"AFTER", "AFTER2", "BOTH"} <= set(table(left)[1]), "one table again")

        # etcd gone altogether: a registration is refused, plainly; a newcomer stays out
        for member in fresh_etcd.members:
            member.kill()
        started = time.monotonic()
        try:
            await left.register_name("LATE", left.spawn(Echo(), ".late"))
        except NameConflict as e:
            refused = str(e)
        else:
            raise AssertionError("a master cut off from etcd granted a name")
        print(f"cut off from etcd: refused after {time.monotonic() - started:.2f} s: {refused}")
        assert refused.startswith("the registry is unavailable: cannot reach etcd: no etcd "
                                  "member answered")
        assert "LATE" not in table(right)[1]
        newcomer = drivers.node(3, at[1], name="newcomer@test")
        master = daemons.masters[1]
        await wait_for_line(master, r"cannot admit harbor 3 \(newcomer@test\): cannot reach "
                                    r"etcd", timeout=15)
        assert newcomer.master is not None and not newcomer.master.connected
    finally:
        await drivers.stop()
