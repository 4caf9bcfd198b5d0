"""The node side of the port mapper: HostMapper (register, host, take over) and NodeResolver.

Most tests run several agents on one ``Clock`` over the ``loopback:`` transport, so every
race and every timer is deterministic. Two more run on the real reactor: agents on
127.0.0.1 (the first hosts, the second registers, the host stops and the other takes over),
and an agent with a genuine ``epmd`` (skipped when epmd is not installed).
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, clientFromString
from twisted.internet.error import DNSLookupError
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent
from twisted.python.failure import Failure

from skyproto.endpoints import (
    client_endpoint_for,
    harbor_tcp_port,
    is_node_name,
    parse_endpoint_description,
    tcp_endpoint,
)
from skyproto.errors import ConfigurationError
from skyproto.mapper.client import MapperClient, RegistrationRefusedError
from skyproto.mapper.extra import MapperExtra, decode_extra, encode_extra
from skyproto.node.host_mapper import HostMapper
from skyproto.node.resolver import NodeLocation, NodeNotFound, NodeResolver
from skyproto.transports.loopback import network_for
from skyproto.wire.codec import encode_cbor

from .erlang import Processes, epmd_executable, free_port, node_env

MAPPER = "loopback:mapper"
EPMD = epmd_executable()
_T = TypeVar("_T")


# --------------------------------------------------------------------------- helpers


def drain(clock: Clock) -> None:
    """Run every call that is due now, including the ones those calls schedule for now."""
    for _ in range(10_000):
        if not any(call.getTime() <= clock.seconds() for call in clock.getDelayedCalls()):
            return
        clock.advance(0)
    raise AssertionError("zero-delay calls keep coming")


def until(clock: Clock, predicate: Callable[[], bool], limit: float = 30.0,
          step: float = 0.01) -> float:
    """Advance Clock time in small steps until ``predicate()``; return the time it took."""
    start = clock.seconds()
    drain(clock)
    while not predicate():
        assert clock.seconds() - start <= limit, "condition not met in Clock time"
        clock.advance(step)
        drain(clock)
    return clock.seconds() - start


def settle(clock: Clock, d: Deferred[_T], limit: float = 30.0) -> _T:
    """Advance the clock until ``d`` fires; return its result or raise its failure."""
    box: list[Any] = []
    d.addBoth(box.append)
    until(clock, lambda: bool(box), limit)
    result = box[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result  # type: ignore[no-any-return]


class Host:
    """Agents for one simulated host: one Clock, one loopback network, one mapper name."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.network = network_for(self.clock)
        self.agents: list[HostMapper] = []

    def agent(self, name: str, harbor: int, endpoint: str | None = None,
              **options: Any) -> HostMapper:
        options.setdefault("rng", random.Random(harbor))
        agent = HostMapper(
            self.clock, MAPPER, MAPPER, 4369, name,
            endpoint if endpoint is not None else f"tcp:127.0.0.1:{7000 + harbor}",
            harbor, **options,
        )
        self.agents.append(agent)
        return agent

    def start(self, agent: HostMapper) -> int:
        return settle(self.clock, agent.start())

    def client(self) -> MapperClient:
        return MapperClient(self.clock, clientFromString(self.clock, MAPPER), timeout=5)

    def names(self) -> dict[str, int]:
        pairs: list[tuple[str, int]] = settle(self.clock, self.client().names())
        return dict(pairs)

    def hosts(self) -> list[HostMapper]:
        return [agent for agent in self.agents if agent.hosting]

    def crash(self, agent: HostMapper) -> None:
        """``agent``'s process dies: its sockets fail at once and none of its code runs again.

        Its mapper stops listening and every connection to it is cut; ``stop()`` in the
        same reactor turn only keeps the dead agent from reacting (its registration and its
        served connections are already cut, so nobody sees a clean unregister).
        """
        assert agent.listening_port is not None
        agent.listening_port.stopListening()
        for connection in self.network.connections_to("mapper"):
            connection.cut("the hosting node crashed")
        agent.stop()

    def stop_all(self) -> None:
        for agent in self.agents:
            settle(self.clock, agent.stop())
        drain(self.clock)


