"""Synthetic rank-recovery regression (docs/algorithm.md §6): shared S*, per-silo P_k*, known
ranks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pf2lora.common.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_RANK_TAU = 0.05


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class SyntheticRankConfig:
    """Sizes, ranks and noise of the synthetic problem; defaults are the paper-style setup."""

    num_clients: int = 5
    dim: int = 64
    shared_rank: int = 8
    private_rank: int = 2
    true_ranks: tuple[int, ...] = (6, 7, 8, 9, 10)
    sigma_low: float = 1.0
    sigma_high: float = 2.0
    noise_std: float = 0.0
    train_samples: int = 2000
    test_samples: int = 500
    seed: int = 0
    # Rank r_k* = r: one singular value of S* inside span(S*) is multiplied by this (P_k* rank 1).
    rescale_factor: float = 1.5
    # W0 = base_std/sqrt(dim) * N(0, 1) entries; 0 gives W0 = 0 as in the paper-style setup.
    base_std: float = 0.0

    def __post_init__(self) -> None:
        for name in (
            "num_clients",
            "dim",
            "shared_rank",
            "private_rank",
            "train_samples",
            "test_samples",
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"seed must be an int >= 0, got {self.seed!r}")
        if self.private_rank >= self.shared_rank:
            raise ConfigError(
                f"private_rank must be < shared_rank ({self.shared_rank}), got {self.private_rank}"
            )
        if self.shared_rank + self.private_rank > self.dim:
            raise ConfigError(
                f"dim must be >= shared_rank + private_rank "
                f"({self.shared_rank + self.private_rank}), got {self.dim}"
            )
        if not isinstance(self.true_ranks, tuple) or len(self.true_ranks) != self.num_clients:
            raise ConfigError(
                f"true_ranks must be a tuple of num_clients={self.num_clients} ints, "
                f"got {self.true_ranks!r}"
            )
        low, high = self.shared_rank - self.private_rank, self.shared_rank + self.private_rank
        for k, t in enumerate(self.true_ranks):
            if not _is_int(t) or not low <= t <= high:
                raise ConfigError(
                    f"true_ranks[{k}] must be an int in [shared_rank - private_rank, "
                    f"shared_rank + private_rank] = [{low}, {high}], got {t!r}"
                )
        if not 0.0 < self.sigma_low <= self.sigma_high:
            raise ConfigError(
                f"sigma_low, sigma_high must satisfy 0 < sigma_low <= sigma_high, "
                f"got {self.sigma_low!r}, {self.sigma_high!r}"
            )
        if not 0.0 <= self.noise_std < float("inf"):
            raise ConfigError(f"noise_std must be a finite number >= 0, got {self.noise_std!r}")
        if not 0.0 < self.rescale_factor < float("inf") or self.rescale_factor == 1.0:
            raise ConfigError(
                f"rescale_factor must be a finite number > 0 and != 1, got {self.rescale_factor!r}"
            )
        if not 0.0 <= self.base_std < float("inf"):
            raise ConfigError(f"base_std must be a finite number >= 0, got {self.base_std!r}")


@dataclass(frozen=True, eq=False)
class SyntheticClient:
    """One silo's regression data, rows are samples: y = x (W0 + S* + P_k*)ᵀ + ε."""

    x_train: Tensor  # (train_samples, dim)
    y_train: Tensor  # (train_samples, dim)
    x_test: Tensor  # (test_samples, dim)
    y_test: Tensor  # (test_samples, dim)
    true_rank: int


