"""Silo-level DP: configuration, clipping, the noise only the sum carries in full, epsilon."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from pf2lora.common.errors import ConfigError
from pf2lora.common.privacy import accountant, mechanism
from pf2lora.common.privacy.config import DPConfig


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mode", "local"),
        ("clip", 0.0),
        ("clip", float("inf")),
        ("noise_multiplier", 0.0),
        ("noise_multiplier", -1.0),
        ("min_silos", 0),
        ("min_silos", 2.5),
        ("delta", 1.0),
        ("max_epsilon", 0.0),
        ("enabled", "yes"),
    ],
)
def test_invalid_settings_are_refused_by_name(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"dp.{field}="):
        DPConfig(**{field: value})  # type: ignore[arg-type]


def test_clipping_bounds_every_update_and_leaves_small_ones_alone() -> None:
    g = torch.Generator().manual_seed(0)
    for scale in (1e-3, 0.3, 1.0, 50.0):
        upd = {
            "a": scale * torch.randn(5, 3, generator=g),
            "b": scale * torch.randn(7, generator=g),
        }
        clipped, norm = mechanism.clip(upd, 1.5)
        assert norm == pytest.approx(mechanism.l2_norm(upd))
        assert mechanism.l2_norm(clipped) <= 1.5 * (1 + 1e-12)
        if norm <= 1.5:  # unchanged
            assert all(torch.equal(clipped[k], upd[k].double()) for k in upd)
        else:  # scaled, direction kept
            assert mechanism.l2_norm(clipped) == pytest.approx(1.5)
            torch.testing.assert_close(
                clipped["a"] / clipped["b"][0], upd["a"].double() / upd["b"][0].double()
            )


def test_update_is_the_difference_from_what_was_received() -> None:
    received = {"w": torch.ones(3)}
    trained = {"w": torch.tensor([1.5, 1.0, 0.0])}
    assert torch.equal(
        mechanism.update(trained, received)["w"], torch.tensor([0.5, 0.0, -1.0]).double()
    )
    with pytest.raises(ValueError, match="names differ"):
        mechanism.update({"v": torch.ones(3)}, received)


def _sum_std(cfg: DPConfig, silos: int, draws: int = 20_000) -> float:
    """Empirical std of one coordinate of the sum of `silos` noised zero updates."""
    g = torch.Generator().manual_seed(1)
    total = torch.zeros(draws, dtype=torch.float64)
    for _ in range(silos):
        total += mechanism.gaussian({"x": torch.zeros(draws)}, cfg.silo_std, g)["x"]
    return float(total.std())


@pytest.mark.parametrize("min_silos", [2, 5])
def test_the_sum_of_min_silos_noised_updates_has_std_z_times_c(min_silos: int) -> None:
    cfg = DPConfig(enabled=True, clip=0.7, noise_multiplier=1.3, min_silos=min_silos)
    assert cfg.sum_std == pytest.approx(0.91)
    # 20000 draws: the sample std is within 3% of the true one far beyond 5 sigma (sd ~ 0.5%)
    assert _sum_std(cfg, min_silos) == pytest.approx(cfg.sum_std, rel=0.03)
    # a mechanism that gave every silo the full std would put sqrt(m) times too much in the sum,
    # and one split over more silos than survive would put too little: the test tells them apart
    too_much = DPConfig(
        enabled=True, clip=0.7, noise_multiplier=1.3 * math.sqrt(min_silos), min_silos=min_silos
    )
    assert _sum_std(too_much, min_silos) != pytest.approx(cfg.sum_std, rel=0.03)
    assert _sum_std(cfg, min_silos - 1) < cfg.sum_std * 0.97
    # central mode: silos add nothing
    assert DPConfig(enabled=True, mode="central").silo_std == 0.0


def test_epsilon_matches_opacus_accountant_called_directly() -> None:
    for z, rounds, delta in ((1.0, 30, 1e-5), (0.8, 100, 1e-6), (2.5, 7, 1e-5)):
        acc = RDPAccountant()
        for _ in range(rounds):
            acc.step(noise_multiplier=z, sample_rate=1.0)
        assert accountant.epsilon(z, rounds, delta) == pytest.approx(
            acc.get_epsilon(delta), rel=1e-9
        )
    assert accountant.epsilon(1.0, 0, 1e-5) == 0.0


def test_budget_gives_the_most_rounds_within_it() -> None:
    n = accountant.rounds_within(1.0, 1e-5, 10.0, limit=1000)
    assert accountant.epsilon(1.0, n, 1e-5) <= 10.0 < accountant.epsilon(1.0, n + 1, 1e-5)
    assert accountant.rounds_within(1.0, 1e-5, 1e-9, limit=1000) == 0
