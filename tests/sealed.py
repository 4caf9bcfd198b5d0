"""Hand-driven peers' half of the v3 handshakes: the key schedule and the record layer.

Tests that speak the master or harbor protocol byte by byte (to send what a real peer
never would) use these, built from the library's own pieces, so that everything after the
handshake is sealed the way a real peer seals it.
"""

from __future__ import annotations

import os
from typing import Any

from skyproto.auth import cluster_key, prove
from skyproto.master.handshake import KDF_PROTOCOL as MASTER_KDF
from skyproto.master.messages import (
    MASTER_ROLE,
    NODE_ROLE,
    PROTOCOL_VERSION,
    MasterChallenge,
    MasterHello,
    transcript,
)
from skyproto.wire.codec import MessageCodec
from skyproto.wire.seal import SEALED, Ephemeral, Opener, Sealer, SessionKeys, derive_keys


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def split_frames(data: bytes) -> tuple[list[bytes], bytes]:
    """Whole frames in ``data``, and what is left of a partial one."""
    frames = []
    while len(data) >= 4:
        length = int.from_bytes(data[:4], "big")
        if len(data) < 4 + length:
            break
        frames.append(data[4:4 + length])
        data = data[4 + length:]
    return frames, data


class Wire:
    """Frames one way and the other; sealed records once :meth:`seal` is called."""

    def __init__(self, codec: MessageCodec | None = None) -> None:
        self.codec = codec
        self.sealer: Sealer | None = None
        self.opener: Opener | None = None
        self._rest = b""

    def seal(self, keys: SessionKeys, initiator: bool) -> None:
        self.sealer = keys.sealer(initiator)
        self.opener = keys.opener(initiator)

    def encode_frame(self, body: bytes) -> bytes:
        framed = frame(body)
        return self.sealer.seal(framed) if self.sealer is not None else framed

    def encode(self, message: object) -> bytes:
        assert self.codec is not None
        return self.encode_frame(self.codec.encode(message))

    def decode_frames(self, data: bytes) -> list[bytes]:
        """Every whole frame in what arrived (records opened); partial ones wait."""
        records, self._rest = split_frames(self._rest + data)
        frames: list[bytes] = []
        for record in records:
            if self.opener is not None and record[:1] == bytes([SEALED]):
                inner, rest = split_frames(self.opener.open(record))
                assert not rest
                frames.extend(inner)
            else:
                frames.append(record)
        return frames

    def decode(self, data: bytes) -> list[Any]:
        assert self.codec is not None
        return [self.codec.decode(body) for body in self.decode_frames(data)]


class MasterNodeSide:
    """The node's key material for one master handshake driven by hand."""

    def __init__(self, secret: bytes, seed: bytes | None = None) -> None:
        self.secret = secret
        self.ephemeral = Ephemeral(seed or os.urandom(32))

    def hello(self, version: int = PROTOCOL_VERSION) -> MasterHello:
        return MasterHello(version, self.ephemeral.public)

    def answer(self, challenge: MasterChallenge) -> tuple[SessionKeys, bytes]:
        """The keys and the node's proof for this challenge (the proof is not checked)."""
        text = transcript(PROTOCOL_VERSION, self.ephemeral.public, challenge.key,
                          challenge.heartbeat_interval, challenge.heartbeat_timeout)
        keys = derive_keys(cluster_key(self.secret), self.ephemeral.shared(challenge.key),
                           MASTER_KDF, text)
        return keys, prove(keys.confirm, NODE_ROLE, text)


def master_challenge(secret: bytes, hello: MasterHello, interval: float = 1.0,
                     timeout: float = 3.0, seed: bytes | None = None,
                     ) -> tuple[SessionKeys, MasterChallenge]:
    """The master's answer to ``hello``, made by hand, and the keys it implies."""
    ephemeral = Ephemeral(seed or os.urandom(32))
    text = transcript(PROTOCOL_VERSION, hello.key, ephemeral.public, interval, timeout)
    keys = derive_keys(cluster_key(secret), ephemeral.shared(hello.key), MASTER_KDF, text)
    proof = prove(keys.confirm, MASTER_ROLE, text)
    return keys, MasterChallenge(PROTOCOL_VERSION, ephemeral.public, proof, interval, timeout)
