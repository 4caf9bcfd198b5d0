"""Our mapper with genuine Erlang nodes and the ``epmd`` client; our client with genuine epmd.

These run real processes (``erl``, ``epmd``) next to the reactor, on ephemeral ports on
127.0.0.1 with a temporary HOME; every process is killed at the end. They skip when
Erlang is not installed (CI installs ``erlang-base``).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater

from skyproto.mapper.client import MapperClient, RegistrationRefusedError
from skyproto.mapper.epmd import NamesResponse, Port2Response
from skyproto.mapper.port import mapper_server_endpoint
from skyproto.mapper.server import MapperServerFactory
from skyproto.testing import wait_for

from .erlang import (
    Processes,
    epmd_executable,
    erl_executable,
    free_port,
    node_argv,
    node_env,
)

ERL = erl_executable()
EPMD = epmd_executable()

pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(
        ERL is None or EPMD is None,
        reason="Erlang (erl and epmd) is not installed; apt-get install erlang-base",
    ),
]

_T = TypeVar("_T")

# Each node waits (with a deadline) until the mapper lists the other node, prints what
# net_adm:names/1 returns and the result of pinging the other node, then waits for its
# stdin to close before halting, so neither halts while the other still pings it.
NODE_SCRIPT = """
Other = os:getenv("OTHER"),
[_, Host] = string:split(atom_to_list(node()), "@"),
Wait = fun W(0) -> timeout;
           W(N) -> case net_adm:names("localhost") of
                       {ok, L} -> case lists:keymember(Other, 1, L) of
                                      true -> ok;
                                      false -> timer:sleep(100), W(N - 1)
                                  end;
                       _ -> timer:sleep(100), W(N - 1)
                   end
       end,
