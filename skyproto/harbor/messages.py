"""The harbor link's control messages (handshake, heartbeat, refusal)."""

from __future__ import annotations

from typing import Final

import attrs

from ..wire.codec import MessageCodec

PROTOCOL_VERSION: Final = 1

HARBOR_CODEC = MessageCodec("harbor")


@HARBOR_CODEC.message(1)
@attrs.frozen
class LinkHello:
    """Dialer -> acceptor: who I am, and a fresh nonce for the acceptor to prove on."""

    version: int
    harbor: int
    incarnation: int
    nonce: bytes


@HARBOR_CODEC.message(2)
@attrs.frozen
class LinkChallenge:
    """Acceptor -> dialer: who I am, my nonce, and my proof of the secret."""

    version: int
    harbor: int
    incarnation: int
    nonce: bytes
    proof: bytes


@HARBOR_CODEC.message(3)
@attrs.frozen
class LinkProof:
    """Dialer -> acceptor: the dialer's proof of the secret; the link is up after it."""

    proof: bytes


@HARBOR_CODEC.message(4)
@attrs.frozen
class LinkRefused:
    """Either side: why the link is refused, just before it closes."""

    reason: str


@HARBOR_CODEC.message(5)
@attrs.frozen
class Heartbeat:
    """Sent every heartbeat interval; any frame counts as a sign of life."""
