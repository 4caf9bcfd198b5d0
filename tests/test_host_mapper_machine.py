"""HostMapper's state machine, driven directly: every state, every event, on a Clock.

The agent gets a fake mapper client and a fake server endpoint, so every register and
listen attempt is a Deferred that the test fires (or leaves pending) by hand, and every
timer runs on a ``Clock``. tests/test_mapping.py runs the same agent over ``loopback:``.
"""

from __future__ import annotations

import errno
import random
from typing import Any, cast

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import (
    CannotListenError,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    TimeoutError,
)
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from skyproto.interfaces import IMapperClient
from skyproto.mapper.client import MapperRegistration, RegistrationRefusedError
from skyproto.mapper.epmd import Alive2XResponse
from skyproto.node.host_mapper import STATES, HostMapper, _Hosted, _HostedMapperFactory

LISTEN = "tcp:4369:interface=127.0.0.1"
CONNECT = "tcp:127.0.0.1:4369"
EVENTS = ("start", "stop", "registered", "refused", "name_taken", "give_up", "failed",
          "listening", "address_in_use", "lost", "retry", "fault", "cleaned_up")


# --------------------------------------------------------------------------- fakes


class FakeConnection:
    """The registration connection a MapperRegistration closes to unregister."""

    def __init__(self, closes: bool = True) -> None:
        self.closes = closes
        self.registration: MapperRegistration | None = None

    def close(self) -> None:
        if self.closes:
            self.finish()

    def finish(self) -> None:
        assert self.registration is not None
        if self.registration.active:
            self.registration._lost(Failure(ConnectionDone("closed")))


def drop(registration: MapperRegistration) -> None:
    """The mapper closes our registration (it died, or someone sent STOP)."""
    registration._lost(Failure(ConnectionLost("the mapper went away")))


class FakeClient:
    """register() returns a Deferred the test fires; ``raises`` makes it raise instead."""

    def __init__(self) -> None:
        self.attempts: list[Deferred[MapperRegistration]] = []
        self.cancelled: list[Deferred[MapperRegistration]] = []
        self.raises: Exception | None = None

    def register(self, name: str, port: int, extra: bytes = b"",
                 **options: object) -> Deferred[MapperRegistration]:
        if self.raises is not None:
            raise self.raises
        attempt: Deferred[MapperRegistration] = Deferred(self.cancelled.append)
        self.attempts.append(attempt)
        return attempt


class FakePort:
    def __init__(self, port: int = 4369) -> None:
        self.port = port
        self.stopped = 0
        self.host_raises = False

    def stopListening(self) -> None:
        self.stopped += 1

    def getHost(self) -> IPv4Address:
        if self.host_raises:
            self.host_raises = False
            raise OSError("getsockname failed")
        return IPv4Address("TCP", "127.0.0.1", self.port)


@implementer(IStreamServerEndpoint)
class FakeServerEndpoint:
    def __init__(self) -> None:
        self.attempts: list[Deferred[Any]] = []

    def listen(self, factory: object) -> Deferred[Any]:
        attempt: Deferred[Any] = Deferred()
        self.attempts.append(attempt)
        return attempt


def address_in_use() -> CannotListenError:
    return CannotListenError("127.0.0.1", 4369, OSError(errno.EADDRINUSE, "in use"))