@pytest.fixture
def host() -> Iterator[Host]:
    """A simulated host; at the end every agent is stopped and nothing may be left over."""
    h = Host()
    yield h
    h.stop_all()
    assert not h.network.connections
    assert not h.network.listening("mapper")
    assert not h.clock.getDelayedCalls()


def log_lines(events: list[LogEvent]) -> list[str]:
    return [formatEvent(event) for event in events]


# --------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("beta@hosta", True),
        ("a_1@localhost", True),
        ("node@host.example.com", True),
        ("tcp:127.0.0.1:7001", False),
        ("unix:/run/sky/beta.sock", False),
        ("unix:/run/user@1/x.sock", False),
        ("loopback:beta", False),
        ("beta", False),
        ("beta@", False),
        ("@hosta", False),
        ("a@b@c", False),
        ("be ta@hosta", False),
        ("beta@ho sta", False),
        ("", False),
    ],
)
def test_is_node_name(text: str, expected: bool) -> None:
    assert is_node_name(text) is expected


@pytest.mark.parametrize(
    ("endpoint", "port"),
    [
        ("tcp:7001", 7001),
        ("tcp:7001:interface=127.0.0.1", 7001),
        ("tcp:port=7001:interface=0.0.0.0", 7001),
        ("tcp:127.0.0.1:7001", 7001),
        ("tcp:host=example.com:port=7001:timeout=3", 7001),
        ("tcp:localhost:7001:timeout=3", 7001),
        ("TCP:7001", 7001),
        ("tcp6:7001:interface=\\:\\:1", 7001),
        ("tcp6:\\:\\:1:7001", 7001),
        ("tcp:localhost", None),
        ("tcp:localhost:http", None),
        ("unix:/run/sky/beta.sock", None),
        ("ssl:7001:privateKey=k.pem", None),
        ("loopback:beta", None),
    ],
)
def test_harbor_tcp_port_forms(endpoint: str, port: int | None) -> None:
    assert harbor_tcp_port(endpoint) == port


@pytest.mark.parametrize("endpoint", ["tcp:0", "tcp:0:interface=127.0.0.1", "tcp:h:70000"])
def test_harbor_tcp_port_refuses_unusable_ports(endpoint: str) -> None:
    with pytest.raises(ValueError, match="advertise the port actually listened on"):
        harbor_tcp_port(endpoint)


def test_endpoint_description_parsing_and_client_forms() -> None:
    assert parse_endpoint_description("tcp6:\\:\\:1:4369:timeout=3") == (
        "tcp6", ["::1", "4369"], {"timeout": "3"}
    )
    assert parse_endpoint_description("unix:/a\\:b") == ("unix", ["/a:b"], {})
    assert client_endpoint_for("unix:/run/sky/b.sock:mode=600:lockfile=1") == (
        "unix:/run/sky/b.sock"
    )
    assert client_endpoint_for("unix:path=/run/sky/b.sock:backlog=5") == (
        "unix:path=/run/sky/b.sock"
    )
    assert client_endpoint_for("unix:/a\\:b:timeout=2") == "unix:/a\\:b:timeout=2"
    assert client_endpoint_for("loopback:beta") == "loopback:beta"
    assert tcp_endpoint("10.0.0.7", 7001) == "tcp:10.0.0.7:7001"
    assert tcp_endpoint("::1", 7001) == "tcp6:\\:\\:1:7001"


def test_extra_round_trip_and_size_limit() -> None:
    assert decode_extra(encode_extra(2)) == MapperExtra(2)
    assert decode_extra(encode_extra(255, "unix:/run/sky/b.sock")) == MapperExtra(
        255, "unix:/run/sky/b.sock"
    )
    assert len(encode_extra(1, "unix:/" + "x" * 990)) <= 1020
    with pytest.raises(ValueError, match="at most 1020"):
        encode_extra(1, "unix:/" + "x" * 1020)
    with pytest.raises(ValueError):
        encode_extra(0)
    with pytest.raises(ValueError):
        encode_extra(1, "")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\x00not cbor",
        encode_cbor([1, "unix:/x"]),
        encode_cbor({"endpoint": "unix:/x"}),  # no harbor: not ours
        encode_cbor({"harbor": 0}),
        encode_cbor({"harbor": 256}),
        encode_cbor({"harbor": "1"}),
        encode_cbor({"harbor": True}),
        encode_cbor({"harbor": 1, "endpoint": 7}),
        encode_cbor({"harbor": 1, "endpoint": ""}),
        encode_cbor({"harbor": 1, "endpoint": "unix:/x\x00"}),
        encode_cbor({"harbor": 1}) + b"\x00",  # trailing bytes
        b"\xc1\x1a\x00\x00\x00\x01",  # a tagged value
        b"\x81" * 40 + b"\x00",  # nested too deep
        encode_cbor({"harbor": 1, "endpoint": "unix:/" + "x" * 1100}),
    ],
)
def test_decode_extra_ignores_what_is_not_exactly_ours(data: bytes) -> None:
    assert decode_extra(data) is None


