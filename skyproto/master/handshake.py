"""The master handshake as one pure state machine for both sides (no I/O), tested directly.

```
node                                                         master
  MasterHello(version, nonce_n)                         ->   version, nonce checked
                        <-   MasterChallenge(version, nonce_m, proof_m, heartbeat timing)
  version, proof_m checked
  Join(proof_n, who, names, heartbeat timing) or Observe(proof_n, heartbeat timing)  ->
                                                             proof_n, timing, endpoint checked
                        <-   Welcome(...) or Refused(reason)   (the master's registry decides)
```

Each side's ``receive`` returns a :class:`Step`: the messages to send and, when there is
one, the outcome (:class:`JoinRequest`, :class:`ObserveRequest`, :class:`Authenticated`,
:class:`Welcomed` or :class:`Refusal`). Both sides then beat at the governing timing, the
slower side's (:meth:`HeartbeatTiming.governing`). A malformed or misplaced message raises
:class:`ProtocolError` (the adapter drops the connection, with no ``Refused``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Final

import attrs

from ..address import HARBOR_MAX
from ..auth import NONCE_SIZE, new_nonce, prove, verify
from ..errors import ProtocolError
from ..wire.heartbeat import HeartbeatTiming
from .messages import (
    MASTER_ROLE,
    NODE_ROLE,
    PROTOCOL_VERSION,
    Join,
    MasterChallenge,
    MasterHello,
    Observe,
    Refused,
    Welcome,
    transcript,
)

#: the longest harbor endpoint the master accepts and pushes to every node
MAX_ENDPOINT: Final = 1024
#: the slowest heartbeat timing either side accepts (seconds)
MAX_HEARTBEAT: Final = 3600.0


@attrs.frozen
class JoinInfo:
    """Who this node is, for every join (``harbor`` 0 asks the master to assign one)."""

    harbor: int
    incarnation: int
    node: str
    endpoint: str


@attrs.frozen
class JoinRequest:
    """Master side: a node proved the secret and asks to join as ``join`` says."""

    join: Join
    timing: HeartbeatTiming


@attrs.frozen
class ObserveRequest:
    """Master side: an observer proved the secret (it reads, never joins)."""

    timing: HeartbeatTiming


@attrs.frozen
class Authenticated:
    """Node side: the master proved the secret; ``observing`` unless a Join went out."""

    timing: HeartbeatTiming
    observing: bool


@attrs.frozen
class Welcomed:
    """Node side: the master admitted this node."""

    welcome: Welcome


@attrs.frozen
class Refusal:
    """The handshake ended without a connection; ``authenticated``: after the peer's proof."""

    reason: str
    authenticated: bool


Outcome = JoinRequest | ObserveRequest | Authenticated | Welcomed | Refusal


@attrs.frozen
class Step:
    """What the adapter must do after a message: send these, and act on the outcome."""

    send: tuple[object, ...] = ()
    outcome: Outcome | None = None


def peer_timing(interval: float, timeout: float) -> HeartbeatTiming | None:
    """The peer's stated heartbeat timing, or None when it is unusable."""
    if not (math.isfinite(interval) and math.isfinite(timeout)):
        return None
    if not 0 < interval < timeout <= MAX_HEARTBEAT:
        return None
    return HeartbeatTiming(interval, timeout)


def _name(message: object) -> str:
    return type(message).__name__


