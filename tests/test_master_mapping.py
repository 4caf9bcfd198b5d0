"""A node finds its master by name: ``--master skymaster@hosta`` (issue 14).

The master registers ``skymaster`` (a registration that is not a harbor: its Extra says
``{"role": "master"}``) with its host's mapper, hosting the mapper if none answers, as a
node does; a node's :class:`NodeEndpoint` asks hosta's mapper at every connection attempt.
Everything runs on one ``Clock`` over the ``loopback:`` transport: "hosta" resolves to
10.0.0.1 and every address's mapper is ``loopback:mapper``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent
from twisted.python.failure import Failure

from skyproto import tap
from skyproto.errors import AddressError, ConfigurationError
from skyproto.mapper.client import MapperClient
from skyproto.mapper.extra import ROLE_MASTER, MapperExtra, decode_extra, encode_extra
from skyproto.mapper.server import MapperServerFactory
from skyproto.master.client import MasterClient
from skyproto.master.registry import InMemoryRegistry
from skyproto.master.server import MasterService
from skyproto.node.host_mapper import HostMapper
from skyproto.node.node import Node
from skyproto.node.resolver import NodeEndpoint, NodeNotFound, NodeResolver
from skyproto.transports.loopback import network_for
from skyproto.wire.codec import encode_cbor

from .cluster import SECRET
from .test_master_timeouts import Listener

MAPPER = "loopback:mapper"
MASTER = "skymaster@hosta"


# --------------------------------------------------------------------------- helpers


def settle(clock: Clock, seconds: float = 0.0, step: float = 0.01) -> None:
    clock.advance(0)
    for _ in range(round(seconds / step)):
        clock.advance(step)


def until(clock: Clock, condition: Callable[[], object], limit: float = 10.0,
          step: float = 0.01) -> float:
    """Advance in steps until ``condition()``; the seconds it took (fails after ``limit``)."""
    start = clock.seconds()
    clock.advance(0)
    while not condition():
        assert clock.seconds() - start < limit, f"not within {limit} s"
        clock.advance(step)
    return clock.seconds() - start


def result_of(clock: Clock, d: Deferred[Any], limit: float = 10.0) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    until(clock, lambda: box, limit)
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def warnings(events: list[LogEvent], text: str = "no master at") -> list[str]:
    return [formatEvent(e) for e in events if text in formatEvent(e)]


class World:
    """hosta: a clock, a loopback network, masters and mappers that come and go."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.network = network_for(self.clock)
        self.asked: list[str] = []
        self.resolver = self.new_resolver()
        self.agents: list[HostMapper] = []
        self.masters: dict[str, tuple[MasterService, IListeningPort]] = {}
        self.nodes: list[Node] = []

    def new_resolver(self) -> NodeResolver:
        def resolve_host(name: str) -> Deferred[str]:
            self.asked.append(name)
            if name != "hosta":
                return fail(DNSLookupError(name))
            return succeed("10.0.0.1")

        return NodeResolver(self.clock, resolve_host=resolve_host,
                            mapper_endpoint_for=lambda address: MAPPER, timeout=2.0)

    def master(self, at: str = "master", name: str = "skymaster",
               register: bool = True) -> HostMapper | None:
        """A master listening on ``loopback:AT``, registered as ``name`` (hosting the
        mapper if none answers); its agent."""
        service = MasterService(InMemoryRegistry(), self.clock, SECRET, auto_grace=0)
        ports: list[IListeningPort] = []
        serverFromString(self.clock, f"loopback:{at}").listen(service).addCallback(ports.append)
        settle(self.clock)
        self.masters[at] = (service, ports[0])
        if not register:
            return None
        return self.agent(name, f"loopback:{at}", None, role=ROLE_MASTER)

    def agent(self, name: str, endpoint: str, harbor: int | None,
              role: str | None = None) -> HostMapper:
        agent = HostMapper(self.clock, MAPPER, MAPPER, 4369, name, endpoint, harbor,
                           random.Random(len(self.agents)), role=role)
        self.agents.append(agent)
        result_of(self.clock, agent.start())
        return agent

    def kill_master(self, at: str = "master") -> None:
        """Like SIGKILL: its port and connections go, its mapper agent with it."""
        _, port = self.masters.pop(at)
        port.stopListening()
        for connection in self.network.connections_to(at):
            connection.cut("master killed")
        for agent in self.agents:
            if agent.harbor_endpoint == f"loopback:{at}":
                self.crash(agent)
        settle(self.clock)

    def crash(self, agent: HostMapper) -> None:
        """The agent's process dies: the mapper it hosts (if any) goes, every connection
        to it cut; otherwise its registration closes (as the kernel closes its socket)."""
        if agent.listening_port is not None:
            agent.listening_port.stopListening()
            for connection in self.network.connections_to("mapper"):
                connection.cut("the hosting process crashed")
        agent.stop()
        self.agents.remove(agent)

    def node(self, harbor: int, *masters: str) -> Node:
        node = Node(harbor, self.clock, SECRET, resolver=self.resolver)
        node.listen(f"loopback:h{harbor}")
        node.join_master(list(masters) or [MASTER], f"n{harbor}@hosta", f"loopback:h{harbor}")
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            result_of(self.clock, node.stop())
        for agent in self.agents:
            result_of(self.clock, agent.stop())
        for _, port in self.masters.values():
            port.stopListening()
        settle(self.clock, 0.1)


