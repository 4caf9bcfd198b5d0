"""The session table, driven directly with a Clock."""

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from zope.interface.verify import verifyObject

from skyproto.errors import CallTimeout, HarborDown
from skyproto.interfaces import ISessionTable
from skyproto.session import SESSION_MAX, SessionTable


def outcome(d):
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def test_provides_interface():
    assert verifyObject(ISessionTable, SessionTable(Clock()))


def test_ids_start_at_one_and_resolve():
    table = SessionTable(Clock())
    s1, d1 = table.new()
    s2, d2 = table.new()
    assert (s1, s2) == (1, 2)
    assert table.pending == 2
    assert table.resolve(s2, "two")
    assert outcome(d2) == "two"
    assert not d1.called
    assert table.pending == 1


def test_fail_by_id():
    table = SessionTable(Clock())
    s, d = table.new()
    assert table.fail(s, HarborDown("gone"))
    assert outcome(d).check(HarborDown)
    assert table.pending == 0


def test_unknown_or_late_ids_are_logged_and_dropped():
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        table = SessionTable(Clock())
        assert not table.resolve(12345, "x")
        assert not table.fail(12345, ValueError())
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e["session"] for e in events if "session" in e] == [12345, 12345]
    assert all(e["log_level"] == LogLevel.info for e in events if "session" in e)


def test_default_id_range_is_31_bits():
    assert SessionTable(Clock()).id_limit == SESSION_MAX == 2**31 - 1


def test_wrap_around_skips_pending_ids():
    table = SessionTable(Clock())
    s1, _ = table.new()
    table._next = SESSION_MAX
    last, _ = table.new()
    assert last == SESSION_MAX
    wrapped, _ = table.new()
    assert s1 == 1 and wrapped == 2  # 1 is still pending, so it is skipped
    table.resolve(s1, None)
    table._next = SESSION_MAX
    with_free_one, _ = table.new()
    assert with_free_one == 1  # SESSION_MAX is pending, 1 is free again


def test_timeout_frees_the_id_and_late_reply_is_dropped():
    clock = Clock()
    table = SessionTable(clock, default_timeout=5)
    s, d = table.new()
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.2)
    failure = outcome(d)
    assert failure.check(CallTimeout)
    assert "5 s" in str(failure.value)
    assert table.pending == 0
    assert not table.resolve(s, "late")


def test_per_call_timeout_overrides_default():
    clock = Clock()
    table = SessionTable(clock, default_timeout=60)
    _, d = table.new(timeout=1)
    clock.advance(1)
    assert outcome(d).check(CallTimeout)


def test_no_timeout_means_no_timer():
    clock = Clock()
    table = SessionTable(clock)
    table.new()
    assert clock.getDelayedCalls() == []


def test_the_deadline_timer_is_armed_once_for_calls_one_after_another():
    """Sequential calls do not arm and cancel a timer each: the one timer stays, runs once
    at its deadline, finds nothing due, and is gone."""
    clock = Clock()
    table = SessionTable(clock, default_timeout=5)
    armed = []
    call_later = clock.callLater

    def counted(*args, **kwargs):
        armed.append(args)
        return call_later(*args, **kwargs)

    clock.callLater = counted
    for n in range(1000):
        s, d = table.new()
        table.resolve(s, n)
        assert outcome(d) == n
        clock.advance(0.001)
    assert len(armed) == 1 and len(clock.getDelayedCalls()) == 1
    clock.advance(5)
    assert clock.getDelayedCalls() == [] and table.pending == 0


def test_a_call_made_after_an_idle_timer_still_times_out():
    clock = Clock()
    table = SessionTable(clock, default_timeout=5)
    s, _ = table.new()
    table.resolve(s, 1)
    clock.advance(3)
    _, late = table.new()  # its deadline is after the idle timer's
    clock.advance(2.1)  # the idle timer runs, finds nothing due, sleeps until ``late``'s
    assert not late.called
    clock.advance(3)
    assert outcome(late).check(CallTimeout)
    assert clock.getDelayedCalls() == []


def test_cancel_frees_the_id_and_the_timer():
    clock = Clock()
    table = SessionTable(clock, default_timeout=5)
    s, d = table.new(harbor=3)
    d.cancel()
    assert outcome(d).check(CancelledError)
    assert table.pending == 0
    assert s not in table
    assert table.fail_all(HarborDown("x"), harbor=3) == 0
    assert table.fail_all(HarborDown("stopping")) == 0
    assert clock.getDelayedCalls() == []  # failing everything drops the idle timer too


def test_fail_all_filtered_by_harbor():
    table = SessionTable(Clock())
    _, to3a = table.new(harbor=3)
    _, to4 = table.new(harbor=4)
    _, to3b = table.new(harbor=3)
    assert table.fail_all(HarborDown("harbor 3 is down"), harbor=3) == 2
    assert outcome(to3a).check(HarborDown)
    assert outcome(to3b).check(HarborDown)
    assert not to4.called
    assert table.fail_all(HarborDown("all")) == 1
    assert outcome(to4).check(HarborDown)
    assert table.pending == 0
    assert table.pending_to(3) == table.pending_to(4) == 0
    assert table.inconsistencies() == []