io:format("WAIT ~p~n", [Wait(300)]),
io:format("NAMES ~p~n", [net_adm:names("localhost")]),
io:format("PING ~p~n", [net_adm:ping(list_to_atom(Other ++ "@" ++ Host))]),
io:get_line(""),
halt().
"""


def reactor() -> Any:
    from twisted.internet import reactor as global_reactor

    return global_reactor


def within(d: Deferred[_T], seconds: float = 30) -> Deferred[_T]:
    return d.addTimeout(seconds, reactor())


async def until(predicate: Callable[[], bool], seconds: float = 30, what: str = "") -> None:
    """Poll ``predicate`` every 50 ms on the reactor until it holds or the deadline passes."""
    await wait_for(predicate, what or "the condition", seconds, clock=reactor(), interval=0.05)


async def listen_mapper(**options: Any) -> tuple[MapperServerFactory, IListeningPort]:
    """Our mapper on 127.0.0.1 as the daemon listens (a MapperPort), reporting its port."""
    factory = MapperServerFactory(reactor(), 0, **options)
    port: IListeningPort = await within(
        mapper_server_endpoint(reactor(), "tcp:0:interface=127.0.0.1").listen(factory)
    )
    host = port.getHost()
    assert isinstance(host, IPv4Address)
    factory.port = host.port
    return factory, port


async def stop_listening(port: IListeningPort) -> None:
    stopped = port.stopListening()
    if stopped is not None:
        await within(stopped)


@pytest_twisted.ensureDeferred
async def test_erlang_nodes_register_find_and_ping_each_other_through_our_mapper() -> None:
    assert ERL is not None and EPMD is not None
    factory, port = await listen_mapper()
    processes = Processes(reactor())
    home = tempfile.TemporaryDirectory(prefix="skyproto-erl-")
    try:
        env = node_env(home.name, factory.port)
        a = processes.spawn(
            "node a", node_argv(ERL, "a@localhost", NODE_SCRIPT), dict(env, OTHER="b")
        )
        b = processes.spawn(
            "node b", node_argv(ERL, "b@localhost", NODE_SCRIPT), dict(env, OTHER="a")
        )
        for node in (a, b):
            await node.wait_for_text("PING", timeout=60)
        for node, other in ((a, "b"), (b, "a")):
            assert "WAIT ok" in node.output, node.output
            assert "PING pong" in node.output, node.output
            names = re.search(r"NAMES \{ok,(.*)\}", node.output)
            assert names is not None, node.output
            assert f'{{"{other}",' in names.group(1)
        live = {r.name: r for r in factory.table.names()}
        assert set(live) == {"a", "b"}
        for registration in live.values():
            # OTP 25.2.3 sends High 6, Low 5 (EPMD.md says Low 6; observed otherwise).
            assert (registration.node_type, registration.protocol) == (77, 0)
            assert registration.high == 6 and 5 <= registration.low <= 6
            assert registration.extra == b""
            assert registration.creation >= 4

        # The genuine epmd client reads our NAMES reply.
        names_cmd = await processes.run(
            "epmd -names", [EPMD, "-port", str(factory.port), "-names"], env
        )
        assert names_cmd.exit_code == 0, names_cmd.output
        assert f"epmd: up and running on port {factory.port} with data:" in names_cmd.output
        for name, registration in live.items():
            assert f"name {name} at port {registration.port}" in names_cmd.output

        dump = await processes.run("epmd -dump", [EPMD, "-port", str(factory.port), "-dump"], env)
        assert "active name     <a> at port" in dump.output, dump.output

        kill = await processes.run("epmd -kill", [EPMD, "-port", str(factory.port), "-kill"], env)
        assert "Killing not allowed - living nodes in database." in kill.output, kill.output

        # A third node with a taken name is refused, as by real epmd.
        dup = await processes.run(
            "node a again", node_argv(ERL, "a@localhost", "halt()."), env, timeout=60
        )
        assert dup.exit_code != 0
        assert "seems to be in use by another Erlang node" in dup.output, dup.output

        # STOP (relaxed mode) closes a's registration; OTP >= 23 re-registers by itself.
        factory.relaxed = True
        old_creation = live["a"].creation
        stop = await processes.run(
            "epmd -stop", [EPMD, "-port", str(factory.port), "-stop", "a"], env
        )
        assert "STOPPED" in stop.output, stop.output
        await until(lambda: factory.table.lookup("a") is not None, 30, "a to re-register")
        again = factory.table.lookup("a")
        assert again is not None and again.creation == old_creation + 1

        # The nodes halt once their stdin closes; their registrations go with them.
        for node in (a, b):
            node.close_stdin()
        for node in (a, b):
            assert await node.wait_exit(30) == 0, node.output
        await until(lambda: len(factory.table) == 0, 10, "the registrations to go")
    finally:
        await processes.cleanup()
        await stop_listening(port)
        home.cleanup()


@pytest_twisted.ensureDeferred
async def test_epmd_kill_stops_our_idle_mapper() -> None:
    assert EPMD is not None
    kills: list[bool] = []
    factory, port = await listen_mapper(on_kill=lambda: kills.append(True))
    processes = Processes(reactor())
    home = tempfile.TemporaryDirectory(prefix="skyproto-erl-")
    try:
        env = node_env(home.name, factory.port)
        names = await processes.run(
            "epmd -names", [EPMD, "-port", str(factory.port), "-names"], env
        )
        assert names.output.strip() == f"epmd: up and running on port {factory.port} with data:"
        kill = await processes.run("epmd -kill", [EPMD, "-port", str(factory.port), "-kill"], env)
        assert kill.output.strip() == "Killed", kill.output
        await until(lambda: kills == [True], 10, "on_kill")
    finally:
        await processes.cleanup()
        await stop_listening(port)
        home.cleanup()


@pytest_twisted.ensureDeferred
async def test_our_client_with_genuine_epmd() -> None:
    assert EPMD is not None
    processes = Processes(reactor())
    home = tempfile.TemporaryDirectory(prefix="skyproto-erl-")
    epmd_port = free_port()
    env = node_env(home.name, epmd_port)
    daemon = processes.spawn("epmd", [EPMD, "-port", str(epmd_port), "-address", "127.0.0.1"], env)
    client = MapperClient(
        reactor(), TCP4ClientEndpoint(reactor(), "127.0.0.1", epmd_port), timeout=5
    )
    try:
        empty: list[NamesResponse] = []

        async def names_answered() -> bool:
            try:
                empty.append(await within(client.names_reply(), 5))
            except Exception:
                return False
            return True

        deadline = reactor().seconds() + 20
        while not await names_answered():
            assert daemon.running, daemon.output
            assert reactor().seconds() < deadline, "genuine epmd did not start"
            await deferLater(reactor(), 0.05)
        assert empty[-1] == NamesResponse(epmd_port, ())

        sky = await within(client.register("sky", 4242, b"\xa1\x00cbor"))
        assert sky.creation >= 4
        with pytest.raises(RegistrationRefusedError):
            await within(client.register("sky", 1))
        old = await within(client.register("old", 4343, high=5, low=5))
        assert 1 <= old.creation <= 3
        assert await within(client.port_please("sky")) == Port2Response(
            4242, 77, 0, 6, 6, "sky", b"\xa1\x00cbor"
        )
        assert await within(client.names_reply()) == NamesResponse(
            epmd_port, (("old", 4343), ("sky", 4242))
        )
        assert await within(client.port_please("nobody")) is None

        await within(sky.unregister())

        async def sky_gone() -> bool:
            return await within(client.port_please("sky")) is None

        deadline = reactor().seconds() + 10
        while not await sky_gone():
            assert reactor().seconds() < deadline, "sky still registered"
            await deferLater(reactor(), 0.05)
        again = await within(client.register("sky", 4242))
        assert again.creation == sky.creation + 1  # epmd remembered the name
        await within(again.unregister())
        await within(old.unregister())
    finally:
        await processes.cleanup()
        home.cleanup()
    assert not daemon.running