class Rig:
    """One agent with fake I/O, and everything it was handed (to check nothing leaks)."""

    def __init__(self, mapper_port: int = 4369, **options: Any) -> None:
        self.clock = Clock()
        self.client = FakeClient()
        self.server = FakeServerEndpoint()
        options.setdefault("rng", random.Random(7))
        self.agent = HostMapper(self.clock, LISTEN, CONNECT, mapper_port, "alpha",
                                "tcp:127.0.0.1:7001", 1, client=cast(IMapperClient, self.client),
                                server_endpoint=self.server, **options)
        self.registrations: list[MapperRegistration] = []
        self.ports: list[FakePort] = []
        self.started: Deferred[int] | None = None

    @property
    def state(self) -> str:
        return self.agent.state

    def registered(self) -> bool:  # a call, so that mypy does not narrow it across events
        return self.agent.registered

    def hosting(self) -> bool:
        return self.agent.hosting

    def registration(self, creation: int = 5, closes: bool = True) -> MapperRegistration:
        connection = FakeConnection(closes)
        registration = MapperRegistration("alpha", 7001, Alive2XResponse(0, creation),
                                          cast(Any, connection))
        connection.registration = registration
        self.registrations.append(registration)
        return registration

    def port(self) -> FakePort:
        port = FakePort()
        self.ports.append(port)
        return port

    def hosted(self) -> _Hosted:
        return _Hosted(_HostedMapperFactory(self.clock, 4369, False), cast(Any, self.port()))

    # --- outcomes of the last attempt ------------------------------------------------

    def start(self) -> Deferred[int]:
        self.started = self.agent.start()
        return self.started

    def register_ok(self, creation: int = 5, closes: bool = True) -> MapperRegistration:
        registration = self.registration(creation, closes)
        self.client.attempts[-1].callback(registration)
        return registration

    def register_fails(self, error: Exception) -> None:
        self.client.attempts[-1].errback(error)

    def listen_ok(self) -> FakePort:
        port = self.port()
        self.server.attempts[-1].callback(port)
        return port

    def listen_fails(self, error: Exception) -> None:
        self.server.attempts[-1].errback(error)

    def advance_timer(self) -> float:
        """Fire the machine's one timer; return its delay."""
        (timer,) = self.clock.getDelayedCalls()
        delay = timer.getTime() - self.clock.seconds()
        self.clock.advance(delay)
        return delay

    # --- reaching each state ---------------------------------------------------------

    def reach(self, state: str) -> None:
        if state in ("registering", "listening", "registered", "backoff", "stopping"):
            self.start()
        if state == "listening":
            self.register_fails(ConnectionRefusedError())
        elif state in ("joining", "claiming"):
            self.reach("listening")
            if state == "joining":
                self.listen_fails(address_in_use())
            else:
                self.listen_ok()
        elif state == "registered":
            self.register_ok()
        elif state in ("hosting", "hosting_backoff"):
            self.reach("claiming")
            self.register_ok()
            if state == "hosting_backoff":
                drop(cast(MapperRegistration, self.agent.registration))
        elif state == "backoff":
            self.register_fails(TimeoutError())
        elif state == "stopping":
            self.register_ok(closes=False)
            self.agent.stop()
        elif state == "stopped":
            self.agent.stop()
        assert self.state == state

    def event_args(self, event: str) -> tuple[Any, ...]:
        taken = Failure(RegistrationRefusedError("alpha", 1))
        current = self.agent.registration
        return {
            "registered": lambda: (self.registration(6),),
            "refused": lambda: (Failure(ConnectionRefusedError()),),
            "name_taken": lambda: (taken,),
            "give_up": lambda: (taken,),
            "failed": lambda: (Failure(TimeoutError()),),
            "listening": lambda: (self.hosted(),),
            "address_in_use": lambda: (Failure(address_in_use()),),
            "lost": lambda: (current if current is not None else self.registration(),),
            "fault": lambda: (Failure(RuntimeError("injected")),),
        }.get(event, lambda: ())()

    def stop_and_check(self) -> None:
        """Stop; then nothing may be left: no timer, attempt, registration or port."""
        stopped: list[object] = []
        self.agent.stop().addBoth(stopped.append)
        for registration in self.registrations:  # stopping waits for our close
            connection = cast(FakeConnection, registration._protocol)
            if registration.closed_by_us:
                connection.finish()
        assert stopped == [None]
        assert self.state == "stopped"
        assert self.clock.getDelayedCalls() == []
        assert all(a.called for a in self.client.attempts + self.server.attempts)
        assert not any(r.active for r in self.registrations)
        assert self.agent.registration is None and not self.hosting()
        assert all(port.stopped for port in self.ports)
        if self.started is not None:
            self.started.addErrback(lambda _: None)  # checked by the test, if it cares


def failure_of(d: Deferred[Any]) -> BaseException:
    """The exception a fired Deferred failed with (consumed)."""
    box: list[Failure] = []
    d.addErrback(box.append)
    assert box, "the Deferred has not failed"
    return cast(BaseException, box[0].value)


def lines(events: list[LogEvent]) -> list[str]:
    return [formatEvent(event) for event in events]


# --------------------------------------------------------------------------- the matrix

