"""SecAgg+ under attack, in process: substituted keys, inconsistent or forged unmask proposals,
tampered shares and routing attacks are refused by the silos or the coordinator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from pf2lora.common.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from pf2lora.common.secagg import fixedpoint, shamir
from pf2lora.common.secagg.keys import (
    RoundKeyPairs,
    make_signer,
    mask_seed,
    sign_keys,
    sign_unmask,
)
from pf2lora.common.secagg.messages import (
    ConsistencySignature,
    SignedKeys,
    UnmaskProposal,
    UnmaskRequest,
    UnmaskResponse,
)
from pf2lora.common.secagg.prg import MaskExpander
from pf2lora.common.secagg.silo import SiloStage
from pf2lora.common.transport import pki
from tests.helpers.secagg_round import (
    FED,
    RUN,
    Round,
    consistency,
    federation_keys,
    ids_of,
    masked_round,
    setup_round,
    through_shares,
    updates_for,
)


@pytest.fixture(scope="module")
def fed() -> dict:
    return federation_keys()


def _relay_substituting(
    victim: str, forge: Callable[[SignedKeys], SignedKeys]
) -> Callable[[dict], dict]:
    def relay(relayed: dict) -> dict:
        return {
            silo: tuple(forge(m) if m.silo_id == victim else m for m in keys)
            for silo, keys in relayed.items()
        }

    return relay


def test_silos_refuse_substituted_keys(fed: dict) -> None:
    ids = ids_of(5)
    attacker = RoundKeyPairs.generate()
    coordinator_key = ec.generate_private_key(ec.SECP256R1())
    carol = fed["silos"]["s2"]
    old_round = setup_round(fed, ids, round_=0).silos["s1"].advertise_keys()
    forgeries = {
        "own key, signature kept": lambda m: dataclasses.replace(
            m, mask_public_key=attacker.mask_public
        ),
        "re-signed by another key": lambda m: sign_keys(
            make_signer(coordinator_key), m.certificate, RUN, 1, m.silo_id, attacker
        ),
        "re-signed with another silo's certificate": lambda m: sign_keys(
            make_signer(carol.key),
            carol.cert.public_bytes(serialization.Encoding.DER),
            RUN,
            1,
            m.silo_id,
            attacker,
        ),
        "replayed from a previous round": lambda m: old_round,
    }
    for name, forge in forgeries.items():
        r = setup_round(fed, ids)
        for s in ids:
            r.server.receive_keys(s, r.silos[s].advertise_keys())
        relayed = _relay_substituting("s1", forge)(r.server.close_keys())
        for s in ids:
            if s == "s1":
                continue
            with pytest.raises(PermissionDenied):
                r.silos[s].receive_keys(relayed[s])
                pytest.fail(f"silo {s} accepted: {name}")


def test_consistency_check_refuses_inconsistent_proposals(fed: dict) -> None:
    r = masked_round(fed)  # threshold 3, quorum 3
    silo = r.silos["s0"]
    bad = {
        "alive and dropped": (("s0", "s1", "s2", "s3"), ("s3", "s4")),
        "below the quorum": (("s0", "s1"), ("s2", "s3", "s4")),
        "unknown silo": (("s0", "s1", "s2", "s9"), ()),
        "this silo dropped": (("s1", "s2", "s3"), ("s0",)),
        "this silo missing": (("s1", "s2", "s3"), ()),
    }
    for name, (survivors, dropped) in bad.items():
        proposal = UnmaskProposal(run_id=RUN, round=1, survivors=survivors, dropped=dropped)
        with pytest.raises(PermissionDenied):
            silo.consistency_check(proposal)
            pytest.fail(f"consistency check signed: {name}")
        assert silo.stage is SiloStage.MASKED  # nothing signed, nothing revealed
        # The same content as an unmask request gets no shares either: it was never signed.
        with pytest.raises(FailedPrecondition):
            silo.unmask(UnmaskRequest(RUN, 1, survivors, dropped, ()))
    with pytest.raises(InvalidArgument, match="sorted"):  # one set, one encoding
        UnmaskProposal(run_id=RUN, round=1, survivors=("s1", "s0", "s2"), dropped=())
    good = r.server.close_masked_inputs()
    request = consistency(r, good)
    response = silo.unmask(request)
    assert {s.owner for s in response.self_mask_shares} == set(good.survivors)
    assert response.mask_key_shares == ()
    # Answered once: a second request (even a validly signed one) gets nothing.
    with pytest.raises(FailedPrecondition):
        silo.unmask(request)
    # Signed once: the other silos, having signed `good`, sign nothing else this round.
    with pytest.raises(FailedPrecondition):
        r.silos["s1"].consistency_check(UnmaskProposal(RUN, 1, good.survivors[:4], ("s4",)))


def _signed_round(fed: dict, n: int = 5) -> tuple[Round, UnmaskProposal, dict]:
    """Every silo masked and signed the coordinator's proposal; returns the signatures."""
    r = masked_round(fed, n)
    proposal = r.server.close_masked_inputs()
    sigs = {s: r.silos[s].consistency_check(proposal) for s in proposal.survivors}
    return r, proposal, sigs