@attrs.define
class MasterHandshake:
    """The master's side of one connection's handshake."""

    secret: bytes = attrs.field(repr=False)
    timing: HeartbeatTiming
    nonce: bytes = attrs.field(factory=new_nonce, repr=False)
    _node_nonce: bytes | None = attrs.field(default=None, init=False, repr=False)
    done: bool = attrs.field(default=False, init=False)

    def receive(self, message: object) -> Step:
        """Advance on one message from the node."""
        if self.done:
            raise ProtocolError(f"unexpected {_name(message)}")
        if self._node_nonce is None:
            return self._on_hello(message)
        return self._on_proof(message)

    def _on_hello(self, message: object) -> Step:
        if not isinstance(message, MasterHello):
            raise ProtocolError(f"expected MasterHello, got {_name(message)}")
        if message.version != PROTOCOL_VERSION:
            return self._refuse(f"protocol version {message.version} is not supported "
                                f"(the master speaks {PROTOCOL_VERSION})", False)
        if len(message.nonce) != NONCE_SIZE:
            raise ProtocolError("bad nonce")
        self._node_nonce = message.nonce
        proof = prove(self.secret, MASTER_ROLE, self._transcript())
        return Step(send=(MasterChallenge(PROTOCOL_VERSION, self.nonce, proof,
                                          self.timing.interval, self.timing.timeout),))

    def _on_proof(self, message: object) -> Step:
        if not isinstance(message, Join | Observe):
            raise ProtocolError(f"expected Join or Observe, got {_name(message)}")
        if not verify(self.secret, NODE_ROLE, self._transcript(), message.proof):
            return self._refuse("authentication failed: wrong cluster secret", False)
        theirs = peer_timing(message.heartbeat_interval, message.heartbeat_timeout)
        if theirs is None:
            return self._refuse(
                f"unusable heartbeat timing: every {message.heartbeat_interval:g} s, "
                f"silent after {message.heartbeat_timeout:g} s", True)
        timing = self.timing.governing(theirs)
        self.done = True
        if isinstance(message, Observe):
            return Step(outcome=ObserveRequest(timing))
        endpoint = message.endpoint
        if not endpoint or len(endpoint) > MAX_ENDPOINT or not endpoint.isprintable():
            return self._refuse(f"unusable harbor endpoint {endpoint[:80]!r}", True)
        return Step(outcome=JoinRequest(message, timing))

    def _refuse(self, reason: str, authenticated: bool) -> Step:
        self.done = True
        return Step(send=(Refused(reason),), outcome=Refusal(reason, authenticated))

    def _transcript(self) -> bytes:
        assert self._node_nonce is not None
        return transcript(PROTOCOL_VERSION, self._node_nonce, self.nonce)


@attrs.define
class NodeHandshake:
    """The node's side: ``join`` None makes it an observer; ``names`` are asserted in the Join."""

    secret: bytes = attrs.field(repr=False)
    timing: HeartbeatTiming
    join: JoinInfo | None
    names: Callable[[], Mapping[str, int]] = dict
    nonce: bytes = attrs.field(factory=new_nonce, repr=False)
    _proven: bool = attrs.field(default=False, init=False)
    done: bool = attrs.field(default=False, init=False)

    def start(self) -> MasterHello:
        """The first message, sent as soon as the connection is made."""
        return MasterHello(PROTOCOL_VERSION, self.nonce)

    def receive(self, message: object) -> Step:
        """Advance on one message from the master (``Refused`` ends it at any time)."""
        if isinstance(message, Refused):
            self.done = True
            return Step(outcome=Refusal(message.reason, self._proven))
        if self.done:
            raise ProtocolError(f"unexpected {_name(message)} from the master")
        if not self._proven:
            return self._on_challenge(message)
        if not isinstance(message, Welcome):
            raise ProtocolError(f"expected Welcome, got {_name(message)}")
        assert self.join is not None
        if not 0 < message.harbor <= HARBOR_MAX or self.join.harbor not in (0, message.harbor):
            raise ProtocolError(f"welcomed as harbor {message.harbor}, "
                                f"asked for {self.join.harbor or 'any'}")
        self.done = True
        return Step(outcome=Welcomed(message))

    def _on_challenge(self, message: object) -> Step:
        if not isinstance(message, MasterChallenge):
            raise ProtocolError(f"expected MasterChallenge, got {_name(message)}")
        if message.version != PROTOCOL_VERSION:
            return self._refuse(f"the master speaks protocol {message.version}, "
                                f"this node {PROTOCOL_VERSION}")
        text = transcript(PROTOCOL_VERSION, self.nonce, message.nonce)
        if not verify(self.secret, MASTER_ROLE, text, message.proof):
            return self._refuse("authentication failed: the master does not know our "
                                "cluster secret")
        theirs = peer_timing(message.heartbeat_interval, message.heartbeat_timeout)
        if theirs is None:
            raise ProtocolError(f"unusable heartbeat timing from the master: every "
                                f"{message.heartbeat_interval:g} s, silent after "
                                f"{message.heartbeat_timeout:g} s")
        self._proven = True
        timing = self.timing.governing(theirs)
        proof = prove(self.secret, NODE_ROLE, text)
        mine = self.timing
        if self.join is None:
            self.done = True
            return Step(send=(Observe(proof, mine.interval, mine.timeout),),
                        outcome=Authenticated(timing, observing=True))
        info = self.join
        join = Join(proof, info.harbor, info.incarnation, info.node, info.endpoint,
                    dict(self.names()), mine.interval, mine.timeout)
        return Step(send=(join,), outcome=Authenticated(timing, observing=False))

    def _refuse(self, reason: str) -> Step:
        self.done = True
        return Step(outcome=Refusal(reason, False))
