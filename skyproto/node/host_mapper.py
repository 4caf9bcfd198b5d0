"""A node's registration with its own host's mapper, as one explicit state machine.

As in the epmd article, every program tries to start the mapper and failing is fine.
:class:`HostMapper` registers the node's short name with the mapper at
``connect_endpoint``; if nothing answers (connection refused) it listens as the mapper
on ``listen_endpoint`` and registers with itself; if that listen fails because the
address is taken, another node won the race and we register with it. The registration
lives as long as its connection. When the connection goes and we did not close it (the
hosting node died, or someone sent STOP), every survivor waits a random
``0..takeover_jitter`` seconds and tries again; failures are retried with bounded,
jittered, exponential backoff. A node that hosts keeps serving the mapper to everyone
until :meth:`HostMapper.stop`, which also closes every registration it serves so that the
others take over at once.

The life cycle is one automat machine (the model is Twisted's ``ClientService``)::

    idle --start--> registering --registered--> registered --lost--> backoff
    registering --refused--> listening --listening--> claiming --registered--> hosting
    listening --address_in_use--> joining --registered--> registered
    hosting --lost--> hosting_backoff --retry--> claiming (registering with ourselves)
    backoff --retry--> registering          any --stop--> stopping --cleaned_up--> stopped
    idle --stop--> stopped     registering/joining/claiming --give_up--> stopping

Every attempt (register, listen) ends in exactly one event, or is abandoned (cancelled,
its late result released) when the machine leaves the state that started it. The machine
owns its one timer. An exception in any transition or callback is logged and turned into
the ``fault`` event, which goes to a backoff state, so nothing is left stuck. Every event
is defined in every state (those that do not apply are ignored, releasing what they
carry). The reactor and the randomness are injected.

What a node registers: ALIVE2 ``PortNo`` is the TCP port of a plain ``tcp:`` harbor
endpoint (:func:`skyproto.endpoints.harbor_tcp_port`), else 0; ``Extra`` is the CBOR map
of :mod:`skyproto.mapper.extra`, with the endpoint when it is not a plain TCP port. A
registration that is not a harbor (the master, as ``skymaster``) gives ``harbor=None``
and a ``role``: its Extra carries the role instead of a harbor id, and its ``PortNo`` is
the TCP port it listens on, as a node's is.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Callable, Iterable
from typing import Any, Final, Protocol, cast

import attrs
from automat import TypeMachineBuilder
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import CannotListenError, ConnectError, ConnectionRefusedError
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IReactorTime,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.logger import Logger, LogLevel
from twisted.python import log as legacy_log
from twisted.python.failure import Failure

from ..address import check_harbor
from ..endpoints import client_endpoint_for, harbor_tcp_port
from ..errors import ConfigurationError
from ..interfaces import IMapperClient
from ..mapper.client import (
    DEFAULT_TIMEOUT,
    MapperClient,
    MapperRegistration,
    RegistrationRefusedError,
)
from ..mapper.extra import encode_extra
from ..mapper.port import mapper_server_endpoint
from ..mapper.server import MapperServerFactory, MapperServerProtocol

__all__ = [
    "DEFAULT_RETRY_INITIAL",
    "DEFAULT_RETRY_MAX",
    "DEFAULT_START_REFUSALS",
    "DEFAULT_TAKEOVER_JITTER",
    "STATES",
    "HostMapper",
]

#: Seconds a survivor waits at most (uniformly at random) before trying to take over.
DEFAULT_TAKEOVER_JITTER: Final = 0.5
#: The first retry delay after a failed attempt, then doubled up to :data:`DEFAULT_RETRY_MAX`.
DEFAULT_RETRY_INITIAL: Final = 0.2
#: The longest wait between attempts (OTP nodes retry every 2 s).
DEFAULT_RETRY_MAX: Final = 2.0
#: How many "name already registered" answers :meth:`HostMapper.start` takes before it
#: gives up (each may be a stale registration whose connection is still closing).
DEFAULT_START_REFUSALS: Final = 5


# --------------------------------------------------------------------------- outcomes


def _is_refused(failure: Failure) -> bool:
    """Whether a connect failed because nothing listens there (so we may host the mapper)."""
    if failure.check(ConnectionRefusedError):
        return True
    error = failure.value
    return isinstance(error, ConnectError) and getattr(error, "osError", None) in (
        errno.ECONNREFUSED,
        errno.ENOENT,  # unix: no socket file
    )


def _is_address_in_use(failure: Failure) -> bool:
    """Whether a listen failed because someone else already listens there."""
    error = failure.value
    if not isinstance(error, CannotListenError):
        return False
    cause = error.socketError
    if getattr(cause, "errno", None) == errno.EADDRINUSE:
        return True
    return isinstance(cause, str) and "in use" in cause  # loopback: "name already in use"


def _reason(failure: Failure) -> str:
    return f"{type(failure.value).__name__}: {failure.getErrorMessage()}"


# --------------------------------------------------------------------------- hosting


class _HostedMapperFactory(MapperServerFactory):
    """The in-process mapper: a :class:`MapperServerFactory` that says when it is idle."""

    def __init__(self, reactor: IReactorTime, port: int, relaxed: bool) -> None:
        super().__init__(reactor, port, relaxed=relaxed)
        self._idle_waiters: list[Deferred[None]] = []

    def connection_closed(self, protocol: MapperServerProtocol) -> None:
        super().connection_closed(protocol)
        if not self.connections:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def when_idle(self) -> Deferred[None]:
        """Fires once no connection to this mapper is open."""
        if not self.connections:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter


@attrs.frozen(eq=False)
class _Hosted:
    """The mapper we run: its factory and the port it listens on."""

    factory: _HostedMapperFactory
    port: IListeningPort

    def close(self) -> Deferred[None]:
        """Stop listening and close every connection it serves; fires when all are gone."""
        stopped = self.port.stopListening()
        for protocol in list(self.factory.connections):
            if protocol.transport is not None:
                protocol.transport.loseConnection()
        steps: list[Deferred[Any]] = [self.factory.when_idle()]
        if stopped is not None:
            steps.append(cast("Deferred[Any]", stopped))
        return gatherResults(steps, consumeErrors=True).addCallback(lambda _: None)

    def abort(self) -> None:
        """Cut whatever connections are still open (closing took too long)."""
        for protocol in list(self.factory.connections):
            transport = protocol.transport
            if transport is not None:
                transport.abortConnection()  # type: ignore[attr-defined]


@attrs.define(eq=False)
class _Attempt:
    """One register or listen try. Its result reaches the machine only while it is current."""

    kind: str
    deferred: Deferred[Any] | None = None


# --------------------------------------------------------------------------- the machine


class _Events(Protocol):
    """The machine's events: two from the owner, the rest from its own attempts and timer."""

    def start(self) -> None:
        "Register (hosting the mapper if nobody does)."

    def stop(self) -> None:
        "Unregister, stop hosting, cancel everything; idempotent."

    def registered(self, registration: MapperRegistration) -> None:
        "A register attempt succeeded."

    def refused(self, failure: Failure) -> None:
        "A register attempt found nothing listening at connect_endpoint."

    def name_taken(self, failure: Failure) -> None:
        "The mapper answered ALIVE2 with an error: the name is registered."

    def give_up(self, failure: Failure) -> None:
        "The name stayed taken for start_refusals answers while starting."

    def failed(self, failure: Failure) -> None:
        "An attempt failed otherwise (timeout, reset, listen error, ...)."

    def listening(self, hosted: _Hosted) -> None:
        "A listen attempt succeeded: we run the mapper."

    def address_in_use(self, failure: Failure) -> None:
        "A listen attempt lost the race: another node runs the mapper."

    def lost(self, registration: MapperRegistration) -> None:
        "Our registration connection closed, not by our hand."

    def retry(self) -> None:
        "The backoff timer fired."

    def fault(self, failure: Failure) -> None:
        "Our own code raised: log, clean up, back off."

    def cleaned_up(self) -> None:
        "Stopping finished (or timed out)."