def test_decode_extra_ignores_unknown_keys() -> None:
    assert decode_extra(encode_cbor({"harbor": 3, "later": [1, 2]})) == MapperExtra(3)


# --------------------------------------------------------------------------- registering


def test_first_agent_starts_the_mapper_and_the_second_registers_with_it(
    host: Host, events: list[LogEvent]
) -> None:
    alpha = host.agent("alpha", 1)
    beta = host.agent("beta", 2, "unix:/run/sky/beta.sock:mode=600")
    creation = host.start(alpha)
    assert alpha.hosting and alpha.registered and alpha.creation == creation >= 4
    assert host.start(beta) >= 4
    assert not beta.hosting and beta.registered
    assert host.names() == {"alpha": 7001, "beta": 0}
    lines = log_lines(events)
    assert any(line.startswith("started the mapper on loopback:mapper; registered alpha")
               for line in lines)
    assert any(line.startswith("registered beta with the mapper at loopback:mapper")
               for line in lines)
    # the registration payload: a TCP port, or port 0 and the endpoint in Extra
    alpha_reply = settle(host.clock, host.client().port_please("alpha"))
    beta_reply = settle(host.clock, host.client().port_please("beta"))
    assert alpha_reply is not None and beta_reply is not None
    assert (alpha_reply.port, decode_extra(alpha_reply.extra)) == (7001, MapperExtra(1))
    assert (beta_reply.port, decode_extra(beta_reply.extra)) == (
        0, MapperExtra(2, "unix:/run/sky/beta.sock")
    )


def test_agents_starting_together_elect_exactly_one_host(host: Host) -> None:
    agents = [host.agent(f"n{i}", i) for i in range(1, 5)]
    starting = [agent.start() for agent in agents]
    for d in starting:
        settle(host.clock, d)
    assert len(host.hosts()) == 1
    assert host.names() == {f"n{i}": 7000 + i for i in range(1, 5)}


def test_survivors_take_over_when_the_hosting_node_crashes(host: Host) -> None:
    alpha, beta, gamma = (host.agent(n, h) for h, n in enumerate(["alpha", "beta", "gamma"], 1))
    for agent in (alpha, beta, gamma):
        host.start(agent)
    assert host.hosts() == [alpha]
    host.crash(alpha)
    drain(host.clock)
    assert not beta.registered and not gamma.registered
    took = until(host.clock, lambda: beta.registered and gamma.registered)
    assert took <= 2.0, took
    assert len(host.hosts()) == 1 and host.hosts()[0] in (beta, gamma)
    assert host.names() == {"beta": 7002, "gamma": 7003}


def test_three_survivors_racing_at_the_same_instant_elect_one_host(
    host: Host, events: list[LogEvent]
) -> None:
    alpha = host.agent("alpha", 1)
    racers = [host.agent(f"r{i}", i, takeover_jitter=0.0) for i in (2, 3, 4)]
    for agent in (alpha, *racers):
        host.start(agent)
    # Connects are refused for a moment, so that all three reach "start the mapper"
    # before any of them could have registered with the winner.
    host.network.refuse("mapper")
    host.crash(alpha)
    drain(host.clock)
    assert len(host.hosts()) == 1
    lost_race = [line for line in log_lines(events)
                 if line.startswith("another node started the mapper on loopback:mapper first")]
    assert len(lost_race) == 2
    host.network.refuse("mapper", False)
    took = until(host.clock, lambda: all(r.registered for r in racers))
    assert took <= 2.0, took
    assert len(host.hosts()) == 1
    assert host.names() == {"r2": 7002, "r3": 7003, "r4": 7004}


