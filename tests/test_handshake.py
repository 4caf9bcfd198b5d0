"""The harbor handshake state machine, driven directly (no I/O)."""

import pytest

from skyproto.errors import AuthenticationFailed, ConfigurationError, ProtocolError
from skyproto.harbor.handshake import HandshakeRefused, LinkHandshake, PeerIdentity
from skyproto.harbor.messages import (
    HARBOR_CODEC,
    PROTOCOL_VERSION,
    Heartbeat,
    LinkChallenge,
    LinkHello,
    LinkProof,
    LinkRefused,
)


def pair(dialer_secret=b"s-sixteen-bytes!", acceptor_secret=b"s-sixteen-bytes!", expect=2):
    dialer = LinkHandshake(dialer_secret, 1, 100, dialer=True, expect_harbor=expect)
    acceptor = LinkHandshake(acceptor_secret, 2, 200, dialer=False)
    return dialer, acceptor


def run(dialer, acceptor):
    hello = dialer.start()
    assert acceptor.start() is None
    challenge = acceptor.receive(hello).send[0]
    step = dialer.receive(challenge)
    proof = step.send[0]
    return step, acceptor.receive(proof)


def test_good_handshake_identifies_both_sides():
    dialer_step, acceptor_step = run(*pair())
    assert dialer_step.peer == PeerIdentity(2, 200)
    assert acceptor_step.peer == PeerIdentity(1, 100)


def test_messages_survive_the_codec():
    dialer, acceptor = pair()
    hello = HARBOR_CODEC.decode(HARBOR_CODEC.encode(dialer.start()))
    challenge = acceptor.receive(hello).send[0]
    assert HARBOR_CODEC.decode(HARBOR_CODEC.encode(challenge)) == challenge


def test_dialer_detects_an_acceptor_without_the_secret():
    dialer, acceptor = pair(acceptor_secret=b"wrong-sixteen-bytes")
    challenge = acceptor.receive(dialer.start()).send[0]
    with pytest.raises(AuthenticationFailed):
        dialer.receive(challenge)


def test_acceptor_detects_a_dialer_without_the_secret():
    dialer, acceptor = pair()
    challenge = acceptor.receive(dialer.start()).send[0]
    # the forger cannot check the challenge, so it sends whatever proof it can make
    proof = LinkProof(b"\x00" * 32)
    with pytest.raises(AuthenticationFailed):
        acceptor.receive(proof)
    assert challenge.proof != proof.proof


def test_recorded_proof_cannot_be_replayed():
    dialer, acceptor = pair()
    hello = dialer.start()
    challenge = acceptor.receive(hello).send[0]
    recorded = dialer.receive(challenge).send[0]
    # An attacker replays the recorded hello and proof to a fresh acceptor (new nonce).
    fresh = LinkHandshake(b"s-sixteen-bytes!", 2, 200, dialer=False)
    fresh.receive(hello)
    with pytest.raises(AuthenticationFailed):
        fresh.receive(recorded)


def test_a_proof_cannot_be_reflected():
    dialer, acceptor = pair()
    hello = dialer.start()
    challenge = acceptor.receive(hello).send[0]
    with pytest.raises(AuthenticationFailed):
        acceptor.receive(LinkProof(challenge.proof))


def test_version_mismatch_is_refused_with_reason():
    _, acceptor = pair()
    with pytest.raises(HandshakeRefused, match="protocol version 99"):
        acceptor.receive(LinkHello(99, 1, 100, b"n" * 32))


def test_claiming_our_own_harbor_is_refused():
    _, acceptor = pair()
    with pytest.raises(HandshakeRefused, match="our own harbor id 2"):
        acceptor.receive(LinkHello(PROTOCOL_VERSION, 2, 100, b"n" * 32))


def test_out_of_range_harbor_is_refused():
    _, acceptor = pair()
    with pytest.raises(HandshakeRefused, match="harbor id"):
        acceptor.receive(LinkHello(PROTOCOL_VERSION, 256, 100, b"n" * 32))


def test_dialer_refuses_the_wrong_harbor():
    dialer, _ = pair(expect=3)
    other = LinkHandshake(b"s-sixteen-bytes!", 2, 200, dialer=False)
    challenge = other.receive(dialer.start()).send[0]
    with pytest.raises(HandshakeRefused, match="dialed harbor 3 but harbor 2 answered"):
        dialer.receive(challenge)


def test_short_key_is_a_protocol_error():
    _, acceptor = pair()
    with pytest.raises(ProtocolError, match="key of 5 bytes"):
        acceptor.receive(LinkHello(PROTOCOL_VERSION, 1, 100, b"short"))


def test_a_small_order_key_is_a_protocol_error():
    # The all-zero point makes the Diffie-Hellman value all zeros: refused, not used.
    _, acceptor = pair()
    with pytest.raises(ProtocolError, match="not a usable X25519"):
        acceptor.receive(LinkHello(PROTOCOL_VERSION, 1, 100, b"\x00" * 32))


def test_both_sides_derive_the_same_sealing_keys():
    dialer_step, acceptor_step = run(*pair())
    mine, theirs = dialer_step.peer.keys, acceptor_step.peer.keys
    assert mine == theirs
    record = mine.sealer(initiator=True).seal(b"\x00\x00\x00\x02hi")
    assert theirs.opener(initiator=False).open(record[4:]) == b"\x00\x00\x00\x02hi"
    reply = theirs.sealer(initiator=False).seal(b"back")
    assert mine.opener(initiator=True).open(reply[4:]) == b"back"
    # the two directions use different keys: a record cannot be reflected to its sender
    assert mine.initiator != mine.responder


def test_every_handshake_derives_fresh_keys():
    first, _ = run(*pair())
    second, _ = run(*pair())
    assert first.peer.keys != second.peer.keys


def test_dialer_refuses_an_unexpected_incarnation():
    # A mapper (or a stale cache) pointed at another process of the right harbor.
    dialer = LinkHandshake(b"s-sixteen-bytes!", 1, 100, dialer=True, expect_harbor=2,
                           expect_incarnation=199)
    acceptor = LinkHandshake(b"s-sixteen-bytes!", 2, 200, dialer=False)
    challenge = acceptor.receive(dialer.start()).send[0]
    with pytest.raises(HandshakeRefused,
                       match="incarnation 199 but incarnation 200 answered"):
        dialer.receive(challenge)


def test_short_secrets_are_refused():
    with pytest.raises(ConfigurationError, match="at least 16"):
        LinkHandshake(b"fifteen bytes!!", 1, 100, dialer=True)


def test_out_of_order_messages_are_protocol_errors():
    dialer, acceptor = pair()
    with pytest.raises(ProtocolError, match="unexpected LinkProof"):
        acceptor.receive(LinkProof(b"x" * 32))
    with pytest.raises(ProtocolError, match="unexpected Heartbeat"):
        dialer.receive(Heartbeat())
    dialer.start()
    with pytest.raises(ProtocolError, match="unexpected LinkHello"):
        dialer.receive(LinkHello(1, 2, 1, b"n" * 32))
    with pytest.raises(ProtocolError):
        acceptor.receive(LinkChallenge(1, 1, 1, b"n" * 32, b"p" * 32))


def test_refusal_is_reported():
    dialer, _ = pair()
    dialer.start()
    with pytest.raises(HandshakeRefused, match="peer refused the link: nope"):
        dialer.receive(LinkRefused("nope"))