class _Core:
    """What the machine acts on: configuration, the one attempt, the timer, the waiters."""

    log = Logger(namespace="skyproto.node.host_mapper")

    def __init__(
        self,
        reactor: IReactorTime,
        client: IMapperClient,
        server_endpoint: IStreamServerEndpoint,
        *,
        listen_endpoint: str,
        connect_endpoint: str,
        mapper_port: int,
        name: str,
        port: int,
        extra: bytes,
        rng: random.Random,
        takeover_jitter: float,
        retry_initial: float,
        retry_max: float,
        start_refusals: int,
        timeout: float,
        relaxed: bool,
    ) -> None:
        self.reactor = reactor
        self.client = client
        self.server_endpoint = server_endpoint
        self.listen_endpoint = listen_endpoint
        self.connect_endpoint = connect_endpoint
        self.mapper_port = mapper_port
        self.name = name
        self.port = port
        self.extra = extra
        self.rng = rng
        self.takeover_jitter = takeover_jitter
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.start_refusals = start_refusals
        self.timeout = timeout
        self.relaxed = relaxed
        #: the name of the machine's current state (see :data:`STATES`)
        self.state = "idle"
        self.attempt: _Attempt | None = None
        self.timer: IDelayedCall | None = None
        self.backoff = 0.0
        self.refusals = 0
        self.faults = 0
        self.registration: MapperRegistration | None = None
        self.creation: int | None = None
        self.hosted: _Hosted | None = None
        self.fresh_mapper = False
        self.start_waiter: Deferred[int] | None = None
        self.start_failure: Failure | None = None
        self.registered_waiters: list[Deferred[int]] = []
        self.stop_waiters: list[Deferred[None]] = []

    # --- attempts ------------------------------------------------------------------------

    def register(self, machine: _Events) -> None:
        """Start a register attempt at connect_endpoint (one attempt at a time)."""
        self.abandon()
        attempt = self.attempt = _Attempt("register")
        registering = cast(
            "Deferred[MapperRegistration]",
            self.client.register(self.name, self.port, self.extra),
        )
        attempt.deferred = registering
        registering.addCallbacks(
            lambda registration: self._guard(machine, self._register_done, machine, attempt,
                                             registration),
            lambda failure: self._guard(machine, self._register_failed, machine, attempt,
                                        failure),
        )

    def _register_done(
        self, machine: _Events, attempt: _Attempt, registration: MapperRegistration
    ) -> None:
        if attempt is not self.attempt:  # abandoned: nobody wants it any more
            registration.unregister()
            return
        self.attempt = None
        machine.registered(registration)

    def _register_failed(self, machine: _Events, attempt: _Attempt, failure: Failure) -> None:
        if attempt is not self.attempt:
            return
        self.attempt = None
        if _is_refused(failure):
            machine.refused(failure)
        elif failure.check(RegistrationRefusedError):
            self.refusals += 1
            if self.start_waiter is not None and self.refusals >= self.start_refusals:
                machine.give_up(failure)
            else:
                machine.name_taken(failure)
        else:
            machine.failed(failure)

    def listen(self, machine: _Events) -> None:
        """Start a listen attempt on listen_endpoint, as this host's mapper."""
        self.abandon()
        attempt = self.attempt = _Attempt("listen")
        factory = _HostedMapperFactory(self.reactor, self.mapper_port, self.relaxed)
        # This runs inside a failed connect's callbacks, whose log context would make
        # Twisted's "... starting on PORT" line say [Uninitialized]: give it the default.
        listening: Deferred[IListeningPort] = legacy_log.callWithContext(  # type: ignore[no-untyped-call]
            {"system": "-"}, self.server_endpoint.listen, factory)
        attempt.deferred = listening
        listening.addCallbacks(
            lambda port: self._guard(machine, self._listen_done, machine, attempt,
                                     _Hosted(factory, port)),
            lambda failure: self._guard(machine, self._listen_failed, machine, attempt,
                                        failure),
        )

    def _listen_done(self, machine: _Events, attempt: _Attempt, hosted: _Hosted) -> None:
        if attempt is not self.attempt:
            self.discard(hosted)
            return
        self.attempt = None
        machine.listening(hosted)

    def _listen_failed(self, machine: _Events, attempt: _Attempt, failure: Failure) -> None:
        if attempt is not self.attempt:
            return
        self.attempt = None
        if _is_address_in_use(failure):
            machine.address_in_use(failure)
        else:
            machine.failed(failure)

    def discard(self, hosted: _Hosted) -> None:
        """Close a mapper nobody wants any more (a late listen result)."""
        hosted.close().addErrback(
            lambda failure: self.log.warn("cannot close a late mapper on {endpoint}: {reason}",
                                          endpoint=self.listen_endpoint, reason=_reason(failure))
        )

    def abandon(self) -> None:
        """Forget the attempt in flight (its late result is released) and cancel it."""
        attempt, self.attempt = self.attempt, None
        if attempt is not None and attempt.deferred is not None and not attempt.deferred.called:
            attempt.deferred.cancel()

    # --- the registration ----------------------------------------------------------------

    def hold(self, machine: _Events, registration: MapperRegistration) -> None:
        """Keep a new registration, watch it, and tell everyone waiting for it."""
        self.registration = registration
        self.creation = registration.creation
        self.backoff = 0.0
        self.refusals = 0
        registration.when_lost().addCallback(
            lambda _: self._guard(machine, self._registration_lost, machine, registration)
        )
        start, self.start_waiter = self.start_waiter, None
        waiters, self.registered_waiters = self.registered_waiters, []
        if start is not None:
            start.callback(registration.creation)
        for waiter in waiters:
            waiter.callback(registration.creation)

    def _registration_lost(self, machine: _Events, registration: MapperRegistration) -> None:
        if registration is self.registration and not registration.closed_by_us:
            machine.lost(registration)

    def release(self) -> None:
        """Close our registration, if we hold one (we closed it: no ``lost`` follows)."""
        registration, self.registration = self.registration, None
        if registration is not None:
            registration.unregister()

    # --- the timer -----------------------------------------------------------------------

    def wait(self, machine: _Events, delay: float) -> None:
        """Schedule the retry; the machine has at most one timer."""
        self.cancel_timer()
        self.timer = self.reactor.callLater(delay, machine.retry)

    def cancel_timer(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def next_backoff(self) -> float:
        """The delay before the next try after a failure: doubled each time, jittered."""
        self.backoff = min(self.retry_max, self.backoff * 2 or self.retry_initial)
        return self.backoff * self.rng.uniform(0.8, 1.2)

    def takeover_delay(self) -> float:
        """The delay before re-registering (or taking over) after the mapper went away."""
        self.backoff = 0.0
        return self.rng.uniform(0.0, self.takeover_jitter)

    # --- faults --------------------------------------------------------------------------

    def _guard(self, machine: _Events, function: Callable[..., None], *args: Any) -> None:
        """Run a callback; if it raises, log it and feed the machine ``fault``."""
        try:
            function(*args)
        except Exception:
            failure = Failure()
            self.log_fault(failure, getattr(function, "__name__", "callback"))
            machine.fault(failure)

    def log_fault(self, failure: Failure, where: str) -> None:
        self.faults += 1
        self.log.failure(
            "mapper agent for {name}: unexpected error in {where} (state {state})",
            failure, LogLevel.error, name=self.name, where=where, state=self.state,
        )

    # --- stopping ------------------------------------------------------------------------

    def cancel_waiters(self) -> None:
        """Errback the start waiter (with why start failed) and every when_registered."""
        cancelled = CancelledError(f"mapper agent for {self.name} stopped")
        start, self.start_waiter = self.start_waiter, None
        reason, self.start_failure = self.start_failure, None
        waiters, self.registered_waiters = self.registered_waiters, []
        if start is not None and not start.called:
            start.errback(reason if reason is not None else Failure(cancelled))
        for waiter in waiters:
            waiter.errback(cancelled)

    def finish_stopping(self) -> None:
        waiters, self.stop_waiters = self.stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)