def test_survivors_without_jitter_re_register_at_once(host: Host) -> None:
    alpha = host.agent("alpha", 1)
    racers = [host.agent(f"r{i}", i, takeover_jitter=0.0) for i in (2, 3, 4)]
    for agent in (alpha, *racers):
        host.start(agent)
    host.crash(alpha)
    took = until(host.clock, lambda: all(r.registered for r in racers))
    assert took == 0.0
    assert len(host.hosts()) == 1
    assert host.names() == {"r2": 7002, "r3": 7003, "r4": 7004}


def test_a_stopping_host_hands_the_mapper_over(host: Host) -> None:
    alpha, beta, gamma = (host.agent(n, h) for h, n in enumerate(["alpha", "beta", "gamma"], 1))
    for agent in (alpha, beta, gamma):
        host.start(agent)
    settle(host.clock, alpha.stop())
    assert not alpha.hosting and not alpha.registered and alpha.listening_port is None
    took = until(host.clock, lambda: beta.registered and gamma.registered)
    assert took <= 2.0
    assert len(host.hosts()) == 1 and host.hosts()[0] in (beta, gamma)
    assert host.names() == {"beta": 7002, "gamma": 7003}


def test_re_registers_after_a_stop_request(host: Host) -> None:
    alpha, beta = host.agent("alpha", 1), host.agent("beta", 2)
    host.start(alpha)
    first = host.start(beta)
    assert alpha.server is not None
    assert alpha.server.stop_node("beta")  # what STOP_REQ does in relaxed mode
    drain(host.clock)
    assert not beta.registered
    until(host.clock, lambda: beta.registered, limit=2.0)
    assert beta.creation == first + 1  # the mapper remembered the name
    assert host.hosts() == [alpha]  # the mapper lives on: nobody took over
    assert host.names() == {"alpha": 7001, "beta": 7002}


def test_a_name_refused_as_registered_is_retried_until_free(host: Host) -> None:
    alpha = host.agent("alpha", 1)
    host.start(alpha)
    stale = settle(host.clock, host.client().register("beta", 9999))
    beta = host.agent("beta", 2)
    started = beta.start()
    host.clock.advance(0.5)
    drain(host.clock)
    assert not started.called and not beta.registered
    settle(host.clock, stale.unregister())
    settle(host.clock, started, limit=3.0)
    assert host.names() == {"alpha": 7001, "beta": 7002}


def test_start_gives_up_when_the_name_stays_taken(host: Host) -> None:
    alpha = host.agent("alpha", 1)
    host.start(alpha)
    taken = settle(host.clock, host.client().register("beta", 9999))
    beta = host.agent("beta", 2, start_refusals=3)
    with pytest.raises(RegistrationRefusedError):
        settle(host.clock, beta.start())
    assert not beta.registered and not beta.hosting
    with pytest.raises(CancelledError):
        settle(host.clock, beta.when_registered())
    settle(host.clock, taken.unregister())


def test_stop_before_registration_cancels_start(host: Host) -> None:
    alpha = host.agent("alpha", 1)
    started = alpha.start()
    stopped = alpha.stop()
    with pytest.raises(CancelledError):
        settle(host.clock, started)
    settle(host.clock, stopped)
    assert not alpha.hosting and not alpha.registered
    with pytest.raises(RuntimeError):
        alpha.start()


def test_when_registered_fires_at_each_registration(host: Host) -> None:
    alpha, beta = host.agent("alpha", 1), host.agent("beta", 2)
    host.start(alpha)
    waiting = beta.when_registered()
    assert not waiting.called
    creation = host.start(beta)
    assert settle(host.clock, waiting) == creation
    assert settle(host.clock, beta.when_registered()) == creation


def test_a_mapper_listening_where_nobody_connects_is_reported_not_restarted(
    host: Host, events: list[LogEvent]
) -> None:
    alpha = HostMapper(host.clock, MAPPER, "loopback:elsewhere", 4369, "alpha",
                       "tcp:127.0.0.1:7001", 1, random.Random(1))
    host.agents.append(alpha)
    started = alpha.start()
    until(host.clock, lambda: host.clock.seconds() >= 5)  # five seconds of retries
    assert not started.called and alpha.hosting
    assert host.network.listening("mapper")
    assert any("do the two name the same address?" in line for line in log_lines(events))
    settle(host.clock, alpha.stop())
    with pytest.raises(CancelledError):
        settle(host.clock, started)


