"""``--http`` on real daemons: /metrics parses with prometheus_client's parser and its
counters move under load through a gate; /health turns 503 once the master is gone."""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.threads import deferToThread

from .processes import daemons, run_twistd, wait_for_line

__all__ = ["daemons", "http_get", "poll"]

T = TypeVar("T")

pytestmark = pytest.mark.process

HTTP = r"on (http://127\.0\.0\.1:\d+/) \(tcp:127\.0\.0\.1:\d+\)"
TIMEOUT = 10


async def http_get(url: str, **headers: str) -> tuple[int, dict[str, str], str]:
    """GET with treq on a pool that keeps no connection open afterwards; the whole
    exchange (treq's own timeout covers only the headers) within TIMEOUT seconds."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    exchange = Deferred.fromCoroutine(_get(url, headers))
    return await exchange.addTimeout(TIMEOUT, reactor)


async def _get(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], str]:
    import treq
    from twisted.internet import reactor
    from twisted.web.client import HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=False)
    sending: Any = headers or None
    response = await treq.get(url, headers=sending, pool=pool, timeout=TIMEOUT)
    body = await treq.text_content(response, encoding="utf-8")
    sent = {name.decode().lower(): values[0].decode()
            for name, values in response.headers.getAllRawHeaders()}
    await pool.closeCachedConnections()
    return response.code, sent, body


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by (name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


def talk(port: int, lines: list[str]) -> list[str]:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall("".join(f"{line}\n" for line in lines).encode())
        reader = sock.makefile("rb")
        return [reader.readline().decode().rstrip("\n") for _ in lines]


@pytest_twisted.ensureDeferred
async def test_metrics_move_under_load_and_health_follows_the_master(daemons: Any) -> None:
    secret = ["--secret-file", str(daemons.secret)]
    master = daemons("skymaster", "--listen", "tcp:0:interface=127.0.0.1", "--http", "0",
                     *secret, name="master")
    master_at = (await wait_for_line(master, r"listening on (tcp:\S+)")).group(1)
    master_http = (await wait_for_line(master, rf"cluster page, /metrics and /health {HTTP}")
                   ).group(1)
    daemons("skynode", "--harbor", "1", "--name", "db", "--master", master_at,
            "--service", "simpledb", *secret, name="db")
    gate = daemons("skynode", "--harbor", "2", "--name", "front", "--master", master_at,
                   "--gate", "tcp:0:interface=127.0.0.1", "--http", "tcp:0", *secret,
                   name="front")
    gate_port = int((await wait_for_line(gate, r"gate for SIMPLEDB listening on "
                                               r"tcp:127\.0\.0\.1:(\d+)")).group(1))
    node_http = (await wait_for_line(gate, rf"/metrics and /health {HTTP}")).group(1)
    # SIMPLEDB is granted once the master's start-up grace (2 s) is over
    code, headers, text = await poll(
        lambda: http_get(node_http + "metrics"),
        lambda reply: metric(reply[2], "skyproto_cluster_names") == 1, "SIMPLEDB's name")
    assert code == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    assert metric(text, "skyproto_node_master_connected") == 1
    (info,) = [labels for name, labels in samples(text) if name == "skyproto_node_info"]
    assert dict(info)["harbor"] == "2" and dict(info)["node"].startswith("front@")
    assert metric(text, "process_resident_memory_bytes") > 0
    before = samples(text)

    requests = [f"SET k{n} v{n}" for n in range(50)] + [f"GET k{n}" for n in range(50)]
    replies = await deferToThread(talk, gate_port, [*requests, "FROB"])
    assert replies[:50] == ["OK"] * 50 and replies[-1] == "ERROR unknown command FROB"

    _, _, text = await http_get(node_http + "metrics")
    after = samples(text)
    ok = ("skyproto_calls_total", (("outcome", "ok"),))
    assert after[ok] - before.get(ok, 0) == 100
    assert after[("skyproto_calls_total", (("outcome", "remote_error"),))] == 1
    assert metric(text, "skyproto_gate_requests_total", outcome="answered") == 100
    assert metric(text, "skyproto_gate_requests_total", outcome="failed") == 1
    assert metric(text, "skyproto_gate_connections_total", outcome="accepted") == 1
    assert metric(text, "skyproto_call_duration_seconds_count") >= 101
    assert metric(text, "skyproto_harbor_link_state", harbor="1", state="up") == 1
    assert 0 <= metric(text, "skyproto_harbor_link_silence_seconds", harbor="1") < 3

    code, _, text = await http_get(master_http + "metrics")
    assert code == 200
    assert metric(text, "skyproto_master_nodes") == 2
    assert metric(text, "skyproto_master_names") == 1
    code, headers, body = await http_get(master_http + "status.json")
    assert code == 200 and headers["content-type"] == "application/json"
    assert [h["name"].split("@")[0] for h in json.loads(body)["harbors"]] == ["db", "front"]

    code, _, body = await http_get(node_http + "health")
    assert (code, body) == (200, "ok\n")
    master.kill()
    code, _, body = await poll(lambda: http_get(node_http + "health"),
                               lambda reply: reply[0] != 200, "the node's /health to fail")
    assert code == 503
    assert body.startswith(f"no master at {master_at} for "), body
    assert "longer than 5 s" in body


async def poll(get: Callable[[], Awaitable[T]], done: Callable[[T], bool], what: str,
               timeout: float = 15.0) -> T:
    """Ask ``get()`` every 0.1 s until ``done`` holds for its answer, up to ``timeout`` s."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    deadline = reactor.seconds() + timeout
    while True:
        answer = await get()
        if done(answer):
            return answer
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}: {answer}")
        await deferLater(reactor, 0.1)