_builder = TypeMachineBuilder(_Events, _Core)
_IDLE = _builder.state("idle")
_REGISTERING = _builder.state("registering")
_LISTENING = _builder.state("listening")
_JOINING = _builder.state("joining")
_CLAIMING = _builder.state("claiming")
_REGISTERED = _builder.state("registered")
_HOSTING = _builder.state("hosting")
_BACKOFF = _builder.state("backoff")
_HOSTING_BACKOFF = _builder.state("hosting_backoff")
_STOPPING = _builder.state("stopping")
_STOPPED = _builder.state("stopped")
_ALL = (_IDLE, _REGISTERING, _LISTENING, _JOINING, _CLAIMING, _REGISTERED, _HOSTING,
        _BACKOFF, _HOSTING_BACKOFF, _STOPPING, _STOPPED)
#: Every state's name, in the order of the life cycle.
STATES: Final = tuple(state.name for state in _ALL)
#: The states a stop has reached.
_ENDING: Final = frozenset({"stopping", "stopped"})
_EVENTS: Final = (_Events.start, _Events.stop, _Events.registered, _Events.refused,
                  _Events.name_taken, _Events.give_up, _Events.failed, _Events.listening,
                  _Events.address_in_use, _Events.lost, _Events.retry, _Events.fault,
                  _Events.cleaned_up)
