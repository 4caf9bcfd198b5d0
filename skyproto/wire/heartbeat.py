"""Heartbeats on any framed connection: beat every interval, declare silence at the timeout.

The owner calls :meth:`Heartbeat.heard` for every frame it receives (one clock read), and
gets ``send_beat()`` every ``interval`` and ``silent(seconds)`` once the peer has sent
nothing for ``timeout``. One timer at a time, scheduled for whichever comes first, so the
silence is noticed at the timeout itself, not a beat later.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class HeartbeatTimer:
    def __init__(self, clock: IReactorTime, interval: float, timeout: float,
                 send_beat: Callable[[], object], silent: Callable[[float], object]) -> None:
        self.clock = clock
        self.interval = interval
        self.timeout = timeout
        self.send_beat = send_beat
        self.silent = silent
        self.last_heard = 0.0
        self._next_beat = 0.0
        self._timer: IDelayedCall | None = None

    def start(self) -> None:
        now = self.clock.seconds()
        self.last_heard = now
        self._next_beat = now + self.interval
        self._schedule(now)

    def heard(self) -> None:
        self.last_heard = self.clock.seconds()

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _tick(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        quiet = now - self.last_heard
        if quiet >= self.timeout:
            self.silent(quiet)
            return
        if now >= self._next_beat:
            self.send_beat()
            self._next_beat = now + self.interval
        self._schedule(now)

    def _schedule(self, now: float) -> None:
        deadline = min(self._next_beat, self.last_heard + self.timeout)
        self._timer = self.clock.callLater(max(0.0, deadline - now), self._tick)
