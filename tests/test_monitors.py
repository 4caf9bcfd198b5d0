"""Monitors (Erlang's erlang:monitor/2) on loopback with a Clock: a service that exits, is
killed, whose harbor goes down or restarts, or that never existed; demonitor."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock

from skyproto.node.node import Node
from skyproto.services import Echo
from skyproto.testing import crash, settle

from .cluster import failure_of, make_node, mesh, result_of


def fired(d: Deferred[str]) -> str | None:
    """What ``d`` fired with so far (None: not yet), leaving its result as it was."""
    box: list[Any] = []

    def keep(result: Any) -> Any:
        box.append(result)
        return result

    d.addBoth(keep)
    return box[0] if box else None


def test_a_local_service_killed_fires_its_monitors_with_the_reason() -> None:
    _, (a,) = mesh(1)
    echo = a.spawn(Echo(), "ECHO")
    first, second = a.monitor(echo), a.monitor(echo)
    assert fired(first) is None
    a.kill(echo, "shut down for the test")
    assert fired(first) == fired(second) == "shut down for the test"
    assert len(a.monitors) == 0


def test_a_monitor_of_nothing_fires_at_once() -> None:
    clock, (a, _) = mesh(2)
    assert result_of(a.monitor(0x01000055)) == "no such service"
    remote = a.monitor(0x02000055)  # asked of harbor 2's node
    settle(clock)
    assert result_of(remote) == "no such service"


def test_a_remote_service_killed_fires_the_monitor_across_the_link() -> None:
    clock, (a, b) = mesh(2)
    echo = b.spawn(Echo())
    watching = a.monitor(echo)
    settle(clock)
    assert fired(watching) is None
    b.kill(echo)
    settle(clock)
    assert fired(watching) == "killed"
    assert len(a.monitors) == 0


def test_a_harbor_that_goes_down_fires_every_monitor_of_its_services() -> None:
    clock, (a, b, c) = mesh(3)
    on_b = [a.monitor(b.spawn(Echo())) for _ in range(2)]
    on_c = a.monitor(c.spawn(Echo()))
    settle(clock)
    crash(b)
    settle(clock, 0.5)
    reasons = [fired(d) for d in on_b]
    assert all(r is not None and "harbor 2" in r for r in reasons), reasons
    assert fired(on_c) is None  # another harbor: still watching


def test_a_harbor_that_restarts_fires_its_monitors() -> None:
    clock, (a, b) = mesh(2)
    echo = b.spawn(Echo())
    watching = a.monitor(echo)
    settle(clock)
    crash(b)
    again = make_node(clock, 2)  # a new incarnation of harbor 2 at the same address
    again.spawn(Echo())
    settle(clock, 3.0)
    reason = fired(watching)
    assert reason is not None and "harbor 2" in reason


def test_a_monitor_made_while_the_harbor_is_unreachable_fires_at_once_or_on_failure() -> None:
    clock, (a,) = mesh(1)
    a.add_peer(9, "loopback:nobody-listens")
    watching = a.monitor(0x09000002)
    settle(clock, 6.0)  # the dial fails; queued frames fail with it
    reason = fired(watching)
    assert reason is not None and "harbor 9" in reason


def test_demonitor_stops_watching_here_and_there() -> None:
    clock, (a, b) = mesh(2)
    echo = b.spawn(Echo())
    watching = a.monitor(echo)
    settle(clock)
    assert b.monitors._theirs  # harbor 2 knows of the monitor
    assert a.demonitor(watching) is True
    assert a.demonitor(watching) is False
    settle(clock)
    assert not b.monitors._theirs  # and forgot it
    b.kill(echo)
    settle(clock)
    assert fired(watching) is None  # never fires


def test_cancelling_a_monitor_is_demonitoring_it() -> None:
    clock, (a, b) = mesh(2)
    watching = a.monitor(b.spawn(Echo()))
    settle(clock)
    watching.cancel()
    failure_of(watching, CancelledError)
    settle(clock)
    assert not b.monitors._theirs and len(a.monitors) == 0


def test_a_stopping_node_ends_its_monitors_and_fires_those_of_others() -> None:
    clock, (a, b) = mesh(2)
    mine = a.monitor(a.spawn(Echo()))
    theirs = b.monitor(a.spawn(Echo()))
    settle(clock)
    a.stop()
    settle(clock, 0.5)
    assert fired(mine) == "the node is stopping"
    reason = fired(theirs)
    assert reason is not None and ("stopping" in reason or "harbor 1" in reason)


def test_killed_services_lose_their_names_too() -> None:
    _, (a,) = mesh(1)
    echo = a.spawn(Echo(), ".local-echo")
    a.kill(echo)
    assert ".local-echo" not in a.names


def test_system_messages_need_a_link_and_the_node_handle() -> None:
    node = Node(3, Clock(), b"system-test-secret!!")
    echo = node.spawn(Echo())
    # a SYSTEM message that did not come over a link (a local send) is ignored
    node._deliver(None, 0x01000001, node.handle, 0, 2, ["monitor", 1, echo])
    assert not node.monitors._theirs