@pytest.fixture
def world() -> Any:
    w = World()
    yield w
    w.stop()


def joined(node: Node) -> bool:
    return node.master is not None and node.master.connected


# --------------------------------------------------------------------------- Extra


def test_a_registration_that_is_not_a_harbor_carries_its_role() -> None:
    assert decode_extra(encode_extra(None, role="master")) == MapperExtra(None, None, "master")
    assert decode_extra(encode_extra(None, "unix:/run/m.sock", role="master")) == \
        MapperExtra(None, "unix:/run/m.sock", "master")
    assert decode_extra(encode_extra(3)) == MapperExtra(3)  # a harbor: as before
    with pytest.raises(ValueError, match="harbor id or a role"):
        encode_extra(None)
    # no harbor and no (text) role, or a bad harbor next to a role: not ours
    for value in ({"endpoint": "unix:/x"}, {"role": ""}, {"role": 7},
                  {"harbor": 0, "role": "master"}, {"harbor": None, "role": "master"}):
        assert decode_extra(encode_cbor(value)) is None, value
    # a harbor's Extra that also names a role is the harbor's
    assert decode_extra(encode_cbor({"harbor": 2, "role": "x"})) == MapperExtra(2)


def test_a_host_mapper_needs_a_harbor_or_a_role() -> None:
    clock = Clock()
    network_for(clock)
    with pytest.raises(ConfigurationError, match="harbor id or a role"):
        HostMapper(clock, MAPPER, MAPPER, 4369, "skymaster", "loopback:master", None)
    agent = HostMapper(clock, MAPPER, MAPPER, 4369, "skymaster", "tcp:0.0.0.0:2013", None,
                       role=ROLE_MASTER)
    assert (agent.harbor, agent.role, agent.port) == (None, "master", 2013)
    assert decode_extra(agent.extra) == MapperExtra(None, None, "master")


# --------------------------------------------------------------------------- found by name


def test_a_node_finds_the_master_by_name_and_the_master_hosts_the_mapper(world: World) -> None:
    agent = world.master()
    assert agent is not None and agent.hosting and agent.registered  # nobody else did
    location = result_of(world.clock, world.resolver.lookup(MASTER))
    assert (location.endpoint, location.harbor, location.role) == (
        "loopback:master", None, "master")
    node = world.node(1)
    until(world.clock, lambda: joined(node))
    assert node.master is not None and node.master.endpoint_description == MASTER
    assert world.masters["master"][0].joined.keys() == {1}


def test_the_master_registers_with_a_mapper_a_node_hosts(world: World) -> None:
    first = world.agent("a1", "loopback:h9", 9)
    assert first.hosting
    agent = world.master()
    assert agent is not None and not agent.hosting and agent.registered
    names: list[tuple[str, int]] = result_of(world.clock, MapperClient(
        world.clock, clientFromString(world.clock, MAPPER), timeout=2).names())
    assert sorted(name for name, _ in names) == ["a1", "skymaster"]


def test_every_attempt_asks_the_mapper_again_so_a_master_on_a_new_port_is_found(
        world: World, events: list[LogEvent]) -> None:
    world.master("master")
    node = world.node(1)
    until(world.clock, lambda: joined(node))
    world.kill_master("master")  # the master and the mapper it hosted: both gone
    assert not joined(node)
    settle(world.clock, 1.0)
    world.master("master-restarted")  # on another "port"; it hosts the mapper again
    took = until(world.clock, lambda: joined(node))
    assert took < 1.0
    assert node.master is not None and node.master.welcomes == 2
    assert world.masters["master-restarted"][0].joined.keys() == {1}
    said = warnings(events)
    assert said and all("skymaster@hosta" in line for line in said), said
    assert any("no mapper answers on hosta (loopback:mapper): connection refused" in line
               for line in said), said
    assert world.resolver.cached(MASTER) is None  # nothing kept between attempts


