"""Record-level DP-SGD inside a silo: Opacus's per-example gradients against gradients taken one
example at a time, the clip bounding every example's contribution, Poisson batches, refusals."""

from __future__ import annotations

import pytest
import torch

from pf2lora.common.algorithms.base import AlgorithmConfig
from pf2lora.common.algorithms.registry import make_algorithm
from pf2lora.common.client_runtime import ClientRuntime, initial_global_state
from pf2lora.common.errors import ConfigError
from pf2lora.common.learning.batching import BatchSource
from pf2lora.common.learning.config import TrainConfig
from pf2lora.common.learning.per_example import PerExampleGrads, clip_and_noise
from pf2lora.common.privacy import accountant
from tests.helpers.tiny import MINI, mini_model, text_data


def _one_by_one(model, batch, params):  # type: ignore[no-untyped-def]
    rows = batch["input_ids"].shape[0]
    out = []
    for i in range(rows):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(model.loss(one), list(params.values()), allow_unused=True)
        out.append(
            {
                n: g if g is not None else torch.zeros_like(params[n])
                for n, g in zip(params, grads, strict=True)
            }
        )
    return out


def test_per_example_gradients_equal_gradients_taken_one_example_at_a_time() -> None:
    m = mini_model()
    m.train()
    for mod in m.modules():  # dropout off: the same forward pass both ways
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    batch = text_data().select(torch.arange(7))
    params = {**m.shared_parameters(), **m.private_parameters()}
    per_example, loss = PerExampleGrads(m.peft)(lambda: m.loss(batch), params)
    assert loss == pytest.approx(float(m.loss(batch).detach()), rel=1e-6)
    reference = _one_by_one(m, batch, params)
    for i, ref in enumerate(reference):
        for n in params:
            torch.testing.assert_close(per_example[n][i], ref[n], rtol=1e-4, atol=1e-7)
    assert all(getattr(p, "grad_sample", None) is None for p in params.values())  # hooks off
    # the clip bounds every example's contribution; no noise: the sum of clipped ones / B
    clip = 0.5 * min(
        sum(float(g.pow(2).sum()) for g in ref.values()) ** 0.5 for ref in reference
    )  # every example is clipped
    out = clip_and_noise(per_example, clip, 0.0, 7.0, torch.Generator().manual_seed(0))
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for ref in reference:
        norm = sum(float(g.pow(2).sum()) for g in ref.values()) ** 0.5
        for n in params:
            expected[n] += ref[n] * min(1.0, clip / norm) / 7.0
    for n in params:
        torch.testing.assert_close(out[n], expected[n], rtol=1e-4, atol=1e-8)


def test_noise_std_of_the_step_is_sigma_times_clip_over_b() -> None:
    zero = {"w": torch.zeros(0, 20000)}  # an empty Poisson batch: the step is noise alone
    out = clip_and_noise(zero, 0.3, 2.0, 5.0, torch.Generator().manual_seed(0))
    assert float(out["w"].std()) == pytest.approx(2.0 * 0.3 / 5.0, rel=0.03)


def test_poisson_batches_vary_around_the_expected_size() -> None:
    data = text_data(n_repeat=10)  # 120 examples
    src = BatchSource(data, 12, seed=3, poisson=True)
    sizes = [src.batch(step, 1)["input_ids"].shape[0] for step in range(400)]
    assert len(set(sizes)) > 5
    assert sum(sizes) / len(sizes) == pytest.approx(12, rel=0.05)
    assert src.batch(5, 1)["input_ids"].shape == src.batch(5, 1)["input_ids"].shape  # seeded


def test_homlora_round_with_dp_sgd_reports_the_record_level_epsilon() -> None:
    train = TrainConfig(local_steps=3, batch_size=6, dp_sgd_clip=1.0, dp_sgd_noise_multiplier=1.5)
    algo = make_algorithm(AlgorithmConfig(name="homlora", train=train), MINI.adapters)
    data = text_data()  # 24 examples: sample rate 6 / 24
    rt = ClientRuntime(algo, MINI, client_index=0, seed=0, train=data, test=data)
    g = initial_global_state(algo, MINI, run_seed=0)
    before = {k: v.clone() for k, v in rt.model.shared_state().items()}
    metrics = rt.run_round(g, 1.0).metrics
    assert metrics["dp_sgd_epsilon"] == pytest.approx(accountant.epsilon(1.5, 3, 1e-5, 0.25))
    assert any(not torch.equal(before[k], v) for k, v in rt.model.shared_state().items())


@pytest.mark.parametrize(
    ("name", "hypergrad"),
    [
        ("pf2lora", "unroll"),
        ("pf2lora", "implicit"),
        ("hetlora", "unroll"),
        ("perfedavg", "unroll"),
    ],
)
def test_dp_sgd_is_refused_where_per_example_clipping_does_not_bound_an_example(
    name: str, hypergrad: str
) -> None:
    with pytest.raises(ConfigError, match="train.dp_sgd_clip with"):
        AlgorithmConfig(name=name, train=TrainConfig(hypergrad=hypergrad, dp_sgd_clip=1.0))  # type: ignore[arg-type]
    for allowed in ("joint", "first-order"):
        AlgorithmConfig(name="pf2lora", train=TrainConfig(hypergrad=allowed, dp_sgd_clip=1.0))


@pytest.mark.parametrize(
    ("field", "value"),
    [("dp_sgd_clip", -1.0), ("dp_sgd_noise_multiplier", 0.0), ("dp_sgd_delta", 1.0)],
)
def test_invalid_dp_sgd_settings_are_refused_by_name(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})  # type: ignore[arg-type]


def test_first_order_dp_sgd_bounds_each_lower_level_step_and_counts_every_query() -> None:
    """Every lower-level step is a DP-SGD query too: with (almost) no noise, one step moves the
    private adapter by at most beta * C * rows / B; epsilon counts ll_steps + 1 queries a step."""
    from pf2lora.common.learning.batching import STREAM_LL, STREAM_LL_EXTRA

    clip, beta = 1e-3, 0.1
    train = TrainConfig(
        local_steps=1,
        batch_size=6,
        hypergrad="first-order",
        ll_lr=beta,
        ll_steps=2,
        dp_sgd_clip=clip,
        dp_sgd_noise_multiplier=1e-9,
    )
    algo = make_algorithm(AlgorithmConfig(name="pf2lora", train=train), MINI.adapters)
    data = text_data()
    rt = ClientRuntime(algo, MINI, client_index=0, seed=0, train=data, test=data)
    before = {n: p.detach().clone() for n, p in rt.model.private_parameters().items()}
    metrics = rt.run_round(initial_global_state(algo, MINI, run_seed=0), 1.0).metrics
    moved = (
        sum(
            float((p.detach() - before[n]).pow(2).sum())
            for n, p in rt.model.private_parameters().items()
        )
        ** 0.5
    )
    rows = [rt.source.batch(0, s)["input_ids"].shape[0] for s in (STREAM_LL_EXTRA, STREAM_LL)]
    assert 0 < moved <= beta * clip * sum(rows) / 6 * (1 + 1e-3)
    assert metrics["dp_sgd_epsilon"] == pytest.approx(
        accountant.epsilon(1e-9, 3, 1e-5, 0.25)  # 1 step x (2 lower-level + 1 upper) queries
    )
