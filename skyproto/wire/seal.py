"""Sealing: the keys a handshake derives, and the AEAD records frames travel in after it.

Both handshakes (harbor link and master connection) follow one schedule, as Noise's
``NNpsk`` patterns and WireGuard do: each side sends a fresh X25519 public key in its first
message; both compute the shared Diffie-Hellman value and feed it to HKDF-SHA256 salted
with the stretched cluster key (:func:`skyproto.auth.cluster_key`), bound to a hash of the
whole transcript. That yields a key for the proofs and one AES-256-GCM key per direction.
Only a peer that knows the secret *and* took part in this exchange can read or write the
connection, so a relay in the middle can only pass bytes on or break the connection.

After the handshake every write is one record: ``length (4) | 0x02 | ciphertext+tag``,
sealed under the sender's direction key with a 96-bit nonce of four zero bytes and a
64-bit counter that starts at 0. A record altered, reordered, replayed or dropped fails to
open (its counter no longer matches), and the connection ends at once.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Final

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import ProtocolError

#: the size of an X25519 public key (and of the seed its private key is made from)
PUBLIC_KEY_SIZE: Final = 32
TAG_SIZE: Final = 16
#: the kind byte of a sealed record; plain frames start with 0 or 1 (harbor) or 0x80-0x9f
#: (a master message, a CBOR array), so the two never look alike
SEALED: Final = 2
#: bytes a record adds to the frames it carries, besides its 4-byte length
RECORD_OVERHEAD: Final = 1 + TAG_SIZE
_HEADER: Final = struct.Struct(">IB")
_NONCE: Final = struct.Struct(">4xQ")
#: what HKDF's info starts with; the protocol label and the transcript hash follow
KDF_LABEL: Final = b"skyproto-seal-v1 "


class SealError(ProtocolError):
    """A sealed record could not be opened: the bytes were changed on the way."""


class Ephemeral:
    """One side's X25519 key pair for one handshake, made from 32 random bytes."""

    __slots__ = ("_private", "public")

    def __init__(self, seed: bytes) -> None:
        self._private = X25519PrivateKey.from_private_bytes(seed)
        #: the 32 bytes sent to the peer (fresh each handshake: it is also the nonce)
        self.public = self._private.public_key().public_bytes_raw()

    def shared(self, peer_public: bytes) -> bytes:
        """The Diffie-Hellman value with the peer's key; ProtocolError if it is unusable."""
        if len(peer_public) != PUBLIC_KEY_SIZE:
            raise ProtocolError(f"key of {len(peer_public)} bytes, expected {PUBLIC_KEY_SIZE}")
        try:
            return self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError:  # a small-order point: the result would be all zeros
            raise ProtocolError("the peer's key is not a usable X25519 public key") from None


@attrs.frozen
class SessionKeys:
    """What one handshake derives: the proof key and a sealing key per direction."""

    confirm: bytes = attrs.field(repr=False)
    #: seals what the side that spoke first (dialer, node) sends
    initiator: bytes = attrs.field(repr=False)
    #: seals what the other side (acceptor, master) sends
    responder: bytes = attrs.field(repr=False)

    def sealer(self, initiator: bool) -> Sealer:
        """The sealer for what this side sends."""
        return Sealer(self.initiator if initiator else self.responder)

    def opener(self, initiator: bool) -> Opener:
        """The opener for what this side receives."""
        return Opener(self.responder if initiator else self.initiator)


def derive_keys(cluster_key: bytes, shared: bytes, protocol: bytes,
                transcript: bytes) -> SessionKeys:
    """HKDF-SHA256(ikm=shared, salt=cluster_key, info=label protocol 0 SHA-256(transcript))."""
    info = KDF_LABEL + protocol + b"\x00" + hashlib.sha256(transcript).digest()
    okm = HKDF(SHA256(), 96, salt=cluster_key, info=info).derive(shared)
    return SessionKeys(okm[:32], okm[32:64], okm[64:])


class Sealer:
    """Seals one direction's records, counting them."""

    __slots__ = ("_encrypt", "records")

    def __init__(self, key: bytes) -> None:
        self._encrypt = AESGCM(key).encrypt
        #: records sealed so far (the next record's nonce)
        self.records = 0

    def seal(self, frames: bytes) -> bytes:
        """Already framed bytes -> one whole record, length prefix included."""
        sealed = self._encrypt(_NONCE.pack(self.records), frames, None)
        self.records += 1
        return _HEADER.pack(len(sealed) + 1, SEALED) + sealed


class Opener:
    """Opens one direction's records in order; any gap, change or repeat fails."""

    __slots__ = ("_decrypt", "records")

    def __init__(self, key: bytes) -> None:
        self._decrypt = AESGCM(key).decrypt
        #: records opened so far (the next record's nonce)
        self.records = 0

    def open(self, record: bytes) -> bytes:
        """A record without its length prefix (kind byte first) -> the frames it carries."""
        if len(record) < RECORD_OVERHEAD:
            raise SealError(f"sealed record of {len(record)} bytes is too short")
        try:
            frames = self._decrypt(_NONCE.pack(self.records), memoryview(record)[1:], None)
        except InvalidTag:
            raise SealError(
                f"sealed record {self.records} failed to open: bytes on the connection "
                f"were altered, reordered, replayed or dropped") from None
        self.records += 1
        return frames