def test_mixed_masters_are_tried_in_turn(world: World) -> None:
    world.master("other", register=False)  # reachable by endpoint only
    node = world.node(1, MASTER, "loopback:other")  # no mapper at all: the second one
    until(world.clock, lambda: joined(node))
    assert node.master is not None
    assert node.master.masters == [MASTER, "loopback:other"]
    assert node.master.endpoint_description == "loopback:other"


# --------------------------------------------------------------------------- failures


def test_no_mapper_then_no_name_then_the_master_each_said_once_in_words(
        world: World, events: list[LogEvent]) -> None:
    node = world.node(1)
    settle(world.clock, 1.0)  # a few attempts (a series is said again every 10th)
    said = warnings(events)
    assert said == [
        "no master at skymaster@hosta: no mapper answers on hosta (loopback:mapper): "
        "connection refused (attempt 1; retrying)"], said
    assert node.master is not None and node.master.last_failure == (
        "skymaster@hosta: no mapper answers on hosta (loopback:mapper): connection refused")

    world.agent("a1", "loopback:h9", 9)  # a mapper, but no master registered with it
    settle(world.clock, 1.0)
    said = warnings(events)[1:]
    assert len(said) == 1, said
    assert said[0].startswith("no master at skymaster@hosta: no skymaster registered with the "
                              "mapper on hosta (loopback:mapper) (attempt "), said
    assert "not registered" not in node.master.last_failure  # the node's words, not raw

    world.master()
    until(world.clock, lambda: joined(node))
    assert len(warnings(events)) == 2
    assert any("joined the master at skymaster@hosta" in formatEvent(e) for e in events)


def test_a_harbor_registered_under_the_masters_name_is_not_taken_for_it(
        world: World, events: list[LogEvent]) -> None:
    world.agent("skymaster", "loopback:h5", 5)
    node = world.node(1)
    settle(world.clock, 1.0)
    assert not joined(node)
    assert warnings(events) == [
        "no master at skymaster@hosta: skymaster on the mapper on hosta is harbor 5, "
        "not a master (attempt 1; retrying)"]


def test_an_unknown_host_is_said(world: World, events: list[LogEvent]) -> None:
    node = world.node(1, "skymaster@nowhere")
    settle(world.clock, 1.0)
    assert not joined(node)
    said = warnings(events)
    assert len(said) == 1 and said[0].startswith(
        "no master at skymaster@nowhere: cannot resolve the host nowhere of "
        "skymaster@nowhere: "), said


def test_a_mapper_that_never_answers_times_out_saying_what_it_waited_for(
        world: World, events: list[LogEvent]) -> None:
    serverFromString(world.clock, MAPPER).listen(Factory.forProtocol(Protocol))  # mute
    world.node(1)  # the resolver gives up after 2 s, before the attempt's 5 s
    settle(world.clock, 2.1)
    assert warnings(events) == [
        "no master at skymaster@hosta: no mapper answers on hosta (loopback:mapper): no "
        "answer within 2 s (attempt 1; retrying)"]


def test_an_attempt_that_times_out_says_what_it_was_doing(
        world: World, events: list[LogEvent]) -> None:
    serverFromString(world.clock, MAPPER).listen(Factory.forProtocol(Protocol))  # mute
    world.resolver.timeout = 30.0  # the attempt's own bound (5 s) comes first
    world.node(1)
    settle(world.clock, 5.1)
    assert warnings(events) == [
        "no master at skymaster@hosta: no connection within 5 s (timed out asking the mapper "
        "on hosta for skymaster) (attempt 1; retrying)"]


def test_master_wait_gives_up_naming_what_the_mapper_said(world: World) -> None:
    world.agent("a1", "loopback:h9", 9)
    node = world.node(1)
    given_up: list[str] = []
    wait = tap.MasterWait(world.clock, lambda: node.master, 2.0, given_up.append)
    wait.startService()
    settle(world.clock, 2.1)
    assert given_up == [
        "no master answered within 2 s (last attempt: skymaster@hosta: no skymaster "
        "registered with the mapper on hosta (loopback:mapper))"]
    wait.stopService()