def test_full_table_is_refused():
    table = SessionTable(Clock(), id_limit=3)
    assert [table.new()[0] for _ in range(3)] == [1, 2, 3]
    with pytest.raises(RuntimeError, match="every session id"):
        table.new()
    table.resolve(2, None)
    assert table.new()[0] == 2


def test_memory_is_constant_per_call():
    table = SessionTable(Clock(), default_timeout=10)
    for _ in range(1000):
        s, _ = table.new(harbor=2)
        table.resolve(s, None)
    assert table.pending == 0
    assert table._per_harbor == {} and table._buckets == {}
    assert table.inconsistencies() == []


def test_timeouts_at_awkward_float_times_fire_once_and_promptly():
    from skyproto.session import DEADLINE_RESOLUTION

    clock = Clock()
    clock.advance(0.1)
    table = SessionTable(clock)
    calls = [table.new(timeout=t)[1] for t in (0.3, 0.7, 1.1, 4.9)]
    for d, t in zip(calls, (0.3, 0.7, 1.1, 4.9), strict=True):
        while not d.called:
            assert clock.seconds() <= 0.1 + t + DEADLINE_RESOLUTION + 1e-9
            clock.advance(0.01)
        assert outcome(d).check(CallTimeout)
        assert clock.seconds() >= 0.1 + t - 1e-9
    assert table.pending == 0
    assert clock.getDelayedCalls() == []


def test_calls_with_the_default_timeout_time_out_oldest_first_on_one_timer():
    """Default-timeout calls are found by age: one timer, calls failing in the order made,
    none early, each at most one grid step late."""
    from skyproto.session import DEADLINE_RESOLUTION

    clock = Clock()
    table = SessionTable(clock, default_timeout=2)
    made = []
    for n in range(50):
        made.append((clock.seconds(), table.new()[1]))
        clock.advance(0.013 * (n % 3))
    failed_at = {}
    for _, d in made:
        d.addErrback(lambda f, d=d: failed_at.setdefault(id(d), clock.seconds()) and None)
    assert len(table.timers) == 1
    while table.pending:
        clock.advance(0.01)
    for started, d in made:
        assert started + 2 - 1e-9 <= failed_at[id(d)] <= started + 2 + DEADLINE_RESOLUTION + 0.01
    order = [failed_at[id(d)] for _, d in made]
    assert order == sorted(order)
    assert table.timers == [] and table.inconsistencies() == []


def test_aged_and_bucketed_calls_mix():
    """A call with its own timeout, a call with none and calls with the default one: each
    times out when it should, whatever the order they were made in."""
    clock = Clock()
    table = SessionTable(clock, default_timeout=5)
    _, never = table.new(timeout=0)
    _, short = table.new(timeout=1)
    _, default = table.new()
    _, same_as_default = table.new(timeout=5)  # the default given explicitly: found by age
    _, long = table.new(timeout=9)
    clock.advance(1.1)
    assert outcome(short).check(CallTimeout) and not default.called
    clock.advance(4)
    assert outcome(default).check(CallTimeout)
    assert outcome(same_as_default).check(CallTimeout)
    assert not long.called
    clock.advance(4)
    assert outcome(long).check(CallTimeout)
    assert not never.called and table.pending == 1
    assert table.inconsistencies() == []


def test_a_call_made_by_a_timed_out_calls_errback_still_times_out():
    clock = Clock()
    table = SessionTable(clock, default_timeout=1)
    _, first = table.new()
    _, second = table.new()
    clock.advance(0.5)
    _, third = table.new()  # due at 1.5
    retried = []
    first.addErrback(lambda f: (retried.append(table.new()[1]), f)[1])  # due at 2.05
    clock.advance(0.55)
    assert outcome(first).check(CallTimeout) and outcome(second).check(CallTimeout)
    assert not third.called and len(retried) == 1
    clock.advance(0.5)
    assert outcome(third).check(CallTimeout) and not retried[0].called
    clock.advance(0.55)
    assert outcome(retried[0]).check(CallTimeout)
    assert table.pending == 0 and table.inconsistencies() == []


def test_a_reply_from_the_wrong_harbor_leaves_the_call_waiting_in_its_place():
    clock = Clock()
    table = SessionTable(clock, default_timeout=1)
    s, d = table.new(harbor=3)
    _, later = table.new(harbor=3)
    assert not table.resolve(s, "forged", harbor=4)
    assert not d.called and table.pending_to(3) == 2
    clock.advance(1.01)  # still the oldest: it times out first, with the other
    assert outcome(d).check(CallTimeout) and outcome(later).check(CallTimeout)
