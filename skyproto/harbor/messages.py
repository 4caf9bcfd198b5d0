"""The harbor link's control messages (handshake, heartbeat, refusal)."""

from __future__ import annotations

from typing import Final

import attrs

from ..wire.codec import MessageCodec

#: 2: hello and challenge carry each side's heartbeat timing; LinkRetired
#: 3: X25519 keys instead of nonces; everything after LinkProof is sealed
PROTOCOL_VERSION: Final = 3

HARBOR_CODEC = MessageCodec("harbor")


@HARBOR_CODEC.message(1)
@attrs.frozen
class LinkHello:
    """Dialer -> acceptor: who I am, and a fresh X25519 public key (also the nonce)."""

    version: int
    harbor: int
    incarnation: int
    key: bytes
    #: how often this side beats and how long a silence it tolerates (the slower side governs)
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 3.0


@HARBOR_CODEC.message(2)
@attrs.frozen
class LinkChallenge:
    """Acceptor -> dialer: who I am, my fresh X25519 public key, and my proof."""

    version: int
    harbor: int
    incarnation: int
    key: bytes
    proof: bytes
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 3.0


@HARBOR_CODEC.message(3)
@attrs.frozen
class LinkProof:
    """Dialer -> acceptor: the dialer's proof; the link is up, and sealed, after it."""

    proof: bytes


@HARBOR_CODEC.message(4)
@attrs.frozen
class LinkRefused:
    """Either side: why the link is refused, just before it closes."""

    reason: str


@HARBOR_CODEC.message(5)
@attrs.frozen
class Heartbeat:
    """Sent every heartbeat interval; any frame counts as a sign of life. ``load``: the
    sender's requests in progress and queued, for ``call_group(pick="least_loaded")``."""

    load: int = 0


@HARBOR_CODEC.message(6)
@attrs.frozen
class LinkRetired:
    """Either side: this link is a duplicate and carries nothing more from me.

    Both sides of a duplicate pair retire the same link (the one the higher harbor id
    dialed); each closes it once it has the other's LinkRetired, so nothing sent on it
    before is lost."""

    reason: str