_defined: set[tuple[str, str]] = set()

_Output = Callable[..., None]


def _on(sources: Iterable[Any], event: Callable[..., None], target: Any, *,
        faults: bool = True) -> Callable[[_Output], _Output]:
    """Declare ``sources --event--> target`` with the decorated output.

    The output runs after ``state`` names the target. If it raises, the error is logged
    and ``fault`` follows (queued by automat until this transition is over), unless this
    is a fault or stop transition itself (``faults=False``): then it is only logged.
    """
    def decorate(output: _Output) -> _Output:
        def run(machine: _Events, core: _Core, *args: Any) -> None:
            core.state = target.name
            try:
                output(machine, core, *args)
            except Exception:
                failure = Failure()
                core.log_fault(failure, f"{event.__name__} -> {target.name}")
                if faults:
                    machine.fault(failure)

        run.__name__ = output.__name__
        for source in sources:
            key = (source.name, event.__name__)
            assert key not in _defined, key
            _defined.add(key)
            source.upon(event).to(target)(run)
        return output

    return decorate


# --- starting and registering -----------------------------------------------------------


@_on([_IDLE], _Events.start, _REGISTERING)
@_on([_BACKOFF], _Events.retry, _REGISTERING)
def _register(machine: _Events, core: _Core, *_: object) -> None:
    core.cancel_timer()
    core.register(machine)


