"""The whole SecAgg+ protocol in process: silos and coordinator with real keys and certificates."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from scipy import stats

from pf2lora.common import pki
from pf2lora.common.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from pf2lora.common.secagg import fixedpoint, shamir
from pf2lora.common.secagg.config import SecAggConfig
from pf2lora.common.secagg.keys import (
    PeerVerifier,
    RoundKeyPairs,
    make_signer,
    mask_seed,
    sign_keys,
)
from pf2lora.common.secagg.layout import flatten, unflatten
from pf2lora.common.secagg.messages import SignedKeys, UnmaskRequest
from pf2lora.common.secagg.prg import MaskExpander
from pf2lora.common.secagg.server import SecAggServer
from pf2lora.common.secagg.silo import SecAggSilo

FED = "secagg-test"
RUN = "run-1"
LENGTH = 5000


@pytest.fixture(scope="module")
def fed() -> dict:
    ca = pki.create_ca(FED)
    silos = {f"s{i}": pki.issue_silo_cert(ca, f"s{i}") for i in range(8)}
    return {"ca": ca, "silos": silos, "verifier": PeerVerifier([ca.cert], FED)}


def _ids(n: int) -> list[str]:
    return [f"s{i}" for i in range(n)]


def _updates(ids: Collection[str], length: int = LENGTH, scale: float = 0.2) -> dict:
    rng = np.random.default_rng(42)
    return {s: (rng.standard_normal(length) * scale).astype(np.float32) for s in ids}


@dataclasses.dataclass
class Round:
    server: SecAggServer
    silos: dict[str, SecAggSilo]


def _setup(
    fed: dict,
    ids: list[str],
    round_: int = 1,
    config: SecAggConfig | None = None,
    length: int = LENGTH,
) -> Round:
    server = SecAggServer(RUN, round_, ids, length, config)
    silos = {
        s: SecAggSilo(
            RUN, round_, s, ids, fed["silos"][s].key, fed["silos"][s].cert, fed["verifier"], config
        )
        for s in ids
    }
    return Round(server, silos)


def _through_shares(
    r: Round,
    relay: Callable[[dict], dict] = lambda relayed: relayed,
    silent_keys: Collection[str] = (),
    silent_shares: Collection[str] = (),
) -> list[str]:
    """Stages 1-2; returns the silos that completed them."""
    alive = [s for s in r.silos if s not in silent_keys]
    for s in alive:
        r.server.receive_keys(s, r.silos[s].advertise_keys())
    relayed = relay(r.server.close_keys())
    for s in alive:
        r.silos[s].receive_keys(relayed[s])
    alive = [s for s in alive if s not in silent_shares]
    for s in alive:
        r.server.receive_shares(s, r.silos[s].share_keys())
    routed = r.server.close_shares()
    for s in alive:
        r.silos[s].receive_shares(routed[s])
    return alive


def _finish(
    r: Round,
    updates: dict,
    alive: list[str],
    dropped: Collection[str] = (),
    silent_unmask: Collection[str] = (),
) -> np.ndarray:
    for s in alive:
        if s not in dropped:
            r.server.receive_masked_input(s, r.silos[s].masked_input(updates[s]))
    request = r.server.close_masked_inputs()
    for s in request.survivors:
        if s not in silent_unmask:
            r.server.receive_unmask(s, r.silos[s].unmask(request))
    return r.server.finish()


def _assert_sum(result: np.ndarray, updates: dict, members: Collection[str], r: Round) -> None:
    plain = np.sum([updates[s].astype(np.float64) for s in members], axis=0)
    bound = len(r.server.plan.silo_ids) * 2.0**-r.server.plan.frac_bits
    assert np.abs(result - plain).max() <= bound


@pytest.mark.parametrize("n", [2, 5, 8])
def test_full_protocol_sum(fed: dict, n: int) -> None:
    ids = _ids(n)
    r = _setup(fed, ids)
    updates = _updates(ids)
    alive = _through_shares(r)
    result = _finish(r, updates, alive)
    _assert_sum(result, updates, ids, r)
    assert all(s.clipped_fraction == 0.0 for s in r.silos.values())


def test_named_tensors_roundtrip(fed: dict) -> None:
    ids = _ids(3)
    rng = np.random.default_rng(0)
    named = {
        s: {
            "q.lora_A": rng.standard_normal((4, 8)).astype(np.float32) * 0.1,
            "q.lora_B": rng.standard_normal((8, 4)).astype(np.float32) * 0.1,
        }
        for s in ids
    }
    flat = {s: flatten(named[s]) for s in ids}
    layout = flat["s0"][1]
    r = _setup(fed, ids, length=layout.size)
    total = unflatten(_finish(r, {s: v for s, (v, _) in flat.items()}, _through_shares(r)), layout)
    for name in ("q.lora_A", "q.lora_B"):
        np.testing.assert_allclose(total[name], sum(named[s][name] for s in ids), atol=1e-6)


@pytest.mark.parametrize(
    "n, config, dropped",
    [
        (5, None, ["s2"]),  # one of five after sharing keys
        (5, SecAggConfig(threshold=3), ["s0", "s4"]),  # two dropped, threshold 3
        (8, SecAggConfig(neighbours=4), ["s1", "s6"]),  # SecAgg+ neighbourhood
    ],
)
def test_dropouts_after_share_stage(
    fed: dict, n: int, config: SecAggConfig | None, dropped: list[str]
) -> None:
    ids = _ids(n)
    r = _setup(fed, ids, config=config)
    updates = _updates(ids)
    alive = _through_shares(r)
    result = _finish(r, updates, alive, dropped=dropped)
    assert r.server.dropped == tuple(dropped)
    _assert_sum(result, updates, [s for s in ids if s not in dropped], r)


@pytest.mark.parametrize(
    "silent_keys, silent_shares, dropped, silent_unmask",
    [
        (["s0"], ["s7"], ["s3"], []),  # gone before keys, before shares, after shares
        (["s0"], [], ["s3"], ["s5"]),  # ... and a survivor that never answers the unmask
    ],
)
def test_dropouts_at_every_stage(
    fed: dict, silent_keys: list, silent_shares: list, dropped: list, silent_unmask: list
) -> None:
    ids = _ids(8)
    r = _setup(fed, ids)  # threshold 5
    updates = _updates(ids)
    alive = _through_shares(r, silent_keys=silent_keys, silent_shares=silent_shares)
    assert alive == [s for s in ids if s not in silent_keys + silent_shares]
    result = _finish(r, updates, alive, dropped=dropped, silent_unmask=silent_unmask)
    assert r.server.dropped == tuple(dropped)  # never advertised or shared: not a dropout
    _assert_sum(result, updates, [s for s in alive if s not in dropped], r)


def test_too_many_dropouts_fail_cleanly(fed: dict) -> None:
    ids = _ids(5)
    r = _setup(fed, ids)  # threshold 3
    alive = _through_shares(r)
    for s in ("s0", "s1"):
        r.server.receive_masked_input(s, r.silos[s].masked_input(_updates(ids)[s]))
    with pytest.raises(FailedPrecondition, match="only 2 of 5 silos completed masked input"):
        r.server.close_masked_inputs()

    r = _setup(fed, ids)
    for s in ("s0", "s1"):
        r.server.receive_keys(s, r.silos[s].advertise_keys())
    with pytest.raises(FailedPrecondition, match="threshold is 3"):
        r.server.close_keys()

    r = _setup(fed, ids)
    alive = _through_shares(r)
    updates = _updates(ids)
    for s in alive:
        r.server.receive_masked_input(s, r.silos[s].masked_input(updates[s]))
    request = r.server.close_masked_inputs()
    for s in ("s0", "s1"):  # only two answer the unmask request
        r.server.receive_unmask(s, r.silos[s].unmask(request))
    with pytest.raises(FailedPrecondition, match="unmasking"):
        r.server.finish()


def test_masked_vector_looks_uniform(fed: dict) -> None:
    ids = _ids(3)
    r = _setup(fed, ids, length=100_000)
    _through_shares(r)
    update = _updates(ids, length=100_000)["s1"]
    encoded, _ = fixedpoint.encode(update, r.server.plan.clip, r.server.plan.frac_bits)
    masked = r.silos["s1"].masked_input(update)

    def p_bytes(v: np.ndarray) -> float:
        counts = np.bincount(v.view(np.uint8), minlength=256)
        return float(stats.chisquare(counts).pvalue)

    def p_top_bits(v: np.ndarray) -> float:
        counts = np.bincount((v >> 24).astype(np.int64), minlength=256)
        return float(stats.chisquare(counts).pvalue)

    assert p_bytes(masked) > 1e-4 and p_top_bits(masked) > 1e-4
    assert p_bytes(encoded) < 1e-12 and p_top_bits(encoded) < 1e-12


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
    ids = _ids(5)
    attacker = RoundKeyPairs.generate()
    coordinator_key = ec.generate_private_key(ec.SECP256R1())
    carol = fed["silos"]["s2"]
    old_round = _setup(fed, ids, round_=0).silos["s1"].advertise_keys()
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
        r = _setup(fed, ids)
        for s in ids:
            r.server.receive_keys(s, r.silos[s].advertise_keys())
        relayed = _relay_substituting("s1", forge)(r.server.close_keys())
        for s in ids:
            if s == "s1":
                continue
            with pytest.raises(PermissionDenied):
                r.silos[s].receive_keys(relayed[s])
                pytest.fail(f"silo {s} accepted: {name}")


def _masked_round(fed: dict, n: int = 5) -> Round:
    ids = _ids(n)
    r = _setup(fed, ids)
    updates = _updates(ids)
    for s in _through_shares(r):
        r.server.receive_masked_input(s, r.silos[s].masked_input(updates[s]))
    return r


def test_unmask_refuses_inconsistent_requests(fed: dict) -> None:
    r = _masked_round(fed)  # threshold 3
    silo = r.silos["s0"]
    bad = {
        "alive and dropped": (("s0", "s1", "s2", "s3"), ("s3", "s4")),
        "below threshold": (("s0", "s1"), ("s2", "s3", "s4")),
        "unknown silo": (("s0", "s1", "s2", "s9"), ()),
        "this silo dropped": (("s1", "s2", "s3"), ("s0",)),
    }
    for name, (survivors, dropped) in bad.items():
        request = UnmaskRequest(run_id=RUN, round=1, survivors=survivors, dropped=dropped)
        with pytest.raises(PermissionDenied):
            silo.unmask(request)
            pytest.fail(f"unmask accepted: {name}")
    good = r.server.close_masked_inputs()
    response = silo.unmask(good)
    assert {s.owner for s in response.self_mask_shares} == set(good.survivors)
    assert response.mask_key_shares == ()
    # Answered once: a second, different request (say "s4 dropped") gets nothing.
    with pytest.raises(FailedPrecondition):
        silo.unmask(
            UnmaskRequest(run_id=RUN, round=1, survivors=good.survivors[:4], dropped=("s4",))
        )


def test_stage_order_and_round_are_enforced(fed: dict) -> None:
    r = _setup(fed, _ids(3))
    with pytest.raises(FailedPrecondition):
        r.silos["s0"].share_keys()
    with pytest.raises(FailedPrecondition):
        r.server.close_shares()
    other = _setup(fed, _ids(3), round_=2).silos["s0"].advertise_keys()
    with pytest.raises(FailedPrecondition):
        r.server.receive_keys("s0", other)
    with pytest.raises(PermissionDenied, match="claiming"):
        r.server.receive_keys("s1", r.silos["s0"].advertise_keys())


def test_masks_are_fresh_every_round(fed: dict) -> None:
    ids = _ids(3)
    zeros = np.zeros(1000, np.float32)
    masked = []
    for round_ in (1, 2):
        r = _setup(fed, ids, round_=round_, length=1000)
        _through_shares(r)
        masked.append(r.silos["s1"].masked_input(zeros))
    assert np.count_nonzero(masked[0] == masked[1]) < 5


def test_tampered_share_is_detected(fed: dict) -> None:
    r = _masked_round(fed)  # 5 responders, threshold 3: the extra shares check consistency
    request = r.server.close_masked_inputs()
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


def test_known_limit_routing_isolates_one_update(fed: dict) -> None:
    """The boundary of the threat model (honest-but-curious coordinator, docs/security.md).

    An actively malicious coordinator withholds shares so that s0 masks only with s1 and s2,
    then declares exactly those two dropped. Every silo answers correctly by its own view and
    the coordinator recovers s0's update alone. When a consistency round, a floor on the mask
    set and a higher threshold are added, this test must be turned into a refusal test.
    """
    ids = _ids(5)
    r = _setup(fed, ids)  # threshold 3
    for s in ids:
        r.server.receive_keys(s, r.silos[s].advertise_keys())
    relayed = r.server.close_keys()
    for s in ids:
        r.silos[s].receive_keys(relayed[s])
    for s in ids:
        r.server.receive_shares(s, r.silos[s].share_keys())
    routed = r.server.close_shares()
    routed["s0"] = tuple(m for m in routed["s0"] if m.sender in ("s1", "s2"))  # withheld
    for s in ids:
        r.silos[s].receive_shares(routed[s])
    x0 = _updates(ids)["s0"]
    y0 = r.silos["s0"].masked_input(x0)
    for s in ids[1:]:
        r.silos[s].masked_input(np.zeros(LENGTH, np.float32))
    request = UnmaskRequest(run_id=RUN, round=1, survivors=("s0", "s3", "s4"), dropped=("s1", "s2"))
    responses = [r.silos[s].unmask(request) for s in request.survivors]

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
    for k in ("s1", "s2"):
        private = X25519PrivateKey.from_private_bytes(secret(k, "mask_key_shares"))
        seed = mask_seed(private, s0_public, RUN, 1, (r.server.plan.index(k), k), (1, "s0"))
        MaskExpander().apply(y, seed, 1)  # s0 subtracted the masks of higher-indexed peers
    recovered = fixedpoint.decode(y, r.server.plan.frac_bits)
    assert np.abs(recovered - x0).max() <= 2.0**-r.server.plan.frac_bits
