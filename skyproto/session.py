"""The session layer: 31-bit session ids mapped to pending Deferreds.

skynet keeps a counter per service and parks a coroutine on each id; we park a Deferred.
Ids run from 1 to 2**31-1 and wrap, skipping ids still pending; 0 means "no reply wanted".
On the wire a request carries its id negated and the reply carries it positive (see
docs/wire-format.md). Every operation is O(1) except ``fail_all``, which is O(calls failed).
"""

from __future__ import annotations

from typing import Any, Final

from twisted.internet.defer import Deferred
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

    __slots__ = ("bucket", "deferred", "harbor", "timeout")

    def __init__(self, deferred: Deferred[Any], harbor: int) -> None:
        self.deferred = deferred
        self.harbor = harbor
        self.bucket = 0
        self.timeout = 0.0


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
    ) -> None:
        self.clock = clock
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
        entry = _Pending(deferred, harbor)
        pending[session] = entry
        if harbor:
            self._by_harbor.setdefault(harbor, set()).add(session)
        if timeout is None:
            timeout = self.default_timeout
        if timeout:
            bucket = -int(-(self.clock.seconds() + timeout) // DEADLINE_RESOLUTION)  # ceil
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
        entry = self._claim(session, harbor, "reply")
        if entry is not None:
            entry.deferred.callback(value)
        return entry is not None

    def fail(self, session: int, reason: BaseException, harbor: int | None = None) -> bool:
        entry = self._claim(session, harbor, "error reply")
        if entry is not None:
            entry.deferred.errback(reason)
        return entry is not None

    def _claim(self, session: int, harbor: int | None, what: str) -> _Pending | None:
        """The pending call a reply completes, or None (logged: unknown, late or forged)."""
        entry = self._forget(session, harbor)
        if entry is None:
            self.log.info("dropping {what} to unknown or expired session {session}",
                          what=what, session=session)
        return entry

    def fail_all(self, reason: BaseException, harbor: int | None = None) -> int:
        chosen = self._pending if harbor is None else self._by_harbor.get(harbor, ())
        sessions = list(chosen)
        for session in sessions:
            self.fail(session, reason)
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
        self._forget(session)

    def _forget(self, session: int, harbor: int | None = None) -> _Pending | None:
        """Remove a pending call; with ``harbor``, only if the call went to that harbor."""
        if harbor is not None:
            entry = self._pending.get(session)
            if entry is None or entry.harbor != harbor:
                return None
            del self._pending[session]
        else:
            entry = self._pending.pop(session, None)
        if entry is None:
            return None
        if entry.bucket:
            sessions = self._buckets[entry.bucket]
            sessions.discard(session)
            if not sessions:
                del self._buckets[entry.bucket]
                if not self._buckets and self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
        if entry.harbor:
            tagged = self._by_harbor[entry.harbor]
            tagged.discard(session)
            if not tagged:
                del self._by_harbor[entry.harbor]
        return entry