@dataclass(frozen=True, eq=False)
class SyntheticProblem:
    """Ground truth and data; every matrix is (d_out, d_in) = (dim, dim), float32."""

    config: SyntheticRankConfig
    base_weight: Tensor  # W0, frozen
    shared_truth: Tensor  # S* = U diag(σ) Vᵀ, rank shared_rank
    private_truths: tuple[Tensor, ...]  # P_k*, rank <= private_rank
    clients: tuple[SyntheticClient, ...]

    def client_truth(self, k: int) -> Tensor:
        """S* + P_k*: the update a silo's adapters (BA + D_k C_k) should learn."""
        return self.shared_truth + self.private_truths[k]


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A (rows, cols) matrix with orthonormal columns (QR of a Gaussian, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q * np.sign(np.diag(r))


def _private_part(
    cfg: SyntheticRankConfig,
    target: int,
    u: np.ndarray,
    sigma: np.ndarray,
    v: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """P with rank(S* + P) = target and rank(P) <= private_rank.

    u, v: (dim, dim) orthonormal, the first shared_rank columns span S*; sigma descending.
    """
    r = cfg.shared_rank
    delta = target - r
    if delta < 0:  # cancel the |delta| smallest components of S*
        keep = slice(r + delta, r)
        return -(u[:, keep] * sigma[keep]) @ v[:, keep].T
    if delta == 0:  # rescale one component inside span(S*): rank 1
        i = int(rng.integers(r))
        return (cfg.rescale_factor - 1.0) * sigma[i] * np.outer(u[:, i], v[:, i])
    # add delta new orthonormal directions outside span(S*), drawn per silo from the complement
    comp = cfg.dim - r
    u_new = u[:, r:] @ _orthonormal(rng, comp, delta)  # (dim, delta)
    v_new = v[:, r:] @ _orthonormal(rng, comp, delta)
    s_new = rng.uniform(cfg.sigma_low, cfg.sigma_high, size=delta)
    return (u_new * s_new) @ v_new.T


def _regression_data(
    rng: np.random.Generator, w: np.ndarray, n: int, noise_std: float
) -> tuple[Tensor, Tensor]:
    """x ~ N(0, I) as rows (n, d_in); y = x wᵀ + ε (n, d_out); float32."""
    x = rng.standard_normal((n, w.shape[1]))
    y = x @ w.T + noise_std * rng.standard_normal((n, w.shape[0]))
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32))


def make_synthetic_rank_problem(cfg: SyntheticRankConfig) -> SyntheticProblem:
    """Draw S*, every P_k* and every silo's train/test data from cfg.seed (deterministic)."""
    root = np.random.SeedSequence(cfg.seed)
    truth_seq, *client_seqs = root.spawn(1 + cfg.num_clients)
    rng = np.random.default_rng(truth_seq)
    d, r = cfg.dim, cfg.shared_rank
    u = _orthonormal(rng, d, d)
    v = _orthonormal(rng, d, d)
    sigma = np.sort(rng.uniform(cfg.sigma_low, cfg.sigma_high, size=r))[::-1]
    shared = (u[:, :r] * sigma) @ v[:, :r].T  # (d, d), rank r
    w0 = (
        cfg.base_std / np.sqrt(d) * rng.standard_normal((d, d))
        if cfg.base_std
        else np.zeros((d, d))
    )
    privates: list[np.ndarray] = []
    clients: list[SyntheticClient] = []
    for k, (target, seq) in enumerate(zip(cfg.true_ranks, client_seqs, strict=True)):
        crng = np.random.default_rng(seq)
        p = _private_part(cfg, target, u, sigma, v, crng)
        assert np.linalg.matrix_rank(p) <= cfg.private_rank, "private part exceeds its rank"
        w = w0 + shared + p  # (d_out, d_in)
        x_train, y_train = _regression_data(crng, w, cfg.train_samples, cfg.noise_std)
        x_test, y_test = _regression_data(crng, w, cfg.test_samples, cfg.noise_std)
        privates.append(p)
        clients.append(SyntheticClient(x_train, y_train, x_test, y_test, true_rank=target))
        logger.debug("synthetic client %d: true rank %d", k, target)

    def t(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    return SyntheticProblem(
        config=cfg,
        base_weight=t(w0),
        shared_truth=t(shared),
        private_truths=tuple(t(p) for p in privates),
        clients=tuple(clients),
    )


def singular_values(delta_w: Tensor) -> list[float]:
    """Singular values of a 2-D weight update, descending (computed in float64)."""
    if not isinstance(delta_w, Tensor) or delta_w.ndim != 2:
        raise ValueError(
            f"delta_w must be a 2-D tensor, got {getattr(delta_w, 'shape', delta_w)!r}"
        )
    m = delta_w.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(m).all()):
        raise ValueError("delta_w has non-finite entries")
    return torch.linalg.svdvals(m).tolist()


def learned_rank(delta_w: Tensor, tau: float = DEFAULT_RANK_TAU) -> int:
    """Number of singular values above tau·σ1 (docs/algorithm.md §6); 0 for an all-zero matrix."""
    if isinstance(tau, bool) or not isinstance(tau, int | float) or not 0.0 < tau < 1.0:
        raise ConfigError(f"tau must be a number in (0, 1), got {tau!r}")
    s = singular_values(delta_w)
    if not s or s[0] == 0.0:
        return 0
    return sum(1 for x in s if x > tau * s[0])
