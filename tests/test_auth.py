import os
import stat

import pytest

from skyproto.auth import load_secret, new_nonce, prove, verify
from skyproto.errors import ConfigurationError


def test_secret_file_is_created_owner_only(tmp_path):
    path = tmp_path / "cookie"
    secret = load_secret(path)
    assert len(secret) == 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_secret(path) == secret  # read back, not regenerated


def test_secret_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "cookie"
    path.write_text("s3cret\n")
    os.chmod(path, 0o644)
    with pytest.raises(ConfigurationError, match="chmod 600") as info:
        load_secret(path)
    assert "s3cret" not in str(info.value)


def test_empty_secret_is_refused(tmp_path):
    path = tmp_path / "cookie"
    path.write_text("\n")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigurationError, match="empty"):
        load_secret(path)


def test_uncreatable_secret_file(tmp_path):
    with pytest.raises(ConfigurationError, match="cannot create"):
        load_secret(tmp_path / "missing-dir" / "cookie")


def test_proofs_bind_secret_role_and_transcript():
    transcript = new_nonce() + new_nonce()
    proof = prove(b"secret", b"dialer", transcript)
    assert verify(b"secret", b"dialer", transcript, proof)
    assert not verify(b"other", b"dialer", transcript, proof)
    assert not verify(b"secret", b"acceptor", transcript, proof)
    assert not verify(b"secret", b"dialer", transcript + b"x", proof)
