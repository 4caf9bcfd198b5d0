"""Test support for code built on skyproto, in the spirit of ``treq.testing``.

* :func:`wait_for` polls a condition on a reactor or a ``Clock`` and returns a Deferred;
  :func:`wait_until` is its blocking twin, for code that runs outside the reactor.
* :func:`settle` runs a ``Clock`` until the in-memory network is quiet.
* :func:`crash` kills a node like SIGKILL; :func:`connections_of` finds its loopback
  connections (to cut, pause or delay them).
* :class:`InMemoryCluster` is a master and nodes in one process, on one ``Clock``, over the
  ``loopback:`` transport: build it, add nodes, crash and restart them, kill the master.

Nothing here imports the global reactor: the clock is always passed in.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Final, TypeVar

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from .harbor.link import HarborLink
from .interfaces import IServiceBehaviour
from .master.client import MasterClientProtocol
from .master.registry import InMemoryRegistry
from .master.server import MasterService
from .node.node import Node
from .transports.loopback import (
    LoopbackConnection,
    LoopbackNetwork,
    LoopbackServerEndpoint,
    network_for,
)

__all__ = [
    "DEFAULT_SECRET",
    "InMemoryCluster",
    "WaitTimeout",
    "connections_of",
    "crash",
    "settle",
    "wait_for",
    "wait_until",
]

T = TypeVar("T")

#: the cluster secret of an :class:`InMemoryCluster` unless given another
DEFAULT_SECRET: Final = b"skyproto.testing in-memory cluster secret"


# --------------------------------------------------------------------------- waiting


class WaitTimeout(TimeoutError):
    """:func:`wait_for` or :func:`wait_until` gave up: ``what`` did not happen in time."""

    def __init__(self, what: str, timeout: float, last: object = None) -> None:
        shown = "" if last is None or last is False else f" (last: {last!r})"
        super().__init__(f"timed out after {timeout:g} s waiting for {what}{shown}")
        self.what = what
        self.timeout = timeout
        #: what the condition returned the last time it was asked
        self.last = last


@attrs.frozen
class _Again:
    """Not yet: ask again after ``seconds``."""

    seconds: float


@attrs.frozen
class _Deadline:
    """What both waiting helpers share: ask the condition, give up after the timeout."""

    what: str
    timeout: float
    interval: float
    ends: float

    @classmethod
    def start(cls, what: str, timeout: float, interval: float, now: float) -> _Deadline:
        if not timeout >= 0:
            raise ValueError(f"timeout must be >= 0 seconds, not {timeout!r}")
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, not {interval!r}")
        return cls(what, timeout, interval, now + timeout)

    def poll(self, condition: Callable[[], T | None], now: Callable[[], float]) -> T | _Again:
        """The condition's value if truthy, else how long to wait before asking again;
        :class:`WaitTimeout` once the deadline has passed."""
        result = condition()
        if result:
            return result
        left = self.ends - now()
        if left <= 0:
            raise WaitTimeout(self.what, self.timeout, result)
        return _Again(min(self.interval, left))


def wait_for(condition: Callable[[], T | None], what: str, timeout: float = 10.0, *,
             clock: IReactorTime, interval: float = 0.05) -> Deferred[T]:
    """Poll ``condition()`` every ``interval`` seconds on ``clock`` (a reactor or a
    ``Clock``) until it returns something truthy, and fire with that.

    It is asked at once, and last at the deadline. Fails with :class:`WaitTimeout` (naming
    ``what`` and ``timeout``) after ``timeout`` seconds of ``clock``, or with the exception
    the condition raised. Cancelling the Deferred stops the polling.
    """
    deadline = _Deadline.start(what, timeout, interval, clock.seconds())
    pending: list[IDelayedCall] = []

    def cancel(_: Deferred[T]) -> None:
        if pending and pending[0].active():
            pending[0].cancel()

    done: Deferred[T] = Deferred(cancel)

    def poll() -> None:
        pending.clear()
        try:
            outcome = deadline.poll(condition, clock.seconds)
        except Exception as e:
            done.errback(e)
            return
        if isinstance(outcome, _Again):
            pending.append(clock.callLater(outcome.seconds, poll))
        else:
            done.callback(outcome)

    poll()
    return done


def wait_until(condition: Callable[[], T | None], what: str, timeout: float = 10.0, *,
               interval: float = 0.05, now: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], object] = time.sleep) -> T:
    """:func:`wait_for`, blocking: for code outside the reactor (a plain test, a thread).

    Never call it in the reactor's thread: nothing else runs while it sleeps.
    """
    deadline = _Deadline.start(what, timeout, interval, now())
    while True:
        outcome = deadline.poll(condition, now)
        if not isinstance(outcome, _Again):
            return outcome
        sleep(outcome.seconds)


def settle(clock: Clock, seconds: float = 0.0, *, step: float = 0.05, horizon: float = 0.0,
           max_steps: int = 100_000) -> bool:
    """Run ``clock`` for ``seconds`` in steps of at most ``step``, then on (in the same
    steps) until nothing is due within ``horizon`` seconds.

    With the default horizon of 0, what is due now runs (every loopback delivery, and what
    it schedules at once), but not what waits for later (heartbeats, retries). Returns
    False if ``max_steps`` steps (all of them counted) did not make it quiet: something
    keeps itself busy within the horizon.
    """
    if not step > 0:
        raise ValueError(f"step must be > 0 seconds, not {step!r}")
    end = clock.seconds() + seconds
    steps = 0
    clock.advance(0)
    while steps < max_steps and end - clock.seconds() > 1e-9:
        clock.advance(min(step, end - clock.seconds()))
        steps += 1
    while steps < max_steps:
        due = min((call.getTime() for call in clock.getDelayedCalls() if call.active()),
                  default=None)
        if due is None or due > clock.seconds() + horizon:
            return True
        clock.advance(0 if due <= clock.seconds() else step)
        steps += 1
    return False


# --------------------------------------------------------------------------- faults


def _belongs_to(protocol: object, node: Node) -> bool:
    protocol = getattr(protocol, "_protocol", protocol)  # ClientService's reconnecting proxy
    if isinstance(protocol, HarborLink):
        return protocol.sink is node.router
    if isinstance(protocol, MasterClientProtocol):
        return node.master is not None and protocol.client is node.master
    return False


def connections_of(node: Node) -> tuple[LoopbackConnection, ...]:
    """The node's live ``loopback:`` connections: its harbor links (dialled or accepted, up
    or still in their handshake) and its connection to the master."""
    return tuple(connection for connection in network_for(node.reactor).connections
                 if any(_belongs_to(side.protocol, node) for side in connection.transports))


def crash(node: Node, reason: str = "crashed") -> None:
    """Kill ``node`` as SIGKILL would: its loopback connections fail (the peers and the
    master see them lost, nothing more is delivered), then :meth:`Node.abort` stops it.

    On other transports only the abort happens (links are aborted, the master connection
    closed). Does not run the clock: the peers notice on its next turn.
    """
    for connection in connections_of(node):
        connection.cut(reason)
    node.abort()


# --------------------------------------------------------------------------- the cluster


ServiceList = Mapping[str, IServiceBehaviour] | Iterable[IServiceBehaviour]


@attrs.define(eq=False)
class InMemoryCluster:
    """A master and nodes on one ``Clock``, over ``loopback:``; the master starts at once.

    Node ``N`` of incarnation ``I`` listens on ``loopback:hN-I``; incarnations count up
    from 1 across the cluster, so a restart always compares newer. Every method that
    changes the cluster settles it (see :func:`settle`) before it returns.
    """

    clock: Clock = attrs.field(factory=Clock)
    secret: bytes = DEFAULT_SECRET
    #: the master listens on ``loopback:<master_name>``
    master_name: str = "master"
    #: the step of :meth:`settle` and :meth:`run_until`
    step: float = 0.05
    #: how long (on the clock) :meth:`add_node` waits for the welcome, then for the names
    join_timeout: float = 10.0
    #: the running master (None between :meth:`kill_master` and :meth:`start_master`)
    master: MasterService | None = attrs.field(init=False, default=None)
    #: the live node of each harbor
    nodes: dict[int, Node] = attrs.field(init=False, factory=dict)
    _port: IListeningPort | None = attrs.field(init=False, default=None)
    _node_names: dict[int, str] = attrs.field(init=False, factory=dict)
    _incarnations: Iterator[int] = attrs.field(init=False,
                                               factory=lambda: itertools.count(1))

    def __attrs_post_init__(self) -> None:
        self.start_master()

    @property
    def network(self) -> LoopbackNetwork:
        """The loopback network of :attr:`clock` (for faults: cut, pause, delay, refuse)."""
        return network_for(self.clock)

    def settle(self, seconds: float = 0.0) -> bool:
        """:func:`settle` this cluster's clock."""
        return settle(self.clock, seconds, step=self.step)

    def run_until(self, condition: Callable[[], T | None], what: str,
                  timeout: float = 10.0) -> T:
        """Run the clock in steps until ``condition()`` is truthy and return that (then
        settle); :class:`WaitTimeout` after ``timeout`` seconds of the clock."""
        outcome: list[T | Failure] = []
        wait_for(condition, what, timeout, clock=self.clock, interval=self.step).addBoth(
            outcome.append)
        while not outcome:  # ends: wait_for gives up at its deadline
            self.clock.advance(self.step)
        self.settle()
        result = outcome[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def add_node(self, harbor: int, services: ServiceList = (),
                 name: str | None = None) -> Node:
        """Start harbor ``harbor``, join it to the master as ``name`` (default
        ``nHARBOR@testing``), spawn ``services`` (a mapping spawns each under its name, a
        list under its ``default_name``), and return it once the master granted their names.

        RuntimeError if the master refused it or it did not join within
        :attr:`join_timeout`, WaitTimeout if a name was not granted in that time.
        """
        if harbor in self.nodes:
            raise ValueError(f"harbor {harbor} is already running")
        incarnation = next(self._incarnations)
        node = Node(harbor, self.clock, self.secret, incarnation=incarnation)
        endpoint = f"loopback:h{harbor}-{incarnation}"
        node.listen(endpoint)
        node_name = self._node_names[harbor] = name or f"n{harbor}@testing"
        refusals: list[str] = []
        client = node.join_master(f"loopback:{self.master_name}", node_name, endpoint,
                                  on_refused=refusals.append)
        self.nodes[harbor] = node
        try:
            self.run_until(lambda: client.welcomes or refusals, f"harbor {harbor} to join",
                           self.join_timeout)
        except WaitTimeout:
            refusals.append(f"no welcome within {self.join_timeout:g} s "
                            f"(is the master running?)")
        if refusals:
            self.crash(node)
            raise RuntimeError(f"harbor {harbor} did not join the master: {refusals[0]}")
        if isinstance(services, Mapping):
            for service_name, service in services.items():
                node.spawn(service, service_name)
        else:
            for service in services:
                node.spawn(service)
        wanted = {n: h for n, h in node.names.items() if not n.startswith(".")}
        self.run_until(
            lambda: all(client.names.get(n) == h for n, h in wanted.items()),
            f"the master to grant {sorted(wanted)} to harbor {harbor}", self.join_timeout)
        return node

    def crash(self, node: Node) -> None:
        """:func:`crash` ``node`` (a live node of this cluster) and settle."""
        if self.nodes.get(node.harbor) is not node:
            raise ValueError(f"{node!r} is not a live node of this cluster")
        del self.nodes[node.harbor]
        crash(node)
        self.settle()

    def restart(self, node: Node, services: ServiceList = ()) -> Node:
        """A new incarnation of ``node``'s harbor, with its node name and ``services``
        (crashing ``node`` first if it is still live): what a supervisor does."""
        if self.nodes.get(node.harbor) is node:
            self.crash(node)
        return self.add_node(node.harbor, services, self._node_names.get(node.harbor))

    def start_master(self) -> MasterService:
        """A new master with an empty registry on ``loopback:<master_name>``; nodes come
        back to it with their backoff (settle a few seconds)."""
        if self._port is not None:
            raise RuntimeError("the master is already running")
        master = MasterService(InMemoryRegistry(), self.clock, self.secret)
        ports: list[IListeningPort] = []
        LoopbackServerEndpoint(self.clock, self.master_name).listen(master).addCallback(
            ports.append)
        self.master, self._port = master, ports[0]
        self.settle()
        return master

    def kill_master(self) -> None:
        """Like SIGKILL of the master: its port goes, every connection to it fails."""
        if self._port is None:
            raise RuntimeError("the master is not running")
        port, self._port, self.master = self._port, None, None
        port.stopListening()
        for connection in self.network.connections_to(self.master_name):
            connection.cut("master killed")
        self.settle()