@pytest_twisted.ensureDeferred
async def test_the_mapper_serves_its_metrics(daemons: Any) -> None:
    mapper = daemons("skymapper", "--listen",
                     f"tcp:{daemons.mapper_port}:interface=127.0.0.1", "--http", "tcp:0",
                     name="mapper")
    url = (await wait_for_line(mapper, rf"/metrics and /health {HTTP}")).group(1)
    daemons("skynode", "--harbor", "1", "--name", "alpha", "--secret-file",
            str(daemons.secret), name="alpha")
    _, _, text = await poll(lambda: http_get(url + "metrics"),
                            lambda r: metric(r[2], "skyproto_mapper_registered_names") == 1,
                            "the node to register with the mapper")
    assert metric(text, "skyproto_mapper_registrations_total") == 1
    code, _, body = await http_get(url + "health")
    assert (code, body) == (200, "ok\n")


@pytest_twisted.ensureDeferred
async def test_a_standalone_node_serves_the_cluster_page(daemons: Any) -> None:
    node = daemons("skynode", "--standalone", "--master-listen", "tcp:0:interface=127.0.0.1",
                   "--gate", "tcp:0:interface=127.0.0.1", "--http", "0",
                   "--secret-file", str(daemons.secret), name="standalone")
    url = (await wait_for_line(node, rf"cluster page, /metrics and /health {HTTP}")).group(1)
    _, _, body = await poll(lambda: http_get(url + "status.json"),
                            lambda reply: bool(json.loads(reply[2])["names"]),
                            "SIMPLEDB in the standalone master's table")
    assert [h["id"] for h in json.loads(body)["harbors"]] == [1]
    code, _, page = await http_get(url)
    assert code == 200 and "standalone@" in page and "SIMPLEDB" in page
    _, _, text = await http_get(url + "metrics")
    assert metric(text, "skyproto_master_nodes") == 1
    assert metric(text, "skyproto_node_master_connected") == 1


@pytest.mark.parametrize(("args", "error"), [
    (["--http", ""], "--http needs an endpoint"),
    (["--log-format", "xml"], "--log-format must be one of text, json, not 'xml'"),
    (["--http", "nonsense:1"], "bad listen endpoint 'nonsense:1'"),
])
def test_mistakes_in_the_new_options_are_one_line(tmp_path: Any, args: list[str],
                                                  error: str) -> None:
    done = run_twistd("skymaster", "--listen", "tcp:0:interface=127.0.0.1", *args,
                      cwd=tmp_path)
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and error in lines[0], done.stderr
