"""Synthetic rank-recovery data: exact ground-truth ranks, determinism, validation, rank metric."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from pf2lora.common.data.synthetic import (
    SyntheticProblem,
    SyntheticRankConfig,
    learned_rank,
    make_synthetic_rank_problem,
    singular_values,
)
from pf2lora.common.errors import ConfigError

SMALL = SyntheticRankConfig(train_samples=256, test_samples=64)


@pytest.fixture(scope="module")
def problem() -> SyntheticProblem:
    return make_synthetic_rank_problem(SMALL)


def test_shared_truth_has_the_shared_rank_and_sigma_range(problem: SyntheticProblem) -> None:
    s = singular_values(problem.shared_truth)
    assert learned_rank(problem.shared_truth, tau=1e-3) == 8
    assert int(torch.linalg.matrix_rank(problem.shared_truth)) == 8
    assert 1.0 - 1e-5 <= min(s[:8]) and max(s[:8]) <= 2.0 + 1e-5
    assert max(s[8:]) < 1e-5


def test_every_client_truth_has_its_true_rank(problem: SyntheticProblem) -> None:
    for k, target in enumerate(SMALL.true_ranks):
        w = problem.client_truth(k)
        assert problem.clients[k].true_rank == target
        assert learned_rank(w, tau=1e-3) == target
        assert learned_rank(w) == target  # default tau 0.05
        assert learned_rank(w, tau=0.01) == target
        assert int(torch.linalg.matrix_rank(w)) == target
        assert int(torch.linalg.matrix_rank(problem.private_truths[k])) <= SMALL.private_rank


def test_private_parts_follow_the_recipe(problem: SyntheticProblem) -> None:
    s_star = problem.shared_truth.double()
    u, _, vh = torch.linalg.svd(s_star)
    u_r, v_r = u[:, :8], vh[:8].T
    for k, target in enumerate(SMALL.true_ranks):
        p = problem.private_truths[k].double()
        inside = u_r @ u_r.T @ p @ v_r @ v_r.T
        if target <= 8:  # cancel or rescale: P lies inside span(S*)
            assert torch.allclose(inside, p, atol=1e-5)
        else:  # new directions: P is orthogonal to span(S*) on both sides
            assert float((u_r.T @ p).abs().max()) < 1e-5
            assert float((p @ v_r).abs().max()) < 1e-5


def test_data_follow_the_truth_and_shapes(problem: SyntheticProblem) -> None:
    for k, c in enumerate(problem.clients):
        assert c.x_train.shape == (256, 64) and c.y_train.shape == (256, 64)
        assert c.x_test.shape == (64, 64) and c.y_test.shape == (64, 64)
        assert c.x_train.dtype == torch.float32 and c.y_test.dtype == torch.float32
        w = problem.base_weight + problem.client_truth(k)
        assert torch.allclose(c.y_train, c.x_train @ w.T, atol=1e-4)
        assert torch.allclose(c.y_test, c.x_test @ w.T, atol=1e-4)
    assert float(problem.base_weight.abs().max()) == 0.0
    x = problem.clients[0].x_train
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1.0) < 0.05


def test_noise_and_base_weight() -> None:
    cfg = replace(SMALL, noise_std=0.01, base_std=1.0, train_samples=512)
    prob = make_synthetic_rank_problem(cfg)
    c = prob.clients[2]
    resid = c.y_train - c.x_train @ (prob.base_weight + prob.client_truth(2)).T
    assert abs(float(resid.std()) - 0.01) < 0.001
    assert float(prob.base_weight.abs().max()) > 0.0


def test_deterministic_given_seed(problem: SyntheticProblem) -> None:
    again = make_synthetic_rank_problem(SMALL)
    assert torch.equal(again.shared_truth, problem.shared_truth)
    for a, b in zip(again.clients, problem.clients, strict=True):
        assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    other = make_synthetic_rank_problem(replace(SMALL, seed=1))
    assert not torch.equal(other.shared_truth, problem.shared_truth)


@pytest.mark.parametrize(
    ("shared_rank", "private_rank", "true_ranks"),
    [(4, 1, (3, 4, 5)), (16, 4, (12, 14, 16, 18, 20, 13)), (2, 1, (1, 2, 3))],
)
def test_other_ranks_generalise(
    shared_rank: int, private_rank: int, true_ranks: tuple[int, ...]
) -> None:
    cfg = SyntheticRankConfig(
        num_clients=len(true_ranks),
        dim=32,
        shared_rank=shared_rank,
        private_rank=private_rank,
        true_ranks=true_ranks,
        train_samples=8,
        test_samples=4,
    )
    prob = make_synthetic_rank_problem(cfg)
    for k, target in enumerate(true_ranks):
        assert learned_rank(prob.client_truth(k), tau=1e-3) == target
        assert int(torch.linalg.matrix_rank(prob.private_truths[k])) <= private_rank


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"true_ranks": (6, 7, 8, 9)}, "true_ranks"),
        ({"true_ranks": (5, 7, 8, 9, 10)}, r"true_ranks\[0\]"),
        ({"true_ranks": (6, 7, 8, 9, 11)}, r"true_ranks\[4\]"),
        ({"true_ranks": [6, 7, 8, 9, 10]}, "true_ranks"),
        ({"private_rank": 8}, "private_rank"),
        ({"dim": 9}, "dim"),
        ({"num_clients": 0}, "num_clients"),
        ({"sigma_low": 0.0}, "sigma_low"),
        ({"sigma_low": 3.0}, "sigma_low"),
        ({"noise_std": -1.0}, "noise_std"),
        ({"train_samples": 0}, "train_samples"),
        ({"seed": -1}, "seed"),
        ({"rescale_factor": 1.0}, "rescale_factor"),
    ],
)
def test_config_validation(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        replace(SyntheticRankConfig(), **changes)


def test_learned_rank_and_singular_values() -> None:
    assert learned_rank(torch.zeros(5, 7)) == 0
    d = torch.diag(torch.tensor([4.0, 1.0, 0.1, 0.01]))
    assert singular_values(d) == pytest.approx([4.0, 1.0, 0.1, 0.01])
    assert learned_rank(d) == 2  # 0.1 < 0.05 * 4 = 0.2
    assert learned_rank(d, tau=0.01) == 3
    assert learned_rank(d.to(torch.float64), tau=0.001) == 4
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((20, 3)), rng.standard_normal((3, 30))
    assert learned_rank(torch.from_numpy(a @ b)) == 3
    with pytest.raises(ConfigError, match="tau"):
        learned_rank(d, tau=0.0)
    with pytest.raises(ValueError, match="2-D"):
        singular_values(torch.zeros(3))
    with pytest.raises(ValueError, match="non-finite"):
        singular_values(torch.full((2, 2), float("nan")))
