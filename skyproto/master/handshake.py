"""The master handshake as one pure state machine for both sides (no I/O), tested directly.

::

    node                                                         master
      MasterHello(version, key_n)                           ->   version, key checked
                            <-   MasterChallenge(version, key_m, proof_m, heartbeat timing)
      version, proof_m checked                                   (both sides now seal)
      [Join(proof_n, who, names, heartbeat timing, groups) or Observe(proof_n, timing)]  ->
                                                                 proof_n, timing, endpoint checked
                            <-   [Welcome(...) or Refused(reason)]  (the master's registry decides)

``[...]`` is sealed: keys come from the X25519 exchange of ``key_n`` and ``key_m`` and the
stretched secret, bound to the transcript (:mod:`skyproto.wire.seal`), as on harbor links.
Each side's ``receive`` returns a :class:`Step`: the messages to send, the keys to seal
with from then on, the messages to send sealed and, when there is one, the outcome
(:class:`JoinRequest`, :class:`ObserveRequest`, :class:`Authenticated`, :class:`Welcomed`
or :class:`Refusal`). Both sides then beat at the governing timing, the slower side's
(:meth:`HeartbeatTiming.governing`). A malformed or misplaced message raises
:class:`ProtocolError` (the adapter drops the connection, with no ``Refused``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from typing import Final

import attrs

from ..address import HARBOR_MAX
from ..auth import cluster_key, new_nonce, prove, verify
from ..errors import ProtocolError
from ..wire.heartbeat import HeartbeatTiming
from ..wire.seal import Ephemeral, SessionKeys, derive_keys
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
#: the protocol label in the key derivation
KDF_PROTOCOL: Final = b"master"


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
    """What the adapter must do after a message: send ``send``; then, with ``keys``, seal
    both directions from now on and send ``sealed``; then act on the outcome."""

    send: tuple[object, ...] = ()
    outcome: Outcome | None = None
    keys: SessionKeys | None = attrs.field(default=None, eq=False, repr=False)
    sealed: tuple[object, ...] = ()


class _Keys:
    """One side's key material for one handshake: the stretched secret and an X25519 pair."""

    def __init__(self, secret: bytes, seed: bytes) -> None:
        self.cluster_key = cluster_key(secret)
        self.ephemeral = Ephemeral(seed)

    def derive(self, peer_key: bytes, transcript: bytes) -> SessionKeys:
        return derive_keys(self.cluster_key, self.ephemeral.shared(peer_key), KDF_PROTOCOL,
                           transcript)


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
    #: 32 random bytes this handshake's X25519 key is made from
    seed: bytes = attrs.field(factory=new_nonce, repr=False)
    _keys: _Keys = attrs.field(init=False, repr=False)
    _session: SessionKeys | None = attrs.field(default=None, init=False, repr=False)
    _transcript: bytes = attrs.field(default=b"", init=False, repr=False)
    done: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self._keys = _Keys(self.secret, self.seed)

    def receive(self, message: object) -> Step:
        """Advance on one message from the node."""
        if self.done:
            raise ProtocolError(f"unexpected {_name(message)}")
        if self._session is None:
            return self._on_hello(message)
        return self._on_proof(message)

    def _on_hello(self, message: object) -> Step:
        if not isinstance(message, MasterHello):
            raise ProtocolError(f"expected MasterHello, got {_name(message)}")
        if message.version != PROTOCOL_VERSION:
            return self._refuse(f"protocol version {message.version} is not supported "
                                f"(the master speaks {PROTOCOL_VERSION})", False)
        mine = self.timing
        text = transcript(PROTOCOL_VERSION, message.key, self._keys.ephemeral.public,
                          mine.interval, mine.timeout)
        keys = self._keys.derive(message.key, text)
        self._session, self._transcript = keys, text
        proof = prove(keys.confirm, MASTER_ROLE, text)
        return Step(send=(MasterChallenge(PROTOCOL_VERSION, self._keys.ephemeral.public, proof,
                                          mine.interval, mine.timeout),), keys=keys)

    def _on_proof(self, message: object) -> Step:
        if not isinstance(message, Join | Observe):
            raise ProtocolError(f"expected Join or Observe, got {_name(message)}")
        assert self._session is not None
        if not verify(self._session.confirm, NODE_ROLE, self._transcript, message.proof):
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


@attrs.define
class NodeHandshake:
    """The node's side: ``join`` None makes it an observer; ``names`` and ``groups`` (group
    -> handles) are asserted in the Join."""

    secret: bytes = attrs.field(repr=False)
    timing: HeartbeatTiming
    join: JoinInfo | None
    names: Callable[[], Mapping[str, int]] = dict
    groups: Callable[[], Mapping[str, Collection[int]]] = dict
    #: 32 random bytes this handshake's X25519 key is made from
    seed: bytes = attrs.field(factory=new_nonce, repr=False)
    _keys: _Keys = attrs.field(init=False, repr=False)
    _proven: bool = attrs.field(default=False, init=False)
    done: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self._keys = _Keys(self.secret, self.seed)

    def start(self) -> MasterHello:
        """The first message, sent as soon as the connection is made."""
        return MasterHello(PROTOCOL_VERSION, self._keys.ephemeral.public)

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
        text = transcript(PROTOCOL_VERSION, self._keys.ephemeral.public, message.key,
                          message.heartbeat_interval, message.heartbeat_timeout)
        keys = self._keys.derive(message.key, text)
        if not verify(keys.confirm, MASTER_ROLE, text, message.proof):
            return self._refuse("authentication failed: the master does not know our "
                                "cluster secret")
        theirs = peer_timing(message.heartbeat_interval, message.heartbeat_timeout)
        if theirs is None:
            raise ProtocolError(f"unusable heartbeat timing from the master: every "
                                f"{message.heartbeat_interval:g} s, silent after "
                                f"{message.heartbeat_timeout:g} s")
        self._proven = True
        timing = self.timing.governing(theirs)
        proof = prove(keys.confirm, NODE_ROLE, text)
        mine = self.timing
        if self.join is None:
            self.done = True
            return Step(keys=keys, sealed=(Observe(proof, mine.interval, mine.timeout),),
                        outcome=Authenticated(timing, observing=True))
        info = self.join
        groups = {group: tuple(sorted(handles)) for group, handles in self.groups().items()
                  if handles}
        join = Join(proof, info.harbor, info.incarnation, info.node, info.endpoint,
                    dict(self.names()), mine.interval, mine.timeout, groups)
        return Step(keys=keys, sealed=(join,), outcome=Authenticated(timing, observing=False))

    def _refuse(self, reason: str) -> Step:
        self.done = True
        return Step(outcome=Refusal(reason, False))
