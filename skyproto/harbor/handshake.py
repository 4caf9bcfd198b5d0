"""The harbor link handshake as a pure state machine (no I/O), tested directly.

Three messages, like Noise's NNpsk2: the dialer sends LinkHello (its harbor id, incarnation,
heartbeat timing and a fresh X25519 key); the acceptor answers LinkChallenge (its own, plus
a proof); the dialer checks that proof and sends its own. Keys come from the Diffie-Hellman
value and the stretched secret, bound to the transcript (:mod:`skyproto.wire.seal`); each
proof covers both keys, both identities and both timings under a role label, so nothing
can be replayed, reflected or altered, and everything after LinkProof is sealed. Both sides
then beat at the slower side's timing.
"""

from __future__ import annotations

import struct
from typing import Final

import attrs

from ..address import check_harbor
from ..auth import cluster_key, new_nonce, prove, verify
from ..errors import AddressError, AuthenticationFailed, ProtocolError
from ..wire.heartbeat import HeartbeatTiming
from ..wire.seal import Ephemeral, SessionKeys, derive_keys
from .messages import PROTOCOL_VERSION, LinkChallenge, LinkHello, LinkProof, LinkRefused

_IDENTITIES: Final = struct.Struct(">HBQBQ")
_TIMINGS: Final = struct.Struct(">dddd")
DIALER: Final = b"harbor-dialer"
ACCEPTOR: Final = b"harbor-acceptor"
#: the protocol label in the key derivation
KDF_PROTOCOL: Final = b"harbor"


class HandshakeRefused(ProtocolError):
    """The handshake cannot go on; ``reason`` is also told to the peer."""


@attrs.frozen
class PeerIdentity:
    """What a finished handshake established about the peer."""

    harbor: int
    incarnation: int
    #: the heartbeat timing both sides use (the slower side's)
    timing: HeartbeatTiming = attrs.field(factory=HeartbeatTiming)
    #: the keys the link is sealed with from now on
    keys: SessionKeys | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen
class Step:
    """What the adapter must do after a message: send these, and maybe declare the link up."""

    send: tuple[object, ...] = ()
    peer: PeerIdentity | None = None


def _transcript(hello: LinkHello, harbor: int, incarnation: int, key: bytes,
                timing: HeartbeatTiming) -> bytes:
    if not 0 <= incarnation < 2**64 or not 0 <= hello.incarnation < 2**64:
        raise ProtocolError("incarnation out of range")
    return hello.key + key + _IDENTITIES.pack(
        hello.version, hello.harbor, hello.incarnation, harbor, incarnation
    ) + _TIMINGS.pack(hello.heartbeat_interval, hello.heartbeat_timeout,
                      timing.interval, timing.timeout)


#: a peer's heartbeat timing must be sane: beats at most every minute, silence at most 10 min
MAX_HEARTBEAT_INTERVAL: Final = 60.0
MAX_HEARTBEAT_TIMEOUT: Final = 600.0


def _peer_timing(interval: float, timeout: float) -> HeartbeatTiming:
    if not (0 < interval <= MAX_HEARTBEAT_INTERVAL and interval < timeout
            and timeout <= MAX_HEARTBEAT_TIMEOUT):
        raise HandshakeRefused(
            f"unusable heartbeat timing: every {interval!r} s, silent after {timeout!r} s")
    return HeartbeatTiming(interval, timeout)


