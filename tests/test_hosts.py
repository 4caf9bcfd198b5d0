"""skyproto across hosts: network namespaces joined by a switch (tests/hosts.py).

Every host runs what a real machine of a multi-host deployment runs (docs/operations.md,
"Multi-host deployment"): nodes listening on every interface (``--listen
tcp:0:interface=0.0.0.0``) and advertising the address their host reaches the master from,
the first node on each host hosting that host's mapper on port 4369 for everyone, the
master found as ``tcp:hosta:2013`` through the hosts file, or (the three-host test) by
name, ``--master skymaster@hosta``, through hosta's mapper, the master listening on an
ephemeral port. The figures printed here are in
docs/reliability.md, "Across hosts".
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address

from skyproto import tap
from skyproto.endpoints import endpoint_host
from skyproto.testing import wait_until

from .hosts import (
    EVENT_LINE,
    NAME_LINE,
    PROBE_LINE,
    REPO,
    Host,
    HostDaemon,
    Network,
    hosts,
    hosts_sweep,
    list_namespaces,
    shim_support,
    wait_line,
)

__all__ = ["hosts", "hosts_sweep"]

pytestmark = pytest.mark.hosts

MASTER = "tcp:hosta:2013"
BY_NAME = "skymaster@hosta"  #: the master found through hosta's mapper (issue 14)
EPHEMERAL = "tcp:0:interface=0.0.0.0"  #: a master on every interface, on any free port
NODE_LISTEN = "tcp:0:interface=0.0.0.0"
CLIENT = str(REPO / "examples" / "client.py")
WAIT = 20.0  #: seconds for a daemon to get somewhere
CUT = 8.0  #: seconds hostb stays cut off in the partition test
DETECT_LIMIT = 3.0  #: callers see errors within this many seconds of the cut (issue 14)
#: The heartbeat timeout (3 s) counts from the last frame received before the cut, so
#: errors come just under 3 s after it, plus how late two busy cores run the timer.
TIMER_SLACK = 0.25
HEAL_LIMIT = 2.0  #: issue 14: hostb serves again within this many seconds of the heal


def start_master(host: Host, name: str = "master", listen: str | None = None) -> HostDaemon:
    """``twistd skymaster`` on ``host``: on its address, port 2013 (or on ``listen``)."""
    master = host.start("skymaster", "--listen", listen or f"tcp:2013:interface={host.address}",
                        name=name)
    wait_line(master, r"skymaster listening on tcp:")
    return master


def start_node(host: Host, harbor: int, name: str, *args: str, echo: str | None = None,
               probe: str | None = None, watch: str | None = None,
               master: str = MASTER) -> HostDaemon:
    """``twistd skynode`` on ``host``, as operations.md's walk-through runs one: every
    interface, the master by host name; ``echo``: a HostEcho under that name; ``probe``:
    a Prober calling those names (and watching who holds those in ``watch``)."""
    env: dict[str, str] = {"SKYH_WATCH": watch} if watch else {}
    services: list[str] = []
    if echo is not None:
        env["SKYH_ECHO"] = echo
        services += ["--service", "tests.hosts:HostEcho"]
    if probe is not None:
        env["SKYH_PROBE"] = probe
        services += ["--service", "tests.hosts:Prober"]
    return host.start("skynode", "--harbor", str(harbor), "--name", name, "--master", master,
                      "--listen", NODE_LISTEN, *services, *args, name=name, env=env)


def joined(daemon: HostDaemon, times: int = 1) -> None:
    wait_until(lambda: len(daemon.search_all(r"joined the master at")) >= times or
               _exited(daemon), f"{daemon.name} to join the master ({times})", WAIT)
    assert daemon.process.poll() is None, daemon.output()


def _exited(daemon: HostDaemon) -> bool:
    if daemon.process.poll() is not None:
        raise AssertionError(f"{daemon.name} exited:\n{daemon.output()}")
    return False


def status(host: Host, master: str = MASTER) -> dict[str, Any] | None:
    """The master's table as ``skyproto status --json`` prints it on ``host`` (None if no
    master answers)."""
    done = host.skyproto("status", "--master", master, "--json", "--timeout", "3")
    if done.returncode != 0:
        return None
    table: dict[str, Any] = json.loads(done.stdout)
    return table


def gate(host: Host, *request: str) -> str | None:
    """One request through the gate on ``host``'s loopback with examples/client.py."""
    done = host.run(sys.executable, CLIENT, "--gate", "tcp:127.0.0.1:8888", "--timeout", "5",
                    *request)
    return done.stdout.strip() if done.returncode == 0 else None