def _request(proposal: UnmaskProposal, *signatures: ConsistencySignature) -> UnmaskRequest:
    return UnmaskRequest(
        proposal.run_id, proposal.round, proposal.survivors, proposal.dropped, signatures
    )


def _der(fed: dict, silo: str) -> bytes:
    return fed["silos"][silo].cert.public_bytes(serialization.Encoding.DER)


def _sign_as(fed: dict, key_of: str, claim: str, proposal: UnmaskProposal) -> ConsistencySignature:
    """A signature made with ``key_of``'s TLS key and certificate, claiming to be ``claim``."""
    return sign_unmask(make_signer(fed["silos"][key_of].key), _der(fed, key_of), claim, proposal)


def test_forged_duplicated_and_insufficient_signatures_are_refused(fed: dict) -> None:
    r, proposal, sigs = _signed_round(fed)  # quorum 3
    silo = r.silos["s0"]
    rogue = pki.issue_silo_cert(pki.create_ca(FED), "s2")
    coordinator_key = ec.generate_private_key(ec.SECP256R1())
    flipped = sigs["s1"].signature[:-1] + bytes([sigs["s1"].signature[-1] ^ 1])
    forged = {
        "s1's signature over another proposal": _sign_as(
            fed, "s1", "s1", UnmaskProposal(RUN, 1, proposal.survivors[:4], ("s4",))
        ),
        "s1's signature, one bit flipped": dataclasses.replace(sigs["s1"], signature=flipped),
        "the coordinator's key with s2's certificate": sign_unmask(
            make_signer(coordinator_key), _der(fed, "s2"), "s2", proposal
        ),
        "s4's key and certificate, claiming to be s2": _sign_as(fed, "s4", "s2", proposal),
        "s2 certified by another CA": sign_unmask(
            make_signer(rogue.key),
            rogue.cert.public_bytes(serialization.Encoding.DER),
            "s2",
            proposal,
        ),
        "s1's signature from round 0, relabelled": dataclasses.replace(
            _sign_as(fed, "s1", "s1", dataclasses.replace(proposal, round=0)), round=1
        ),
    }
    # Each forgery beside s0's own and one genuine signature: 2 valid, below the quorum of 3.
    for name, fake in forged.items():
        with pytest.raises(PermissionDenied, match="only 2 valid"):
            silo.unmask(_request(proposal, sigs["s0"], fake, sigs["s3"]))
            pytest.fail(f"unmask accepted a request with: {name}")
    # Insufficient: two genuine signatures, or none.
    with pytest.raises(PermissionDenied, match="only 2 valid"):
        silo.unmask(_request(proposal, sigs["s0"], sigs["s1"]))
    with pytest.raises(PermissionDenied, match="only 0 valid"):
        silo.unmask(_request(proposal))
    # Duplicated: one silo's signature twice, or a signature of another round, is not a request.
    with pytest.raises(InvalidArgument, match="twice"):
        _request(proposal, sigs["s0"], sigs["s1"], sigs["s1"])
    with pytest.raises(InvalidArgument, match="round"):
        _request(proposal, sigs["s0"], dataclasses.replace(sigs["s1"], round=2))
    assert silo.stage is SiloStage.SIGNED  # the refusals revealed nothing and used up nothing
    # Forgeries beside a quorum of valid signatures are ignored, not counted.
    response = silo.unmask(
        _request(
            proposal, forged["s1's signature, one bit flipped"], sigs["s0"], sigs["s2"], sigs["s3"]
        )
    )
    assert {s.owner for s in response.self_mask_shares} == set(proposal.survivors)


def test_signatures_from_outside_the_survivor_set_do_not_count(fed: dict) -> None:
    ids = ids_of(5)
    r = setup_round(fed, ids)
    updates = updates_for(ids)
    for s in through_shares(r):
        if s != "s4":  # s4 drops after sharing its keys
            r.server.receive_masked_input(s, r.silos[s].masked_input(updates[s]))
    proposal = r.server.close_masked_inputs()
    assert proposal.dropped == ("s4",)
    own, s1 = (r.silos[s].consistency_check(proposal) for s in ("s0", "s1"))
    outsider = _sign_as(fed, "s4", "s4", proposal)  # s4's real key (colluding, or stolen)
    with pytest.raises(PermissionDenied, match="only 2 valid"):
        r.silos["s0"].unmask(_request(proposal, own, s1, outsider))


