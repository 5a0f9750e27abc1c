"""Pure partitioners: split sample indices across silos (natural, similarity, Dirichlet, i.i.d.)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from pf2lora.common.errors import ConfigError

logger = logging.getLogger(__name__)

Seed = int | np.random.Generator
"""A seed, or a generator the caller owns (it is advanced)."""

DEFAULT_DIRICHLET_MIN_SIZE = 10
DEFAULT_DIRICHLET_MAX_TRIES = 1000


def _rng(seed: Seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed must be a non-negative int or a numpy Generator, got {seed!r}")
    return np.random.default_rng(int(seed))


def _labels_array(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ConfigError(f"labels must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"labels must be integers, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ConfigError(f"labels must be >= 0, got {int(arr.min())}")
    return arr.astype(np.int64, copy=False)


def _check_num_clients(num_clients: int, num_samples: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int | np.integer):
        raise ConfigError(f"num_clients must be an int, got {num_clients!r}")
    if num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
    if num_samples < num_clients:
        raise ConfigError(
            f"num_clients={num_clients} exceeds the number of samples ({num_samples}): "
            "every client needs at least one sample"
        )


def _finish(parts: list[np.ndarray], num_samples: int) -> list[np.ndarray]:
    """Sort each client's indices and check that every index is used exactly once."""
    out = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    if any(p.size == 0 for p in out):
        sizes = [int(p.size) for p in out]
        raise ConfigError(f"a client would get no samples (sizes {sizes}); use fewer clients")
    counts = np.bincount(np.concatenate(out), minlength=num_samples) if out else np.zeros(0)
    assert counts.size == num_samples and bool(np.all(counts == 1)), "partition lost an index"
    return out


def _contiguous_chunks(arr: np.ndarray, m: int, *, remainder_last: bool) -> list[np.ndarray]:
    """Cut arr into m contiguous chunks whose sizes differ by at most one."""
    q, r = divmod(arr.size, m)
    sizes = [q + (1 if (j >= m - r if remainder_last else j < r) else 0) for j in range(m)]
    return np.split(arr, np.cumsum(sizes)[:-1])


