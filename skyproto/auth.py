"""The cluster secret and the mutual HMAC-SHA256 challenge built on it.

The secret lives in a file readable by its owner only (like Erlang's ``~/.erlang.cookie``):
created with mode 0600 and a random value on first use, refused if others can read it, and
never logged. A handshake proves knowledge of the secret without sending it: each side
contributes a fresh random nonce, and each proof is an HMAC over a role label and the whole
transcript, so a recorded handshake cannot be replayed and a proof cannot be reflected.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from hashlib import sha256
from pathlib import Path
from typing import Final

from .errors import ConfigurationError

NONCE_SIZE: Final = 32
PROOF_SIZE: Final = 32
DEFAULT_SECRET_FILE: Final = "~/.skyproto.cookie"


def default_secret_path() -> Path:
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
    return secret


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_SIZE)


def prove(secret: bytes, role: bytes, transcript: bytes) -> bytes:
    """The proof one side sends: HMAC-SHA256(secret, role label || transcript)."""
    return hmac.new(secret, b"skyproto-auth-v1\x00" + role + b"\x00" + transcript, sha256).digest()


def verify(secret: bytes, role: bytes, transcript: bytes, proof: bytes) -> bool:
    """Check a peer's proof in constant time."""
    return hmac.compare_digest(prove(secret, role, transcript), proof)
