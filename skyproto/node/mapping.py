"""The node side of the port mapper: register with this host's mapper, and find other nodes.

Two objects, kept apart because they answer different questions:

* :class:`HostMapper` is a node's agent for *its own host's* mapper, as in the epmd
  article: every program tries to start epmd, and failing is fine. :meth:`HostMapper.start`
  registers the node's short name with the mapper at ``connect_endpoint``; if nothing
  answers (connection refused) it starts a mapper in-process on ``listen_endpoint`` and
  registers with that; if the listen fails because the address is taken, another node won
  that race and we just register with it. The registration lives as long as its
  connection. When the connection goes and we did not close it (the hosting node died, or
  someone sent STOP), every surviving node waits a random ``0..takeover_jitter`` seconds,
  tries the same "register, else host" step, and retries with bounded, jittered,
  exponential backoff until it is registered again. A node that hosts keeps serving its
  mapper to everyone until :meth:`HostMapper.stop`, which also closes every registration
  it serves so that the others take over at once.
* :class:`NodeResolver` answers "where does ``name@host`` listen?" for any host: it
  resolves ``host`` (``reactor.resolve``: the system resolver and /etc/hosts, as Erlang
  does), asks that host's mapper with PORT_PLEASE2, and returns an endpoint string to
  dial. Answers are cached (so traffic keeps flowing while a mapper is being taken over)
  until :meth:`NodeResolver.invalidate`, which the router calls when a dial to a resolved
  endpoint fails. It is separate from :class:`HostMapper` because resolving needs no
  registration (a console tool resolves too) and is not tied to one mapper.

What a skyproto node registers (the choice this module makes, for genuine epmd and
genuine Erlang nodes alike):

* ALIVE2 ``PortNo``: the TCP port of the harbor endpoint when it is a plain ``tcp:`` or
  ``tcp6:`` endpoint with a numeric port (see :func:`harbor_tcp_port` for the exact
  forms), else 0. ``epmd -names`` and Erlang's ``net_adm:names`` thus show a real port
  for TCP nodes.
* ALIVE2 ``Extra``: always a small CBOR map (:func:`encode_extra`), ``{"harbor": id}``,
  plus ``"endpoint": "<client endpoint string>"`` when the harbor endpoint is not a plain
  TCP port (``unix:``, ``ssl:``, ``loopback:``, any plugin). The harbor id is always there
  so that a resolver can tell a skyproto registration from an Erlang one and check it
  reached the harbor it wanted. Genuine epmd stores Extra untouched (up to 1020 bytes;
  larger is refused, so :class:`HostMapper` checks the size up front) and echoes it in
  PORT2_RESP; Erlang nodes ignore it. Decoding (:func:`decode_extra`) is strict and never
  raises: a registration whose Extra is not exactly ours (an Erlang node's empty Extra,
  another program's bytes, a malformed map) is treated as having none, and such a node
  resolves to ``tcp:<ip>:<port>``.

The reactor is always injected; this module never imports the global one, so every timer
here runs on ``twisted.internet.task.Clock`` in tests.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Callable
from typing import Any, Final, cast

import attrs
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import (
    CannotListenError,
    ConnectError,
    ConnectionRefusedError,
)
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IReactorCore,
    IReactorTime,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..address import HARBOR_MAX, HARBOR_MIN, NodeName, check_harbor
from ..errors import AddressError, ConfigurationError, ProtocolError, SkyprotoError
from ..mapper.client import (
    DEFAULT_TIMEOUT,
    MapperClient,
    MapperRegistration,
    RegistrationRefusedError,
)
from ..mapper.epmd import DEFAULT_PORT, MAX_EXTRA_BYTES
from ..mapper.server import MapperServerFactory, MapperServerProtocol
from ..wire.codec import decode_cbor, encode_cbor

__all__ = [
    "EXTRA_ENDPOINT",
    "EXTRA_HARBOR",
    "HostMapper",
    "MapperExtra",
    "NodeLocation",
    "NodeNotFound",
    "NodeResolver",
    "client_endpoint_for",
    "decode_extra",
    "encode_extra",
    "harbor_tcp_port",
    "is_node_name",
    "parse_endpoint_description",
    "tcp_endpoint",
]

#: Extra-field key of the registering node's harbor id (always present in ours).
EXTRA_HARBOR: Final = "harbor"
#: Extra-field key of the client endpoint to dial, when that is not ``tcp:<ip>:<port>``.
EXTRA_ENDPOINT: Final = "endpoint"

#: Seconds a survivor waits at most (uniformly at random) before trying to take over.
DEFAULT_TAKEOVER_JITTER: Final = 0.5
#: The first retry delay after a failed attempt, then doubled up to :data:`DEFAULT_RETRY_MAX`.
DEFAULT_RETRY_INITIAL: Final = 0.2
#: The longest wait between attempts (OTP nodes retry every 2 s).
DEFAULT_RETRY_MAX: Final = 2.0
#: How many "name already registered" answers :meth:`HostMapper.start` takes before it
#: gives up (each may be a stale registration whose connection is still closing).
DEFAULT_START_REFUSALS: Final = 5

_UNIX_SERVER_ONLY_OPTIONS: Final = frozenset({"mode", "lockfile", "backlog", "wantPID"})
_STARTING: Final = "starting"
_RUNNING: Final = "running"
_STOPPED: Final = "stopped"
_IDLE: Final = "idle"


class NodeNotFound(SkyprotoError):
    """A node name could not be resolved to an endpoint (not registered, unknown host,
    or no mapper answering on its host); the message says which."""


# --------------------------------------------------------------------------- pure helpers


def is_node_name(text: str) -> bool:
    """True for ``name@host`` (no ``:`` anywhere); False for endpoint strings.

    Endpoint descriptions always contain ``:`` (``tcp:...``, ``unix:...``), node names
    never do (IPv6 literals are not supported as node hosts), so the two can share a
    command-line option or a master table column.
    """
    if ":" in text or "@" not in text:
        return False
    try:
        node = NodeName.parse(text)
    except AddressError:
        return False
    return not any(c.isspace() for c in node.host)


def parse_endpoint_description(text: str) -> tuple[str, list[str], dict[str, str]]:
    """Split an endpoint string as Twisted does: (kind, positional args, keyword args).

    Fields are separated by unescaped ``:``; a field with an unescaped ``=`` is a keyword
    argument; ``\\`` escapes the next character (``tcp6:\\:\\:1:4369``).
    """
    fields: list[tuple[str, int | None]] = []
    current: list[str] = []
    equals: int | None = None
    escaped = False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append(("".join(current), equals))
            current, equals = [], None
        else:
            if char == "=" and equals is None:
                equals = len(current)
            current.append(char)
    fields.append(("".join(current), equals))
    kind = fields[0][0]
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for value, at in fields[1:]:
        if at is None:
            args.append(value)
        else:
            kwargs[value[:at]] = value[at + 1 :]
    return kind, args, kwargs


def _escape(value: str) -> str:
    """Escape ``value`` for use as one field of an endpoint string."""
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def harbor_tcp_port(endpoint: str) -> int | None:
    """The TCP port of a plain ``tcp:``/``tcp6:`` harbor endpoint, or None for other kinds.

    Supported forms (server or client descriptions, any further options ignored):

    * ``tcp:PORT[:...]``, e.g. ``tcp:7001:interface=127.0.0.1`` (first argument numeric);
    * ``tcp:HOST:PORT[:...]``, e.g. ``tcp:127.0.0.1:7001`` (second argument numeric);
    * ``port=PORT`` as a keyword in either form.

    Anything else (``unix:``, ``ssl:``, ``loopback:``, a plugin, a TCP description with no
    numeric port) returns None: such a node is found through the Extra field. Port 0 (or
    a port outside 1..65535) raises ValueError: advertise the port actually listened on.
    """
    kind, args, kwargs = parse_endpoint_description(endpoint)
    if kind.lower() not in ("tcp", "tcp6"):
        return None
    if "port" in kwargs:
        text: str | None = kwargs["port"]
    elif args and args[0].isdigit():
        text = args[0]
    elif len(args) >= 2 and args[1].isdigit():
        text = args[1]
    else:
        text = None
    if text is None or not text.isdigit():
        return None
    port = int(text)
    if not 1 <= port <= 0xFFFF:
        raise ValueError(
            f"harbor endpoint {endpoint!r} has port {port}: advertise the port actually "
            "listened on (1..65535)"
        )
    return port


def client_endpoint_for(endpoint: str) -> str:
    """The client form of a listening endpoint, for peers to dial: what goes in Extra.

    ``unix:PATH`` loses its server-only options (``mode``, ``lockfile``, ``backlog``,
    ``wantPID``); other kinds are returned unchanged, so give their client form.
    """
    kind, args, kwargs = parse_endpoint_description(endpoint)
    if kind.lower() != "unix":
        return endpoint
    kept = [f"{_escape(k)}={_escape(v)}" for k, v in kwargs.items()
            if k not in _UNIX_SERVER_ONLY_OPTIONS]
    return ":".join([kind, *(_escape(a) for a in args), *kept])


def tcp_endpoint(address: str, port: int) -> str:
    """A client endpoint string for ``address:port``: ``tcp:`` or, for IPv6, ``tcp6:``."""
    if ":" in address:
        return f"tcp6:{_escape(address)}:{port}"
    return f"tcp:{address}:{port}"


@attrs.frozen
class MapperExtra:
    """A skyproto node's EPMD Extra field, decoded: its harbor id and, maybe, its endpoint."""

    harbor: int
    endpoint: str | None = None


