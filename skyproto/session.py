"""The session layer: 31-bit session ids mapped to pending Deferreds.

skynet keeps a counter per service and parks a coroutine on each id; we park a Deferred.
Ids run from 1 to 2**31-1 and wrap, skipping ids still pending; 0 means "no reply wanted".
On the wire a request carries its id negated and the reply carries it positive (see
docs/wire-format.md). Making and resolving a call is O(1) and allocates one Deferred and
one tuple; failing the calls of one harbor is O(calls pending).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from .errors import CallTimeout
from .interfaces import ISessionTable

SESSION_MAX: Final = 2**31 - 1


#: timers fire on a grid of this many seconds; a call times out at most this late
DEADLINE_RESOLUTION: Final = 0.05

# A pending call is one tuple: (its Deferred, the harbor it went to, when it started in
# clock seconds, its deadline bucket, its timeout). The bucket says how it times out:
_AGED: Final = 0  #: after the table's default timeout: found by age (see SessionTable)
_NEVER: Final = -1  #: not at all
# ... and any bucket above 0 is a deadline bucket of its own (an explicit timeout).
# The fields are read by index (entry[0] ... entry[4]): this runs for every call.

#: told of every call that ends: (None, or why it failed; when it started, clock seconds)
Finished = Callable[[BaseException | None, float], None]


def _grid_after(seconds: float) -> int:
    """The first grid point (a bucket number) at or after ``seconds``."""
    return -int(-seconds // DEADLINE_RESOLUTION)


@implementer(ISessionTable)
class SessionTable:
    """Allocates session ids, times calls out on ``clock``, and resolves them by id.

    No timer is armed per call. Calls with the default timeout (nearly all) are made in
    time order, so ``_pending``, a dict, holds them in deadline order too: one timer waits
    for the oldest, and when it fires it fails what is due and sleeps until the next
    oldest. A call with a timeout of its own goes into the bucket of its deadline
    (``DEADLINE_RESOLUTION`` wide), with one timer for the earliest bucket.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        default_timeout: float | None = None,
        id_limit: int = SESSION_MAX,
        first_id: int = 1,
        finished: Finished | None = None,
    ) -> None:
        self.clock = clock
        #: told of each call as it ends (a node's statistics), before its Deferred fires
        self.finished = finished
        self.default_timeout = default_timeout
        self.id_limit = id_limit
        self._pending: dict[int, tuple[Deferred[Any], int, float, int, float]] = {}
        self._per_harbor: dict[int, int] = {}  #: pending calls per harbor tag
        self._next = first_id
        self._aged_timer: IDelayedCall | None = None
        self._buckets: dict[int, set[int]] = {}
        self._timer: IDelayedCall | None = None
        self._timer_bucket = 0

    @property
    def pending(self) -> int:
        """How many sessions wait for a reply."""
        return len(self._pending)

    def pending_to(self, harbor: int) -> int:
        """How many calls tagged ``harbor`` wait for their reply."""
        return self._per_harbor.get(harbor, 0)

    @property
    def timers(self) -> list[IDelayedCall]:
        """The table's armed timers (at most two: one for aged calls, one for buckets)."""
        return [t for t in (self._aged_timer, self._timer) if t is not None and t.active()]

    def __contains__(self, session: int) -> bool:
        return session in self._pending

    def new(self, timeout: float | None = None, harbor: int = 0) -> tuple[int, Deferred[Any]]:
        """A fresh session id and the Deferred its reply will fire.

        ``timeout`` (else the table's default; None or 0 for none) errbacks the Deferred
        with CallTimeout. Cancelling the Deferred frees the id. ``harbor`` tags the call so
        that ``fail_all(reason, harbor)`` finds it.
        """
        pending = self._pending
        session = self._next
        self._next = session + 1
        if session > self.id_limit or session in pending:
            session = self._free_id()
        deferred: Deferred[Any] = Deferred(lambda _: self._cancel(session))
        now = self.clock.seconds()
        if timeout is None or timeout == self.default_timeout:
            timeout = self.default_timeout
            if timeout:
                pending[session] = (deferred, harbor, now, _AGED, timeout)
                if self._aged_timer is None:
                    self._aged_timer = self.clock.callLater(timeout, self._expire_aged)
            else:
                pending[session] = (deferred, harbor, now, _NEVER, 0.0)
        elif timeout > 0:
            bucket = _grid_after(now + timeout)
            pending[session] = (deferred, harbor, now, bucket, timeout)
            sessions = self._buckets.get(bucket)
            if sessions is None:
                self._buckets[bucket] = {session}
                if self._timer is None or bucket < self._timer_bucket:
                    self._schedule(bucket)
            else:
                sessions.add(session)
        else:
            pending[session] = (deferred, harbor, now, _NEVER, 0.0)
        counts = self._per_harbor
        counts[harbor] = counts.get(harbor, 0) + 1
        return session, deferred

    def _free_id(self) -> int:
        """The next id not pending, from ``_next`` on, wrapping to 1 after ``id_limit``."""
        pending = self._pending
        limit = self.id_limit
        if len(pending) >= limit:
            raise RuntimeError("every session id is in use")
        session = self._next - 1
        while session > limit or session < 1 or session in pending:
            session = session + 1 if session < limit else 1
        self._next = session + 1
        return session

    def resolve(self, session: int, value: object, harbor: int | None = None) -> bool:
        """Fire a session's Deferred with ``value``; False (logged) if no such session waits (from
        ``harbor``, when given)."""
        # _forget in line: this runs for every reply
        pending = self._pending
        entry = pending.get(session)
        if entry is None or (harbor is not None and entry[1] != harbor):
            self._unknown(session, "reply")
            return False
        del pending[session]
        counts = self._per_harbor
        tag = entry[1]
        left = counts[tag] - 1
        if left:
            counts[tag] = left
        else:
            del counts[tag]
        if entry[3] > 0:
            self._unbucket(session, entry[3])
        if self.finished is not None:
            self.finished(None, entry[2])
        entry[0].callback(value)
        return True

    def fail(self, session: int, reason: BaseException, harbor: int | None = None) -> bool:
        """Errback a session's Deferred with ``reason``; False (logged) if no such session waits
        (from ``harbor``, when given)."""
        entry = self._forget(session, harbor)
        if entry is None:
            self._unknown(session, "error reply")
            return False
        if self.finished is not None:
            self.finished(reason, entry[2])
        entry[0].errback(reason)
        return True

    def _unknown(self, session: int, what: str) -> None:
        """A reply that completes no pending call: unknown, late or forged."""
        self.log.info("dropping {what} to unknown or expired session {session}",
                      what=what, session=session)

    def fail_all(self, reason: BaseException, harbor: int | None = None) -> int:
        """Errback every pending session (those to ``harbor``, when given) with ``reason``; how
        many."""
        if harbor is None:
            sessions = list(self._pending)
        else:
            sessions = [s for s, entry in self._pending.items() if entry[1] == harbor]
        for session in sessions:
            self.fail(session, reason)
        if not self._pending:  # nothing left to time out
            for timer in self.timers:
                timer.cancel()
            self._aged_timer = self._timer = None
        return len(sessions)

    def _expire_aged(self) -> None:
        """The oldest call with the default timeout may be due: fail every such call that is,
        then sleep until the next one's deadline (on the grid, so that a burst of calls
        times out in a few timer runs, not one run each)."""
        self._aged_timer = None
        timeout = self.default_timeout
        if not timeout:
            return
        # A call is due once its deadline has passed, give or take a float rounding.
        now = self.clock.seconds() + 1e-6
        due: list[int] = []
        next_deadline: float | None = None
        for session, entry in self._pending.items():
            if entry[3] == _AGED:
                deadline = entry[2] + timeout
                if deadline > now:
                    next_deadline = deadline
                    break
                due.append(session)
        for session in due:
            self.fail(session, CallTimeout(f"no reply within {timeout:g} s (session {session})"))
        if next_deadline is not None:
            self._arm_aged(next_deadline)

    def _arm_aged(self, deadline: float) -> None:
        """Wake at the first grid point after ``deadline``, instead of any timer armed by a
        call made meanwhile (from an errback of a call timed out: its deadline is later)."""
        if self._aged_timer is not None and self._aged_timer.active():
            self._aged_timer.cancel()
        delay = max(0.0, _grid_after(deadline) * DEADLINE_RESOLUTION - self.clock.seconds())
        self._aged_timer = self.clock.callLater(delay, self._expire_aged)

    def _schedule(self, bucket: int) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer_bucket = bucket
        delay = max(0.0, bucket * DEADLINE_RESOLUTION - self.clock.seconds())
        self._timer = self.clock.callLater(delay, self._expire)

    def _expire(self) -> None:
        self._timer = None
        # The timer fires at bucket * resolution, give or take a float rounding.
        now_bucket = int((self.clock.seconds() + 1e-6) // DEADLINE_RESOLUTION)
        for bucket in sorted(b for b in self._buckets if b <= now_bucket):
            for session in sorted(self._buckets.get(bucket, ())):
                entry = self._pending.get(session)
                if entry is not None:
                    self.fail(session, CallTimeout(
                        f"no reply within {entry[4]:g} s (session {session})"))
        if self._buckets:
            self._schedule(min(self._buckets))

    def _cancel(self, session: int) -> None:
        entry = self._forget(session)
        if entry is not None and self.finished is not None:
            self.finished(CancelledError(), entry[2])

    def _forget(self, session: int, harbor: int | None = None
                ) -> tuple[Deferred[Any], int, float, int, float] | None:
        """Remove a pending call; with ``harbor``, only if the call went to that harbor."""
        pending = self._pending
        entry = pending.get(session)
        if entry is None or (harbor is not None and entry[1] != harbor):
            return None
        del pending[session]
        counts = self._per_harbor
        left = counts[entry[1]] - 1
        if left:
            counts[entry[1]] = left
        else:
            del counts[entry[1]]
        if entry[3] > 0:
            self._unbucket(session, entry[3])
        return entry

    def _unbucket(self, session: int, bucket: int) -> None:
        """A call with a timeout of its own is over: out of its deadline bucket."""
        sessions = self._buckets[bucket]
        sessions.discard(session)
        if not sessions:
            # The timer stays: it runs once, finds nothing due and sleeps until the next
            # bucket, which is cheaper than cancelling it and arming it again.
            del self._buckets[bucket]

    def inconsistencies(self) -> list[str]:
        """What is wrong with the table's own indexes (for tests): each count per harbor
        and each deadline bucket must match the pending calls, and no call may wait
        whose Deferred has fired."""
        problems = []
        counts: dict[int, int] = {}
        for entry in self._pending.values():
            counts[entry[1]] = counts.get(entry[1], 0) + 1
        if counts != self._per_harbor:
            problems.append(f"calls per harbor {self._per_harbor}, pending {counts}")
        bucketed = {s for s, entry in self._pending.items() if entry[3] > 0}
        indexed = set().union(*self._buckets.values()) if self._buckets else set()
        if bucketed != indexed or not all(self._buckets.values()):
            problems.append(f"buckets {self._buckets} for the calls {sorted(bucketed)}")
        if any(entry[0].called for entry in self._pending.values()):
            problems.append("a call whose Deferred fired still waits")
        return problems
