"""Heartbeats on any framed connection: beat every interval, declare silence at the timeout.

The owner calls :meth:`HeartbeatTimer.heard` whenever bytes arrive (not per whole frame: a
large frame on a slow link takes longer than the timeout, yet its bytes prove the peer is
alive), and gets ``send_beat()`` every ``interval`` and ``silent(seconds)`` once the peer has
sent nothing for ``timeout``. One timer at a time, scheduled for whichever comes first, on
the clock's :class:`skyproto.wire.timer_grid.TimerGrid` (so at most 1/32 s late).

The timer never dies: a ``send_beat`` that raises is logged and the timer goes on. Silence is
confirmed on the next reactor turn, after waiting data has been read, so a stalled reactor
(a long computation, a paused process) does not drop a peer whose bytes are already here.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from .timer_grid import timer_grid


@attrs.frozen
class HeartbeatTiming:
    """How often a side beats and how long a silence it tolerates."""

    interval: float = 1.0
    timeout: float = 3.0

    def governing(self, other: HeartbeatTiming) -> HeartbeatTiming:
        """The timing both sides of a connection use: the slower side's, so nobody drops
        a peer for beating at the rate it said it would."""
        return HeartbeatTiming(max(self.interval, other.interval),
                               max(self.timeout, other.timeout))


class HeartbeatTimer:
    """Beats every ``interval`` and calls ``silent`` after ``timeout`` seconds with nothing heard,
    on the injected clock."""

    log = Logger()

    def __init__(self, clock: IReactorTime, interval: float, timeout: float,
                 send_beat: Callable[[], object], silent: Callable[[float], object]) -> None:
        self.clock = clock
        self.interval = interval
        self.timeout = timeout
        self.send_beat = send_beat
        self.silent = silent
        self.last_heard = 0.0
        self._next_beat = 0.0
        self._grid = timer_grid(clock)
        self._tick_at: int | None = None  #: the grid point of the next tick
        self._confirming: IDelayedCall | None = None
        self._running = False

    @property
    def running(self) -> bool:
        """Whether the timer is started."""
        return self._running

    def start(self) -> None:
        """Start beating and watching, counting from now."""
        self._cancel()
        now = self.clock.seconds()
        self._running = True
        self.last_heard = now
        self._next_beat = now + self.interval
        self._schedule()

    def retime(self, timing: HeartbeatTiming) -> None:
        """Use a negotiated timing from now on (after a handshake)."""
        self.interval = timing.interval
        self.timeout = timing.timeout
        if self._running:
            now = self.clock.seconds()
            self._next_beat = min(self._next_beat, now + self.interval)
            self._cancel()
            self._schedule()

    def heard(self) -> None:
        """Something arrived from the peer: it is alive now."""
        self.last_heard = self.clock.seconds()

    def stop(self) -> None:
        """Stop beating and watching."""
        self._running = False
        self._cancel()

    def _cancel(self) -> None:
        if self._tick_at is not None:
            self._grid.cancel(self._tick_at, self._tick)
            self._tick_at = None
        if self._confirming is not None and self._confirming.active():
            self._confirming.cancel()
        self._confirming = None

    def _tick(self) -> None:
        self._tick_at = None
        if not self._running:
            return
        now = self.clock.seconds()
        if now - self.last_heard >= self.timeout:
            # Let the reactor read what is waiting before we believe the silence.
            self._confirming = self.clock.callLater(0, self._confirm_silence)
            return
        if now >= self._next_beat:
            self._next_beat = now + self.interval
            try:
                self.send_beat()
            except Exception as e:  # e.g. QueueFull: the next beat may get through
                self.log.warn("heartbeat not sent: {error}", error=str(e))
        if self._running:
            self._schedule()

    def _confirm_silence(self) -> None:
        self._confirming = None
        if not self._running:
            return
        now = self.clock.seconds()
        quiet = now - self.last_heard
        if quiet >= self.timeout:
            self._running = False
            self.silent(quiet)
            return
        self._schedule()

    def _schedule(self) -> None:
        self._tick_at = self._grid.call_at(min(self._next_beat, self.last_heard + self.timeout),
                                           self._tick)
