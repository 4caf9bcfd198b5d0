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


def test_a_short_secret_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "cookie"
    path.write_text("fifteen-bytes!!\n")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigurationError) as info:
        load_secret(path)
    message = str(info.value)
    assert "holds 15 bytes; at least 16 are needed" in message and "\n" not in message
    assert "fifteen" not in message  # the secret itself is never told


def test_the_generated_secret_is_32_random_bytes_in_hex(tmp_path):
    first, second = load_secret(tmp_path / "a"), load_secret(tmp_path / "b")
    assert len(bytes.fromhex(first.decode())) == 32 and first != second


def test_the_cluster_key_is_scrypt_of_the_secret_with_the_documented_cost():
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    from skyproto.auth import MIN_SECRET_SIZE, SCRYPT_N, SCRYPT_R, SCRYPT_SALT, cluster_key

    secret = b"correct horse battery staple"
    expected = Scrypt(salt=b"skyproto cluster key v1", length=32, n=2**14, r=8, p=1)
    assert (SCRYPT_N, SCRYPT_R, SCRYPT_SALT, MIN_SECRET_SIZE) == (
        2**14, 8, b"skyproto cluster key v1", 16)
    assert cluster_key(secret) == expected.derive(secret)
    with pytest.raises(ConfigurationError, match="at least 16"):
        cluster_key(b"short")


def test_a_recorded_handshake_gives_an_observer_nothing_to_test_a_guess_against():
    """Every proof and key depends on the X25519 value, which an observer of the bytes
    cannot compute: even the right secret does not reproduce the acceptor's proof from
    what was on the wire alone."""
    from skyproto.auth import cluster_key
    from skyproto.harbor.handshake import ACCEPTOR, LinkHandshake, _transcript

    secret = b"a weak but long enough secret"
    dialer = LinkHandshake(secret, 1, 10, dialer=True)
    acceptor = LinkHandshake(secret, 2, 20, dialer=False)
    hello = dialer.start()
    challenge = acceptor.receive(hello).send[0]
    wire = _transcript(hello, challenge.harbor, challenge.incarnation, challenge.key,
                       acceptor.timing)
    for key in (secret, cluster_key(secret)):  # what an offline guess could try
        assert not verify(key, ACCEPTOR, wire, challenge.proof)
    assert dialer.receive(challenge).peer is not None  # while the real peer checks it