@attrs.define
class LinkHandshake:
    """One side of one handshake. A dialer names whom it meant to reach: ``expect_harbor``,
    and ``expect_incarnation`` when the master told it which process is live there."""

    secret: bytes = attrs.field(repr=False)
    harbor: int
    incarnation: int
    dialer: bool
    expect_harbor: int | None = None
    #: 32 random bytes this handshake's X25519 key is made from
    seed: bytes = attrs.field(factory=new_nonce, repr=False)
    #: this side's heartbeat timing, told to the peer
    timing: HeartbeatTiming = attrs.field(factory=HeartbeatTiming)
    expect_incarnation: int | None = None
    _hello: LinkHello | None = attrs.field(default=None, init=False)
    _keys: SessionKeys | None = attrs.field(default=None, init=False, repr=False)
    _transcript: bytes = attrs.field(default=b"", init=False, repr=False)
    done: bool = attrs.field(default=False, init=False)
    _cluster_key: bytes = attrs.field(init=False, repr=False)
    _ephemeral: Ephemeral = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._cluster_key = cluster_key(self.secret)
        self._ephemeral = Ephemeral(self.seed)

    @property
    def public_key(self) -> bytes:
        """This side's X25519 public key, sent in its first message."""
        return self._ephemeral.public

    def start(self) -> LinkHello | None:
        """The dialer's first message (the acceptor waits)."""
        if not self.dialer:
            return None
        self._hello = LinkHello(PROTOCOL_VERSION, self.harbor, self.incarnation,
                                self.public_key, self.timing.interval, self.timing.timeout)
        return self._hello

    def receive(self, message: object) -> Step:
        """Advance on one message; raise HandshakeRefused, AuthenticationFailed, ProtocolError."""
        if self.done:
            raise ProtocolError(f"unexpected {type(message).__name__} after the handshake")
        if isinstance(message, LinkRefused):
            raise HandshakeRefused(f"peer refused the link: {message.reason}")
        if self.dialer and isinstance(message, LinkChallenge) and self._hello is not None:
            return self._on_challenge(message)
        if not self.dialer and isinstance(message, LinkHello) and self._hello is None:
            return self._on_hello(message)
        if not self.dialer and isinstance(message, LinkProof) and self._hello is not None:
            return self._on_proof(message)
        raise ProtocolError(f"unexpected {type(message).__name__} during the handshake")

    def _check_peer(self, version: int, harbor: int) -> None:
        if version != PROTOCOL_VERSION:
            raise HandshakeRefused(
                f"protocol version {version} is not supported (this node speaks {PROTOCOL_VERSION})"
            )
        try:
            check_harbor(harbor)
        except AddressError as e:
            raise HandshakeRefused(str(e)) from None
        if harbor == self.harbor:
            raise HandshakeRefused(f"peer claims our own harbor id {harbor}")

    def _derive(self, peer_key: bytes, transcript: bytes) -> SessionKeys:
        shared = self._ephemeral.shared(peer_key)
        self._transcript = transcript
        self._keys = derive_keys(self._cluster_key, shared, KDF_PROTOCOL, transcript)
        return self._keys

    def _on_hello(self, hello: LinkHello) -> Step:
        self._check_peer(hello.version, hello.harbor)
        _peer_timing(hello.heartbeat_interval, hello.heartbeat_timeout)
        transcript = _transcript(hello, self.harbor, self.incarnation, self.public_key,
                                 self.timing)
        keys = self._derive(hello.key, transcript)
        self._hello = hello
        proof = prove(keys.confirm, ACCEPTOR, transcript)
        return Step(send=(LinkChallenge(PROTOCOL_VERSION, self.harbor, self.incarnation,
                                        self.public_key, proof, self.timing.interval,
                                        self.timing.timeout),))

    def _on_proof(self, message: LinkProof) -> Step:
        hello, keys = self._hello, self._keys
        assert hello is not None and keys is not None
        if not verify(keys.confirm, DIALER, self._transcript, message.proof):
            raise AuthenticationFailed("peer failed to prove the cluster secret")
        self.done = True
        theirs = HeartbeatTiming(hello.heartbeat_interval, hello.heartbeat_timeout)
        return Step(peer=PeerIdentity(hello.harbor, hello.incarnation,
                                      self.timing.governing(theirs), keys))

    def _on_challenge(self, challenge: LinkChallenge) -> Step:
        assert self._hello is not None
        self._check_peer(challenge.version, challenge.harbor)
        if self.expect_harbor is not None and challenge.harbor != self.expect_harbor:
            raise HandshakeRefused(
                f"dialed harbor {self.expect_harbor} but harbor {challenge.harbor} answered"
            )
        theirs = _peer_timing(challenge.heartbeat_interval, challenge.heartbeat_timeout)
        transcript = _transcript(self._hello, challenge.harbor, challenge.incarnation,
                                 challenge.key, theirs)
        keys = self._derive(challenge.key, transcript)
        if not verify(keys.confirm, ACCEPTOR, transcript, challenge.proof):
            raise AuthenticationFailed("peer failed to prove the cluster secret")
        if (self.expect_incarnation is not None
                and challenge.incarnation != self.expect_incarnation):
            raise HandshakeRefused(
                f"dialed harbor {challenge.harbor} incarnation {self.expect_incarnation} but "
                f"incarnation {challenge.incarnation} answered (a stale or wrong address)")
        self.done = True
        return Step(
            send=(LinkProof(prove(keys.confirm, DIALER, transcript)),),
            peer=PeerIdentity(challenge.harbor, challenge.incarnation,
                              self.timing.governing(theirs), keys),
        )
