"""Timers that share the reactor's calls: each is rounded up to a point of a fine grid, and
every timer due at one point runs from one ``DelayedCall``.

A node keeps a heartbeat timer per connection, and every beat re-arms it. With one
``callLater`` each, a process holding many connections (a 100-node mesh in one process has
9,900 link ends) keeps thousands of calls in the reactor's heap and pays for re-sorting it
on every beat; on the grid it holds a few dozen. A timer runs at most one step late.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Final

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

#: seconds between grid points: a power of two, so that points are exact in binary
GRID_STEP: Final = 1 / 32

_grids: weakref.WeakKeyDictionary[IReactorTime, TimerGrid] = weakref.WeakKeyDictionary()


def timer_grid(clock: IReactorTime) -> TimerGrid:
    """The grid shared by every timer on ``clock`` (made on first use)."""
    try:
        grid = _grids.get(clock)
    except TypeError:  # a clock that takes no weak reference: a grid for this timer alone
        return TimerGrid(clock)
    if grid is None:
        grid = _grids[clock] = TimerGrid(clock)
    return grid


class TimerGrid:
    """Callbacks due at grid points of ``step`` seconds, one reactor call per point in use."""

    log = Logger()

    def __init__(self, clock: IReactorTime, step: float = GRID_STEP) -> None:
        # Weak: the grid lives in a WeakKeyDictionary keyed by this clock.
        self._clock: Callable[[], IReactorTime | None]
        try:
            self._clock = weakref.ref(clock)
        except TypeError:
            self._clock = lambda: clock
        self.step = step
        self._due: dict[int, dict[Callable[[], object], None]] = {}
        self._calls: dict[int, IDelayedCall] = {}
        #: the point being run, and what of it has not run yet
        self._running: tuple[int, dict[Callable[[], object], None]] | None = None

    def call_at(self, when: float, callback: Callable[[], object]) -> int:
        """Run ``callback`` at the first grid point at or after ``when`` (clock seconds);
        returns that point, which :meth:`cancel` takes."""
        point = -int(-when // self.step)
        due = self._due.get(point)
        if due is None:
            clock = self._clock()
            assert clock is not None  # a timer's owner holds its clock
            due = self._due[point] = {}
            delay = max(0.0, point * self.step - clock.seconds())
            self._calls[point] = clock.callLater(delay, self._run, point)
        due[callback] = None
        return point

    def cancel(self, point: int, callback: Callable[[], object]) -> None:
        """Forget ``callback`` at ``point`` (nothing if it ran or was cancelled already)."""
        running = self._running
        if running is not None and running[0] == point and callback in running[1]:
            del running[1][callback]  # cancelled by a timer that ran before it
            return
        due = self._due.get(point)
        if due is None or due.pop(callback, False) is False:
            return
        if not due:
            del self._due[point]
            call = self._calls.pop(point)
            if call.active():
                call.cancel()

    @property
    def pending(self) -> int:
        """How many callbacks wait, at every point (those of the point being run too)."""
        running = len(self._running[1]) if self._running is not None else 0
        return running + sum(len(due) for due in self._due.values())

    def _run(self, point: int) -> None:
        del self._calls[point]
        due = self._due.pop(point)
        self._running = (point, due)
        try:
            while due:
                callback, _ = due.popitem()
                try:
                    callback()
                except Exception:  # one timer's failure must not cost the others their turn
                    self.log.failure("a timer failed")
        finally:
            self._running = None
