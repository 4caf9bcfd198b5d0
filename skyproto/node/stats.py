"""What a node counts about its own calls and sends, for its metrics.

Plain integers bumped on the call path (one dict update and one list update per finished
call, an integer per send or handled message) and read when metrics are scraped; no lock,
no reactor, no metrics library here. :mod:`skyproto.web.metrics` turns them into
Prometheus families.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Final

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from ..errors import (
    CallTimeout,
    FrameTooLarge,
    HarborDown,
    MasterUnavailable,
    NoSuchService,
    QueueFull,
    RemoteError,
)

__all__ = ["LATENCY_BUCKETS", "OUTCOMES", "CallStats", "outcome_of"]

#: upper bounds (seconds) of the call latency histogram's buckets; +Inf comes last
LATENCY_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                          0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: the outcome label of each failure a call or a send can end with (most specific first)
OUTCOMES: Final[tuple[tuple[type[BaseException], str], ...]] = (
    (RemoteError, "remote_error"),
    (NoSuchService, "no_such_service"),
    (CallTimeout, "timeout"),
    (HarborDown, "harbor_down"),
    (QueueFull, "queue_full"),
    (FrameTooLarge, "frame_too_large"),
    (MasterUnavailable, "master_unavailable"),
    (CancelledError, "cancelled"),
)


def outcome_of(error: BaseException) -> str:
    """The outcome label for a failed call or send: ``timeout``, ``harbor_down``, ... or
    ``error`` for anything else."""
    for kind, label in OUTCOMES:
        if isinstance(error, kind):
            return label
    return "error"


class CallStats:
    """Calls and sends by outcome, call latency, messages handled by local services."""

    __slots__ = ("_calls_ok", "_failed_calls", "clock", "handled", "handler_errors",
                 "latency_buckets", "latency_sum", "sends")

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._calls_ok = 0  # apart from the failed ones: bumped on every reply
        self._failed_calls: dict[str, int] = {}
        #: one-way messages by outcome (``ok``: handed on; else why ``send`` raised)
        self.sends: dict[str, int] = {}
        #: finished calls per latency bucket (not cumulative), the last one for +Inf
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        #: requests and one-way messages given to a local service
        self.handled = 0
        #: of those, the ones whose handler raised (or whose Deferred failed)
        self.handler_errors = 0

    def call_finished(self, error: BaseException | None, started: float) -> None:
        """A call ended (``error``: why it failed, else None) that began at ``started``
        (clock seconds): count it by outcome and latency. The session table calls this."""
        elapsed = self.clock.seconds() - started
        if error is None:
            self._calls_ok += 1
        else:
            outcome = outcome_of(error)
            failed = self._failed_calls
            failed[outcome] = failed.get(outcome, 0) + 1
        self.latency_buckets[bisect_left(LATENCY_BUCKETS, elapsed)] += 1
        self.latency_sum += elapsed

    @property
    def calls(self) -> dict[str, int]:
        """Finished calls by outcome (``ok`` or a label of :data:`OUTCOMES`, or ``error``)."""
        counts = {"ok": self._calls_ok} if self._calls_ok else {}
        counts.update(self._failed_calls)
        return counts

    def call_failed(self, failure: Failure, started: float) -> Failure:
        """An errback for a call that failed before it had a session (a name lookup):
        count it, pass the failure on."""
        self.call_finished(failure.value or Exception(), started)
        return failure

    def sent(self, error: BaseException | None = None) -> None:
        """A ``send`` returned (``error``: what it raised)."""
        outcome = "ok" if error is None else outcome_of(error)
        self.sends[outcome] = self.sends.get(outcome, 0) + 1

    @property
    def calls_finished(self) -> int:
        """How many calls ended, whatever their outcome."""
        return sum(self.calls.values())