#: state -> event -> the state after it (and its cascade); absent: stays where it is
EXPECTED: dict[str, dict[str, str]] = {
    "idle": {"start": "registering", "stop": "stopped"},
    "registering": {"stop": "stopped", "registered": "registered", "refused": "listening",
                    "name_taken": "backoff", "give_up": "stopped", "failed": "backoff",
                    "fault": "backoff"},
    "listening": {"stop": "stopped", "listening": "claiming", "address_in_use": "joining",
                  "failed": "backoff", "fault": "backoff"},
    "joining": {"stop": "stopped", "registered": "registered", "refused": "backoff",
                "name_taken": "backoff", "give_up": "stopped", "failed": "backoff",
                "fault": "backoff"},
    "claiming": {"stop": "stopped", "registered": "hosting", "refused": "hosting_backoff",
                 "name_taken": "hosting_backoff", "give_up": "stopped",
                 "failed": "hosting_backoff", "fault": "hosting_backoff"},
    "registered": {"stop": "stopped", "lost": "backoff", "fault": "backoff"},
    "hosting": {"stop": "stopped", "lost": "hosting_backoff", "fault": "hosting_backoff"},
    "backoff": {"stop": "stopped", "retry": "registering", "fault": "backoff"},
    "hosting_backoff": {"stop": "stopped", "retry": "claiming", "fault": "hosting_backoff"},
    "stopping": {"cleaned_up": "stopped", "fault": "stopped"},
    "stopped": {},
}


def test_the_states() -> None:
    assert tuple(EXPECTED) == STATES


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize("state", STATES)
def test_every_event_in_every_state(state: str, event: str, events: list[LogEvent]) -> None:
    rig = Rig()
    rig.reach(state)
    attempts = len(rig.client.attempts) + len(rig.server.attempts)
    getattr(rig.agent._machine, event)(*rig.event_args(event))
    assert rig.state == EXPECTED[state].get(event, state)
    assert rig.agent.faults == 0  # no output raised
    assert len(rig.clock.getDelayedCalls()) <= 1  # one timer at most
    if rig.state in ("backoff", "hosting_backoff"):
        assert len(rig.clock.getDelayedCalls()) == 1
    if rig.state == state and event not in ("start", "stop", "fault", "retry"):
        # ignored: no new attempt, and what the event carried is released
        assert len(rig.client.attempts) + len(rig.server.attempts) == attempts
        assert all(r is rig.agent.registration or not r.active or r.closed_by_us
                   for r in rig.registrations)
    rig.stop_and_check()
    assert not any(" object at 0x" in line for line in lines(events))


# --------------------------------------------------------------------------- life cycles


def test_register_with_a_running_mapper() -> None:
    rig = Rig()
    rig.start()
    assert rig.state == "registering" and not rig.registered()
    rig.register_ok(creation=9)
    assert rig.state == "registered" and rig.registered() and not rig.hosting()
    assert rig.started is not None and rig.started.result == 9
    rig.stop_and_check()


def test_nobody_answers_so_we_host_and_register_with_ourselves(events: list[LogEvent]) -> None:
    rig = Rig(mapper_port=0)
    rig.start()
    rig.register_fails(ConnectionRefusedError())
    assert rig.state == "listening" and len(rig.server.attempts) == 1
    port = rig.listen_ok()
    assert rig.state == "claiming" and rig.hosting()
    assert rig.agent.server is not None and rig.agent.server.port == 4369  # read back
    assert rig.agent.listening_port is cast(Any, port)
    rig.register_ok()
    assert rig.state == "hosting"
    assert any(line.startswith(f"started the mapper on {LISTEN}; registered alpha")
               for line in lines(events))
    rig.stop_and_check()
    assert port.stopped == 1


def test_listen_address_in_use_then_register_succeeds(events: list[LogEvent]) -> None:
    rig = Rig()
    rig.reach("listening")
    rig.listen_fails(address_in_use())
    assert rig.state == "joining" and len(rig.client.attempts) == 2
    rig.register_ok()
    assert rig.state == "registered" and not rig.hosting()
    assert sum(line.startswith("another node started the mapper on") for line in lines(events)) == 1
    rig.stop_and_check()


def test_the_winner_not_answering_yet_backs_off_instead_of_listening_again() -> None:
    rig = Rig()
    rig.reach("joining")
    rig.register_fails(ConnectionRefusedError())
    assert rig.state == "backoff" and len(rig.server.attempts) == 1
    rig.advance_timer()
    assert rig.state == "registering"
    rig.register_fails(ConnectionRefusedError())
    assert rig.state == "listening" and len(rig.server.attempts) == 2  # now try again
    rig.stop_and_check()


