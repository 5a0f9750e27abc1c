"""Signed round keys against real federation certificates, and the key derivations' bindings."""

from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from pf2lora.common.errors import InvalidArgument, PermissionDenied
from pf2lora.common.secagg.keys import (
    PeerVerifier,
    RoundKeyPairs,
    decrypt_share,
    encrypt_share,
    make_signer,
    mask_seed,
    share_key,
    sign_keys,
    sign_unmask,
)
from pf2lora.common.secagg.messages import (
    ConsistencySignature,
    SignedKeys,
    UnmaskProposal,
    UnmaskRequest,
    unmask_payload,
)
from pf2lora.common.secagg.prg import MaskExpander
from pf2lora.common.transport import pki

FED = "secagg-test"
RUN = "run-1"


def _der(issued: pki.IssuedCertificate) -> bytes:
    return issued.cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def fed() -> dict:
    ca = pki.create_ca(FED)
    silos = {s: pki.issue_silo_cert(ca, s) for s in ("alice", "bob", "carol")}
    return {"ca": ca, "silos": silos, "verifier": PeerVerifier([ca.cert], FED)}


def _signed(fed: dict, silo: str, round_: int = 5, keys: RoundKeyPairs | None = None) -> SignedKeys:
    issued = fed["silos"][silo]
    keys = keys or RoundKeyPairs.generate()
    return sign_keys(make_signer(issued.key), _der(issued), RUN, round_, silo, keys)


def test_valid_keys_verify(fed: dict) -> None:
    message = _signed(fed, "bob")
    fed["verifier"].verify_signed_keys(message, RUN, 5)
    # A signer callable (an HSM, a key held elsewhere) works like the key itself.
    key = fed["silos"]["bob"].key
    signer = make_signer(lambda data: key.sign(data, ec.ECDSA(hashes.SHA256())))
    keys = RoundKeyPairs.generate()
    fed["verifier"].verify_signed_keys(
        sign_keys(signer, _der(fed["silos"]["bob"]), RUN, 5, "bob", keys), RUN, 5
    )


def test_substituted_key_is_refused(fed: dict) -> None:
    genuine = _signed(fed, "bob")
    attacker = RoundKeyPairs.generate()
    verifier: PeerVerifier = fed["verifier"]
    # 1. The coordinator swaps in its own public key, keeping Bob's signature.
    swapped = dataclasses.replace(genuine, mask_public_key=attacker.mask_public)
    with pytest.raises(PermissionDenied, match="signature"):
        verifier.verify_signed_keys(swapped, RUN, 5)
    # 2. ... and re-signs with a key of its own, keeping Bob's certificate.
    own_key = ec.generate_private_key(ec.SECP256R1())
    resigned = sign_keys(make_signer(own_key), genuine.certificate, RUN, 5, "bob", attacker)
    with pytest.raises(PermissionDenied, match="signature"):
        verifier.verify_signed_keys(resigned, RUN, 5)
    # 3. ... or signs with a colluding silo's key and certificate, claiming to be Bob.
    carol = fed["silos"]["carol"]
    as_carol = sign_keys(make_signer(carol.key), _der(carol), RUN, 5, "bob", attacker)
    with pytest.raises(PermissionDenied, match="identity"):
        verifier.verify_signed_keys(as_carol, RUN, 5)
    # 4. ... or a certificate for "bob" from a CA of its own.
    rogue_ca = pki.create_ca(FED)
    rogue_bob = pki.issue_silo_cert(rogue_ca, "bob")
    forged = sign_keys(make_signer(rogue_bob.key), _der(rogue_bob), RUN, 5, "bob", attacker)
    with pytest.raises(PermissionDenied, match="federation CA"):
        verifier.verify_signed_keys(forged, RUN, 5)


def test_replayed_keys_are_refused(fed: dict) -> None:
    old = _signed(fed, "bob", round_=4)
    with pytest.raises(PermissionDenied, match="replayed"):
        fed["verifier"].verify_signed_keys(old, RUN, 5)
    relabelled = dataclasses.replace(old, round=5)
    with pytest.raises(PermissionDenied, match="signature"):
        fed["verifier"].verify_signed_keys(relabelled, RUN, 5)
    other_run = dataclasses.replace(_signed(fed, "bob"), run_id="run-2")
    with pytest.raises(PermissionDenied):
        fed["verifier"].verify_signed_keys(other_run, "run-2", 5)


