"""The timer grid: timers due at one grid point share one reactor call, never run early, and
one failing or cancelling timer does not cost the others theirs."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel

from skyproto.wire.heartbeat import HeartbeatTimer
from skyproto.wire.timer_grid import GRID_STEP, TimerGrid, timer_grid


def test_timers_due_at_one_point_share_one_call_and_never_run_early() -> None:
    clock = Clock()
    grid = TimerGrid(clock)
    ran: list[tuple[int, float]] = []

    def record(i: int) -> Callable[[], None]:
        return lambda: ran.append((i, clock.seconds()))

    for i in range(100):  # 0.51 to 0.5199 s, between the grid points 0.5 and 0.53125
        grid.call_at(0.51 + i * 0.0001, record(i))
    assert len(clock.getDelayedCalls()) == 1 and grid.pending == 100
    clock.advance(0.51 + 99 * 0.0001)
    assert ran == []
    clock.advance(17 * GRID_STEP - clock.seconds())  # to the grid point after them
    assert sorted(i for i, _ in ran) == list(range(100))
    assert all(at >= 0.51 + i * 0.0001 for i, at in ran)  # none before its time
    assert all(at - (0.51 + i * 0.0001) <= GRID_STEP for i, at in ran)  # at most a step late
    assert clock.getDelayedCalls() == [] and grid.pending == 0


def test_cancelling_the_last_timer_of_a_point_cancels_its_call() -> None:
    clock = Clock()
    grid = TimerGrid(clock)
    ran: list[str] = []
    first, second = (lambda: ran.append("first")), (lambda: ran.append("second"))
    point = grid.call_at(1.0, first)
    assert grid.call_at(1.0, second) == point
    grid.cancel(point, first)
    assert len(clock.getDelayedCalls()) == 1
    grid.cancel(point, second)
    grid.cancel(point, second)  # twice is harmless
    assert clock.getDelayedCalls() == []
    clock.advance(2.0)
    assert ran == []


def test_a_failing_timer_is_logged_and_the_others_still_run(events: list[LogEvent]) -> None:
    clock = Clock()
    grid = TimerGrid(clock)
    ran: list[int] = []

    def fail() -> None:
        raise RuntimeError("boom")

    grid.call_at(1.0, lambda: ran.append(1))
    grid.call_at(1.0, fail)
    grid.call_at(1.0, lambda: ran.append(2))
    clock.advance(1.0)
    assert sorted(ran) == [1, 2]
    failures = [e for e in events if e.get("log_level") == LogLevel.critical]
    assert len(failures) == 1 and failures[0]["log_failure"].check(RuntimeError)


def test_a_timer_cancelled_by_one_that_ran_before_it_does_not_run() -> None:
    clock = Clock()
    grid = TimerGrid(clock)
    ran: list[str] = []
    callbacks: dict[str, Callable[[], object]] = {}
    points: list[int] = []

    def cancel_the_other(me: str, other: str) -> None:
        ran.append(me)
        grid.cancel(points[0], callbacks[other])

    callbacks["a"] = lambda: cancel_the_other("a", "b")
    callbacks["b"] = lambda: cancel_the_other("b", "a")
    points.append(grid.call_at(1.0, callbacks["a"]))
    grid.call_at(1.0, callbacks["b"])
    clock.advance(1.0)
    assert len(ran) == 1  # whichever ran first cancelled the other


def test_a_timer_set_for_now_by_a_running_one_gets_a_call_of_its_own() -> None:
    """Not run in the same loop (a timer re-arming itself for now would never end it): on a
    new reactor call, which a reactor runs on its next turn."""
    clock = Clock()
    grid = TimerGrid(clock)
    ran: list[str] = []
    calls_then: list[int] = []

    def again() -> None:
        ran.append("first")
        grid.call_at(clock.seconds(), lambda: ran.append("second"))
        calls_then.append(len(clock.getDelayedCalls()))

    grid.call_at(1.0, again)
    clock.advance(1.0)
    assert calls_then == [1] and ran == ["first", "second"]


def test_a_thousand_heartbeat_timers_keep_a_few_dozen_reactor_calls() -> None:
    """The reason for the grid: a mesh of 100 nodes in one process has 9,900 heartbeat timers,
    and with a reactor call each, every beat paid for re-sorting a heap of thousands."""
    clock = Clock()
    beats = [0]

    def beat() -> None:
        beats[0] += 1

    timers = []
    for _ in range(1000):
        clock.advance(0.000997)  # started at 1,000 different moments over one second
        timer = HeartbeatTimer(clock, 1.0, 3.0, beat, lambda quiet: None)
        timer.start()
        timers.append(timer)
    for _ in range(50):
        clock.advance(0.1)
        for timer in timers:
            timer.heard()
        assert len(clock.getDelayedCalls()) <= 1 / GRID_STEP + 1
    assert 4 * 1000 <= beats[0] <= 5 * 1000  # each beat about once a second for 5 s
    for timer in timers:
        timer.stop()
    assert clock.getDelayedCalls() == [] and timer_grid(clock).pending == 0


class SlottedClock:
    """A clock that takes no weak reference (``__slots__``), as a user's own might be."""

    __slots__ = ("clock",)

    def __init__(self) -> None:
        self.clock = Clock()

    def seconds(self) -> float:
        return self.clock.seconds()

    def callLater(self, delay: float, f: Callable[..., object], *args: object) -> object:
        return self.clock.callLater(delay, f, *args)

    def getDelayedCalls(self) -> list[object]:
        return list(self.clock.getDelayedCalls())


def test_a_clock_without_weak_references_still_beats() -> None:
    slotted = SlottedClock()
    beats: list[float] = []
    timer = HeartbeatTimer(slotted, 1.0, 3.0,  # type: ignore[arg-type]
                           lambda: beats.append(slotted.seconds()), lambda quiet: None)
    timer.start()
    for _ in range(24):  # 3 s in steps exact in binary
        slotted.clock.advance(0.125)
        timer.heard()
    assert beats == [1.0, 2.0, 3.0]
    timer.stop()
    assert slotted.getDelayedCalls() == []
