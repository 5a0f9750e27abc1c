"""Partitioners: every index once, the promised label skew, determinism, argument validation."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from pf2lora.common.data.partition import (
    partition_dirichlet,
    partition_iid,
    partition_natural,
    partition_similarity,
    stratified_subsample,
    train_test_split_indices,
)
from pf2lora.common.errors import ConfigError

RNG = np.random.default_rng(1234)
LABELS_2 = np.repeat([0, 1], 200)  # balanced, 2 labels
LABELS_4 = RNG.integers(0, 4, size=2000)  # 4 labels, roughly balanced
GROUPS = np.array(["tweets"] * 30 + ["movies"] * 50 + ["amazon"] * 20 + ["nyt"] * 40)
RNG.shuffle(GROUPS)


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    assert all(p.dtype == np.int64 and p.ndim == 1 and p.size > 0 for p in parts)
    counts = np.bincount(np.concatenate(parts), minlength=n)
    assert counts.size == n and np.all(counts == 1)


def shares(labels: np.ndarray, idx: np.ndarray, num_labels: int) -> np.ndarray:
    return np.bincount(labels[idx], minlength=num_labels) / idx.size


PARTITIONERS: dict[str, Callable[[int], list[np.ndarray]]] = {
    "iid": lambda seed: partition_iid(LABELS_4, 7, seed),
    "natural": lambda seed: partition_natural(GROUPS.tolist(), 8, seed),
    "similarity-0": lambda seed: partition_similarity(LABELS_4, 7, 0.0, seed),
    "similarity-0.3": lambda seed: partition_similarity(LABELS_4, 7, 0.3, seed),
    "similarity-1": lambda seed: partition_similarity(LABELS_4, 7, 1.0, seed),
    "dirichlet-0.1": lambda seed: partition_dirichlet(LABELS_4, 7, 0.1, seed),
    "dirichlet-10": lambda seed: partition_dirichlet(LABELS_4, 7, 10.0, seed),
}


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_every_index_exactly_once_and_deterministic(name: str) -> None:
    make = PARTITIONERS[name]
    parts = make(0)
    n = GROUPS.size if name == "natural" else LABELS_4.size
    assert_exact_cover(parts, n)
    again = make(0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    # A Generator works as the seed too, and gives the same result as the int seed's stream.
    from_gen = make(np.random.default_rng(0))  # type: ignore[arg-type]
    assert all(np.array_equal(a, b) for a, b in zip(parts, from_gen, strict=True))
    if name not in ("similarity-0",):  # s=0 is fully determined by the labels
        other = make(1)
        assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_natural_one_group_per_client_in_sorted_order() -> None:
    parts = partition_natural(GROUPS.tolist(), 4, 0)
    assert [set(GROUPS[p].tolist()) for p in parts] == [{"amazon"}, {"movies"}, {"nyt"}, {"tweets"}]
    assert [p.size for p in parts] == [20, 50, 40, 30]


def test_natural_two_clients_per_group_for_8_clients_on_4_groups() -> None:
    parts = partition_natural(GROUPS.tolist(), 8, 0)
    owners = [GROUPS[p] for p in parts]
    assert all(len(set(o.tolist())) == 1 for o in owners)
    assert [o[0] for o in owners] == ["amazon"] * 2 + ["movies"] * 2 + ["nyt"] * 2 + ["tweets"] * 2
    assert [p.size for p in parts] == [10, 10, 25, 25, 20, 20, 15, 15]


@pytest.mark.parametrize("num_clients", [3, 5, 6])
def test_natural_rejects_non_multiple(num_clients: int) -> None:
    with pytest.raises(ConfigError, match="multiple of the number of groups"):
        partition_natural(GROUPS.tolist(), num_clients, 0)


def test_similarity_zero_is_sorted_by_label() -> None:
    parts = partition_similarity(LABELS_2, 4, 0.0, 0)
    assert [sorted(set(LABELS_2[p].tolist())) for p in parts] == [[0], [0], [1], [1]]
    parts = partition_similarity(LABELS_4, 4, 0.0, 0)
    # Fully sorted: label ranges of consecutive clients never go backwards.
    for a, b in zip(parts, parts[1:], strict=False):
        assert LABELS_4[a].max() <= LABELS_4[b].min()


def test_similarity_one_is_near_the_global_distribution() -> None:
    parts = partition_similarity(LABELS_4, 5, 1.0, 0)
    global_shares = shares(LABELS_4, np.arange(LABELS_4.size), 4)
    for p in parts:
        assert np.abs(shares(LABELS_4, p, 4) - global_shares).max() < 0.08


def test_similarity_interpolates() -> None:
    def skew(s: float) -> float:
        parts = partition_similarity(LABELS_2, 4, s, 0)
        return float(np.mean([abs(shares(LABELS_2, p, 2)[0] - 0.5) for p in parts]))

    assert skew(0.0) == pytest.approx(0.5)
    assert skew(0.0) > skew(0.5) > skew(1.0)
    assert skew(0.5) == pytest.approx(0.25, abs=0.05)


def test_similarity_never_leaves_a_client_empty() -> None:
    for n in range(3, 12):
        labels = np.arange(n) % 3
        for s in (0.0, 0.2, 0.5, 0.9, 1.0):
            assert_exact_cover(partition_similarity(labels, 3, s, 0), n)


def test_dirichlet_small_alpha_skews_and_large_alpha_is_near_uniform() -> None:
    global_shares = shares(LABELS_4, np.arange(LABELS_4.size), 4)

    def max_dev(alpha: float) -> float:
        parts = partition_dirichlet(LABELS_4, 5, alpha, 0)
        return float(max(np.abs(shares(LABELS_4, p, 4) - global_shares).max() for p in parts))

    assert max_dev(0.05) > 0.4  # some client is dominated by one label
    assert max_dev(1000.0) < 0.08


def test_dirichlet_min_size_is_respected() -> None:
    parts = partition_dirichlet(LABELS_4, 10, 0.05, 3, min_size=50)
    assert min(p.size for p in parts) >= 50
    assert_exact_cover(parts, LABELS_4.size)


def test_dirichlet_gives_up_with_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="min_size"):
        partition_dirichlet(LABELS_2, 10, 0.01, 0, min_size=40, max_tries=3)
    with pytest.raises(ConfigError, match="cannot give"):
        partition_dirichlet(LABELS_2, 10, 1.0, 0, min_size=41)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: partition_iid(LABELS_2, 0, 0), "num_clients"),
        (lambda: partition_iid(LABELS_2[:3], 4, 0), "num_clients"),
        (lambda: partition_iid(LABELS_2, 2, -1), "seed"),
        (lambda: partition_iid(LABELS_2, 2, "0"), "seed"),
        (lambda: partition_similarity(LABELS_2, 2, 1.5, 0), "similarity"),
        (lambda: partition_similarity(LABELS_2, 2, -0.1, 0), "similarity"),
        (lambda: partition_similarity(LABELS_2.astype(float), 2, 0.5, 0), "labels"),
        (lambda: partition_similarity(LABELS_2 - 1, 2, 0.5, 0), "labels"),
        (lambda: partition_similarity(LABELS_2.reshape(20, 20), 2, 0.5, 0), "labels"),
        (lambda: partition_dirichlet(LABELS_2, 2, 0.0, 0), "alpha"),
        (lambda: partition_dirichlet(LABELS_2, 2, float("inf"), 0), "alpha"),
        (lambda: partition_dirichlet(LABELS_2, 2, 1.0, 0, min_size=0), "min_size"),
        (lambda: partition_natural(["a"] * 5, 10, 0), "num_clients"),
        (lambda: partition_natural(["a"] * 5 + ["b"], 4, 0), "group 'b'"),
        (lambda: train_test_split_indices(LABELS_2, 0.0, 0), "test_fraction"),
        (lambda: train_test_split_indices(LABELS_2, 1.0, 0), "test_fraction"),
        (lambda: train_test_split_indices(np.array([0, 1]), 0.1, 0), "test_fraction"),
        (lambda: stratified_subsample(LABELS_2, 401, 0), "size"),
    ],
)
def test_bad_arguments_raise_config_error_naming_the_field(
    call: Callable[[], object], field: str
) -> None:
    with pytest.raises(ConfigError, match=field):
        call()


def test_train_test_split_is_stratified_disjoint_and_deterministic() -> None:
    labels = np.array([0] * 90 + [1] * 10 + [2] * 50)
    train, test = train_test_split_indices(labels, 0.2, 7)
    assert np.intersect1d(train, test).size == 0
    assert np.union1d(train, test).size == labels.size
    assert test.size == 30
    assert np.bincount(labels[test], minlength=3).tolist() == [18, 2, 10]
    again = train_test_split_indices(labels, 0.2, 7)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])


def test_train_test_split_rounds_to_the_requested_size() -> None:
    labels = np.array([0] * 7 + [1] * 3 + [2])
    for seed in range(5):
        train, test = train_test_split_indices(labels, 0.3, seed)
        assert test.size == 3 and train.size == 8


def test_stratified_subsample_keeps_shares() -> None:
    idx = stratified_subsample(LABELS_4, 400, 0)
    assert idx.size == 400 and np.unique(idx).size == 400
    full = shares(LABELS_4, np.arange(LABELS_4.size), 4)
    assert np.abs(shares(LABELS_4, idx, 4) - full).max() < 0.005
