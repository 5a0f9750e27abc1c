"""The whole SecAgg+ protocol in process: silos and coordinator with real keys and certificates."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from pf2lora.common.errors import FailedPrecondition, PermissionDenied
from pf2lora.common.secagg import fixedpoint
from pf2lora.common.secagg.config import SecAggConfig
from pf2lora.common.secagg.layout import flatten, unflatten
from pf2lora.common.secagg.messages import (
    UnmaskProposal,
    UnmaskRequest,
)
from tests.helpers.secagg_round import (
    RUN,
    assert_sum,
    consistency,
    federation_keys,
    finish,
    ids_of,
    masked_round,
    setup_round,
    through_shares,
    updates_for,
)


@pytest.fixture(scope="module")
def fed() -> dict:
    return federation_keys()


@pytest.mark.parametrize("n", [2, 5, 8])
def test_full_protocol_sum(fed: dict, n: int) -> None:
    ids = ids_of(n)
    r = setup_round(fed, ids)
    updates = updates_for(ids)
    alive = through_shares(r)
    result = finish(r, updates, alive)
    assert_sum(result, updates, ids, r)
    assert all(s.clipped_fraction == 0.0 for s in r.silos.values())


def test_named_tensors_roundtrip(fed: dict) -> None:
    ids = ids_of(3)
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
    r = setup_round(fed, ids, length=layout.size)
    total = unflatten(finish(r, {s: v for s, (v, _) in flat.items()}, through_shares(r)), layout)
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
    ids = ids_of(n)
    r = setup_round(fed, ids, config=config)
    updates = updates_for(ids)
    alive = through_shares(r)
    result = finish(r, updates, alive, dropped=dropped)
    assert r.server.dropped == tuple(dropped)
    assert_sum(result, updates, [s for s in ids if s not in dropped], r)


@pytest.mark.parametrize(
    "silent_keys, silent_shares, dropped, silent_consistency, silent_unmask",
    [
        (["s0"], ["s7"], ["s3"], [], []),  # gone before keys, before shares, after shares
        (["s0"], [], ["s3"], [], ["s5"]),  # ... and a survivor that never answers the unmask
        (["s0"], [], ["s3"], ["s5"], []),  # ... or one that never signs (still a survivor)
    ],
)
def test_dropouts_at_every_stage(
    fed: dict,
    silent_keys: list,
    silent_shares: list,
    dropped: list,
    silent_consistency: list,
    silent_unmask: list,
) -> None:
    ids = ids_of(8)
    r = setup_round(fed, ids)  # threshold 5, quorum 5
    updates = updates_for(ids)
    alive = through_shares(r, silent_keys=silent_keys, silent_shares=silent_shares)
    assert alive == [s for s in ids if s not in silent_keys + silent_shares]
    result = finish(
        r,
        updates,
        alive,
        dropped=dropped,
        silent_unmask=silent_unmask,
        silent_consistency=silent_consistency,
    )
    assert r.server.dropped == tuple(dropped)  # never advertised or shared: not a dropout
    assert_sum(result, updates, [s for s in alive if s not in dropped], r)


def test_too_many_dropouts_fail_cleanly(fed: dict) -> None:
    ids = ids_of(5)
    r = setup_round(fed, ids)  # threshold 3
    alive = through_shares(r)
    for s in ("s0", "s1"):
        r.server.receive_masked_input(s, r.silos[s].masked_input(updates_for(ids)[s]))
    with pytest.raises(FailedPrecondition, match="only 2 of 5 silos completed masked input"):
        r.server.close_masked_inputs()

    r = setup_round(fed, ids)
    for s in ("s0", "s1"):
        r.server.receive_keys(s, r.silos[s].advertise_keys())
    with pytest.raises(FailedPrecondition, match="threshold is 3"):
        r.server.close_keys()

    r = setup_round(fed, ids)
    alive = through_shares(r)
    updates = updates_for(ids)
    for s in alive:
        r.server.receive_masked_input(s, r.silos[s].masked_input(updates[s]))
    request = consistency(r, r.server.close_masked_inputs())
    for s in ("s0", "s1"):  # only two answer the unmask request
        r.server.receive_unmask(s, r.silos[s].unmask(request))
    with pytest.raises(FailedPrecondition, match="unmasking"):
        r.server.finish()

    r = setup_round(fed, ids)
    for s in through_shares(r):
        r.server.receive_masked_input(s, r.silos[s].masked_input(updates[s]))
    proposal = r.server.close_masked_inputs()
    for s in ("s0", "s1"):  # only two sign the proposal
        r.server.receive_consistency(s, r.silos[s].consistency_check(proposal))
    with pytest.raises(FailedPrecondition, match="consistency check, quorum is 3"):
        r.server.close_consistency()

    # Sparse neighbourhoods: t = 3 of 5 holders, but the quorum is a majority of all 8 silos.
    ids = ids_of(8)
    r = setup_round(fed, ids, config=SecAggConfig(neighbours=4))
    assert (r.server.plan.threshold, r.server.plan.signature_quorum) == (3, 5)
    for s in through_shares(r)[:4]:
        r.server.receive_masked_input(s, r.silos[s].masked_input(updates_for(ids)[s]))
    with pytest.raises(FailedPrecondition, match="masked input, quorum is 5"):
        r.server.close_masked_inputs()


def test_masked_vector_looks_uniform(fed: dict) -> None:
    ids = ids_of(3)
    r = setup_round(fed, ids, length=100_000)
    through_shares(r)
    update = updates_for(ids, length=100_000)["s1"]
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


def test_stage_order_and_round_are_enforced(fed: dict) -> None:
    r = setup_round(fed, ids_of(3))
    with pytest.raises(FailedPrecondition):
        r.silos["s0"].share_keys()
    with pytest.raises(FailedPrecondition):
        r.server.close_shares()
    other = setup_round(fed, ids_of(3), round_=2).silos["s0"].advertise_keys()
    with pytest.raises(FailedPrecondition):
        r.server.receive_keys("s0", other)
    with pytest.raises(PermissionDenied, match="claiming"):
        r.server.receive_keys("s1", r.silos["s0"].advertise_keys())
    r = masked_round(fed, 3)
    with pytest.raises(FailedPrecondition):  # unmask before signing a proposal
        r.silos["s0"].unmask(UnmaskRequest(RUN, 1, ("s0", "s1", "s2"), (), ()))
    with pytest.raises(FailedPrecondition):  # the coordinator proposes before it unmasks
        r.server.close_consistency()
    other_round = UnmaskProposal(RUN, 2, ("s0", "s1", "s2"), ())
    with pytest.raises(FailedPrecondition):
        r.silos["s0"].consistency_check(other_round)
    fresh = setup_round(fed, ids_of(3))
    with pytest.raises(FailedPrecondition):  # sign before masking
        fresh.silos["s0"].consistency_check(UnmaskProposal(RUN, 1, ("s0", "s1", "s2"), ()))


def test_masks_are_fresh_every_round(fed: dict) -> None:
    ids = ids_of(3)
    zeros = np.zeros(1000, np.float32)
    masked = []
    for round_ in (1, 2):
        r = setup_round(fed, ids, round_=round_, length=1000)
        through_shares(r)
        masked.append(r.silos["s1"].masked_input(zeros))
    assert np.count_nonzero(masked[0] == masked[1]) < 5


@pytest.mark.parametrize("silent", [1, 2])
def test_mask_floor_in_sparse_neighbourhoods(fed: dict, silent: int) -> None:
    """k = 4, t = 3: 5 holders of each silo's shares. A silo masks only if at most t - 1 = 2
    holders (itself included) are outside its mask set: one neighbour silent at the share
    stage is tolerated, two are not (the price of the floor in dropout tolerance)."""
    ids = ids_of(8)
    r = setup_round(fed, ids, config=SecAggConfig(neighbours=4))
    gone = sorted(r.server.plan.neighbours["s0"])[:silent]
    if silent == 2:
        with pytest.raises(FailedPrecondition, match="refusing to mask"):
            through_shares(r, silent_shares=gone)
        return
    updates = updates_for(ids)
    alive = through_shares(r, silent_shares=gone)
    assert_sum(finish(r, updates, alive), updates, alive, r)