def test_request_other_than_the_signed_proposal_is_refused(fed: dict) -> None:
    r, proposal, sigs = _signed_round(fed)
    other = UnmaskProposal(RUN, 1, proposal.survivors[:4], ("s4",))
    # Validly signed by three silos in some other world; s0 signed `proposal`, not this.
    other_sigs = [_sign_as(fed, s, s, other) for s in ("s1", "s2", "s3")]
    with pytest.raises(PermissionDenied, match="differs from the proposal it signed"):
        r.silos["s0"].unmask(_request(other, *other_sigs))
    # The signed proposal's signatures attached to other content do not help either.
    with pytest.raises(PermissionDenied, match="differs"):
        r.silos["s0"].unmask(_request(other, *sigs.values()))
    # A silo that never signed anything answers nothing.
    fresh = masked_round(fed)
    with pytest.raises(FailedPrecondition):
        fresh.silos["s0"].unmask(_request(proposal, *sigs.values()))
    r.silos["s0"].unmask(_request(proposal, *sigs.values()))  # the signed one is answered


def test_coordinator_checks_consistency_messages(fed: dict) -> None:
    r = setup_round(fed, ids_of(5))
    updates = updates_for(ids_of(5))
    for s in through_shares(r):
        if s != "s4":
            r.server.receive_masked_input(s, r.silos[s].masked_input(updates[s]))
    proposal = r.server.close_masked_inputs()
    sig0 = r.silos["s0"].consistency_check(proposal)
    with pytest.raises(PermissionDenied, match="claiming"):
        r.server.receive_consistency("s1", sig0)
    r.server.receive_consistency("s0", sig0)
    with pytest.raises(FailedPrecondition, match="already"):
        r.server.receive_consistency("s0", sig0)
    with pytest.raises(PermissionDenied, match="not a survivor"):
        r.server.receive_consistency("s4", _sign_as(fed, "s4", "s4", proposal))
    for s in ("s1", "s2"):
        r.server.receive_consistency(s, r.silos[s].consistency_check(proposal))
    request = r.server.close_consistency()
    assert [s.silo_id for s in request.signatures] == ["s0", "s1", "s2"]
    r.silos["s3"].consistency_check(proposal)  # signed too late: not in the request
    with pytest.raises(PermissionDenied, match="did not sign|not a survivor"):
        r.server.receive_unmask("s3", UnmaskResponse(RUN, 1, "s3", (), ()))


def test_tampered_share_is_detected(fed: dict) -> None:
    r = masked_round(fed)  # 5 responders, threshold 3: the extra shares check consistency
    request = consistency(r, r.server.close_masked_inputs())
    for s in request.survivors:
        response = r.silos[s].unmask(request)
        if s == "s4":  # a faulty or malicious silo returns a wrong share of s0's seed
            first = response.self_mask_shares[0]
            wrong = dataclasses.replace(first, share=bytes(65) + b"\x01")
            response = dataclasses.replace(
                response, self_mask_shares=(wrong, *response.self_mask_shares[1:])
            )
        r.server.receive_unmask(s, response)
    with pytest.raises(InvalidArgument, match="inconsistent shares"):
        r.server.finish()


def _withholding_round(fed: dict, keep: dict[str, Collection[str]]) -> tuple[Round, dict]:
    """An active coordinator routes keys honestly but delivers to silo s only the shares whose
    senders are in keep[s]. Returns the round and the relayed keys."""
    ids = ids_of(5)
    r = setup_round(fed, ids)  # threshold 3, quorum 3
    for s in ids:
        r.server.receive_keys(s, r.silos[s].advertise_keys())
    relayed = r.server.close_keys()
    for s in ids:
        r.silos[s].receive_keys(relayed[s])
    for s in ids:
        r.server.receive_shares(s, r.silos[s].share_keys())
    routed = r.server.close_shares()
    for s, senders in keep.items():
        routed[s] = tuple(m for m in routed[s] if m.sender in senders)
    for s in ids:
        r.silos[s].receive_shares(routed[s])
    return r, relayed