def test_mapper_lost_while_registered_takes_over_after_jitter() -> None:
    rig = Rig(takeover_jitter=0.5)
    rig.reach("registered")
    first = rig.agent.registration
    assert first is not None
    waiting = rig.agent.when_registered()
    assert waiting.called  # registered now
    drop(first)
    assert rig.state == "backoff" and not rig.registered()
    again = rig.agent.when_registered()
    delay = rig.advance_timer()
    assert 0 <= delay <= 0.5
    assert rig.state == "registering"
    rig.register_fails(ConnectionRefusedError())  # the host is gone: we take over
    rig.listen_ok()
    rig.register_ok(creation=6)
    assert rig.state == "hosting" and again.result == 6
    rig.stop_and_check()


def test_registration_lost_while_hosting_re_registers_with_ourselves(
    events: list[LogEvent]
) -> None:
    rig = Rig()
    rig.reach("hosting")
    drop(cast(MapperRegistration, rig.agent.registration))  # STOP_REQ in relaxed mode
    assert rig.state == "hosting_backoff" and rig.hosting()
    rig.advance_timer()
    assert rig.state == "claiming" and len(rig.server.attempts) == 1  # no second listen
    rig.register_fails(ConnectionRefusedError())
    assert rig.state == "hosting_backoff"
    assert any("do the two name the same address?" in line for line in lines(events))
    rig.advance_timer()
    rig.register_ok(creation=7)
    assert rig.state == "hosting" and rig.agent.creation == 7
    rig.stop_and_check()


def test_backoff_doubles_up_to_the_cap_with_the_injected_rng() -> None:
    rig = Rig(rng=random.Random(3), retry_initial=0.2, retry_max=2.0)
    twin = random.Random(3)
    rig.start()
    delays = []
    for _ in range(7):
        rig.register_fails(TimeoutError())
        delays.append(rig.advance_timer())
    expected = [min(2.0, 0.2 * 2 ** i) * twin.uniform(0.8, 1.2) for i in range(7)]
    assert delays == pytest.approx(expected)
    rig.register_ok()  # success resets the backoff
    drop(cast(MapperRegistration, rig.agent.registration))
    assert rig.advance_timer() <= rig.agent.takeover_jitter
    rig.register_fails(TimeoutError())
    assert 0.16 <= rig.advance_timer() <= 0.24  # back to retry_initial
    rig.stop_and_check()


def test_start_gives_up_after_start_refusals() -> None:
    rig = Rig(start_refusals=2)
    rig.start()
    rig.register_fails(RegistrationRefusedError("alpha", 1))
    assert rig.state == "backoff"
    rig.advance_timer()
    rig.register_fails(RegistrationRefusedError("alpha", 1))
    assert rig.state == "stopped"
    assert rig.started is not None
    assert isinstance(failure_of(rig.started), RegistrationRefusedError)
    rig.started.addErrback(lambda _: None)
    waiting = rig.agent.when_registered()
    assert isinstance(failure_of(waiting), CancelledError)
    waiting.addErrback(lambda _: None)
    rig.stop_and_check()


def test_after_start_a_taken_name_is_retried_for_ever() -> None:
    rig = Rig(start_refusals=1)
    rig.reach("registered")
    drop(cast(MapperRegistration, rig.agent.registration))
    for _ in range(5):
        rig.advance_timer()
        rig.register_fails(RegistrationRefusedError("alpha", 1))
        assert rig.state == "backoff"
    rig.stop_and_check()


# --------------------------------------------------------------------------- stopping


def test_stop_during_registering_cancels_the_attempt_and_start() -> None:
    rig = Rig()
    rig.start()
    attempt = rig.client.attempts[-1]
    stopped = rig.agent.stop()
    assert rig.client.cancelled == [attempt]
    assert rig.started is not None and isinstance(failure_of(rig.started), CancelledError)
    rig.started.addErrback(lambda _: None)
    assert stopped.result is None and rig.state == "stopped"
    with pytest.raises(RuntimeError, match="already started"):
        rig.agent.start()
    rig.stop_and_check()


def test_a_registration_arriving_after_stop_is_unregistered() -> None:
    rig = Rig()
    rig.start()
    attempt = rig.client.attempts[-1]
    attempt.pause()  # its result is in, but not yet delivered when stop() comes
    late = rig.register_ok()
    rig.agent.stop()
    attempt.unpause()
    assert late.closed_by_us and not late.active and rig.state == "stopped"
    rig.stop_and_check()