def test_bad_configuration_is_one_clear_error(host: Host) -> None:
    with pytest.raises(ConfigurationError, match="advertise the port actually listened on"):
        host.agent("alpha", 1, "tcp:0:interface=127.0.0.1")
    with pytest.raises(ConfigurationError, match="at most 1020"):
        host.agent("alpha", 1, "unix:/" + "x" * 1100)
    with pytest.raises(ConfigurationError, match="alpha"):
        HostMapper(host.clock, "nosuchkind:x", MAPPER, 4369, "alpha", "tcp:h:1", 1)
    with pytest.raises(ValueError):
        host.agent("alpha", 0)


# --------------------------------------------------------------------------- resolving


def resolver_for(host: Host, addresses: dict[str, str] | None = None,
                 asked: list[str] | None = None) -> NodeResolver:
    """A resolver whose hosts resolve through ``addresses`` and whose mappers are all ours."""
    table = addresses if addresses is not None else {"hosta": "10.0.0.7"}

    def resolve_host(name: str) -> Deferred[str]:
        if asked is not None:
            asked.append(name)
        if name not in table:
            return fail(DNSLookupError(name))
        return succeed(table[name])

    return NodeResolver(host.clock, resolve_host=resolve_host,
                        mapper_endpoint_for=lambda address: MAPPER)


def test_a_tcp_harbor_resolves_to_the_resolved_address_and_its_port(host: Host) -> None:
    host.start(host.agent("alpha", 1))
    host.start(host.agent("beta", 2, "tcp:7002:interface=0.0.0.0"))
    resolver = resolver_for(host)
    assert settle(host.clock, resolver.resolve_node("beta@hosta")) == "tcp:10.0.0.7:7002"
    assert settle(host.clock, resolver.lookup("alpha@hosta")) == NodeLocation(
        "alpha@hosta", "tcp:10.0.0.7:7001", 7001, 1
    )
    v6 = resolver_for(host, {"hostb": "::1"})
    assert settle(host.clock, v6.resolve_node("beta@hostb")) == "tcp6:\\:\\:1:7002"


def test_a_unix_harbor_endpoint_travels_in_extra(host: Host) -> None:
    host.start(host.agent("alpha", 1))
    host.start(host.agent("beta", 3, "unix:/run/sky/beta.sock:mode=600:lockfile=1"))
    location = settle(host.clock, resolver_for(host).lookup("beta@hosta"))
    assert location == NodeLocation("beta@hosta", "unix:/run/sky/beta.sock", 0, 3)


def test_an_erlang_style_or_foreign_registration_resolves_by_port(host: Host) -> None:
    host.start(host.agent("alpha", 1))
    client = host.client()
    erl = settle(host.clock, client.register("erl", 5555))
    odd = settle(host.clock, client.register("odd", 5556, b"\xff\x00not ours"))
    noport = settle(host.clock, client.register("noport", 0))
    resolver = resolver_for(host)
    assert settle(host.clock, resolver.lookup("erl@hosta")) == NodeLocation(
        "erl@hosta", "tcp:10.0.0.7:5555", 5555, None
    )
    assert settle(host.clock, resolver.resolve_node("odd@hosta")) == "tcp:10.0.0.7:5556"
    with pytest.raises(NodeNotFound, match="neither a port nor an endpoint"):
        settle(host.clock, resolver.resolve_node("noport@hosta"))
    for registration in (erl, odd, noport):
        settle(host.clock, registration.unregister())


