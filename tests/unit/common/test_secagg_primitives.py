"""Secure-aggregation building blocks: mask PRG, Shamir sharing, fixed point, config, layout."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch

from pf2lora.common.errors import ConfigError, InvalidArgument
from pf2lora.common.secagg import fixedpoint, shamir
from pf2lora.common.secagg.config import SecAggConfig
from pf2lora.common.secagg.layout import flatten, unflatten
from pf2lora.common.secagg.prg import MaskExpander

# --- PRG -----------------------------------------------------------------------------------------


def test_mask_is_deterministic_chunk_independent_and_cancels() -> None:
    seed = os.urandom(32)
    length = 200_003  # not a multiple of any chunk size
    whole = MaskExpander(chunk_elements=1 << 20).expand(seed, length)
    chunked = MaskExpander(chunk_elements=1000).expand(seed, length)
    np.testing.assert_array_equal(whole, chunked)
    assert not np.array_equal(whole, MaskExpander().expand(os.urandom(32), length))
    # A prefix of a longer mask: the keystream does not depend on the vector length.
    np.testing.assert_array_equal(MaskExpander().expand(seed, 10), whole[:10])

    x = np.arange(length, dtype=np.uint32)
    y = x.copy()
    MaskExpander().apply(y, seed, 1)
    assert np.count_nonzero(y == x) < 10
    MaskExpander().apply(y, seed, -1)
    np.testing.assert_array_equal(y, x)


def test_mask_wraps_mod_2_32() -> None:
    seed = os.urandom(32)
    mask = MaskExpander().expand(seed, 1000)
    y = np.full(1000, 0xFFFFFFFF, dtype=np.uint32)
    MaskExpander().apply(y, seed, 1)
    expected = ((mask.astype(np.uint64) + 0xFFFFFFFF) % (1 << 32)).astype(np.uint32)
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize(
    "target, seed",
    [
        (np.zeros(4, np.int32), bytes(32)),
        (np.zeros((2, 2), np.uint32), bytes(32)),
        (np.zeros(4, np.uint32), bytes(16)),
    ],
)
def test_mask_refuses_bad_inputs(target: np.ndarray, seed: bytes) -> None:
    with pytest.raises(InvalidArgument):
        MaskExpander().apply(target, seed, 1)


# --- Shamir --------------------------------------------------------------------------------------


def test_any_t_of_n_reconstruct() -> None:
    secret = os.urandom(32)
    xs = [1, 2, 3, 4, 5, 6]
    shares = shamir.split(secret, 4, xs)
    for subset in itertools.combinations(xs, 4):
        assert shamir.reconstruct({x: shares[x] for x in subset}, 4, 32) == secret
    assert shamir.reconstruct(shares, 4, 32) == secret  # all six, consistency-checked


def test_t_minus_one_shares_reveal_nothing_usable() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5])
    two = {1: shares[1], 2: shares[2]}
    with pytest.raises(InvalidArgument, match="too few shares"):
        shamir.reconstruct(two, 3, 32)
    # Interpolating t-1 points as if the threshold were t-1 gives some other value ...
    value = shamir._evaluate(sorted(two.items()), shamir._barycentric_weights([1, 2]), 0)
    assert value != int.from_bytes(secret, "big")
    # ... and every candidate secret is consistent with them: t-1 shares plus any f(0) fit a
    # polynomial of degree t-1, so the shares carry no information about the secret.
    for candidate in (0, 12345, int.from_bytes(os.urandom(32), "big")):
        points = [(0, candidate), *sorted(two.items())]
        weights = shamir._barycentric_weights([x for x, _ in points])
        assert shamir._evaluate(points, weights, 0) == candidate


def test_shamir_errors() -> None:
    secret = os.urandom(64)  # the largest secret
    shares = shamir.split(secret, 3, [1, 2, 3, 4])
    assert shamir.reconstruct(shares, 3, 64) == secret
    tampered = dict(shares)
    tampered[4] = (tampered[4] + 1) % shamir.PRIME
    with pytest.raises(InvalidArgument, match="inconsistent"):
        shamir.reconstruct(tampered, 3, 64)
    with pytest.raises(InvalidArgument, match="duplicate"):
        shamir.split(secret, 2, [1, 2, 2])
    with pytest.raises(InvalidArgument):
        shamir.split(secret, 5, [1, 2, 3])
    with pytest.raises(InvalidArgument):
        shamir.split(os.urandom(65), 2, [1, 2, 3])
    with pytest.raises(InvalidArgument):
        shamir.split(secret, 2, [0, 1, 2])
    # Shares of a 64-byte secret read as a 32-byte one: the value does not fit.
    with pytest.raises(InvalidArgument, match="does not fit"):
        shamir.reconstruct(shares, 3, 32)
    assert shamir.share_from_bytes(shamir.share_to_bytes(shares[1])) == shares[1]
    with pytest.raises(InvalidArgument):
        shamir.share_from_bytes(b"\xff" * shamir.SHARE_BYTES)


# --- fixed point ---------------------------------------------------------------------------------


def test_fixed_point_sum_within_resolution() -> None:
    rng = np.random.default_rng(0)
    n, frac_bits = 16, fixedpoint.choose_frac_bits(16, 1.0)
    assert frac_bits == 26
    xs = [(rng.standard_normal(100_000) * 0.3).astype(np.float32) for _ in range(n)]
    total = np.zeros(100_000, np.uint32)
    for x in xs:
        codes, clipped = fixedpoint.encode(x, 1.0, frac_bits)
        np.add(total, codes, out=total)
    decoded = fixedpoint.decode(total, frac_bits)
    plain = np.sum([np.clip(x, -1, 1).astype(np.float64) for x in xs], axis=0)
    assert np.abs(decoded - plain).max() <= fixedpoint.resolution(n, frac_bits)


def test_fixed_point_clipping_and_extremes() -> None:
    x = np.array([0.5, 2.0, -3.0, 1.0, -1.0], np.float32)
    codes, clipped = fixedpoint.encode(x, 1.0, 30)
    assert clipped == pytest.approx(2 / 5)
    np.testing.assert_array_equal(
        codes.view(np.int32), [1 << 29, 1 << 30, -(1 << 30), 1 << 30, -(1 << 30)]
    )
    # The worst case at the overflow limit still decodes exactly: N * round(C 2^F) < 2^31.
    n, frac_bits = 7, fixedpoint.choose_frac_bits(7, 1.0)
    total = np.zeros(1, np.uint32)
    for _ in range(n):
        total += fixedpoint.encode(np.array([-1.0], np.float32), 1.0, frac_bits)[0]
    assert fixedpoint.decode(total, frac_bits)[0] == -n
    with pytest.raises(InvalidArgument, match="NaN"):
        fixedpoint.encode(np.array([0.0, np.nan], np.float32), 1.0, 20)
    with pytest.raises(InvalidArgument, match="infinite"):
        fixedpoint.encode(np.array([np.inf], np.float32), 1.0, 20)


def test_overflow_check() -> None:
    fixedpoint.check_no_overflow(16, 1.0, 26)
    with pytest.raises(ConfigError, match="overflow"):
        fixedpoint.check_no_overflow(16, 1.0, 27)
    with pytest.raises(ConfigError, match="overflow"):
        fixedpoint.check_no_overflow(3, 1000.0, 20)
    with pytest.raises(ConfigError):
        fixedpoint.check_no_overflow(0, 1.0, 10)
    with pytest.raises(ConfigError):
        fixedpoint.choose_frac_bits(2, 1e12)
    for n, clip in [(2, 1.0), (64, 0.01), (1000, 5.0)]:
        frac_bits = fixedpoint.choose_frac_bits(n, clip)
        fixedpoint.check_no_overflow(n, clip, frac_bits)
        if frac_bits < fixedpoint.MAX_FRAC_BITS:
            with pytest.raises(ConfigError):
                fixedpoint.check_no_overflow(n, clip, frac_bits + 1)


# --- config and plan -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip": 0.0},
        {"clip": float("nan")},
        {"frac_bits": 31},
        {"threshold": 1},
        {"neighbours": 3},
        {"neighbours": 0},
    ],
)
def test_config_validation(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        SecAggConfig(**kwargs)


def test_round_plan_defaults_and_graph() -> None:
    ids = [f"silo-{i:02d}" for i in range(20)]
    plan = SecAggConfig().plan("run", 1, list(reversed(ids)))
    assert plan.silo_ids == tuple(ids) and plan.index("silo-00") == 1
    assert plan.threshold == 11 and plan.frac_bits == fixedpoint.choose_frac_bits(20, 1.0)
    assert plan.signature_quorum == 11  # a strict majority of the roster, and >= t
    assert all(len(v) == 19 for v in plan.neighbours.values())

    sparse = SecAggConfig(neighbours=6)
    a, b = sparse.plan("run", 1, ids), sparse.plan("run", 1, list(reversed(ids)))
    assert a.neighbours == b.neighbours  # every party derives the same graph
    assert a.threshold == 4  # majority of the 7 holders (6 neighbours + itself)
    assert a.signature_quorum == 11  # still a majority of all 20 silos
    assert SecAggConfig(threshold=15).plan("run", 1, ids).signature_quorum == 15
    assert SecAggConfig().plan("run", 1, ids[:2]).signature_quorum == 2
    assert all(len(v) == 6 for v in a.neighbours.values())
    assert all(s in a.neighbours[p] for s, ps in a.neighbours.items() for p in ps)  # symmetric
    assert sparse.plan("run", 2, ids).neighbours != a.neighbours  # fresh per round
    with pytest.raises(ConfigError, match="exceeds"):
        SecAggConfig(neighbours=4, threshold=6).plan("run", 1, ids)
    with pytest.raises(ConfigError, match="at least 2"):
        SecAggConfig().plan("run", 1, ["only"])
    with pytest.raises(InvalidArgument):
        SecAggConfig().plan("run", 1, ["a", "a"])
    with pytest.raises(ConfigError, match="overflow"):
        SecAggConfig(clip=1.0, frac_bits=30).plan("run", 1, ids)


# --- layout --------------------------------------------------------------------------------------


def test_flatten_roundtrip_numpy_and_torch() -> None:
    tensors = {
        "b.lora_B": torch.randn(4, 3, dtype=torch.bfloat16),
        "a.lora_A": np.arange(6, dtype=np.float32).reshape(2, 3),
        "c.bias": torch.randn(5),
    }
    vector, layout = flatten(tensors)
    assert vector.dtype == np.float32 and vector.shape == (6 + 12 + 5,)
    assert [e.name for e in layout.entries] == ["a.lora_A", "b.lora_B", "c.bias"]
    back = unflatten(vector, layout)
    np.testing.assert_array_equal(back["a.lora_A"], tensors["a.lora_A"])
    np.testing.assert_array_equal(back["b.lora_B"], tensors["b.lora_B"].float().numpy())
    assert flatten(dict(reversed(tensors.items())))[1].digest() == layout.digest()
    with pytest.raises(InvalidArgument):
        unflatten(vector[:-1], layout)
    with pytest.raises(InvalidArgument):
        flatten({"x": np.arange(3)})