def probes(daemon: HostDaemon) -> list[dict[str, Any]]:
    """Every outcome change a Prober logged: target, outcome, at, sent, detail."""
    found = []
    for match in PROBE_LINE.finditer(daemon.output()):
        if match.group("target") in ("name", "event"):
            continue
        found.append(dict(match.groupdict(), at=float(match["at"]), sent=float(match["sent"])))
    return found


def first(daemon: HostDaemon, target: str, after: float,
          ok: bool) -> dict[str, Any] | None:
    """The first outcome change of ``target`` logged after ``after`` to ok (or not ok)."""
    for line in probes(daemon):
        if line["target"] == target and line["at"] >= after and \
                (line["outcome"] == "ok") == ok:
            return line
    return None


def current(daemon: HostDaemon, target: str) -> str | None:
    lines = [line for line in probes(daemon) if line["target"] == target]
    return lines[-1]["outcome"] if lines else None


def holders(daemon: HostDaemon, name: str) -> list[tuple[float, str]]:
    return [(float(m["at"]), m["handle"]) for m in NAME_LINE.finditer(daemon.output())
            if m["name"] == name]


def wait_all(conditions: dict[str, Callable[[], Any]], timeout: float) -> dict[str, Any]:
    """Wait until every condition holds (each at most ``timeout`` s from now); results."""
    results: dict[str, Any] = {}

    def all_done() -> bool:
        for what, condition in conditions.items():
            if what not in results:
                value = condition()
                if value:
                    results[what] = value
        return len(results) == len(conditions)

    with contextlib.suppress(TimeoutError):
        wait_until(all_done, f"{sorted(set(conditions) - set(results))}", timeout)
    return results


# --------------------------------------------------------------------------- advertising


class FakePort:
    def __init__(self, host: str, port: int) -> None:
        self.address = IPv6Address("TCP", host, port) if ":" in host else \
            IPv4Address("TCP", host, port)

    def getHost(self) -> IPv4Address | IPv6Address:
        return self.address


def test_a_node_on_every_interface_advertises_its_route_to_the_master():
    """(No namespaces needed: these run everywhere.) The route lookup sends nothing."""
    everywhere: Any = FakePort("0.0.0.0", 7001)
    assert tap.advertised_address(everywhere, NODE_LISTEN, toward="tcp:127.0.0.1:2013") == \
        "tcp:127.0.0.1:7001"
    assert tap.advertised_address(everywhere, NODE_LISTEN, toward=[  # the first with a host
        "unix:/run/m.sock", "tcp:host=127.0.0.2:port=2013"]) == "tcp:127.0.0.1:7001"
    # no master, or none that resolves: the host's name, as before
    fallback = f"tcp:{socket.getfqdn()}:7001"
    assert tap.advertised_address(everywhere, NODE_LISTEN) == fallback
    assert tap.advertised_address(everywhere, NODE_LISTEN, toward="loopback:m") == fallback
    one: Any = FakePort("10.0.0.5", 7001)  # one address: that one, whatever the master
    assert tap.advertised_address(one, None, toward="tcp:127.0.0.1:2013") == "tcp:10.0.0.5:7001"
    assert tap.route_source_address("no-such-host.invalid") is None
    assert endpoint_host("tcp:hosta:2013") == "hosta"
    assert endpoint_host("skytls:host=10.0.0.1:port=2013") == "10.0.0.1"
    assert endpoint_host("tcp:2013:interface=10.0.0.1") is None  # a server string
    assert endpoint_host("unix:/run/m.sock") is None


def test_the_mapper_a_node_hosts_listens_where_the_node_does():
    everywhere: Any = FakePort("0.0.0.0", 7001)
    local: Any = FakePort("127.0.0.1", 7001)
    default = "tcp:4369:interface=127.0.0.1"
    assert tap.hosted_mapper_endpoint(None, default, 4369, everywhere) == "tcp:4369"
    assert tap.hosted_mapper_endpoint(None, default, 4369, local) == default
    assert tap.hosted_mapper_endpoint("10.0.0.5", default, 4369, local) == \
        "tcp:4369:interface=10.0.0.5"
    assert tap.hosted_mapper_endpoint("::", default, 4369, local) == \
        "tcp:4369:interface=\\:\\:"
    assert tap.hosted_mapper_endpoint("unix:/run/m.sock", default, 4369, everywhere) == \
        "unix:/run/m.sock"
    unix = "unix:/run/sky/mapper.sock:mode=600:lockfile=1"  # not tcp: left alone
    assert tap.hosted_mapper_endpoint(None, unix, 4369, everywhere) == unix