def test_answers_are_cached_until_invalidated(host: Host) -> None:
    host.start(host.agent("alpha", 1))
    beta = host.agent("beta", 2, "unix:/run/sky/old.sock")
    host.start(beta)
    asked: list[str] = []
    resolver = resolver_for(host, asked=asked)
    together = [resolver.resolve_node("beta@hosta") for _ in range(3)]
    assert [settle(host.clock, d) for d in together] == ["unix:/run/sky/old.sock"] * 3
    assert asked == ["hosta"]  # three callers, one query
    # beta restarts elsewhere: the cache still answers (no query) until invalidated
    settle(host.clock, beta.stop())
    host.start(host.agent("beta", 2, "unix:/run/sky/new.sock"))
    assert settle(host.clock, resolver.resolve_node("beta@hosta")) == "unix:/run/sky/old.sock"
    assert asked == ["hosta"]
    assert resolver.cached("beta@hosta") is not None
    assert resolver.invalidate("beta@hosta") is True
    assert resolver.invalidate("beta@hosta") is False
    assert settle(host.clock, resolver.resolve_node("beta@hosta")) == "unix:/run/sky/new.sock"
    assert asked == ["hosta", "hosta"]


def test_an_answer_invalidated_while_in_flight_is_not_cached(host: Host) -> None:
    host.start(host.agent("alpha", 1))
    resolver = resolver_for(host)
    pending = resolver.resolve_node("alpha@hosta")
    resolver.invalidate("alpha@hosta")
    assert settle(host.clock, pending) == "tcp:10.0.0.7:7001"
    assert resolver.cached("alpha@hosta") is None


def test_node_not_found(host: Host) -> None:
    host.start(host.agent("alpha", 1))
    resolver = resolver_for(host)
    with pytest.raises(NodeNotFound,
                       match=r"^node nobody is not registered with the mapper at loopback:mapper$"):
        settle(host.clock, resolver.resolve_node("nobody@hosta"))
    assert resolver.cached("nobody@hosta") is None
    with pytest.raises(NodeNotFound, match="cannot resolve the host of node alpha@nowhere"):
        settle(host.clock, resolver.resolve_node("alpha@nowhere"))
    with pytest.raises(NodeNotFound, match="name@host"):
        settle(host.clock, resolver.resolve_node("tcp:10.0.0.7:7001"))
    lonely = NodeResolver(host.clock, resolve_host=lambda name: succeed("10.0.0.8"),
                          mapper_endpoint_for=lambda address: "loopback:nobody-here")
    with pytest.raises(NodeNotFound, match="cannot ask the mapper at loopback:nobody-here"):
        settle(host.clock, lonely.resolve_node("alpha@hostb"))


# --------------------------------------------------------------------------- real reactor


def reactor() -> Any:
    from twisted.internet import reactor as global_reactor

    return global_reactor


def within(d: Deferred[_T], seconds: float = 15) -> Deferred[_T]:
    return d.addTimeout(seconds, reactor())


async def names_at(probe: MapperClient) -> dict[str, int]:
    pairs: list[tuple[str, int]] = await within(probe.names())
    return dict(pairs)


def hosting(agent: HostMapper) -> bool:
    """``agent.hosting``, read through a call so that mypy does not narrow it across awaits."""
    return agent.hosting


@pytest_twisted.ensureDeferred
async def test_real_tcp_an_agent_hosts_another_registers_and_takes_over() -> None:
    mapper_port = free_port()
    listen = f"tcp:{mapper_port}:interface=127.0.0.1"
    connect = f"tcp:127.0.0.1:{mapper_port}"
    alpha_port = free_port()
    with tempfile.TemporaryDirectory(prefix="skyproto-map-") as tmp:
        socket_path = str(Path(tmp) / "beta.sock")
        alpha = HostMapper(reactor(), listen, connect, mapper_port, "alpha",
                           f"tcp:127.0.0.1:{alpha_port}", 1)
        beta = HostMapper(reactor(), listen, connect, mapper_port, "beta",
                          f"unix:{socket_path}:mode=600", 2)
        probe = MapperClient(reactor(), TCP4ClientEndpoint(reactor(), "127.0.0.1", mapper_port),
                             timeout=5)
        try:
            await within(alpha.start())
            assert alpha.hosting
            await within(beta.start())
            assert not hosting(beta)
            assert await names_at(probe) == {"alpha": alpha_port, "beta": 0}
            assert (await within(probe.names_reply())).epmd_port == mapper_port

            resolver = NodeResolver(reactor(), mapper_port, timeout=5)
            assert await within(resolver.resolve_node("alpha@localhost")) == (
                f"tcp:127.0.0.1:{alpha_port}"
            )
            assert await within(resolver.resolve_node("beta@localhost")) == f"unix:{socket_path}"
            with pytest.raises(NodeNotFound, match=(
                f"^node nobody is not registered with the mapper at 127.0.0.1:{mapper_port}$"
            )):
                await within(resolver.resolve_node("nobody@localhost"))

            # The host stops: beta notices at once and takes the mapper's port over.
            assert beta.registration is not None
            lost = beta.registration.when_lost()
            await within(alpha.stop())
            await within(lost)
            await within(beta.when_registered())
            assert hosting(beta)
            assert await names_at(probe) == {"beta": 0}
        finally:
            await within(alpha.stop())
            await within(beta.stop())
        assert not hosting(beta) and beta.listening_port is None