def encode_extra(harbor: int, endpoint: str | None = None) -> bytes:
    """The CBOR map a skyproto node puts in ALIVE2's Extra; ValueError above 1020 bytes."""
    value: dict[str, object] = {EXTRA_HARBOR: check_harbor(harbor)}
    if endpoint is not None:
        if not endpoint or "\x00" in endpoint:
            raise ValueError(f"cannot advertise the endpoint {endpoint!r}")
        value[EXTRA_ENDPOINT] = endpoint
    data = encode_cbor(value)
    if len(data) > MAX_EXTRA_BYTES:
        raise ValueError(
            f"the mapper Extra for endpoint {endpoint!r} is {len(data)} bytes; "
            f"epmd accepts at most {MAX_EXTRA_BYTES}"
        )
    return data


def decode_extra(data: bytes) -> MapperExtra | None:
    """Our Extra, or None if ``data`` is not exactly one (empty, malformed, someone else's).

    Strict and total: a CBOR map with text keys whose ``harbor`` is an int in 1..255 and
    whose ``endpoint``, if present, is a non-empty string without NUL. Unknown keys are
    ignored (room for later versions); anything else yields None, never an exception.
    """
    if not data or len(data) > MAX_EXTRA_BYTES:
        return None
    try:
        value = decode_cbor(data)
    except ProtocolError:
        return None
    if type(value) is not dict:
        return None
    harbor = value.get(EXTRA_HARBOR)
    if type(harbor) is not int or not HARBOR_MIN <= harbor <= HARBOR_MAX:
        return None
    endpoint = value.get(EXTRA_ENDPOINT)
    if endpoint is not None and (type(endpoint) is not str or not endpoint or "\x00" in endpoint):
        return None
    return MapperExtra(harbor, endpoint)


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