@_on([_HOSTING_BACKOFF], _Events.retry, _CLAIMING)
def _register_with_ourselves(machine: _Events, core: _Core) -> None:
    core.cancel_timer()
    core.register(machine)


@_on([_REGISTERING], _Events.refused, _LISTENING)
def _take_over(machine: _Events, core: _Core, failure: Failure) -> None:
    core.log.debug("nothing answers at {connect}: listening as the mapper on {endpoint}",
                   connect=core.connect_endpoint, endpoint=core.listen_endpoint, name=core.name)
    core.listen(machine)


@_on([_LISTENING], _Events.listening, _CLAIMING)
def _claim(machine: _Events, core: _Core, hosted: _Hosted) -> None:
    core.hosted = hosted
    core.fresh_mapper = True
    if hosted.factory.port == 0:
        hosted.factory.port = getattr(hosted.port.getHost(), "port", 0)
    core.log.debug("listening as the mapper on {endpoint}", endpoint=core.listen_endpoint,
                   name=core.name)
    core.register(machine)


@_on([_LISTENING], _Events.address_in_use, _JOINING)
def _join(machine: _Events, core: _Core, failure: Failure) -> None:
    core.log.info(
        "another node started the mapper on {endpoint} first: registering with it",
        endpoint=core.listen_endpoint, name=core.name,
    )
    core.register(machine)


@_on([_REGISTERING, _JOINING], _Events.registered, _REGISTERED)
def _registered(machine: _Events, core: _Core, registration: MapperRegistration) -> None:
    core.log.info(
        "registered {name} with the mapper at {endpoint} (port {port}, creation {creation})",
        endpoint=core.connect_endpoint, name=core.name, port=core.port,
        creation=registration.creation, hosting=False,
    )
    core.hold(machine, registration)


@_on([_CLAIMING], _Events.registered, _HOSTING)
def _hosting(machine: _Events, core: _Core, registration: MapperRegistration) -> None:
    if core.fresh_mapper:
        core.fresh_mapper = False
        core.log.info(
            "started the mapper on {endpoint}; registered {name} (port {port}, "
            "creation {creation})",
            endpoint=core.listen_endpoint, name=core.name, port=core.port,
            creation=registration.creation, hosting=True,
        )
    else:
        core.log.info(
            "registered {name} with the mapper at {endpoint} (port {port}, creation "
            "{creation})",
            endpoint=core.connect_endpoint, name=core.name, port=core.port,
            creation=registration.creation, hosting=True,
        )
    core.hold(machine, registration)


# --- failures: back off ---------------------------------------------------------------


def _retry_later(machine: _Events, core: _Core, what: str) -> None:
    delay = core.next_backoff()
    core.wait(machine, delay)
    core.log.warn("mapper at {endpoint}: {what}; retrying in {delay:.2f} s",
                  endpoint=core.connect_endpoint, what=what, delay=delay, name=core.name)


@_on([_REGISTERING, _JOINING], _Events.name_taken, _BACKOFF)
@_on([_CLAIMING], _Events.name_taken, _HOSTING_BACKOFF)
def _still_registered(machine: _Events, core: _Core, failure: Failure) -> None:
    _retry_later(machine, core,
                 f"{core.name} is still registered (maybe a stale registration closing)")


@_on([_REGISTERING, _JOINING], _Events.failed, _BACKOFF)
@_on([_JOINING], _Events.refused, _BACKOFF)
@_on([_CLAIMING], _Events.failed, _HOSTING_BACKOFF)
def _cannot_register(machine: _Events, core: _Core, failure: Failure) -> None:
    _retry_later(machine, core, f"cannot register {core.name}: {_reason(failure)}")


@_on([_CLAIMING], _Events.refused, _HOSTING_BACKOFF)
def _own_mapper_refuses(machine: _Events, core: _Core, failure: Failure) -> None:
    _retry_later(machine, core,
                 f"our own mapper on {core.listen_endpoint} refuses connections at "
                 f"{core.connect_endpoint}: do the two name the same address?")


