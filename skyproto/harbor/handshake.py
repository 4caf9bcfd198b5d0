"""The harbor link handshake as a pure state machine (no I/O), tested directly.

Three messages, like a TLS-PSK exchange: the dialer sends LinkHello (its harbor id,
incarnation, heartbeat timing and nonce); the acceptor answers LinkChallenge (its own, plus
an HMAC proof over both); the dialer checks that proof and sends its own. Each proof covers
both fresh nonces, both identities and both timings under a role label, so nothing can be
replayed, reflected or altered. Both sides then beat at the slower side's timing.
"""

from __future__ import annotations

import struct
from typing import Final

import attrs

from ..address import check_harbor
from ..auth import NONCE_SIZE, new_nonce, prove, verify
from ..errors import AddressError, AuthenticationFailed, ProtocolError
from ..wire.heartbeat import HeartbeatTiming
from .messages import PROTOCOL_VERSION, LinkChallenge, LinkHello, LinkProof, LinkRefused

_IDENTITIES: Final = struct.Struct(">HBQBQ")
_TIMINGS: Final = struct.Struct(">dddd")
DIALER: Final = b"harbor-dialer"
ACCEPTOR: Final = b"harbor-acceptor"


class HandshakeRefused(ProtocolError):
    """The handshake cannot go on; ``reason`` is also told to the peer."""


@attrs.frozen
class PeerIdentity:
    """What a finished handshake established about the peer."""

    harbor: int
    incarnation: int
    #: the heartbeat timing both sides use (the slower side's)
    timing: HeartbeatTiming = attrs.field(factory=HeartbeatTiming)


@attrs.frozen
class Step:
    """What the adapter must do after a message: send these, and maybe declare the link up."""

    send: tuple[object, ...] = ()
    peer: PeerIdentity | None = None


def _transcript(hello: LinkHello, harbor: int, incarnation: int, nonce: bytes,
                timing: HeartbeatTiming) -> bytes:
    if not 0 <= incarnation < 2**64 or not 0 <= hello.incarnation < 2**64:
        raise ProtocolError("incarnation out of range")
    return hello.nonce + nonce + _IDENTITIES.pack(
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
    """One side of one handshake. ``expect_harbor`` is whom a dialer meant to reach."""

    secret: bytes = attrs.field(repr=False)
    harbor: int
    incarnation: int
    dialer: bool
    expect_harbor: int | None = None
    nonce: bytes = attrs.field(factory=new_nonce, repr=False)
    #: this side's heartbeat timing, told to the peer
    timing: HeartbeatTiming = attrs.field(factory=HeartbeatTiming)
    _hello: LinkHello | None = attrs.field(default=None, init=False)
    done: bool = attrs.field(default=False, init=False)

    def start(self) -> LinkHello | None:
        """The dialer's first message (the acceptor waits)."""
        if not self.dialer:
            return None
        self._hello = LinkHello(PROTOCOL_VERSION, self.harbor, self.incarnation, self.nonce,
                                self.timing.interval, self.timing.timeout)
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

    def _check_peer(self, version: int, harbor: int, nonce: bytes) -> None:
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
        if len(nonce) != NONCE_SIZE:
            raise ProtocolError(f"nonce of {len(nonce)} bytes, expected {NONCE_SIZE}")

    def _on_hello(self, hello: LinkHello) -> Step:
        self._check_peer(hello.version, hello.harbor, hello.nonce)
        _peer_timing(hello.heartbeat_interval, hello.heartbeat_timeout)
        self._hello = hello
        transcript = _transcript(hello, self.harbor, self.incarnation, self.nonce, self.timing)
        proof = prove(self.secret, ACCEPTOR, transcript)
        return Step(send=(LinkChallenge(PROTOCOL_VERSION, self.harbor, self.incarnation,
                                        self.nonce, proof, self.timing.interval,
                                        self.timing.timeout),))

    def _on_proof(self, message: LinkProof) -> Step:
        hello = self._hello
        assert hello is not None
        transcript = _transcript(hello, self.harbor, self.incarnation, self.nonce, self.timing)
        if not verify(self.secret, DIALER, transcript, message.proof):
            raise AuthenticationFailed("peer failed to prove the cluster secret")
        self.done = True
        theirs = HeartbeatTiming(hello.heartbeat_interval, hello.heartbeat_timeout)
        return Step(peer=PeerIdentity(hello.harbor, hello.incarnation,
                                      self.timing.governing(theirs)))

    def _on_challenge(self, challenge: LinkChallenge) -> Step:
        assert self._hello is not None
        self._check_peer(challenge.version, challenge.harbor, challenge.nonce)
        if self.expect_harbor is not None and challenge.harbor != self.expect_harbor:
            raise HandshakeRefused(
                f"dialed harbor {self.expect_harbor} but harbor {challenge.harbor} answered"
            )
        theirs = _peer_timing(challenge.heartbeat_interval, challenge.heartbeat_timeout)
        transcript = _transcript(self._hello, challenge.harbor, challenge.incarnation,
                                 challenge.nonce, theirs)
        if not verify(self.secret, ACCEPTOR, transcript, challenge.proof):
            raise AuthenticationFailed("peer failed to prove the cluster secret")
        self.done = True
        return Step(
            send=(LinkProof(prove(self.secret, DIALER, transcript)),),
            peer=PeerIdentity(challenge.harbor, challenge.incarnation,
                              self.timing.governing(theirs)),
        )