# --------------------------------------------------------------------------- the layer


SINK = r"""
import socket, sys, threading
server = socket.create_server(("0.0.0.0", 5001))
print("listening", flush=True)
def serve(conn):
    with conn:
        total = 0
        while chunk := conn.recv(65536):
            total += len(chunk)
        conn.sendall(str(total).encode())
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

PROBE = r"""
import socket, sys, time
host, size, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
start = time.monotonic()
try:
    conn = socket.create_connection((host, 5001), timeout=timeout)
except OSError as e:
    print("error", type(e).__name__, round(time.monotonic() - start, 3))
    raise SystemExit(0)
connected = time.monotonic()
conn.sendall(b"x" * size)
conn.shutdown(socket.SHUT_WR)
got = conn.recv(64)
print("ok", round(connected - start, 4), round(time.monotonic() - connected, 3), got.decode())
"""


def measure(host: Host, target: str, size: int = 0, timeout: float = 2.0) -> list[str]:
    """From ``host``: connect to the sink on ``target``, send ``size`` bytes; the words
    ``ok CONNECT_S TRANSFER_S RECEIVED`` or ``error TYPE AFTER_S``."""
    done = host.python(PROBE, target, str(size), str(timeout), timeout=timeout + 30)
    return done.stdout.split()


def test_the_layer_partitions_shapes_and_delays_links_and_leaves_nothing(hosts):
    reason = shim_support()
    if reason is not None:
        pytest.skip(reason)
    net: Network = hosts(2, shim=["hostb"])
    a, b = net.hosts
    assert a.python("import socket; print(socket.gethostname(), "
                    "socket.gethostbyname('hostb'))").stdout.split() == ["hosta", b.address]
    mapper = b.start("skymapper", "--listen", "tcp:4369", name="mapper")  # to see it go
    wait_line(mapper, r"skymapper listening")
    sink = b.spawn(sys.executable, "-u", "-c", SINK)
    assert sink.stdout is not None and sink.stdout.readline().strip() == "listening"

    plain = measure(a, "hostb", 1 << 20)
    b.set_link(delay=0.05)
    delayed = measure(a, "hostb")
    b.set_link(loss=1.0)
    lost = measure(a, "hostb", timeout=1.0)
    forwarded, dropped = b.link_stats()
    b.set_link()
    b.shape("4mbit")
    shaped = measure(a, "hostb", 1 << 20, timeout=5)
    b.unshape()
    b.partition()
    cut_in = measure(a, "hostb", timeout=1.0)
    cut_out = measure(b, "hosta", timeout=1.0)
    local = measure(b, "127.0.0.1", timeout=1.0)
    b.heal()
    healed = measure(a, "hostb")
    print(f"\nlayer: plain: connect {plain[1]} s, 1 MiB in {plain[2]} s; shim 50 ms each "
          f"way: connect {delayed[1]} s; shim 100 % loss: {' '.join(lost)} (forwarded "
          f"{forwarded}, dropped {dropped} frames); tbf 4 Mbit/s: 1 MiB in {shaped[2]} s; "
          f"cut: in {' '.join(cut_in)}, out {' '.join(cut_out)}, own loopback connect "
          f"{local[1]} s; healed: connect {healed[1]} s")
    assert plain[0] == "ok" and plain[3] == str(1 << 20) and float(plain[2]) < 1.0, plain
    assert delayed[0] == "ok" and 0.09 <= float(delayed[1]) < 0.5, delayed  # one round trip
    assert lost[:2] == ["error", "TimeoutError"] and dropped > 0, lost
    assert shaped[0] == "ok" and float(shaped[2]) >= 1.5, shaped  # 8 Mbit at 4 Mbit/s: ~2 s
    # a partition is silence, both ways: no RST (refused), no local error (EPERM)
    assert cut_in[:2] == ["error", "TimeoutError"], cut_in
    assert cut_out[:2] == ["error", "TimeoutError"], cut_out
    assert local[0] == "ok", local  # the host's own loopback is not cut
    assert healed[0] == "ok", healed

    # what the fixture does after every test, passed or failed, leaves nothing behind
    namespaces = [host.namespace for host in net] + [net.switch]
    shim = b.shim
    assert shim is not None
    assert not net.cleanup()
    assert not set(namespaces) & set(list_namespaces())
    assert not [ns for ns in namespaces if (Path("/etc/netns") / ns).exists()]
    assert mapper.process.poll() is not None and sink.poll() is not None
    assert shim.poll() is not None
    assert not net.workdir.exists()


# --------------------------------------------------------------------------- the cluster


def test_three_hosts_gate_client_and_a_node_started_after_the_master_restarted(hosts):
    """The master listens on an ephemeral port and registers as skymaster with hosta's
    mapper (which it hosts, being first there); every node is given ``--master
    skymaster@hosta`` and no port, and finds the restarted master on its new port."""
    net: Network = hosts(3)
    a, b, c = net.hosts
    master = start_master(a, listen=EPHEMERAL)
    wait_line(master, r"registered as skymaster@hosta with the mapper")
    first_port = int(wait_line(master, r"skymaster listening on tcp:[\d.]+:(\d+)")[1])
    a1 = start_node(a, 1, "a1", echo="ECHO_A", master=BY_NAME)
    b1 = start_node(b, 2, "b1", "--service", "simpledb", master=BY_NAME)
    # c1 advertises its node name: whoever dials it asks hostc's mapper where it is
    c1 = start_node(c, 3, "c1", "--gate", "tcp:8888:interface=127.0.0.1",
                    "--advertise", "c1@hostc", echo="ECHO_C", master=BY_NAME)
    for node in (a1, b1, c1):
        joined(node)

    # a client on hostc, through hostc's gate, to SIMPLEDB on hostb
    assert wait_until(lambda: gate(c, "SET", "greeting", "hello hosts"),
                      "SET through the gate on hostc", WAIT) == "OK"
    assert gate(c, "GET", "greeting") == "VALUE hello hosts"

    # a node advertises its host's address (the route to the master), not 0.0.0.0
    table = wait_until(lambda: status(a, BY_NAME), "the master's table", WAIT)
    endpoints = {row["name"]: row["endpoint"] for row in table["harbors"]}
    assert endpoints.pop("c1@hostc") == "c1@hostc", table
    assert set(endpoints) == {"a1@hosta", "b1@hostb"}, table
    for host in (a, b):
        node = f"{host.name[-1]}1@{host.name}"
        assert re.fullmatch(rf"tcp:{re.escape(host.address)}:\d+", endpoints[node]), endpoints
    # each host's mapper, run by its first node, answers the other hosts on port 4369
    for asker, host in ((c, b), (a, c), (b, a)):
        names = asker.skyproto("names", "--mapper", f"tcp:{host.name}:4369", check=True)
        assert f"name {host.name[-1]}1 at port" in names.stdout, names.stdout
    listed = b.skyproto("names", "--mapper", "tcp:hosta:4369", check=True).stdout
    assert f"name skymaster at port {first_port}" in listed, listed

    # the master restarts (on another ephemeral port); every node re-joins, asking hosta's
    # mapper again; a node started on hostb after that reaches the old nodes on hosta and
    # hostc (c1 through hostc's mapper)
    master.kill()
    restarted = time.time()
    master2 = start_master(a, name="master2", listen=EPHEMERAL)
    listening = time.time()
    second_port = int(wait_line(master2, r"skymaster listening on tcp:[\d.]+:(\d+)")[1])
    for node in (a1, b1, c1):
        joined(node, times=2)
    rejoined = time.time()
    started = time.time()
    b2 = start_node(b, 4, "b2", probe="ECHO_A,ECHO_C", master=BY_NAME)
    joined(b2)
    wait_until(lambda: current(b2, "ECHO_A") == current(b2, "ECHO_C") == "ok",
               "b2 to call ECHO_A on hosta and ECHO_C on hostc", WAIT)
    reached = max(line["at"] for line in probes(b2))
    print(f"\nthree hosts: master restarted (listening {listening - restarted:.2f} s after "
          f"the start command), a1, b1, c1 re-joined {rejoined - listening:.2f} s after it "
          f"listened (seen in their logs); b2 on hostb called hosta and hostc "
          f"{reached - started:.2f} s after its start command")
    assert not [p for p in probes(b2) if p["outcome"] != "ok"], probes(b2)
    assert c.skyproto("names", check=True).stdout.count("name c1 at port") == 1
    assert gate(c, "GET", "greeting") == "VALUE hello hosts"  # b1 kept its data
    names = b.skyproto("names", check=True).stdout
    assert "name b1 at port" in names and "name b2 at port" in names, names
    listed = c.skyproto("names", "--mapper", "tcp:hosta:4369", check=True).stdout
    assert f"name skymaster at port {second_port}" in listed, (first_port, listed)
    table = wait_until(lambda: status(c, BY_NAME), "the new master's table", WAIT)
    assert {row["name"] for row in table["harbors"]} == {
        "a1@hosta", "b1@hostb", "c1@hostc", "b2@hostb"}, table
    assert table["names"]["SIMPLEDB"] == 0x02000002, table


def test_a_partitioned_host_fails_fast_holds_no_name_twice_and_comes_back(hosts):
    net: Network = hosts(3)
    a, b, c = net.hosts
    master = start_master(a)
    a1 = start_node(a, 1, "a1", echo="ECHO_A", probe="SIMPLEDB,ECHO_B")
    b1 = start_node(b, 2, "b1", "--service", "simpledb", echo="ECHO_B",
                    probe="ECHO_A,ECHO_C", watch="SIMPLEDB")
    joined(b1)
    wait_line(b1, r"name SIMPLEDB is :")
    # a warm standby on hostc: it asks for SIMPLEDB when the master says the name is gone
    c1 = start_node(c, 3, "c1", "--service", "tests.hosts:Standby", echo="ECHO_C",
                    probe="SIMPLEDB,ECHO_B")
    callers = {a1: ("SIMPLEDB", "ECHO_B"), b1: ("ECHO_A", "ECHO_C"), c1: ("SIMPLEDB", "ECHO_B")}
    for node in callers:
        joined(node)
    primary = wait_line(b1, r"service SimpleDB is (:[0-9a-f]{8})")[1]
    standby = wait_line(c1, r"service Standby is (:[0-9a-f]{8})")[1]
    wait_until(lambda: all(current(node, target) == "ok"
                           for node, targets in callers.items() for target in targets),
               "every caller's calls to succeed", WAIT)

    cut = time.time()
    b.partition()
    failed = wait_all({f"{node.name}->{target}": (
        lambda node=node, target=target: first(node, target, cut, ok=False))
        for node, targets in callers.items() for target in targets}, timeout=15)
    master_dropped = wait_line(master, r"harbor 2 left: .*")[0]
    took_over_at = float(wait_line(c1, r"standby holds SIMPLEDB at ([\d.]+)")[1])
    took_over = took_over_at - cut
    tables: list[tuple[float, dict[str, Any] | None]] = []
    while time.time() < cut + CUT:  # hold the cut; meanwhile sample the master's table
        tables.append((time.time(), status(a)))

    healed = time.time()
    b.heal()
    back = wait_all({
        **{f"{node.name}->{target}": (lambda node=node, target=target:
                                      first(node, target, healed, ok=True))
           for node, targets in callers.items() for target in targets if target != "SIMPLEDB"},
        "hostb in the master's table": lambda: event_after(a1, r"HarborJoined\(.*harbor=2,",
                                                           healed),
        "b1 drops SIMPLEDB": lambda: holder_after(b1, "SIMPLEDB", standby, healed),
    }, timeout=20)
    tables.append((time.time(), status(a)))

    detect = {what: round(line["at"] - cut, 2) for what, line in failed.items()}
    kinds = sorted({line["outcome"] for line in failed.values()})
    recover = {what: round((value["at"] if isinstance(value, dict) else value) - healed, 2)
               for what, value in back.items()}
    b1_believed = back.get("b1 drops SIMPLEDB")
    print(f"\npartition of hostb for {CUT:g} s: first errors after {detect} s ({kinds}); "
          f"master: {master_dropped!r}; the standby on hostc held SIMPLEDB {took_over:.2f} s "
          f"after the cut, while cut-off b1 still took it for its own for "
          f"{b1_believed - took_over_at if b1_believed else float('nan'):.2f} s (until it "
          f"re-joined); after the heal: {recover} s (issue 14's target: {HEAL_LIMIT:g} s, "
          f"{'met' if recover and max(recover.values()) <= HEAL_LIMIT else 'NOT met'})")

    assert len(detect) == sum(map(len, callers.values())), (detect, net.logs())
    assert max(detect.values()) <= DETECT_LIMIT + TIMER_SLACK, detect
    assert kinds == ["HarborDown"], kinds  # the failure detector, not call timeouts
    # no name held twice: the master's table moves SIMPLEDB from b1 to the standby once,
    # never back; after the heal every node, b1 too, agrees on the standby
    sequence = [table["names"].get("SIMPLEDB") for _, table in tables if table is not None]
    handles = [f":{h:08x}" for i, h in enumerate(sequence) if h is not None and
               (i == 0 or h != sequence[i - 1])]
    assert handles and set(handles) <= {primary, standby} and handles[-1] == standby, handles
    assert handles.count(standby) == 1 and handles.count(primary) <= 1, handles
    for node in callers:
        views = holders(node, "SIMPLEDB")
        assert views and views[-1][1] == standby, (node.name, views)
    assert b1.search(r"name SIMPLEDB is not this node's"), b1.output()
    assert len(recover) == 4 + 2, (recover, net.logs())
    assert max(recover.values()) <= HEAL_LIMIT, recover


def event_after(daemon: HostDaemon, pattern: str, after: float) -> float | None:
    """When the Prober of ``daemon`` logged a cluster event matching ``pattern``, after
    ``after``."""
    for match in EVENT_LINE.finditer(daemon.output()):
        at = float(match["at"])
        if at >= after and re.search(pattern, match["event"]):
            return at
    return None


def holder_after(daemon: HostDaemon, name: str, handle: str, after: float) -> float | None:
    """When ``daemon`` first saw ``handle`` as the holder of ``name``, after ``after``."""
    for at, held in holders(daemon, name):
        if at >= after and held == handle:
            return at
    return None


def test_a_heal_just_after_a_dropped_connect_attempt_is_served_within_2_s(hosts):
    """Heal just after the cut-off node's master client sent a SYN (its third since it lost
    the master), the moment the next one is furthest away. Each connect attempt may take
    5 s (master/client.py), so how soon the node re-joins depends on how often the kernel
    resends a SYN: here after 1 s, then every 0.5 s (measured with the cut's counter)."""
    net: Network = hosts(2)
    a, b = net.hosts
    start_master(a)
    a1 = start_node(a, 1, "a1", probe="ECHO_B")
    b1 = start_node(b, 2, "b1", echo="ECHO_B")
    joined(b1)
    joined(a1)
    wait_until(lambda: current(a1, "ECHO_B") == "ok", "a1 to call ECHO_B", WAIT)
    cut = time.time()
    b.partition(count_syns_to=2013)
    wait_line(b1, r"lost the master at", timeout=15)
    syns: list[float] = []

    def third_syn() -> bool:
        while b.dropped_syns() > len(syns):
            syns.append(time.time() - cut)
        return len(syns) >= 3

    wait_until(third_syn, "b1's third SYN to the master", 15, interval=0.01)
    healed = time.time()
    b.heal()
    back = wait_all({
        "a1->ECHO_B": lambda: first(a1, "ECHO_B", healed, ok=True),
        "hostb in the master's table": lambda: event_after(a1, r"HarborJoined\(.*harbor=2,",
                                                           healed)}, timeout=20)
    recover = {what: round((value["at"] if isinstance(value, dict) else value) - healed, 2)
               for what, value in back.items()}
    print(f"\nb1's SYNs to the master {[round(t, 2) for t in syns]} s after the cut; healed "
          f"{healed - cut:.2f} s after it; back after {recover} s")
    assert len(recover) == 2, (recover, net.logs())
    assert max(recover.values()) <= HEAL_LIMIT, recover


SLOW_CALLER = r'''
import json, sys, time
from twisted.internet import task
from twisted.internet.defer import DeferredSemaphore, gatherResults
from twisted.logger import globalLogPublisher, formatEvent
from skyproto.auth import load_secret
from skyproto.node.node import Node

silent = []
globalLogPublisher.addObserver(
    lambda e: silent.append(formatEvent(e)) if "silent for" in formatEvent(e) else None)


async def main(reactor):
    address, calls, big = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    node = Node(7, reactor, load_secret(), default_timeout=120)
    await node.listen(f"tcp:0:interface={address}")
    node.join_master("tcp:hosta:2013", "slow@hostb")
    started = time.monotonic()
    while "ECHO_A" not in node.membership.names:
        if time.monotonic() - started > 20:
            raise SystemExit("no ECHO_A within 20 s")
        await task.deferLater(reactor, 0.05, lambda: None)
    gate = DeferredSemaphore(20)
    outcomes = []

    async def one(i):
        try:
            outcomes.append((await node.call("ECHO_A", i, timeout=60)) == i)
        except Exception as e:
            outcomes.append(repr(e))

    began = time.monotonic()
    await gatherResults([gate.run(lambda i=i: task.Deferred.fromCoroutine(one(i)))
                         for i in range(calls)])
    small = time.monotonic() - began
    payload = b"b" * big
    began = time.monotonic()
    echoed = await node.call("ECHO_A", payload, timeout=120)
    large = time.monotonic() - began
    bad = [o for o in outcomes if o is not True]
    print(json.dumps({"ok": len(outcomes) - len(bad), "bad": bad[:3], "small_s": small,
                      "large_ok": echoed == payload, "large_s": large, "silent": silent}))
    await node.stop()


task.react(main)
'''


@pytest.mark.parametrize("link,calls,big", [
    ("50 ms each way, 1 % loss", 1000, 8 << 20),
    ("20 Mbit/s", 1000, 8 << 20),
])
def test_slow_and_lossy_links_lose_no_call_and_declare_no_link_silent(
        hosts: Callable[..., Network], link: str, calls: int, big: int) -> None:
    reason = shim_support()
    if reason is not None:
        pytest.skip(reason)
    net: Network = hosts(2, shim=["hostb"])
    a, b = net.hosts
    master = start_master(a)
    a1 = start_node(a, 1, "a1", echo="ECHO_A")
    joined(a1)
    if "loss" in link:
        b.set_link(delay=0.05, loss=0.01)
    else:
        b.shape("20mbit", burst="128kb", latency="400ms")
    done = b.python(SLOW_CALLER, b.address, str(calls), str(big), timeout=240)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    stats = b.link_stats() if "loss" in link else None
    print(f"\n{link}: {result['ok']} of {calls} small calls answered in "
          f"{result['small_s']:.1f} s; a {big >> 20} MiB echo in {result['large_s']:.1f} s"
          + (f"; shim forwarded {stats[0]} frames, dropped {stats[1]}" if stats else ""))
    assert result["ok"] == calls, result["bad"]
    assert result["large_ok"], result
    assert result["silent"] == [], result["silent"]  # no link was declared silent
    assert "silent for" not in a1.output() and "silent for" not in master.output()


def test_the_node_hosting_a_hosts_mapper_dies_and_another_takes_it_over(
        hosts: Callable[..., Network]) -> None:
    """b1 started first on hostb, so it runs hostb's mapper; kill -9 it: b2 (also on hostb)
    takes the mapper over and re-registers; other hosts find b2 by name there again, and a
    caller on hosta never stops reaching b2."""
    net: Network = hosts(2)
    a, b = net.hosts
    start_master(a)
    b1 = start_node(b, 2, "b1", echo="ECHO_B1")
    wait_line(b1, r"started the mapper on")
    b2 = start_node(b, 3, "b2", echo="ECHO_B2")
    wait_line(b2, r"registered b2 with the mapper")
    caller = start_node(a, 1, "a1", probe="ECHO_B2")
    for node in (b1, b2, caller):
        joined(node)
    wait_until(lambda: current(caller, "ECHO_B2") == "ok", "a1 calling ECHO_B2", WAIT)
    names = a.skyproto("names", "--mapper", "tcp:hostb:4369", check=True).stdout
    assert "name b1 at port" in names and "name b2 at port" in names, names

    b1.kill()
    killed = time.time()

    def taken_over() -> bool:
        listed = a.skyproto("names", "--mapper", "tcp:hostb:4369", timeout=10)
        return listed.returncode == 0 and "name b2 at port" in listed.stdout \
            and "name b1 at port" not in listed.stdout

    wait_until(taken_over, "b2 to run hostb's mapper with its own registration", WAIT)
    took = time.time() - killed
    assert b2.search(r"started the mapper on"), b2.output()[-2000:]
    failed = [p for p in probes(caller) if p["target"] == "ECHO_B2" and p["outcome"] != "ok"]
    print(f"\nmapper host killed: b2 ran hostb's mapper and was listed there again "
          f"{took:.2f} s later; a1's calls to ECHO_B2 failed {len(failed)} times")
    assert not failed, failed
    assert current(caller, "ECHO_B2") == "ok"