def test_routing_attack_is_refused(fed: dict) -> None:
    """The routing attack of an active coordinator (docs/security.md), N = 5, t = 3.

    Formerly: withhold shares so that s0 masks only with s1 and s2, declare exactly those two
    dropped, and the other survivors hand over b_0 and sk_1, sk_2: s0's update alone. Now:
    1. the mask floor: s0 refuses to mask with 2 of the 4 holders of its shares (3 holders
       outside its mask set, itself included, would reach t);
    2. with the most withholding the floor allows (s0 masks with s1, s2, s3), every proposal
       that drops all of s0's maskers has fewer survivors than the quorum, a proposal leaving
       s0 with one surviving masker (the sum x0 + x3) is not signed by s0, and the silos that
       signed one proposal refuse any other: the coordinator never gets s0's update.
    """
    with pytest.raises(FailedPrecondition, match="refusing to mask"):
        _withholding_round(fed, {"s0": ("s1", "s2")})

    r, relayed = _withholding_round(fed, {"s0": ("s1", "s2", "s3")})
    ids, updates = ids_of(5), updates_for(ids_of(5))
    y0 = r.silos["s0"].masked_input(updates["s0"])
    for s in ids[1:]:
        r.silos[s].masked_input(updates[s])

    # (a) All of s0's maskers dropped: at most 2 survivors remain, below the quorum of 3.
    isolate = UnmaskProposal(RUN, 1, ("s0", "s4"), ("s1", "s2", "s3"))
    for s in isolate.survivors:
        with pytest.raises(PermissionDenied, match="below the quorum"):
            r.silos[s].consistency_check(isolate)
    # (b) Two of them dropped: the sum would be x0 + x3 alone, so s0 does not sign ...
    with pytest.raises(PermissionDenied, match="only 1 of the peers it masks with are survivors"):
        r.silos["s0"].consistency_check(UnmaskProposal(RUN, 1, ("s0", "s3", "s4"), ("s1", "s2")))
    assert r.silos["s0"].stage is SiloStage.MASKED
    # ... and s3 and s4 alone are no quorum, with or without a signature forged for s0.
    pair = UnmaskProposal(RUN, 1, ("s0", "s3", "s4"), ("s1", "s2"))
    pair_sigs = [r.silos[s].consistency_check(pair) for s in ("s3", "s4")]
    forged_s0 = sign_unmask(
        make_signer(ec.generate_private_key(ec.SECP256R1())), _der(fed, "s0"), "s0", pair
    )
    for s in ("s3", "s4"):
        with pytest.raises(PermissionDenied, match="only 2 valid"):
            r.silos[s].unmask(_request(pair, forged_s0, *pair_sigs))
    # (c) Split views: s0, s1, s2 sign a proposal in which only s3 dropped (s3 and s4 already
    # signed `pair`). That request is answered by its signers, refused by the others, and
    # `pair` never reaches a quorum: nobody reveals sk_1 or sk_2.
    one = UnmaskProposal(RUN, 1, ("s0", "s1", "s2", "s4"), ("s3",))
    one_sigs = [r.silos[s].consistency_check(one) for s in ("s0", "s1", "s2")]
    with pytest.raises(FailedPrecondition):
        r.silos["s4"].consistency_check(one)  # s4 signs once per round
    request = _request(one, *one_sigs)
    responses = [r.silos[s].unmask(request) for s in ("s0", "s1", "s2")]
    for s in ("s3", "s4"):
        with pytest.raises(PermissionDenied, match="differs"):
            r.silos[s].unmask(request)
        with pytest.raises(PermissionDenied, match="only 2 valid"):
            r.silos[s].unmask(_request(pair, *pair_sigs, one_sigs[0]))  # s0 signed `one`
    assert all(o.owner not in ("s1", "s2") for resp in responses for o in resp.mask_key_shares)

    # With everything it collected, the coordinator still cannot remove s_01 and s_02 from y0.
    def secret(owner: str, field: str) -> bytes:
        points = {
            r.server.plan.index(resp.silo_id): shamir.share_from_bytes(o.share)
            for resp in responses
            for o in getattr(resp, field)
            if o.owner == owner
        }
        return shamir.reconstruct(points, 3, 32)

    y = y0.copy()
    MaskExpander().apply(y, secret("s0", "self_mask_shares"), -1)
    s0_public = next(m for m in relayed["s1"] if m.silo_id == "s0").mask_public_key
    sk3 = X25519PrivateKey.from_private_bytes(secret("s3", "mask_key_shares"))
    MaskExpander().apply(y, mask_seed(sk3, s0_public, RUN, 1, (4, "s3"), (1, "s0")), 1)
    residue = fixedpoint.decode(y, r.server.plan.frac_bits) - updates["s0"]
    assert np.abs(residue).max() > 1.0  # s0's update is still hidden under s_01 and s_02