def test_certificate_checks(fed: dict) -> None:
    ca = fed["ca"]
    now = dt.datetime.now(dt.UTC)
    cases = {
        "expired": pki.issue_silo_cert(
            ca, "bob", not_before=now - dt.timedelta(days=3), not_after=now - dt.timedelta(days=1)
        ),
        "not yet valid": pki.issue_silo_cert(
            ca, "bob", not_before=now + dt.timedelta(days=1), not_after=now + dt.timedelta(days=2)
        ),
        "admin, not silo": pki.issue_admin_cert(ca, "bob"),
        "server certificate": pki.issue_server_cert(ca, ["localhost"]),
    }
    for name, issued in cases.items():
        keys = RoundKeyPairs.generate()
        message = sign_keys(make_signer(issued.key), _der(issued), RUN, 5, "bob", keys)
        with pytest.raises(PermissionDenied):
            fed["verifier"].verify_signed_keys(message, RUN, 5)
            pytest.fail(f"{name} certificate accepted")
    other_federation = PeerVerifier([ca.cert], "another-federation")
    with pytest.raises(PermissionDenied, match="identity"):
        other_federation.verify_signed_keys(_signed(fed, "bob"), RUN, 5)
    with pytest.raises(InvalidArgument):
        make_signer(ec.generate_private_key(ec.SECP384R1()))


def test_mask_seeds_agree_and_bind_run_round_and_pair() -> None:
    a, b, c = (RoundKeyPairs.generate() for _ in range(3))
    A, B = (1, "alice"), (2, "bob")
    s_ab = mask_seed(a.mask, b.mask_public, RUN, 7, A, B)
    assert s_ab == mask_seed(b.mask, a.mask_public, RUN, 7, B, A)  # both ends agree
    # The same key material in another round, run or pair gives an unrelated seed.
    others = {
        mask_seed(a.mask, b.mask_public, RUN, 8, A, B),
        mask_seed(a.mask, b.mask_public, "run-2", 7, A, B),
        mask_seed(a.mask, b.mask_public, RUN, 7, A, (3, "bob")),
        mask_seed(a.mask, c.mask_public, RUN, 7, A, (3, "carol")),
        share_key(a.mask, b.mask_public, RUN, 7, A, B),  # domain separation from share keys
    }
    assert s_ab not in others and len(others) == 5
    # Pairwise masks cancel: the lower index adds PRG(s), the higher one subtracts it.
    x_a, x_b = np.arange(1000, dtype=np.uint32), np.arange(1000, dtype=np.uint32) * 3
    y_a, y_b = x_a.copy(), x_b.copy()
    MaskExpander().apply(y_a, s_ab, -1)
    MaskExpander().apply(y_b, mask_seed(b.mask, a.mask_public, RUN, 7, B, A), 1)
    np.testing.assert_array_equal(y_a + y_b, x_a + x_b)
    # Masks of one pair in two rounds differ (reusing one would reveal x_r - x_r').
    m7 = MaskExpander().expand(s_ab, 1000)
    m8 = MaskExpander().expand(mask_seed(a.mask, b.mask_public, RUN, 8, A, B), 1000)
    assert np.count_nonzero(m7 == m8) < 5


def test_share_encryption_binds_sender_receiver_round() -> None:
    a, b = RoundKeyPairs.generate(), RoundKeyPairs.generate()
    A, B = (1, "alice"), (2, "bob")
    key = share_key(a.share, b.share_public, RUN, 3, A, B)
    assert key == share_key(b.share, a.share_public, RUN, 3, B, A)
    ciphertext = encrypt_share(key, b"share bytes", RUN, 3, "alice", "bob")
    assert decrypt_share(key, ciphertext, RUN, 3, "alice", "bob") == b"share bytes"
    for run, round_, sender, receiver in [
        (RUN, 3, "bob", "alice"),  # reflected back to its sender
        (RUN, 4, "alice", "bob"),  # replayed in the next round
        ("run-2", 3, "alice", "bob"),
    ]:
        with pytest.raises(PermissionDenied):
            decrypt_share(key, ciphertext, run, round_, sender, receiver)
    flipped = ciphertext[:-1] + bytes([ciphertext[-1] ^ 1])
    with pytest.raises(PermissionDenied):
        decrypt_share(key, flipped, RUN, 3, "alice", "bob")


