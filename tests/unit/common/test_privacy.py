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


# ---------------------------------------------------------------------------- in an algorithm


def _dp_runtimes(dp: DPConfig, n: int = 3):  # type: ignore[no-untyped-def]
    from pf2lora.common.algorithms.base import AlgorithmConfig
    from pf2lora.common.algorithms.registry import make_algorithm
    from pf2lora.common.client_runtime import ClientRuntime, initial_global_state
    from pf2lora.common.learning.config import TrainConfig
    from tests.helpers.tiny import MINI, text_data

    cfg = AlgorithmConfig(train=TrainConfig(local_steps=2, batch_size=6, ul_lr=0.05), dp=dp)
    algo = make_algorithm(cfg, MINI.adapters)
    data = text_data()
    rts = [
        ClientRuntime(algo, MINI, client_index=k, seed=k, train=data, test=data) for k in range(n)
    ]
    return algo, rts, initial_global_state(algo, MINI, run_seed=0)


def test_dp_payload_is_the_clipped_update_with_weight_one_and_never_private() -> None:
    from pf2lora.common.algorithms.aggregate import WEIGHT_KEY

    dp = DPConfig(enabled=True, clip=1e-3, noise_multiplier=1.0, min_silos=2)
    _, (rt, *_), g = _dp_runtimes(dp, 1)
    for p in rt.model.private_parameters().values():  # a leak would be visible
        with torch.no_grad():
            p.add_(1000.0)
    res = rt.run_round(g, 0.25)
    assert float(res.payload[WEIGHT_KEY]) == 1.0  # equal weights, whatever the FedAvg weight
    assert set(res.payload) - {WEIGHT_KEY} == set(g)
    assert res.metrics["dp_update_norm"] > 1e-3 and res.metrics["dp_clipped"] == 1.0
    # payload = clipped update + noise of std z C / sqrt(m): nothing near the private 1000s
    noise = torch.cat([(v.double()).flatten() for k, v in res.payload.items() if k != WEIGHT_KEY])
    assert float(noise.abs().max()) < 1e-3 + 10 * dp.silo_std
    assert float(noise.std()) == pytest.approx(dp.silo_std, rel=0.1)


def test_dp_aggregate_adds_the_mean_update_and_refuses_too_few_updates() -> None:
    from pf2lora.common.algorithms.aggregate import sum_payloads
    from pf2lora.common.algorithms.dp import private_aggregate, private_payload
    from pf2lora.common.errors import DataError

    dp = DPConfig(enabled=True, clip=10.0, noise_multiplier=1e-6, min_silos=2)  # ~no noise
    prev = {"w": torch.zeros(4)}
    trained = [{"w": torch.tensor([1.0, 0, 0, 0])}, {"w": torch.tensor([0, 3.0, 0, 0])}]
    payloads = [private_payload(t, prev, dp)[0] for t in trained]
    new = private_aggregate(sum_payloads(payloads), prev, dp)
    torch.testing.assert_close(new["w"], torch.tensor([0.5, 1.5, 0, 0]), atol=1e-4, rtol=0)
    with pytest.raises(DataError, match="fewer than dp.min_silos = 2"):
        private_aggregate(sum_payloads(payloads[:1]), prev, dp)
    central = DPConfig(enabled=True, mode="central", clip=1.0, noise_multiplier=2.0)
    out = private_aggregate(
        sum_payloads([{"w": torch.zeros(20000), "__weight__": torch.tensor(2.0)}]),
        {"w": torch.zeros(20000)},
        central,
    )
    assert float(out["w"].std()) == pytest.approx(central.sum_std / 2, rel=0.03)  # noise / n


def test_dp_is_refused_for_algorithms_without_a_plain_mean() -> None:
    from pf2lora.common.algorithms.base import AlgorithmConfig

    for name in ("hetlora", "local"):
        with pytest.raises(ConfigError, match=f"dp.enabled=true with algorithm='{name}'"):
            AlgorithmConfig(name=name, dp=DPConfig(enabled=True))


def test_simulation_with_dp_reports_epsilon_each_round_and_stops_at_the_budget() -> None:
    from pf2lora.common.algorithms.base import AlgorithmConfig
    from pf2lora.common.learning.config import TrainConfig
    from pf2lora.common.simulation import DataConfig, SimulationConfig, run_simulation
    from tests.helpers.tiny import MINI

    dp = DPConfig(enabled=True, clip=0.5, noise_multiplier=2.0, min_silos=3)
    budget = accountant.epsilon(2.0, 2, 1e-5) + 1e-9  # room for exactly two rounds
    cfg = SimulationConfig(
        algorithm=AlgorithmConfig(
            train=TrainConfig(local_steps=1, batch_size=4),
            dp=DPConfig(**{**dp.__dict__, "max_epsilon": budget}),
        ),
        model=MINI,
        data=DataConfig(num_clients=4, max_train_per_client=12, max_test_per_client=6),
        rounds=4,
    )
    res = run_simulation(cfg)
    eps = [r["epsilon"] for r in res.rounds]
    assert len(eps) == 2  # the third round would have exceeded the budget
    assert eps == [pytest.approx(accountant.epsilon(2.0, k, 1e-5)) for k in (1, 2)]


def test_a_budget_below_one_round_is_refused() -> None:
    one = accountant.epsilon(1.0, 1, 1e-5)
    with pytest.raises(ConfigError, match="dp.max_epsilon=.*below one round's epsilon"):
        DPConfig(enabled=True, noise_multiplier=1.0, max_epsilon=one / 2)
    DPConfig(enabled=True, noise_multiplier=1.0, max_epsilon=one)  # exactly one round: fine


def test_dp_without_noise_or_clipping_is_equal_weight_fedavg() -> None:
    """The DP path (updates with weight 1, previous + mean update) changes nothing but the noise
    and the clip: with both negligible it trains what plain FedAvg with equal weights trains."""
    from pf2lora.common.algorithms.base import AlgorithmConfig
    from pf2lora.common.learning.config import TrainConfig
    from pf2lora.common.simulation import DataConfig, SimulationConfig, run_simulation
    from tests.helpers.tiny import MINI

    finals = []
    for dp in (DPConfig(), DPConfig(enabled=True, clip=1e6, noise_multiplier=1e-12, min_silos=4)):
        cfg = SimulationConfig(
            algorithm=AlgorithmConfig(
                name="homlora",
                weighting="equal",
                train=TrainConfig(local_steps=3, batch_size=8, ul_lr=1e-2),
                dp=dp,
            ),
            model=MINI,
            data=DataConfig(num_clients=4, max_train_per_client=24, max_test_per_client=8),
            rounds=3,
        )
        finals.append(run_simulation(cfg).final_global)
    plain, private = finals
    assert max(float(plain[k].abs().max()) for k in plain) > 1e-2  # it trained
    for k in plain:
        torch.testing.assert_close(private[k], plain[k], rtol=0, atol=1e-5)
