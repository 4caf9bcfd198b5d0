"""skyproto.testing itself: waiting, settling, and the in-memory cluster with its faults."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock

from skyproto.errors import HarborDown
from skyproto.services import Echo
from skyproto.testing import (
    InMemoryCluster,
    WaitTimeout,
    connections_of,
    settle,
    wait_for,
    wait_until,
)

from .cluster import Parked, failure_of, result_of

# --- wait_for / wait_until ----------------------------------------------------------------


def test_wait_for_fires_with_the_first_truthy_value_polled_on_the_clock() -> None:
    clock = Clock()
    box: list[int] = []
    asked: list[float] = []

    def condition() -> int | None:
        asked.append(clock.seconds())
        return box[0] if box else None

    d = wait_for(condition, "a value", timeout=5, clock=clock, interval=0.5)
    assert asked == [0.0]  # asked at once
    clock.advance(0.5)
    box.append(7)
    assert not d.called
    clock.advance(0.5)
    assert result_of(d) == 7
    assert asked == [0.0, 0.5, 1.0]
    assert not clock.getDelayedCalls()


def test_wait_for_is_synchronous_when_the_condition_already_holds() -> None:
    assert result_of(wait_for(lambda: "yes", "it", clock=Clock())) == "yes"


def test_wait_for_times_out_at_the_deadline_naming_what_it_waited_for() -> None:
    clock = Clock()
    d: Deferred[list[int]] = wait_for(lambda: [], "the list to fill", timeout=2, clock=clock,
                                      interval=0.3)
    clock.advance(1.99)
    assert not d.called
    clock.advance(0.01)  # asked last at the deadline itself
    error = failure_of(d, WaitTimeout).value
    assert isinstance(error, WaitTimeout) and isinstance(error, TimeoutError)
    assert str(error) == "timed out after 2 s waiting for the list to fill (last: [])"
    assert (error.what, error.timeout, error.last) == ("the list to fill", 2, [])
    assert not clock.getDelayedCalls()


def test_wait_for_fails_with_what_the_condition_raised_and_can_be_cancelled() -> None:
    clock = Clock()

    def broken() -> None:
        raise KeyError("gone")

    failure_of(wait_for(broken, "x", clock=clock), KeyError)
    d: Deferred[object] = wait_for(lambda: None, "never", clock=clock)
    d.cancel()
    failure_of(d, CancelledError)
    assert not clock.getDelayedCalls()
    with pytest.raises(ValueError, match="interval"):
        wait_for(lambda: None, "x", clock=clock, interval=0)


@pytest_twisted.ensureDeferred
async def test_wait_for_on_the_real_reactor() -> None:
    from twisted.internet import reactor

    flag: list[bool] = []
    reactor.callLater(0.05, flag.append, True)
    assert await wait_for(lambda: flag, "the flag", timeout=5, clock=reactor,
                          interval=0.01) == [True]
    with pytest.raises(WaitTimeout, match=r"after 0.05 s waiting for nothing"):
        await wait_for(lambda: False, "nothing", timeout=0.05, clock=reactor, interval=0.01)


def test_wait_until_blocks_with_the_same_deadline_rules() -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    values = iter([0, 0, 3])
    assert wait_until(lambda: next(values), "three", interval=0.25, now=lambda: now[0],
                      sleep=sleep) == 3
    assert slept == [0.25, 0.25]
    slept.clear()
    with pytest.raises(WaitTimeout, match=r"^timed out after 1 s waiting for zero \(last: 0\)$"):
        wait_until(lambda: 0, "zero", timeout=1, interval=0.4, now=lambda: now[0], sleep=sleep)
    assert slept == [0.4, 0.4, pytest.approx(0.2)]  # the last nap ends at the deadline


# --- settle --------------------------------------------------------------------------------


def test_settle_runs_what_is_due_then_the_given_time_then_until_quiet() -> None:
    clock = Clock()
    ran: list[tuple[str, float]] = []

    def chain(n: int) -> None:  # work that schedules more work at once
        ran.append((f"chain{n}", clock.seconds()))
        if n < 3:
            clock.callLater(0, chain, n + 1)

    clock.callLater(0, chain, 1)
    clock.callLater(0.3, lambda: ran.append(("later", clock.seconds())))
    assert settle(clock)
    assert ran == [("chain1", 0), ("chain2", 0), ("chain3", 0)]
    assert settle(clock, 0.5, step=0.1)
    assert ran[-1][0] == "later" and clock.seconds() == pytest.approx(0.5)


def test_settle_waits_out_a_horizon_and_gives_up_at_its_step_limit() -> None:
    clock = Clock()
    clock.callLater(0.2, lambda: None)
    assert settle(clock, horizon=0.5, step=0.05)
    assert clock.seconds() == pytest.approx(0.2) and not clock.getDelayedCalls()

    def beat() -> None:  # a heartbeat: always something due within a second
        clock.callLater(0.1, beat)

    beat()
    assert settle(clock) is True  # the default horizon is now: the beat waits
    assert settle(clock, horizon=1.0, max_steps=50) is False


# --- the in-memory cluster -----------------------------------------------------------------


def test_the_cluster_builds_and_a_call_goes_through_by_name() -> None:
    cluster = InMemoryCluster()
    a = cluster.add_node(1)
    b = cluster.add_node(2, [Echo()], name="beta@testing")
    parked = Parked()
    cluster.add_node(3, {"PARKED": parked})
    assert cluster.master is not None and cluster.master.connected() == 3
    assert [(r.harbor, r.node) for r in cluster.master.registry.snapshot().harbors] == [
        (1, "n1@testing"), (2, "beta@testing"), (3, "n3@testing")]
    assert a.membership.names == {"ECHO": b.resolve("ECHO"), "PARKED": 0x03000002}
    d = a.call("ECHO", "hello")
    assert cluster.settle()
    assert result_of(d) == "hello"
    a.call("PARKED", "wait")
    cluster.settle()
    assert len(parked.waiting) == 1
    with pytest.raises(ValueError, match="harbor 2 is already running"):
        cluster.add_node(2)


def test_crash_fails_calls_to_the_node_with_harbor_down() -> None:
    cluster = InMemoryCluster()
    a = cluster.add_node(1)
    b = cluster.add_node(2, {"SLOW": Parked()})
    pending = a.call("SLOW", "never answered")
    cluster.settle()
    assert {c.name for c in connections_of(b)} == {"master", "h1-1"}  # master, link from a
    cluster.crash(b)
    failure_of(pending, HarborDown)
    failure_of(a.call(0x02000002, "anyone?"), HarborDown)
    assert connections_of(b) == ()
    assert [c.name for c in cluster.network.connections] == ["master"]  # a's only
    assert cluster.master is not None and list(cluster.master.joined) == [1]
    assert 2 not in a.membership.harbors and "SLOW" not in a.membership.names
    assert 2 not in cluster.nodes
    with pytest.raises(ValueError, match="not a live node"):
        cluster.crash(b)


def test_restart_brings_the_harbor_back_as_a_new_incarnation() -> None:
    cluster = InMemoryCluster()
    a = cluster.add_node(1)
    b = cluster.add_node(2, [Echo()], name="beta@testing")
    b2 = cluster.restart(b, [Echo()])  # crashes the live b first
    assert b2 is not b and b2.harbor == 2 and b2.incarnation > b.incarnation
    assert cluster.nodes == {1: a, 2: b2}
    assert cluster.master is not None
    (record,) = [r for r in cluster.master.registry.snapshot().harbors if r.harbor == 2]
    assert (record.node, record.incarnation) == ("beta@testing", b2.incarnation)
    d = a.call("ECHO", "back")
    cluster.settle()
    assert result_of(d) == "back"


def test_killed_master_nodes_keep_calling_and_rejoin_the_new_one() -> None:
    cluster = InMemoryCluster()
    a = cluster.add_node(1)
    cluster.add_node(2, [Echo()])
    cluster.kill_master()
    assert cluster.master is None and a.master is not None and not a.master.connected
    d = a.call("ECHO", "no master needed")  # from the cache, over the existing link
    cluster.settle()
    assert result_of(d) == "no master needed"
    with pytest.raises(RuntimeError, match="did not join the master: no welcome"):
        cluster.add_node(3)
    assert 3 not in cluster.nodes
    master = cluster.start_master()
    cluster.run_until(lambda: master.connected() == 2, "both nodes to re-join")
    assert master.registry.snapshot().names == {"ECHO": 0x02000002}
    with pytest.raises(RuntimeError, match="already running"):
        cluster.start_master()
    c = cluster.add_node(3)
    d = c.call("ECHO", "new node, old name")
    cluster.settle()
    assert result_of(d) == "new node, old name"


def test_run_until_gives_up_on_the_clock() -> None:
    cluster = InMemoryCluster()
    started = cluster.clock.seconds()
    with pytest.raises(WaitTimeout, match="waiting for a miracle"):
        cluster.run_until(lambda: None, "a miracle", timeout=3)
    assert cluster.clock.seconds() - started == pytest.approx(3, abs=cluster.step)


def test_a_refused_node_is_a_clear_error() -> None:
    cluster = InMemoryCluster()
    cluster.secret = b"not the master's secret"  # nodes added from now on have this one
    with pytest.raises(RuntimeError, match=r"harbor 1 did not join the master: .*secret"):
        cluster.add_node(1)
    assert cluster.nodes == {} and cluster.network.connections == ()