def test_the_endpoint_explains_each_failure_kind(world: World) -> None:
    endpoint = NodeEndpoint(world.clock, world.resolver, MASTER, role=ROLE_MASTER)
    factory = Factory.forProtocol(Protocol)
    with pytest.raises(NodeNotFound, match="no mapper answers on hosta") as refused:
        result_of(world.clock, endpoint.connect(factory))
    assert refused.value.kind == "no-mapper"
    world.agent("a1", "loopback:h9", 9)
    with pytest.raises(NodeNotFound) as missing:
        result_of(world.clock, endpoint.connect(factory))
    assert (missing.value.kind, str(missing.value)) == (
        "not-registered", "no skymaster registered with the mapper on hosta (loopback:mapper)")
    world.agent("skymaster", "loopback:nothing-here", None, role=ROLE_MASTER)
    with pytest.raises(ConnectionRefusedError):  # found, but nobody listens there
        result_of(world.clock, endpoint.connect(factory))
    assert endpoint.resolved == "loopback:nothing-here"
    with pytest.raises(AddressError):
        NodeEndpoint(world.clock, world.resolver, "tcp:hosta:2013")


def test_a_refused_dial_names_where_the_mapper_pointed(
        world: World, events: list[LogEvent]) -> None:
    world.agent("skymaster", "loopback:gone", None, role=ROLE_MASTER)  # a stale registration
    world.node(1)
    settle(world.clock, 0.5)
    assert warnings(events)[0] == (
        "no master at skymaster@hosta: connection refused at loopback:gone, where the mapper "
        "said it listens (attempt 1; retrying)")


# --------------------------------------------------------------------------- re-registering


def test_the_master_re_registers_when_the_mapper_it_used_goes_away(world: World) -> None:
    host = world.agent("a1", "loopback:h9", 9)  # a node hosts hosta's mapper
    agent = world.master()
    assert agent is not None and not agent.hosting
    world.crash(host)  # ... and dies: the master takes the mapper over and re-registers
    until(world.clock, lambda: agent.hosting and agent.registered, limit=3.0)
    location = result_of(world.clock, world.resolver.lookup(MASTER))
    assert (location.endpoint, location.role) == ("loopback:master", "master")
    node = world.node(1)  # a node started after that finds it
    until(world.clock, lambda: joined(node))


def test_the_master_re_registers_with_a_restarted_dedicated_mapper(world: World) -> None:
    factory = MapperServerFactory(world.clock, 4369)
    ports: list[IListeningPort] = []
    serverFromString(world.clock, MAPPER).listen(factory).addCallback(ports.append)
    agent = world.master()
    assert agent is not None and not agent.hosting and agent.registered
    # `systemctl restart skymapper`: gone, and back before anyone took it over
    ports.pop().stopListening()
    for connection in world.network.connections_to("mapper"):
        connection.cut("skymapper restarted")
    serverFromString(world.clock, MAPPER).listen(MapperServerFactory(world.clock, 4369))
    until(world.clock, lambda: agent.registered, limit=3.0)
    location = result_of(world.clock, world.resolver.lookup(MASTER))
    assert location.role == "master"


# --------------------------------------------------------------------------- options


def test_master_name_option() -> None:
    assert tap.master_name("skymaster") == "skymaster"
    assert tap.master_name("m2@hosta") == "m2"
    for bad in ("", "has space", "a@b@c"):
        with pytest.raises(AddressError):
            tap.master_name(bad)
    options = tap.MasterOptions()
    options.parseOptions([])
    assert (options["master_name"], options["no-mapper"], options["mapper"]) == (
        "skymaster", False, None)
    options = tap.MasterOptions()
    options.parseOptions(["--name", "m2", "--mapper", "tcp:127.0.0.1:4400", "--no-mapper"])
    assert (options["master_name"], options["no-mapper"]) == ("m2", True)


def test_a_node_takes_name_at_host_masters_mixed_with_endpoints() -> None:
    options = tap.NodeOptions()
    options.parseOptions(["--harbor", "1", "--master", MASTER, "--master", "tcp:hostb:2013"])
    assert options["masters"] == [MASTER, "tcp:hostb:2013"]
    clock = Clock()
    client = MasterClient(clock, [MASTER, "tcp:127.0.0.1:2013"], SECRET, Listener())
    kinds = [type(endpoint).__name__ for _, endpoint in client.endpoint.masters]
    assert kinds == ["NodeEndpoint", "TCP4ClientEndpoint"]
    with pytest.raises(ConfigurationError, match="bad master endpoint"):
        MasterClient(clock, ["skymaster@"], SECRET, Listener())


def test_a_node_on_every_interface_advertises_its_route_to_a_master_found_by_name() -> None:
    class Port:
        def getHost(self) -> Any:
            from twisted.internet.address import IPv4Address

            return IPv4Address("TCP", "0.0.0.0", 7001)

    assert tap.advertised_address(Port(), "tcp:0:interface=0.0.0.0",  # type: ignore[arg-type]
                                  toward=["skymaster@127.0.0.1"]) == "tcp:127.0.0.1:7001"