def _check_fraction(name: str, value: float, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not low <= float(value) <= high:
        raise ConfigError(f"{name} must be in [{low}, {high}], got {value!r}")
    return float(value)


def partition_iid(
    labels: Sequence[int] | np.ndarray, num_clients: int, seed: Seed
) -> list[np.ndarray]:
    """Shuffle all indices and cut them into num_clients near-equal parts (labels give only n)."""
    n = len(labels)
    _check_num_clients(num_clients, n)
    perm = _rng(seed).permutation(n)
    return _finish(np.array_split(perm, num_clients), n)


def partition_natural(groups: Sequence[str], num_clients: int, seed: Seed) -> list[np.ndarray]:
    """One group (domain) per client; or each group split evenly into num_clients/num_groups parts.

    Clients come in sorted group order: with groups {a, b} and 4 clients, clients 0 and 1 hold
    halves of group a, clients 2 and 3 halves of group b.
    """
    keys = np.asarray([str(g) for g in groups])
    n = keys.size
    _check_num_clients(num_clients, n)
    names = sorted(set(keys.tolist()))
    if num_clients % len(names) != 0:
        raise ConfigError(
            f"num_clients={num_clients} must be a multiple of the number of groups "
            f"({len(names)}: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''})"
        )
    per_group = num_clients // len(names)
    rng = _rng(seed)
    parts: list[np.ndarray] = []
    for name in names:
        idx = np.flatnonzero(keys == name)
        if idx.size < per_group:
            raise ConfigError(
                f"group {name!r} has {idx.size} samples, fewer than the {per_group} clients "
                "it would be split into"
            )
        if per_group == 1:
            parts.append(idx)
        else:
            parts.extend(np.array_split(rng.permutation(idx), per_group))
    return _finish(parts, n)


def partition_similarity(
    labels: Sequence[int] | np.ndarray, num_clients: int, similarity: float, seed: Seed
) -> list[np.ndarray]:
    """SCAFFOLD-style label-sorted mixture (docs/algorithm.md §5).

    Per label, a fraction `similarity` of its samples goes to an i.i.d. pool (shuffled) and the
    rest to a pool kept sorted by label; client j takes the j-th contiguous 1/M of each pool.
    similarity=1 is i.i.d., similarity=0 fully sorted (with 2 balanced labels and 4 clients,
    clients 0-1 hold only label 0 and clients 2-3 only label 1).
    """
    y = _labels_array(labels)
    n = y.size
    _check_num_clients(num_clients, n)
    s = _check_fraction("similarity", similarity, 0.0, 1.0)
    rng = _rng(seed)
    iid_pool: list[np.ndarray] = []
    sorted_pool: list[np.ndarray] = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_iid = int(round(s * idx.size))
        iid_pool.append(idx[:n_iid])
        sorted_pool.append(idx[n_iid:])
    iid = rng.permutation(np.concatenate(iid_pool)) if iid_pool else np.zeros(0, np.int64)
    srt = np.concatenate(sorted_pool) if sorted_pool else np.zeros(0, np.int64)
    # The i.i.d. pool's remainder goes to the first clients and the sorted pool's to the last
    # ones, so no client is left empty whenever there are at least num_clients samples.
    iid_parts = _contiguous_chunks(iid, num_clients, remainder_last=False)
    srt_parts = _contiguous_chunks(srt, num_clients, remainder_last=True)
    parts = [np.concatenate([a, b]) for a, b in zip(iid_parts, srt_parts, strict=True)]
    return _finish(parts, n)


def partition_dirichlet(
    labels: Sequence[int] | np.ndarray,
    num_clients: int,
    alpha: float,
    seed: Seed,
    min_size: int = DEFAULT_DIRICHLET_MIN_SIZE,
    max_tries: int = DEFAULT_DIRICHLET_MAX_TRIES,
) -> list[np.ndarray]:
    """Dirichlet(alpha) label skew (NIID-Bench style), resampled until every client has min_size.

    For every label, client shares are drawn from Dir(alpha·1_M); a client already holding n/M
    samples gets no more (this keeps client sizes comparable, as in NIID-Bench). Small alpha
    gives a few labels per client, large alpha near the global label distribution.
    """
    y = _labels_array(labels)
    n = y.size
    _check_num_clients(num_clients, n)
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float | np.floating)
        or not 0.0 < float(alpha) < float("inf")
    ):
        raise ConfigError(f"dirichlet alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1:
        raise ConfigError(f"min_size must be an int >= 1, got {min_size!r}")
    if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
        raise ConfigError(f"max_tries must be an int >= 1, got {max_tries!r}")
    if n < num_clients * min_size:
        raise ConfigError(
            f"{n} samples cannot give {num_clients} clients min_size={min_size} each; "
            "lower min_size or num_clients"
        )
    rng = _rng(seed)
    classes = np.unique(y)
    for attempt in range(1, max_tries + 1):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            p = p * (sizes < n / num_clients)  # full clients take no more
            total = p.sum()
            p = p / total if total > 0 else np.full(num_clients, 1.0 / num_clients)
            cuts = (np.cumsum(p) * idx.size).astype(np.int64)[:-1]
            for j, chunk in enumerate(np.split(idx, cuts)):
                buckets[j].append(chunk)
                sizes[j] += chunk.size
        if sizes.min() >= min_size:
            logger.debug("dirichlet partition: alpha=%s, %d attempt(s)", alpha, attempt)
            parts = [np.concatenate(b) for b in buckets]
            return _finish(parts, n)
    raise ConfigError(
        f"dirichlet alpha={alpha}: no partition gave every one of {num_clients} clients "
        f">= {min_size} samples in {max_tries} tries; raise alpha or lower min_size"
    )


def _stratified_counts(y: np.ndarray, total: int, rng: np.random.Generator) -> dict[int, int]:
    """Per-label counts summing to `total`, proportional to the label counts (largest remainder)."""
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * (total / y.size)
    base = np.floor(quota).astype(np.int64)
    short = total - int(base.sum())
    if short > 0:
        # Largest fractional part first; random tie-break so no label is favoured by its id.
        frac = quota - base
        order = np.lexsort((rng.random(classes.size), -frac))
        base[order[:short]] += 1
    return {int(c): int(k) for c, k in zip(classes, base, strict=True)}


def stratified_subsample(labels: Sequence[int] | np.ndarray, size: int, seed: Seed) -> np.ndarray:
    """`size` indices drawn without replacement, with the label shares of `labels` (sorted)."""
    y = _labels_array(labels)
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or not 0 <= size <= y.size:
        raise ConfigError(f"size must be an int in [0, {y.size}], got {size!r}")
    if size == y.size:
        return np.arange(y.size, dtype=np.int64)
    rng = _rng(seed)
    picked = [
        rng.permutation(np.flatnonzero(y == c))[:k]
        for c, k in _stratified_counts(y, int(size), rng).items()
    ]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def train_test_split_indices(
    labels: Sequence[int] | np.ndarray, test_fraction: float, seed: Seed
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: (train, test) sorted index arrays, test ≈ test_fraction of each label."""
    y = _labels_array(labels)
    f = _check_fraction("test_fraction", test_fraction, 0.0, 1.0)
    if f in (0.0, 1.0):
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    n_test = int(round(f * y.size))
    if n_test < 1 or n_test >= y.size:
        raise ConfigError(
            f"{y.size} samples with test_fraction={test_fraction} leave an empty train or "
            "test split; a client needs at least a few samples"
        )
    test = stratified_subsample(y, n_test, seed)
    train = np.setdiff1d(np.arange(y.size, dtype=np.int64), test, assume_unique=True)
    return train, test
