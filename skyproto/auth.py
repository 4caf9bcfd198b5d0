"""The cluster secret, the key stretched from it, and the proofs built on that key.

The secret lives in a file readable by its owner only (like Erlang's ``~/.erlang.cookie``):
created with mode 0600 and a random value on first use, refused if others can read it or if
it is shorter than :data:`MIN_SECRET_SIZE` bytes, and never logged. Handshakes never use the
secret itself: they use :func:`cluster_key`, the secret stretched once per process with
scrypt, so each offline guess at a weak secret costs an attacker tens of milliseconds.
The handshakes (:mod:`skyproto.wire.seal`) derive per-connection keys from it; each proof
is an HMAC over a role label and the whole transcript, so a recorded handshake cannot be
replayed and a proof cannot be reflected.
"""

from __future__ import annotations

import functools
import hmac
import os
import secrets
import stat
from hashlib import sha256
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .errors import ConfigurationError

NONCE_SIZE: Final = 32
PROOF_SIZE: Final = 32
#: secrets shorter than this are refused (the generated cookie is 32 random bytes, hex)
MIN_SECRET_SIZE: Final = 16
#: scrypt's cost for stretching the secret: about 60 ms and 16 MiB, once per process
SCRYPT_N: Final = 2**14
SCRYPT_R: Final = 8
SCRYPT_SALT: Final = b"skyproto cluster key v1"
DEFAULT_SECRET_FILE: Final = "~/.skyproto.cookie"


def default_secret_path() -> Path:
    """Where the cluster secret is read when no ``--secret-file`` is given: ``~/.skyproto.cookie``,
    expanded."""
    return Path(DEFAULT_SECRET_FILE).expanduser()


def load_secret(path: str | os.PathLike[str] | None = None, create: bool = True) -> bytes:
    """Read the cluster secret, creating the file (mode 0600, random) if it does not exist
    and ``create`` is true (daemons); tools that only read (``skyproto status``) pass False.

    Raises ConfigurationError, with one line a user can act on, if the file is readable or
    writable by others, empty, or cannot be read or created.
    """
    file = Path(path).expanduser() if path is not None else default_secret_path()
    if not create and not file.exists():
        raise ConfigurationError(f"no secret file {file} (give --secret-file)")
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as e:
        raise ConfigurationError(f"cannot create secret file {file}: {e.strerror}") from None
    else:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32) + "\n")
    try:
        mode = file.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigurationError(
                f"secret file {file} is accessible by others (mode {stat.S_IMODE(mode):04o});"
                f" run: chmod 600 {file}"
            )
        secret = file.read_bytes().strip()
    except OSError as e:
        raise ConfigurationError(f"cannot read secret file {file}: {e.strerror}") from None
    if not secret:
        raise ConfigurationError(f"secret file {file} is empty")
    return check_secret(secret, f"secret file {file}")


def check_secret(secret: bytes, where: str = "the cluster secret") -> bytes:
    """Return ``secret`` if it is long enough; ConfigurationError (one line) if not."""
    if len(secret) < MIN_SECRET_SIZE:
        raise ConfigurationError(
            f"{where} holds {len(secret)} bytes; at least {MIN_SECRET_SIZE} are needed "
            f"(delete it to have a random one made)")
    return secret


@functools.lru_cache(maxsize=16)
def cluster_key(secret: bytes) -> bytes:
    """The 32-byte key every handshake uses: scrypt(secret), computed once per secret.

    Stretching makes an offline guess cost as much as this call (tens of milliseconds and
    16 MiB), far more than an online handshake attempt; see docs/security.md."""
    check_secret(secret)
    return Scrypt(salt=SCRYPT_SALT, length=32, n=SCRYPT_N, r=SCRYPT_R, p=1).derive(secret)


def new_nonce() -> bytes:
    """A fresh random nonce of NONCE_SIZE bytes, from the operating system's CSPRNG."""
    return secrets.token_bytes(NONCE_SIZE)


def prove(key: bytes, role: bytes, transcript: bytes) -> bytes:
    """The proof one side sends: HMAC-SHA256(key, label || role || 0 || transcript)."""
    return hmac.new(key, b"skyproto-auth-v1\x00" + role + b"\x00" + transcript, sha256).digest()


def verify(key: bytes, role: bytes, transcript: bytes, proof: bytes) -> bool:
    """Check a peer's proof in constant time."""
    return hmac.compare_digest(prove(key, role, transcript), proof)
