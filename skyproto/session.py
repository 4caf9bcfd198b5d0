"""The session layer: 31-bit session ids mapped to pending Deferreds.

skynet keeps a counter per service and parks a coroutine on each id; we park a Deferred.
Ids run from 1 to 2**31-1 and wrap, skipping ids still pending; 0 means "no reply wanted".
On the wire a request carries its id negated and the reply carries it positive (see
docs/wire-format.md). Every operation is O(1) except ``fail_all``, which is O(calls failed).
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


#: deadlines are kept in buckets of this many seconds; a call times out at most this late
DEADLINE_RESOLUTION: Final = 0.05


class _Pending:
    """One call waiting for its reply: small and fixed-size."""

    __slots__ = ("bucket", "deferred", "harbor", "started", "timeout")

    def __init__(self, deferred: Deferred[Any], harbor: int, started: float) -> None:
        self.deferred = deferred
        self.harbor = harbor
        self.started = started
        self.bucket = 0
        self.timeout = 0.0


#: told of every call that ends: (None, or why it failed; when it started, clock seconds)
Finished = Callable[[BaseException | None, float], None]


@implementer(ISessionTable)
class SessionTable:
    """Allocates session ids, times calls out on ``clock``, and resolves them by id."""

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
        self._pending: dict[int, _Pending] = {}
        self._by_harbor: dict[int, set[int]] = {}
        self._next = first_id
        # Timeouts without a timer per call: sessions grouped by deadline bucket, and one
        # timer for the earliest bucket. Scheduling a DelayedCall per call cost more than
        # the rest of a call's bookkeeping together.
        self._buckets: dict[int, set[int]] = {}
        self._timer: IDelayedCall | None = None
        self._timer_bucket = 0

    @property
    def pending(self) -> int:
        """How many sessions wait for a reply."""
        return len(self._pending)

    def pending_to(self, harbor: int) -> int:
        """How many calls tagged ``harbor`` wait for their reply."""
        return len(self._by_harbor.get(harbor, ()))

    def __contains__(self, session: int) -> bool:
        return session in self._pending

    def new(self, timeout: float | None = None, harbor: int = 0) -> tuple[int, Deferred[Any]]:
        """A fresh session id and the Deferred its reply will fire.

        ``timeout`` (else the table's default; None or 0 for none) errbacks the Deferred
        with CallTimeout. Cancelling the Deferred frees the id. ``harbor`` tags the call so
        that ``fail_all(reason, harbor)`` finds it.
        """
        pending = self._pending
        limit = self.id_limit
        if len(pending) >= limit:
            raise RuntimeError("every session id is in use")
        session = self._next
        while session in pending:
            session = session + 1 if session < limit else 1
        self._next = session + 1 if session < limit else 1

        deferred: Deferred[Any] = Deferred(lambda _: self._cancel(session))
        now = self.clock.seconds()
        entry = _Pending(deferred, harbor, now)
        pending[session] = entry
        if harbor:
            tagged = self._by_harbor.get(harbor)
            if tagged is None:
                self._by_harbor[harbor] = {session}
            else:
                tagged.add(session)
        if timeout is None:
            timeout = self.default_timeout
        if timeout:
            bucket = -int(-(now + timeout) // DEADLINE_RESOLUTION)  # ceil
            entry.bucket = bucket
            entry.timeout = timeout
            sessions = self._buckets.get(bucket)
            if sessions is None:
                self._buckets[bucket] = {session}
                if self._timer is None or bucket < self._timer_bucket:
                    self._schedule(bucket)
            else:
                sessions.add(session)
        return session, deferred

    def resolve(self, session: int, value: object, harbor: int | None = None) -> bool:
        """Fire a session's Deferred with ``value``; False (logged) if no such session waits (from
        ``harbor``, when given)."""
        # _forget in line: this runs for every reply
        entry = self._pending.get(session)
        if entry is None or (harbor is not None and entry.harbor != harbor):
            self._unknown(session, "reply")
            return False
        del self._pending[session]
        self._release(session, entry)
        if self.finished is not None:
            self.finished(None, entry.started)
        entry.deferred.callback(value)
        return True

    def fail(self, session: int, reason: BaseException, harbor: int | None = None) -> bool:
        """Errback a session's Deferred with ``reason``; False (logged) if no such session waits
        (from ``harbor``, when given)."""
        entry = self._forget(session, harbor)
        if entry is None:
            self._unknown(session, "error reply")
            return False
        if self.finished is not None:
            self.finished(reason, entry.started)
        entry.deferred.errback(reason)
        return True

    def _unknown(self, session: int, what: str) -> None:
        """A reply that completes no pending call: unknown, late or forged."""
        self.log.info("dropping {what} to unknown or expired session {session}",
                      what=what, session=session)

    def fail_all(self, reason: BaseException, harbor: int | None = None) -> int:
        """Errback every pending session (those to ``harbor``, when given) with ``reason``; how
        many."""
        chosen = self._pending if harbor is None else self._by_harbor.get(harbor, ())
        sessions = list(chosen)
        for session in sessions:
            self.fail(session, reason)
        if not self._pending and self._timer is not None:  # nothing left to time out
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        return len(sessions)

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
                        f"no reply within {entry.timeout:g} s (session {session})"))
        if self._buckets:
            self._schedule(min(self._buckets))

    def _cancel(self, session: int) -> None:
        entry = self._forget(session)
        if entry is not None and self.finished is not None:
            self.finished(CancelledError(), entry.started)

    def _forget(self, session: int, harbor: int | None = None) -> _Pending | None:
        """Remove a pending call; with ``harbor``, only if the call went to that harbor."""
        pending = self._pending
        entry = pending.get(session)
        if entry is None or (harbor is not None and entry.harbor != harbor):
            return None
        del pending[session]
        self._release(session, entry)
        return entry

    def _release(self, session: int, entry: _Pending) -> None:
        """A call removed from ``_pending``: out of its deadline bucket and harbor set too."""
        if entry.bucket:
            sessions = self._buckets[entry.bucket]
            sessions.discard(session)
            if not sessions:
                # The timer stays: it runs once, finds nothing due and sleeps until the next
                # bucket, which is cheaper than cancelling it after every sequential call
                # and arming it again for the next.
                del self._buckets[entry.bucket]
        if entry.harbor:
            tagged = self._by_harbor[entry.harbor]
            tagged.discard(session)
            if not tagged:
                del self._by_harbor[entry.harbor]