@pytest_twisted.ensureDeferred
async def test_real_unix_mapper_socket_is_hosted_and_taken_over() -> None:
    with tempfile.TemporaryDirectory(prefix="skyproto-map-") as tmp:
        path = Path(tmp) / "mapper.sock"
        # lockfile=1: a socket file left by a dead host is replaced, not taken for a mapper
        listen, connect = f"unix:{path}:mode=600:lockfile=1", f"unix:{path}"
        alpha = HostMapper(reactor(), listen, connect, 4369, "alpha", f"unix:{tmp}/a.sock", 1)
        beta = HostMapper(reactor(), listen, connect, 4369, "beta", f"unix:{tmp}/b.sock", 2)
        probe = MapperClient(reactor(), clientFromString(reactor(), connect), timeout=5)
        try:
            await within(alpha.start())  # no socket file yet: ENOENT counts as "nobody"
            assert hosting(alpha)
            await within(beta.start())
            assert not hosting(beta)
            assert beta.registration is not None
            lost = beta.registration.when_lost()
            await within(alpha.stop())
            await within(lost)
            await within(beta.when_registered())
            assert hosting(beta)
            assert await names_at(probe) == {"beta": 0}
            assert (await within(probe.names_reply())).epmd_port == 4369
        finally:
            await within(alpha.stop())
            await within(beta.stop())


@pytest.mark.process
@pytest.mark.skipif(EPMD is None, reason="epmd is not installed; apt-get install erlang-base")
@pytest_twisted.ensureDeferred
async def test_genuine_epmd_keeps_our_extra_and_the_agent_takes_over_when_it_dies() -> None:
    assert EPMD is not None
    processes = Processes(reactor())
    home = tempfile.TemporaryDirectory(prefix="skyproto-epmd-")
    epmd_port = free_port()
    socket_path = str(Path(home.name) / "sky.sock")
    daemon = processes.spawn(
        "epmd", [EPMD, "-d", "-d", "-port", str(epmd_port), "-address", "127.0.0.1"],
        node_env(home.name, epmd_port),
    )
    agent = HostMapper(reactor(), f"tcp:{epmd_port}:interface=127.0.0.1",
                       f"tcp:127.0.0.1:{epmd_port}", epmd_port, "sky", f"unix:{socket_path}", 7)
    probe = MapperClient(reactor(), TCP4ClientEndpoint(reactor(), "127.0.0.1", epmd_port),
                         timeout=5)
    try:
        # -d -d prints this line once epmd listens, before it serves anyone
        await daemon.wait_for_text("entering the main select() loop", 20)
        assert await names_at(probe) == {}
        await within(agent.start())
        assert not hosting(agent)  # genuine epmd serves us
        reply = await within(probe.port_please("sky"))
        assert reply is not None and (reply.port, reply.extra) == (0, agent.extra)
        assert decode_extra(reply.extra) == MapperExtra(7, f"unix:{socket_path}")
        resolver = NodeResolver(reactor(), epmd_port, timeout=5)
        assert await within(resolver.resolve_node("sky@localhost")) == f"unix:{socket_path}"

        # epmd dies: the agent starts a mapper on its port and registers again.
        assert agent.registration is not None
        lost = agent.registration.when_lost()
        daemon.kill()
        await within(daemon.wait_exit(10))
        await within(lost)
        await within(agent.when_registered())
        assert hosting(agent)
        assert resolver.invalidate("sky@localhost")
        assert await within(resolver.resolve_node("sky@localhost")) == f"unix:{socket_path}"
    finally:
        await within(agent.stop())
        await processes.cleanup()
        home.cleanup()
    assert not daemon.running
