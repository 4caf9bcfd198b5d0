"""One other harbor as this node sees it: an automat state machine for its link's life.

States: ``idle`` (known, not dialed: a newcomer the master told us of dials us), ``dialing``
(connecting), ``handshaking`` (connected, proving the secret), ``up`` (a link carries
traffic), ``backoff`` (the last dial failed or the link dropped; a jittered timer redials),
``removed`` (forgotten: the master says it left, or the node stops). The machine owns the
queue of encoded frames waiting for a link (bounded in bytes), its retry timer and its
backoff. Every dial ends in exactly one outcome: ``dial_done`` or ``dial_failed``; outcomes
of a dial the machine no longer waits for are ignored. No transition raises: whatever it
calls out to is guarded, so the machine is never left between states.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from typing import Any, Final, Protocol

import attrs
from automat import TypeMachineBuilder
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ..errors import HarborDown, QueueFull
from ..interfaces import IHarborLink
from ..wire.codec import Frame

log = Logger()

#: the states in which the machine acts on a dial (it ignores one in every other)
DIALABLE_STATES: Final = frozenset({"idle", "backoff"})


class PeerInputs(Protocol):
    """What can happen to a peer; the router feeds these in."""

    def dial(self) -> None:
        "Dial now unless linked or dialing (a static peer, or the master re-announced it)."

    def send(self, frame: Frame) -> None:
        "Queue an encoded frame for the link coming up (only in idle, dialing, handshaking)."

    def connected(self) -> None:
        "Our dial reached the peer; the handshake runs."

    def dial_done(self) -> None:
        "Our dial's handshake finished (the router already attached or refused the link)."

    def dial_failed(self, reason: str) -> None:
        "Our dial failed: refused, timed out, refused in the handshake, ..."

    def attach(self, link: IHarborLink) -> None:
        "This link (dialed by either side) is now the harbor's link."

    def lost(self, reason: str) -> None:
        "The harbor's link went down."

    def detach(self, reason: str) -> None:
        "The peer retired our link for another that is still coming up here: wait for it."

    def retry_due(self) -> None:
        "The backoff timer fired."

    def remove(self, reason: str) -> None:
        "Forget this harbor: close its link, fail what waits, never dial again."


@attrs.define(eq=False)
class PeerCore:
    """What the peer machine keeps between states (the router reads it, never writes it)."""

    harbor: int
    clock: IReactorTime
    rng: random.Random
    #: starts a dial; the router reports its outcome back as inputs
    start_dial: Callable[[PeerCore], Deferred[Any]]
    #: told when queued frames are failed, so the calls waiting on them fail at once
    queue_failed: Callable[[int, HarborDown], None]
    endpoint: str | None = None
    retry_initial: float = 0.5
    retry_max: float = 2.0
    max_queue_bytes: int = 1024 * 1024
    handshake_timeout: float = 5.0
    link: IHarborLink | None = None
    attempt: Deferred[Any] | None = None
    retry: IDelayedCall | None = None
    backoff: float = 0.0
    queue: deque[Frame] = attrs.field(factory=deque)
    queued_bytes: int = 0
    #: why the harbor is down, told to every caller until it is up again
    last_error: str = ""
    state: str = "idle"

    # --- helpers the transitions share (none raises) -----------------------------------

    def begin_dial(self, inputs: PeerInputs) -> None:
        """Dial the peer now (a dial that cannot even start fails on the next turn)."""
        self.cancel_retry()
        self.state = "dialing"
        try:
            self.attempt = self.start_dial(self)
        except Exception as e:  # a dial that cannot even start is a failed dial
            self.attempt = None
            self.clock.callLater(0, inputs.dial_failed, f"cannot dial: {e}")

    def cancel_attempt(self) -> None:
        """Cancel the dial in progress, if any."""
        attempt, self.attempt = self.attempt, None
        if attempt is not None and not attempt.called:
            attempt.cancel()

    def cancel_retry(self) -> None:
        """Cancel the scheduled redial, if any."""
        retry, self.retry = self.retry, None
        if retry is not None and retry.active():
            retry.cancel()

    def schedule_retry(self, inputs: PeerInputs) -> float:
        """Redial after the next backoff (doubling to ``retry_max``, jittered); the delay."""
        self.state = "backoff"
        self.backoff = min(self.retry_max, self.backoff * 2 or self.retry_initial)
        delay = self.backoff * self.rng.uniform(0.8, 1.2)
        self.retry = self.clock.callLater(delay, inputs.retry_due)
        return delay

    def dial_failed(self, inputs: PeerInputs, reason: str) -> None:
        """A dial failed: what was queued fails with HarborDown, and a redial is scheduled."""
        self.attempt = None
        error = HarborDown(f"harbor {self.harbor} at {self.endpoint} is unreachable: {reason}")
        self.last_error = str(error)
        self.fail_queue(error)
        delay = self.schedule_retry(inputs)
        log.warn("{error}; retrying in {delay:.1f} s", error=str(error), delay=delay)

    def fail_queue(self, error: HarborDown, lost: bool = False) -> None:
        """Fail what waits (``lost``: also a frame already taken from the queue)."""
        if not self.queue and not lost:
            return
        self.queue.clear()
        self.queued_bytes = 0
        try:
            self.queue_failed(self.harbor, error)
        except Exception:
            log.failure("failing the calls queued for harbor {harbor}", harbor=self.harbor)

    def enqueue(self, frame: Frame) -> None:
        """Queue a frame until the link is up."""
        self.queue.append(frame)
        self.queued_bytes += len(frame)

    def flush(self, link: IHarborLink) -> None:
        """Hand every queued frame to a link that just came up."""
        queue = self.queue
        try:
            while queue:
                frame = queue.popleft()
                self.queued_bytes -= len(frame)
                link.write_frame(frame, True)
        except Exception as e:
            log.warn("harbor {harbor}: queued frames could not be sent: {error}",
                     harbor=self.harbor, error=str(e))
            self.fail_queue(HarborDown(f"harbor {self.harbor}: queued frames lost: {e}"),
                            lost=True)
            link.close(f"sending queued frames failed: {e}")

    def went_up(self, link: IHarborLink) -> None:
        """The link is up: use it, reset the backoff and send what was queued."""
        self.cancel_retry()
        self.link = link
        self.state = "up"
        self.last_error = ""
        self.backoff = 0.0
        self.flush(link)


def _build() -> Callable[[PeerCore], PeerInputs]:
    machine = TypeMachineBuilder(PeerInputs, PeerCore)
    idle = machine.state("idle")
    dialing = machine.state("dialing")
    handshaking = machine.state("handshaking")
    up = machine.state("up")
    backoff = machine.state("backoff")
    removed = machine.state("removed")

    # --- dial (DIALABLE_STATES names the two states that act on one) ---------------------
    @idle.upon(PeerInputs.dial).to(dialing)
    @backoff.upon(PeerInputs.dial).to(dialing)
    def dial_now(inputs: PeerInputs, core: PeerCore) -> None:
        core.begin_dial(inputs)

    for state in (dialing, handshaking, up, removed):
        state.upon(PeerInputs.dial).loop().returns(None)

    # --- queueing while the link comes up ----------------------------------------------
    @idle.upon(PeerInputs.send).to(dialing)
    def send_when_idle(inputs: PeerInputs, core: PeerCore, frame: Frame) -> None:
        core.enqueue(frame)
        core.begin_dial(inputs)

    @dialing.upon(PeerInputs.send).loop()
    @handshaking.upon(PeerInputs.send).loop()
    def send_queued(inputs: PeerInputs, core: PeerCore, frame: Frame) -> None:
        core.enqueue(frame)

    @up.upon(PeerInputs.send).loop()
    def send_up(inputs: PeerInputs, core: PeerCore, frame: Frame) -> None:
        # The router writes to an up link itself; a frame that reaches here raced a change.
        assert core.link is not None
        core.link.write_frame(frame, True)

    @backoff.upon(PeerInputs.send).loop()
    @removed.upon(PeerInputs.send).loop()
    def send_refused(inputs: PeerInputs, core: PeerCore, frame: Frame) -> None:
        pass  # the router raises HarborDown before feeding a send in these states

    # --- a dial's progress and outcome --------------------------------------------------
    @dialing.upon(PeerInputs.connected).to(handshaking)
    def now_handshaking(inputs: PeerInputs, core: PeerCore) -> None:
        core.state = "handshaking"

    for state in (idle, handshaking, up, backoff, removed):
        state.upon(PeerInputs.connected).loop().returns(None)

    @dialing.upon(PeerInputs.dial_done).to(backoff)
    @handshaking.upon(PeerInputs.dial_done).to(backoff)
    def done_but_not_attached(inputs: PeerInputs, core: PeerCore) -> None:
        # The handshake finished, yet the router refused the link (stale, an impostor).
        core.dial_failed(inputs, "the link was refused after its handshake")

    @up.upon(PeerInputs.dial_done).loop()
    def done_up(inputs: PeerInputs, core: PeerCore) -> None:
        core.attempt = None

    for state in (idle, backoff, removed):
        state.upon(PeerInputs.dial_done).loop().returns(None)

    @dialing.upon(PeerInputs.dial_failed).to(backoff)
    @handshaking.upon(PeerInputs.dial_failed).to(backoff)
    def failed(inputs: PeerInputs, core: PeerCore, reason: str) -> None:
        core.dial_failed(inputs, reason)

    for state in (idle, up, backoff, removed):
        state.upon(PeerInputs.dial_failed).loop().returns(None)

    # --- a link attached (ours or the peer's) ------------------------------------------
    @idle.upon(PeerInputs.attach).to(up)
    @dialing.upon(PeerInputs.attach).to(up)
    @handshaking.upon(PeerInputs.attach).to(up)
    @backoff.upon(PeerInputs.attach).to(up)
    @up.upon(PeerInputs.attach).to(up)
    def attached(inputs: PeerInputs, core: PeerCore, link: IHarborLink) -> None:
        core.went_up(link)

    @removed.upon(PeerInputs.attach).loop()
    def attached_after_removal(inputs: PeerInputs, core: PeerCore, link: IHarborLink) -> None:
        link.close(f"harbor {core.harbor} was removed")

    # --- the link went down -------------------------------------------------------------
    @up.upon(PeerInputs.lost).to(backoff)
    def link_lost(inputs: PeerInputs, core: PeerCore, reason: str) -> None:
        core.link = None
        core.last_error = reason
        core.schedule_retry(inputs)

    for state in (idle, dialing, handshaking, backoff, removed):
        state.upon(PeerInputs.lost).loop().returns(None)

    @up.upon(PeerInputs.detach).to(handshaking)
    def detached(inputs: PeerInputs, core: PeerCore, reason: str) -> None:
        core.link = None
        core.state = "handshaking"
        core.retry = core.clock.callLater(core.handshake_timeout, inputs.dial_failed,
                                          f"no link replaced the one {reason}")

    for state in (idle, dialing, handshaking, backoff, removed):
        state.upon(PeerInputs.detach).loop().returns(None)

    # --- retry --------------------------------------------------------------------------
    @backoff.upon(PeerInputs.retry_due).to(dialing)
    def retry_now(inputs: PeerInputs, core: PeerCore) -> None:
        core.retry = None
        core.begin_dial(inputs)

    for state in (idle, dialing, handshaking, up, removed):
        state.upon(PeerInputs.retry_due).loop().returns(None)

    # --- removal ------------------------------------------------------------------------
    @idle.upon(PeerInputs.remove).to(removed)
    @dialing.upon(PeerInputs.remove).to(removed)
    @handshaking.upon(PeerInputs.remove).to(removed)
    @up.upon(PeerInputs.remove).to(removed)
    @backoff.upon(PeerInputs.remove).to(removed)
    def remove(inputs: PeerInputs, core: PeerCore, reason: str) -> None:
        core.state = "removed"
        core.cancel_retry()
        core.cancel_attempt()
        core.fail_queue(HarborDown(f"harbor {core.harbor} is down: {reason}"))
        link, core.link = core.link, None
        if link is not None:
            link.close(reason)

    removed.upon(PeerInputs.remove).loop().returns(None)

    return machine.build()


_PeerMachine = _build()


class Peer:
    """One other harbor: its machine, and the checks that may refuse a send."""

    def __init__(self, core: PeerCore) -> None:
        self.core = core
        self.inputs: PeerInputs = _PeerMachine(core)

    @property
    def harbor(self) -> int:
        """The peer's harbor id."""
        return self.core.harbor

    @property
    def state(self) -> str:
        """Where the peer is: idle, dialing, handshaking, backoff, up, or removed."""
        return self.core.state

    @property
    def link(self) -> IHarborLink | None:
        """The live link to the peer, if any."""
        return self.core.link

    @property
    def endpoint(self) -> str | None:
        """Where the peer listens (None if it dialed us and nobody told us)."""
        return self.core.endpoint

    @property
    def last_error(self) -> str:
        """Why the last dial failed (empty once up)."""
        return self.core.last_error

    def send(self, frame: Frame) -> None:
        """Send (or queue) one encoded frame; HarborDown or QueueFull if it cannot be."""
        core = self.core
        state = core.state
        if state == "up":
            assert core.link is not None
            core.link.write_frame(frame, False)
            return
        if state == "backoff":
            why = f": {core.last_error}" if core.last_error else ""
            raise HarborDown(f"harbor {core.harbor} is down{why}")
        if state == "removed":
            raise HarborDown(f"harbor {core.harbor} is not known to this node")
        if state == "idle" and core.endpoint is None:
            raise HarborDown(f"harbor {core.harbor}: this node does not know where it listens")
        if core.queued_bytes + len(frame) > core.max_queue_bytes:
            raise QueueFull(f"{core.queued_bytes} bytes already wait for harbor "
                            f"{core.harbor}'s link (limit {core.max_queue_bytes})")
        self.inputs.send(frame)
