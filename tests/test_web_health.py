"""/health: 200 ok while serving, 503 and the reason when not (on a simulated clock)."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from skyproto.node.node import Node
from skyproto.testing import InMemoryCluster
from skyproto.web.health import HealthResource, NodeHealth, Running
from skyproto.web.site import master_web, node_web


def get(web: Any, path: str) -> tuple[int, str]:
    """Status and body of GET ``path`` on a daemon's site (rendered in this thread)."""
    request = DummyRequest([part.encode() for part in path.lstrip("/").split("/")])
    resource = web.site.getResourceFor(request)
    body = resource.render(request)
    assert isinstance(body, bytes)
    return request.responseCode or 200, body.decode()


def test_running_is_healthy_between_start_and_stop() -> None:
    health = Running("master")
    resource = HealthResource(health)
    request: Any = DummyRequest([b""])
    assert resource.render(request) == b"the master is starting\n"
    assert request.responseCode == 503
    health.start()
    request = DummyRequest([b""])
    assert resource.render(request) == b"ok\n"
    assert request.responseCode in (None, 200)
    assert request.responseHeaders.getRawHeaders(b"content-type") == [
        b"text/plain; charset=utf-8"]
    health.stop()
    assert health.check() == "the master is stopping"


def test_a_node_without_a_master_is_healthy_while_it_runs() -> None:
    clock = Clock()
    node = Node(1, clock, b"a secret of at least sixteen bytes")
    web = node_web(node, clock, process=False)
    assert get(web, "/health") == (503, "the node is starting\n")
    service = web.service()
    service.startService()
    assert get(web, "/health") == (200, "ok\n")
    node.stop()
    assert get(web, "/health") == (503, "the node is stopping\n")
    service.stopService()
    assert not clock.getDelayedCalls()  # the sampler stopped with the service


def test_a_node_is_unhealthy_once_its_master_is_gone_longer_than_the_grace() -> None:
    cluster = InMemoryCluster()
    node = cluster.add_node(1)
    web = node_web(node, cluster.clock, process=False)
    web.service().startService()
    assert get(web, "/health") == (200, "ok\n")
    cluster.kill_master()
    cluster.settle(4.5)  # the master client's request timeout is 5 s
    assert get(web, "/health") == (200, "ok\n")
    cluster.settle(1)
    status, body = get(web, "/health")
    assert status == 503
    assert body.startswith("no master at loopback:master for 5.")
    assert "longer than 5 s" in body
    cluster.start_master()
    cluster.run_until(lambda: node.master is not None and node.master.connected,
                      "the node to re-join")
    assert get(web, "/health") == (200, "ok\n")


def test_the_grace_can_be_shorter() -> None:
    cluster = InMemoryCluster()
    node = cluster.add_node(1)
    health = NodeHealth(node, cluster.clock, grace=1)
    health.start()
    cluster.kill_master()
    cluster.settle(1.5)
    reason = health.check()
    assert reason is not None and "longer than 1 s" in reason
    health.stop()


def test_a_node_the_master_refused_is_unhealthy_at_once() -> None:
    cluster = InMemoryCluster()
    cluster.add_node(1)
    intruder = Node(1, cluster.clock, cluster.secret)  # harbor 1 is taken
    intruder.listen("loopback:intruder")
    refusals: list[str] = []
    intruder.join_master("loopback:master", "intruder@testing", "loopback:intruder",
                         on_refused=refusals.append)
    health = NodeHealth(intruder, cluster.clock)
    health.start()
    cluster.run_until(lambda: refusals, "the refusal")
    reason = health.check()
    assert reason is not None
    assert reason.startswith("the master at loopback:master refused this node: harbor 1 ")
    health.stop()
    intruder.stop()


def test_a_master_is_healthy_while_it_serves() -> None:
    cluster = InMemoryCluster()
    assert cluster.master is not None
    web = master_web(cluster.master, process=False)
    service = web.service()
    service.startService()
    assert get(web, "/health") == (200, "ok\n")
    service.stopService()
    assert get(web, "/health") == (503, "the master is stopping\n")