def test_a_port_arriving_after_stop_is_closed() -> None:
    rig = Rig()
    rig.reach("listening")
    attempt = rig.server.attempts[-1]
    attempt.pause()
    port = rig.listen_ok()
    rig.agent.stop()
    attempt.unpause()
    assert port.stopped == 1 and not rig.hosting()
    rig.stop_and_check()


@pytest.mark.parametrize("state", STATES)
def test_stop_works_from_every_state_and_is_idempotent(state: str) -> None:
    rig = Rig()
    rig.reach(state)
    if rig.started is not None:
        rig.started.addErrback(lambda _: None)
    first, second = rig.agent.stop(), rig.agent.stop()
    for registration in rig.registrations:
        cast(FakeConnection, registration._protocol).finish()
    assert first.result is None and second.result is None
    assert rig.agent.stop().result is None  # at once, once stopped
    assert rig.state == "stopped" and rig.clock.getDelayedCalls() == []
    with pytest.raises(RuntimeError):
        rig.agent.start()
    rig.stop_and_check()


def test_a_stop_that_never_completes_times_out(events: list[LogEvent]) -> None:
    rig = Rig(timeout=3)
    rig.start()
    rig.register_ok(closes=False)
    stopped = rig.agent.stop()
    assert rig.state == "stopping" and not stopped.called
    rig.clock.advance(3)
    assert stopped.result is None and rig.state == "stopped"
    assert any("did not stop cleanly" in line for line in lines(events))
    assert rig.clock.getDelayedCalls() == []


# --------------------------------------------------------------------------- faults


def test_a_client_that_raises_is_a_fault_and_the_machine_recovers(
    events: list[LogEvent]
) -> None:
    rig = Rig()
    rig.client.raises = RuntimeError("client exploded")
    started = rig.start()
    assert rig.state == "backoff" and rig.agent.faults == 1 and not started.called
    (fault,) = [e for e in events if "log_failure" in e]
    assert fault["log_level"] is LogLevel.error
    assert (fault["name"], fault["state"]) == ("alpha", "registering")
    assert "client exploded" in str(fault["log_failure"].value)
    rig.client.raises = None
    rig.advance_timer()
    rig.register_ok(creation=8)
    assert rig.state == "registered" and started.result == 8
    rig.stop_and_check()


def test_an_error_inside_a_transition_backs_off_and_keeps_the_mapper() -> None:
    rig = Rig(mapper_port=0)  # so that claiming reads the port back: getHost() raises
    rig.reach("listening")
    port = rig.port()
    port.host_raises = True
    rig.server.attempts[-1].callback(port)
    assert rig.state == "hosting_backoff" and rig.hosting() and rig.agent.faults == 1
    assert len(rig.client.attempts) == 1  # the first one, refused; claiming never registered
    rig.advance_timer()
    assert rig.state == "claiming"
    rig.register_ok()
    assert rig.state == "hosting"
    rig.stop_and_check()


class FlakyRandom(random.Random):
    """A random source that raises once, after ``good`` draws."""

    def __init__(self, good: int) -> None:
        super().__init__(1)
        self.good = good

    def uniform(self, a: float, b: float) -> float:
        self.good -= 1
        if self.good == -1:
            raise ValueError("entropy ran out")
        return super().uniform(a, b)


def test_an_error_in_the_lost_callback_path_does_not_leave_it_stuck() -> None:
    rig = Rig(rng=FlakyRandom(0))
    rig.reach("registered")
    drop(cast(MapperRegistration, rig.agent.registration))  # the jitter draw raises
    assert rig.state == "backoff" and rig.agent.faults == 1
    rig.advance_timer()
    assert rig.state == "registering"
    rig.register_ok()
    rig.stop_and_check()


def test_user_callbacks_that_raise_or_call_back_in_change_nothing() -> None:
    rig = Rig()
    started = rig.start()

    def explode(_: object) -> None:
        raise RuntimeError("a user callback")

    started.addCallback(explode).addErrback(lambda _: None)
    stopped: list[object] = []
    rig.agent.when_registered().addCallback(lambda _: rig.agent.stop().addBoth(stopped.append))
    rig.register_ok()
    assert stopped == [None] and rig.state == "stopped" and rig.agent.faults == 0
    rig.stop_and_check()


def test_stop_from_a_start_errback_while_stopping() -> None:
    rig = Rig()
    started = rig.start()
    again: list[object] = []
    started.addErrback(lambda _: rig.agent.stop().addBoth(again.append))
    rig.agent.stop()
    assert again == [None] and rig.state == "stopped"
    rig.stop_and_check()