def test_low_order_public_key_is_refused() -> None:
    with pytest.raises(PermissionDenied):
        mask_seed(X25519PrivateKey.generate(), bytes(32), RUN, 1, (1, "alice"), (2, "bob"))


def test_consistency_signatures_verify_and_bind_the_proposal(fed: dict) -> None:
    verifier: PeerVerifier = fed["verifier"]
    bob = fed["silos"]["bob"]
    proposal = UnmaskProposal(RUN, 5, ("alice", "bob"), ("carol",))
    signature = sign_unmask(make_signer(bob.key), _der(bob), "bob", proposal)
    verifier.verify_consistency_signature(signature, proposal)
    others = {
        "carol moved to the survivors": UnmaskProposal(RUN, 5, ("alice", "bob", "carol"), ()),
        "alice moved to the dropped": UnmaskProposal(RUN, 5, ("bob",), ("alice", "carol")),
        "another round": dataclasses.replace(proposal, round=6),
        "another run": dataclasses.replace(proposal, run_id="run-2"),
    }
    for name, other in others.items():
        with pytest.raises(PermissionDenied):
            verifier.verify_consistency_signature(signature, other)
            pytest.fail(f"signature accepted for: {name}")
    # Relabelled as carol's: the certificate names bob.
    with pytest.raises(PermissionDenied, match="identity"):
        verifier.verify_consistency_signature(
            dataclasses.replace(signature, silo_id="carol"), proposal
        )
    # Domain separation: bob's signature over his round keys is no consistency signature.
    keys = _signed(fed, "bob")
    with pytest.raises(PermissionDenied, match="does not verify"):
        verifier.verify_consistency_signature(
            dataclasses.replace(signature, signature=keys.signature), proposal
        )
    # The two lists cannot be re-cut: (a, b | c) and (a | b, c) sign different bytes.
    assert unmask_payload(RUN, 5, ("alice", "bob"), ("carol",)) != unmask_payload(
        RUN, 5, ("alice",), ("bob", "carol")
    )


def test_consistency_messages_validate() -> None:
    proposal = UnmaskProposal(RUN, 5, ("alice", "bob"), ("carol",))
    signature = ConsistencySignature(RUN, 5, "bob", b"\x30" * 70, b"\x30" * 600)
    request = UnmaskRequest(RUN, 5, ("alice", "bob"), ("carol",), (signature,))
    assert request.proposal == proposal
    # one embedded message: 1-byte tag + 2-byte varint length + its fields
    assert request.wire_size() == proposal.wire_size() + 1 + 2 + signature.wire_size()
    for bad in [
        lambda: UnmaskProposal(RUN, 5, ("bob", "alice"), ()),  # not sorted
        lambda: UnmaskProposal(RUN, 5, ("alice", "alice"), ()),  # repeated
        lambda: UnmaskProposal(RUN, 5, ["alice"], ()),  # not a tuple
        lambda: UnmaskProposal(RUN, -1, ("alice",), ()),
        lambda: ConsistencySignature(RUN, 5, "bob", b"", b"cert"),
        lambda: ConsistencySignature(RUN, 5, "Bob", b"sig", b"cert"),
        lambda: UnmaskRequest(RUN, 5, ("alice",), (), (signature, signature)),
        lambda: UnmaskRequest(RUN, 6, ("alice",), (), (signature,)),  # signature of round 5
        lambda: UnmaskRequest(RUN, 5, ("alice",), (), (proposal,)),  # type: ignore[arg-type]
    ]:
        with pytest.raises(InvalidArgument):
            bad()