@_on([_LISTENING], _Events.failed, _BACKOFF)
def _cannot_listen(machine: _Events, core: _Core, failure: Failure) -> None:
    delay = core.next_backoff()
    core.wait(machine, delay)
    core.log.warn(
        "nothing answers at {connect} and the mapper cannot listen on {endpoint} "
        "({reason}); retrying in {delay:.2f} s",
        connect=core.connect_endpoint, endpoint=core.listen_endpoint,
        reason=_reason(failure), delay=delay, name=core.name,
    )


@_on([_REGISTERED], _Events.lost, _BACKOFF)
@_on([_HOSTING], _Events.lost, _HOSTING_BACKOFF)
def _mapper_went_away(machine: _Events, core: _Core, registration: MapperRegistration) -> None:
    core.release()  # already closed: this only forgets it
    delay = core.takeover_delay()
    core.wait(machine, delay)
    reason = registration.lost_reason
    core.log.warn(
        "the mapper at {endpoint} dropped the registration of {name} ({reason}); "
        "re-registering (or taking over) in {delay:.3f} s",
        endpoint=core.connect_endpoint, name=core.name, delay=delay,
        reason="?" if reason is None else _reason(reason), hosting=core.hosted is not None,
    )


@_on([_REGISTERING, _LISTENING, _JOINING, _REGISTERED, _BACKOFF], _Events.fault, _BACKOFF,
     faults=False)
@_on([_CLAIMING, _HOSTING, _HOSTING_BACKOFF], _Events.fault, _HOSTING_BACKOFF, faults=False)
def _recover(machine: _Events, core: _Core, failure: Failure) -> None:
    """Drop the attempt and the registration, and retry later (no jitter: ``rng`` may be
    what raised, and a local error needs no herd spreading)."""
    core.abandon()
    core.release()
    core.backoff = delay = min(core.retry_max, core.backoff * 2 or core.retry_initial)
    core.wait(machine, delay)
    core.log.warn("mapper agent for {name} recovers from an error; retrying in {delay:.2f} s",
                  name=core.name, delay=delay, reason=_reason(failure))


# --- giving up and stopping -------------------------------------------------------------


@_on([_REGISTERING, _JOINING, _CLAIMING], _Events.give_up, _STOPPING, faults=False)
def _give_up(machine: _Events, core: _Core, failure: Failure) -> None:
    core.log.error(
        "the mapper at {endpoint} refused {name} {refusals} times: the name is taken by a "
        "live node", endpoint=core.connect_endpoint, name=core.name, refusals=core.refusals,
    )
    core.start_failure = failure
    _stop(machine, core)


@_on([_REGISTERING, _LISTENING, _JOINING, _CLAIMING, _REGISTERED, _HOSTING, _BACKOFF,
      _HOSTING_BACKOFF], _Events.stop, _STOPPING, faults=False)
def _stop(machine: _Events, core: _Core) -> None:
    """Cancel the timer and the attempt, unregister, stop hosting; then ``cleaned_up``."""
    core.cancel_timer()
    core.abandon()
    steps: list[Deferred[Any]] = []
    registration, core.registration = core.registration, None
    if registration is not None:
        steps.append(registration.unregister())
    hosted, core.hosted = core.hosted, None
    if hosted is not None:
        others = sum(1 for p in hosted.factory.connections
                     if p.registered not in (None, core.name))
        steps.append(hosted.close())
        core.log.info(
            "stopped the mapper on {endpoint}; {others} other registrations will move",
            endpoint=core.listen_endpoint, others=others, name=core.name,
        )
    done: Deferred[Any] = gatherResults(steps, consumeErrors=True)
    done.addTimeout(core.timeout, core.reactor)

    def timed_out(failure: Failure) -> None:
        if hosted is not None:
            hosted.abort()
        core.log.warn("mapper agent for {name} did not stop cleanly: {reason}",
                      name=core.name, reason=_reason(failure))

    done.addErrback(timed_out)
    done.addBoth(lambda _: machine.cleaned_up())
    core.cancel_waiters()


@_on([_STOPPING], _Events.cleaned_up, _STOPPED, faults=False)
@_on([_STOPPING], _Events.fault, _STOPPED, faults=False)
@_on([_IDLE], _Events.stop, _STOPPED, faults=False)
def _stopped(machine: _Events, core: _Core, *_: object) -> None:
    core.cancel_timer()
    core.abandon()
    core.cancel_waiters()
    core.log.info("mapper agent for {name} stopped", name=core.name)
    core.finish_stopping()