class HostMapper:
    """A node's agent for its host's mapper: register, host it if nobody does, take over.

    ``listen_endpoint`` is where a mapper for this host listens (``tcp:4369:interface=
    127.0.0.1``) and ``connect_endpoint`` how to reach it (``tcp:127.0.0.1:4369``); they
    must name the same place, or a node that starts a mapper would never find it.
    ``mapper_port`` is the number the hosted mapper reports in NAMES (Erlang insists it is
    its own epmd port; 0 means "the port listened on"). ``name`` is the node's short name
    (no ``@host``), ``harbor_endpoint`` where its harbor link listens (see
    :func:`harbor_tcp_port` and :func:`client_endpoint_for`), ``harbor`` its harbor id.
    For a ``unix:`` mapper use ``lockfile=1`` in ``listen_endpoint`` so a stale socket
    file left by a dead host is replaced rather than taken for a live mapper.

    Attributes for tests and operators: ``hosting`` (we run the mapper), ``registered``,
    ``creation`` (the mapper's creation for our current or last registration),
    ``server`` / ``listening_port`` (the hosted mapper, while hosting).
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        listen_endpoint: str,
        connect_endpoint: str,
        mapper_port: int,
        name: str,
        harbor_endpoint: str,
        harbor: int,
        rng: random.Random | None = None,
        *,
        takeover_jitter: float = DEFAULT_TAKEOVER_JITTER,
        retry_initial: float = DEFAULT_RETRY_INITIAL,
        retry_max: float = DEFAULT_RETRY_MAX,
        start_refusals: int = DEFAULT_START_REFUSALS,
        timeout: float = DEFAULT_TIMEOUT,
        relaxed: bool = False,
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
        self.harbor = check_harbor(harbor)
        self.harbor_endpoint = harbor_endpoint
        self.rng = rng if rng is not None else random.Random()
        self.takeover_jitter = takeover_jitter
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.start_refusals = start_refusals
        self.timeout = timeout
        self.relaxed = relaxed
        try:
            port = harbor_tcp_port(harbor_endpoint)
            advertised = None if port is not None else client_endpoint_for(harbor_endpoint)
            self.extra = encode_extra(self.harbor, advertised)
            self._server_endpoint: IStreamServerEndpoint = serverFromString(
                reactor, listen_endpoint
            )
            client_endpoint: IStreamClientEndpoint = clientFromString(reactor, connect_endpoint)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigurationError(f"mapper for node {name!r}: {e}") from None
        #: the ALIVE2 port we register (0 when the endpoint travels in ``extra``)
        self.port = port if port is not None else 0
        #: the client endpoint advertised in Extra, or None for a plain TCP port
        self.advertised_endpoint = advertised
        self.client = MapperClient(reactor, client_endpoint, timeout=timeout)
        self.hosting = False
        self.creation: int | None = None
        self.server: _HostedMapperFactory | None = None
        self.listening_port: IListeningPort | None = None
        self.registration: MapperRegistration | None = None
        self._state = _IDLE
        self._timer: IDelayedCall | None = None
        self._inflight: Deferred[Any] | None = None
        self._backoff = 0.0
        self._refusals = 0
        self._started_mapper = False
        self._start_waiter: Deferred[int] | None = None
        self._registered_waiters: list[Deferred[int]] = []
        self._stopped: Deferred[None] | None = None

    def __repr__(self) -> str:
        state = "hosting" if self.hosting else "registered" if self.registered else self._state
        return f"<HostMapper {self.name!r} at {self.connect_endpoint} {state}>"

    @property
    def registered(self) -> bool:
        """True while our registration connection is open."""
        return self.registration is not None and self.registration.active

    # --- public API --------------------------------------------------------------------

    def start(self) -> Deferred[int]:
        """Register (hosting the mapper if nobody does); fires with the creation.

        Errbacks with :class:`RegistrationRefusedError` if the name stays taken for
        ``start_refusals`` attempts (the agent then stops), or CancelledError if
        :meth:`stop` comes first. Any other failure is retried with backoff.
        """
        if self._state != _IDLE:
            raise RuntimeError(f"{self!r} was already started")
        self._state = _STARTING
        self._start_waiter = Deferred()
        self._attempt()
        return self._start_waiter

    def when_registered(self) -> Deferred[int]:
        """Fires with the creation once registered (at once if registered now).

        Errbacks with CancelledError if the agent stops first.
        """
        if self.registered and self.creation is not None:
            return succeed(self.creation)
        waiter: Deferred[int] = Deferred()
        if self._state == _STOPPED:
            waiter.errback(CancelledError(f"{self!r} is stopped"))
        else:
            self._registered_waiters.append(waiter)
        return waiter

    def stop(self) -> Deferred[None]:
        """Unregister, stop hosting (closing every registration we serve, so the other
        nodes take over at once), cancel every timer. Never errbacks."""
        if self._stopped is not None:
            waiter: Deferred[None] = Deferred()
            self._stopped.addBoth(lambda _: waiter.callback(None))
            return waiter
        self._state = _STOPPED
        self._cancel_timer()
        inflight, self._inflight = self._inflight, None
        if inflight is not None and not inflight.called:
            inflight.cancel()
        cancelled = CancelledError(f"{self!r} stopped")
        start, self._start_waiter = self._start_waiter, None
        if start is not None and not start.called:
            start.errback(cancelled)
        waiters, self._registered_waiters = self._registered_waiters, []
        for w in waiters:
            w.errback(cancelled)
        steps: list[Deferred[Any]] = []
        registration, self.registration = self.registration, None
        if registration is not None:
            steps.append(registration.unregister())
        if self.listening_port is not None:
            steps.append(self._stop_hosting())
        done: Deferred[Any] = gatherResults(steps, consumeErrors=True)
        done.addTimeout(self.timeout, self.reactor)
        done.addErrback(self._stop_failed)
        self._stopped = done.addCallback(lambda _: None)
        self._stopped.addCallback(lambda _: self.log.info(
            "mapper agent for {name} stopped", name=self.name))
        waiter = Deferred()
        self._stopped.addBoth(lambda _: waiter.callback(None))
        return waiter

    # --- the attempt loop --------------------------------------------------------------

    def _attempt(self, after_listen: bool = False) -> None:
        """One try: register at connect_endpoint; on "connection refused", try to host."""
        self._timer = None
        if self._state == _STOPPED:
            return
        registering = self.client.register(self.name, self.port, self.extra)
        self._inflight = registering
        registering.addCallbacks(
            self._registered, self._register_failed, errbackArgs=(after_listen,)
        )

    def _registered(self, registration: MapperRegistration) -> None:
        self._inflight = None
        if self._state == _STOPPED:
            registration.unregister()
            return
        self.registration = registration
        self.creation = registration.creation
        self._backoff = 0.0
        self._refusals = 0
        if self._started_mapper:
            self._started_mapper = False
            self.log.info(
                "started the mapper on {endpoint}; registered {name} (port {port}, "
                "creation {creation})",
                endpoint=self.listen_endpoint, name=self.name, port=self.port,
                creation=registration.creation, hosting=True,
            )
        else:
            self.log.info(
                "registered {name} with the mapper at {endpoint} (port {port}, "
                "creation {creation})",
                endpoint=self.connect_endpoint, name=self.name, port=self.port,
                creation=registration.creation, hosting=self.hosting,
            )
        registration.when_lost().addCallback(lambda _: self._lost(registration))
        self._state = _RUNNING
        start, self._start_waiter = self._start_waiter, None
        if start is not None:
            start.callback(registration.creation)
        waiters, self._registered_waiters = self._registered_waiters, []
        for waiter in waiters:
            waiter.callback(registration.creation)

    def _register_failed(self, failure: Failure, after_listen: bool) -> None:
        self._inflight = None
        if self._state == _STOPPED:
            return
        if _is_refused(failure) and not after_listen and not self.hosting:
            self._take_over()
            return
        if _is_refused(failure) and self.hosting:
            what = (
                f"our own mapper on {self.listen_endpoint} refuses connections at "
                f"{self.connect_endpoint}: do the two name the same address?"
            )
        elif failure.check(RegistrationRefusedError):
            self._refusals += 1
            if self._state == _STARTING and self._refusals >= self.start_refusals:
                self.log.error(
                    "the mapper at {endpoint} refused {name} {refusals} times: the name is "
                    "taken by a live node", endpoint=self.connect_endpoint, name=self.name,
                    refusals=self._refusals,
                )
                start, self._start_waiter = self._start_waiter, None
                self.stop()
                if start is not None:
                    start.errback(failure)
                return
            what = f"{self.name} is still registered (maybe a stale registration closing)"
        else:
            what = f"cannot register {self.name}: {_reason(failure)}"
        delay = self._schedule_retry()
        self.log.warn(
            "mapper at {endpoint}: {what}; retrying in {delay:.2f} s",
            endpoint=self.connect_endpoint, what=what, delay=delay, name=self.name,
        )

    def _take_over(self) -> None:
        """Nothing answers at connect_endpoint: start a mapper on listen_endpoint."""
        factory = _HostedMapperFactory(self.reactor, self.mapper_port, self.relaxed)
        listening: Deferred[IListeningPort] = self._server_endpoint.listen(factory)
        self._inflight = listening
        listening.addCallbacks(self._hosting, self._listen_failed, callbackArgs=(factory,))

    def _hosting(self, port: IListeningPort, factory: _HostedMapperFactory) -> None:
        self._inflight = None
        if self._state == _STOPPED:
            port.stopListening()
            return
        if factory.port == 0:
            factory.port = getattr(port.getHost(), "port", 0)
        self.server = factory
        self.listening_port = port
        self.hosting = True
        self._started_mapper = True
        self.log.debug("listening as the mapper on {endpoint}", endpoint=self.listen_endpoint)
        self._attempt(after_listen=True)

    def _listen_failed(self, failure: Failure) -> None:
        self._inflight = None
        if self._state == _STOPPED:
            return
        if _is_address_in_use(failure):
            self.log.info(
                "another node started the mapper on {endpoint} first: registering with it",
                endpoint=self.listen_endpoint, name=self.name,
            )
            self._attempt(after_listen=True)
            return
        delay = self._schedule_retry()
        self.log.warn(
            "nothing answers at {connect} and the mapper cannot listen on {endpoint} "
            "({reason}); retrying in {delay:.2f} s",
            connect=self.connect_endpoint, endpoint=self.listen_endpoint,
            reason=_reason(failure), delay=delay, name=self.name,
        )

    def _lost(self, registration: MapperRegistration) -> None:
        """The registration connection is gone: if not by our hand, race to take over."""
        if registration is not self.registration:
            return
        self.registration = None
        if self._state == _STOPPED or registration.closed_by_us:
            return
        self._backoff = 0.0
        delay = self.rng.uniform(0.0, self.takeover_jitter)
        self._timer = self.reactor.callLater(delay, self._attempt)
        reason = registration.lost_reason
        self.log.warn(
            "the mapper at {endpoint} dropped the registration of {name} ({reason}); "
            "re-registering (or taking over) in {delay:.3f} s",
            endpoint=self.connect_endpoint, name=self.name, delay=delay,
            reason="?" if reason is None else _reason(reason), hosting=self.hosting,
        )

    def _schedule_retry(self) -> float:
        self._backoff = min(self.retry_max, self._backoff * 2 or self.retry_initial)
        delay = self._backoff * self.rng.uniform(0.8, 1.2)
        self._timer = self.reactor.callLater(delay, self._attempt)
        return delay

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    # --- stopping ----------------------------------------------------------------------

    def _stop_hosting(self) -> Deferred[None]:
        """Stop listening and close every connection our mapper serves."""
        port, self.listening_port = self.listening_port, None
        factory, self.server = self.server, None
        self.hosting = False
        assert port is not None and factory is not None
        others = sum(1 for p in factory.connections if p.registered not in (None, self.name))
        stopped = port.stopListening()
        for protocol in list(factory.connections):
            if protocol.transport is not None:
                protocol.transport.loseConnection()
        self.log.info(
            "stopped the mapper on {endpoint}; {others} other registrations will move",
            endpoint=self.listen_endpoint, others=others, name=self.name,
        )
        steps: list[Deferred[Any]] = [factory.when_idle()]
        if stopped is not None:
            steps.append(cast("Deferred[Any]", stopped))
        idle: Deferred[Any] = gatherResults(steps, consumeErrors=True)

        def abort_the_rest(failure: Failure) -> Failure:
            for protocol in list(factory.connections):
                transport = protocol.transport
                if transport is not None:
                    transport.abortConnection()  # type: ignore[attr-defined]
            return failure

        idle.addErrback(abort_the_rest)
        return idle.addCallback(lambda _: None)

    def _stop_failed(self, failure: Failure) -> None:
        """Stopping timed out (the hosted mapper's connections were aborted): log and go on."""
        self.log.warn("mapper agent for {name} did not stop cleanly: {reason}",
                      name=self.name, reason=_reason(failure))


# --------------------------------------------------------------------------- resolving


@attrs.frozen
class NodeLocation:
    """Where a node listens, as learned from its host's mapper."""

    node: str  #: ``name@host``
    endpoint: str  #: the client endpoint string to dial
    port: int  #: the ALIVE2 port (0 when the endpoint came from Extra)
    harbor: int | None  #: the harbor id from Extra (None for a non-skyproto node)


class NodeResolver:
    """Resolves ``name@host`` to a harbor endpoint through the mapper on ``host``; caches.

    ``resolve_host`` turns a host name into an address (default: ``reactor.resolve``,
    which reads /etc/hosts and DNS like Erlang). ``mapper_endpoint_for`` turns that address
    into the client endpoint of the host's mapper (default ``tcp:<address>:<mapper_port>``;
    tests map every address to ``loopback:...``). A node whose Extra carries an endpoint
    resolves to it; otherwise to ``tcp:<address>:<port>``. Answers are cached until
    :meth:`invalidate`; concurrent lookups of one node share one query.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        mapper_port: int = DEFAULT_PORT,
        *,
        resolve_host: Callable[[str], Deferred[str]] | None = None,
        mapper_endpoint_for: Callable[[str], str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.reactor = reactor
        self.mapper_port = mapper_port
        self.timeout = timeout
        self._resolve_host = resolve_host if resolve_host is not None else self._system_resolve
        self._mapper_endpoint_for = (
            mapper_endpoint_for if mapper_endpoint_for is not None else self._default_mapper
        )
        self._cache: dict[str, NodeLocation] = {}
        self._pending: dict[str, list[Deferred[NodeLocation]]] = {}

    def _system_resolve(self, host: str) -> Deferred[str]:
        return cast(IReactorCore, self.reactor).resolve(host)

    def _default_mapper(self, address: str) -> str:
        return tcp_endpoint(address, self.mapper_port)

    def resolve_node(self, node: str | NodeName) -> Deferred[str]:
        """Deferred of the endpoint string to dial for ``name@host``; NodeNotFound if none."""
        return self.lookup(node).addCallback(lambda location: location.endpoint)

    def lookup(self, node: str | NodeName) -> Deferred[NodeLocation]:
        """Deferred of the whole :class:`NodeLocation` (endpoint, port, harbor id)."""
        try:
            parsed = node if isinstance(node, NodeName) else _parse_node(node)
        except AddressError as e:
            failed: Deferred[NodeLocation] = Deferred()
            failed.errback(NodeNotFound(str(e)))
            return failed
        key = str(parsed)
        hit = self._cache.get(key)
        if hit is not None:
            return succeed(hit)
        waiter: Deferred[NodeLocation] = Deferred()
        waiters = self._pending.get(key)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        waiters = self._pending[key] = [waiter]
        asking = Deferred.fromCoroutine(self._ask(parsed))
        asking.addBoth(self._answered, key, waiters)
        return waiter

    def cached(self, node: str | NodeName) -> NodeLocation | None:
        """The cached location of ``node``, if any (no query)."""
        return self._cache.get(str(node))

    def invalidate(self, node: str | NodeName) -> bool:
        """Forget what we know of ``node`` (a dial to it failed); True if it was cached.

        A lookup already under way still answers its callers but is not cached, and the
        next :meth:`lookup` asks the mapper again.
        """
        key = str(node)
        self._pending.pop(key, None)
        return self._cache.pop(key, None) is not None

    def _answered(
        self, result: NodeLocation | Failure, key: str, waiters: list[Deferred[NodeLocation]]
    ) -> None:
        current = self._pending.get(key) is waiters
        if current:
            del self._pending[key]
            if isinstance(result, NodeLocation):
                self._cache[key] = result
        for waiter in waiters:
            if not waiter.called:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

    async def _ask(self, node: NodeName) -> NodeLocation:
        try:
            address = await self._resolve_host(node.host)
        except Exception as e:
            raise NodeNotFound(f"cannot resolve the host of node {node}: {e}") from e
        mapper = self._mapper_endpoint_for(address)
        where = _describe_endpoint(mapper)
        try:
            client = MapperClient(
                self.reactor, clientFromString(self.reactor, mapper), timeout=self.timeout
            )
            reply = await client.port_please(node.name)
        except Exception as e:
            raise NodeNotFound(
                f"cannot ask the mapper at {where} for node {node.name}: "
                f"{type(e).__name__}: {e}"
            ) from e
        if reply is None:
            raise NodeNotFound(f"node {node.name} is not registered with the mapper at {where}")
        extra = decode_extra(reply.extra)
        if reply.extra and extra is None:
            self.log.debug("ignoring a non-skyproto Extra of {size} bytes for {node}",
                           size=len(reply.extra), node=str(node))
        if extra is not None and extra.endpoint is not None:
            endpoint = extra.endpoint
        elif reply.port:
            endpoint = tcp_endpoint(address, reply.port)
        else:
            raise NodeNotFound(
                f"node {node.name} is registered with the mapper at {where} "
                "with neither a port nor an endpoint"
            )
        location = NodeLocation(
            str(node), endpoint, reply.port, None if extra is None else extra.harbor
        )
        self.log.debug("node {node} is at {endpoint}", node=str(node), endpoint=endpoint)
        return location


def _parse_node(text: str) -> NodeName:
    if not is_node_name(text):
        raise AddressError(f"a node name is written name@host (no ':'), not {text!r}")
    return NodeName.parse(text)


def _describe_endpoint(endpoint: str) -> str:
    """``host:port`` for a TCP client endpoint string (``[host]:port`` for IPv6), else as is."""
    kind, args, kwargs = parse_endpoint_description(endpoint)
    if kind.lower() in ("tcp", "tcp6"):
        host = kwargs.get("host", args[0] if args else None)
        port = kwargs.get("port", args[1] if len(args) > 1 else None)
        if host is not None and port is not None:
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return endpoint