@_on([_STOPPED], _Events.stop, _STOPPED, faults=False)
def _already_stopped(machine: _Events, core: _Core) -> None:
    core.finish_stopping()


@_on([_STOPPING], _Events.stop, _STOPPING, faults=False)
def _stopping_already(machine: _Events, core: _Core) -> None:
    """The stop waiter is queued; it fires with the others once cleaned up."""


# --- everything else: ignored, releasing what the event carries --------------------------


def _ignore(machine: _Events, core: _Core, *args: object) -> None:
    """An event that does not apply in this state (a late or repeated one)."""
    for arg in args:
        if isinstance(arg, MapperRegistration) and arg is not core.registration:
            arg.unregister()
        elif isinstance(arg, _Hosted) and arg is not core.hosted:
            core.discard(arg)
    core.log.debug("mapper agent for {name} ignores an event in state {state}",
                   name=core.name, state=core.state)


for _state in _ALL:
    for _event in _EVENTS:
        if (_state.name, _event.__name__) not in _defined:
            _on([_state], _event, _state, faults=False)(_ignore)

_Machine = _builder.build()


class HostMapper:
    """A node's agent for its host's mapper: register, host it if nobody does, take over.

    ``listen_endpoint`` is where a mapper for this host listens (``tcp:4369:interface=
    127.0.0.1``) and ``connect_endpoint`` how to reach it (``tcp:127.0.0.1:4369``); they
    must name the same place, or a node that starts a mapper would never find it.
    ``mapper_port`` is the number the hosted mapper reports in NAMES (Erlang insists it is
    its own epmd port; 0 means "the port listened on"). ``name`` is the node's short name
    (no ``@host``), ``harbor_endpoint`` where its harbor link listens (see
    :func:`skyproto.endpoints.harbor_tcp_port` and
    :func:`skyproto.endpoints.client_endpoint_for`), ``harbor`` its harbor id, or None
    for a registration that is not a harbor, which names its ``role`` instead (a master
    registers ``harbor=None, role="master"`` with the endpoint it listens on), ``rng``
    the source of jitter. ``client`` and ``server_endpoint`` replace the ones built from
    the two endpoint strings (tests give fakes). For a ``unix:`` mapper use ``lockfile=1``
    in ``listen_endpoint`` so a stale socket file left by a dead host is replaced rather
    than taken for a live mapper.

    For tests and operators: ``state`` (one of :data:`STATES`), ``hosting`` (we run the
    mapper), ``registered``, ``creation`` (for our current or last registration),
    ``server`` / ``listening_port`` (the hosted mapper, while hosting).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        listen_endpoint: str,
        connect_endpoint: str,
        mapper_port: int,
        name: str,
        harbor_endpoint: str,
        harbor: int | None,
        rng: random.Random | None = None,
        *,
        role: str | None = None,
        takeover_jitter: float = DEFAULT_TAKEOVER_JITTER,
        retry_initial: float = DEFAULT_RETRY_INITIAL,
        retry_max: float = DEFAULT_RETRY_MAX,
        start_refusals: int = DEFAULT_START_REFUSALS,
        timeout: float = DEFAULT_TIMEOUT,
        relaxed: bool = False,
        client: IMapperClient | None = None,
        server_endpoint: IStreamServerEndpoint | None = None,
    ) -> None:
        if takeover_jitter < 0 or retry_initial <= 0 or retry_max < retry_initial:
            raise ValueError("need takeover_jitter >= 0 and 0 < retry_initial <= retry_max")
        if start_refusals < 1:
            raise ValueError("start_refusals must be at least 1")
        self.reactor = reactor
        self.listen_endpoint = listen_endpoint
        self.connect_endpoint = connect_endpoint
        self.mapper_port = mapper_port
        self.name = name
        if harbor is None and not role:
            raise ConfigurationError(f"mapper for {name!r}: give a harbor id or a role")
        self.harbor = None if harbor is None else check_harbor(harbor)
        #: what a registration without a harbor id is (``"master"``), else None
        self.role = role if harbor is None else None
        self.harbor_endpoint = harbor_endpoint
        try:
            port = harbor_tcp_port(harbor_endpoint)
            advertised = None if port is not None else client_endpoint_for(harbor_endpoint)
            self.extra = encode_extra(self.harbor, advertised, role=self.role)
            if server_endpoint is None:
                server_endpoint = mapper_server_endpoint(reactor, listen_endpoint)
            if client is None:
                endpoint: IStreamClientEndpoint = clientFromString(reactor, connect_endpoint)
                client = MapperClient(reactor, endpoint, timeout=timeout)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigurationError(f"mapper for node {name!r}: {e}") from None
        #: the ALIVE2 port we register (0 when the endpoint travels in ``extra``)
        self.port = port if port is not None else 0
        #: the client endpoint advertised in Extra, or None for a plain TCP port
        self.advertised_endpoint = advertised
        self.client = client
        self._started = False
        self._core = _Core(
            reactor, client, server_endpoint,
            listen_endpoint=listen_endpoint, connect_endpoint=connect_endpoint,
            mapper_port=mapper_port, name=name, port=self.port, extra=self.extra,
            rng=rng if rng is not None else random.Random(),
            takeover_jitter=takeover_jitter, retry_initial=retry_initial,
            retry_max=retry_max, start_refusals=start_refusals, timeout=timeout,
            relaxed=relaxed,
        )
        self._machine: _Events = _Machine(self._core)

    def __repr__(self) -> str:
        return f"<HostMapper {self.name!r} at {self.connect_endpoint} {self.state}>"

    # --- what it is doing ----------------------------------------------------------------

    @property
    def state(self) -> str:
        """The machine's state: one of :data:`STATES`."""
        return self._core.state

    @property
    def rng(self) -> random.Random:
        """The random source of the jitter and backoff."""
        return self._core.rng

    @property
    def takeover_jitter(self) -> float:
        """At most this many seconds of random wait before re-registering or taking over."""
        return self._core.takeover_jitter

    @property
    def retry_initial(self) -> float:
        """The first retry delay, in seconds, after a failed registration."""
        return self._core.retry_initial

    @property
    def retry_max(self) -> float:
        """The cap of the retry delay, in seconds."""
        return self._core.retry_max

    @property
    def start_refusals(self) -> int:
        """How many refusals of our name end the start (the name is taken by a live node)."""
        return self._core.start_refusals

    @property
    def timeout(self) -> float:
        """Seconds one request to the mapper may take."""
        return self._core.timeout

    @property
    def relaxed(self) -> bool:
        """Whether a mapper this node hosts relaxes epmd's local-only command check."""
        return self._core.relaxed

    @property
    def registered(self) -> bool:
        """True while our registration connection is open."""
        registration = self._core.registration
        return registration is not None and registration.active

    @property
    def registration(self) -> MapperRegistration | None:
        """Our current registration, if any."""
        return self._core.registration

    @property
    def creation(self) -> int | None:
        """The mapper's creation for our current or last registration."""
        return self._core.creation

    @property
    def hosting(self) -> bool:
        """True while we run this host's mapper."""
        return self._core.hosted is not None

    @property
    def server(self) -> MapperServerFactory | None:
        """The mapper we run, while hosting."""
        hosted = self._core.hosted
        return None if hosted is None else hosted.factory

    @property
    def listening_port(self) -> IListeningPort | None:
        """The port our mapper listens on, while hosting."""
        hosted = self._core.hosted
        return None if hosted is None else hosted.port

    @property
    def faults(self) -> int:
        """How many unexpected errors the machine has recovered from."""
        return self._core.faults

    # --- public API ----------------------------------------------------------------------

    def start(self) -> Deferred[int]:
        """Register (hosting the mapper if nobody does); fires with the creation.

        Errbacks with :class:`RegistrationRefusedError` if the name stays taken for
        ``start_refusals`` attempts (the agent then stops), or CancelledError if
        :meth:`stop` comes first. Any other failure is retried with backoff.
        """
        if self._started:
            raise RuntimeError(f"{self!r} was already started")
        self._started = True
        waiter: Deferred[int] = Deferred()
        self._core.start_waiter = waiter
        self._machine.start()
        return waiter

    def when_registered(self) -> Deferred[int]:
        """Fires with the creation once registered (at once if registered now).

        Errbacks with CancelledError if the agent stops first.
        """
        creation = self._core.creation
        if self.registered and creation is not None:
            return succeed(creation)
        waiter: Deferred[int] = Deferred()
        if self.state in _ENDING:
            waiter.errback(CancelledError(f"{self!r} is stopped"))
        else:
            self._core.registered_waiters.append(waiter)
        return waiter

    def stop(self) -> Deferred[None]:
        """Unregister, stop hosting (closing every registration we serve, so the other
        nodes take over at once), cancel every timer. Idempotent; never errbacks."""
        self._started = True  # a stopped agent cannot be started
        waiter: Deferred[None] = Deferred()
        self._core.stop_waiters.append(waiter)
        self._machine.stop()
        return waiter
