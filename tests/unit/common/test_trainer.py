"""The bilevel local trainer: every estimator trains; a state saved mid-run resumes exactly."""

from __future__ import annotations

import math

import pytest
import torch

from pf2lora.common.errors import ConfigError, DataError
from pf2lora.common.learning.config import TrainConfig
from pf2lora.common.learning.trainer import BilevelTrainer, Diverged
from pf2lora.common.state_io import load_state, save_state
from tests.helpers.tiny import linear_model, mini_model, regression_data, source, text_data


@pytest.mark.parametrize("hypergrad", ["unroll", "implicit", "first-order", "joint"])
def test_each_estimator_reduces_the_loss(hypergrad: str) -> None:
    m = linear_model(d=6, r=3, r_hat=2)
    data = regression_data(128, d=6)
    cfg = TrainConfig(local_steps=60, batch_size=32, ll_lr=0.02, ul_lr=0.02, hypergrad=hypergrad)
    tr = BilevelTrainer(m, cfg, seed=0)
    before = float(m.loss(data.tensors))
    x0 = {n: p.detach().clone() for n, p in m.shared_parameters().items()}
    y0 = {n: p.detach().clone() for n, p in m.private_parameters().items()}
    tr.train_round(source(data, 32))
    after = float(m.loss(data.tensors))
    assert after < 0.7 * before, (before, after)
    assert any(not torch.equal(x0[n], p) for n, p in m.shared_parameters().items())
    assert any(not torch.equal(y0[n], p) for n, p in m.private_parameters().items())
    assert tr.step == 60 and tr.rounds == 1


def _snapshot(m) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {n: p.detach().clone() for n, p in m.peft.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("hypergrad", ["unroll", "implicit", "joint"])
def test_state_saved_mid_run_continues_bit_identically(tmp_path, hypergrad: str) -> None:  # type: ignore[no-untyped-def]
    data = text_data()
    cfg = TrainConfig(local_steps=3, batch_size=6, hypergrad=hypergrad)
    # uninterrupted: two rounds in one process
    m1 = mini_model(shared_seed=3, private_seed=4)
    m1.train()
    t1 = BilevelTrainer(m1, cfg, seed=11)
    t1.train_round(source(data, 6, seed=5))
    t1.train_round(source(data, 6, seed=5))
    # interrupted: one round, save, a fresh model and trainer load the state, one more round
    m2 = mini_model(shared_seed=3, private_seed=4)
    t2 = BilevelTrainer(m2, cfg, seed=11)
    t2.train_round(source(data, 6, seed=5))
    shared_after_1 = m2.shared_state()
    save_state(tmp_path / "state.safetensors", *t2.state_tensors())
    del m2, t2
    m3 = mini_model(
        shared_seed=99, private_seed=98
    )  # different init: everything must come from disk
    m3.load_shared_state(shared_after_1)  # the shared adapter comes from the coordinator
    t3 = BilevelTrainer(m3, cfg, seed=0)
    t3.load_state_tensors(*load_state(tmp_path / "state.safetensors"))
    assert t3.step == 3 and t3.rounds == 1 and t3.seed == 11
    t3.train_round(source(data, 6, seed=5))
    s1, s3 = _snapshot(m1), _snapshot(m3)
    assert s1.keys() == s3.keys()
    for n in s1:
        assert torch.equal(s1[n], s3[n]), n


def test_state_file_mismatch_and_damage_are_clear_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    m = linear_model()
    t = BilevelTrainer(m, TrainConfig(local_steps=1), seed=0)
    save_state(tmp_path / "s.safetensors", *t.state_tensors())
    plain = BilevelTrainer(linear_model(), TrainConfig(local_steps=1), seed=0, objective="plain")
    with pytest.raises(DataError, match="objective"):
        plain.load_state_tensors(*load_state(tmp_path / "s.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="bad.safetensors"):
        load_state(tmp_path / "bad.safetensors")


def test_bilevel_without_private_adapter_is_refused_and_config_validated() -> None:
    from pf2lora.common.learning.config import AdapterConfig

    hom = mini_model(AdapterConfig(private_rank=0))
    with pytest.raises(DataError, match="private"):
        BilevelTrainer(hom, TrainConfig(), seed=0)
    with pytest.raises(ConfigError, match="hypergrad"):
        TrainConfig(hypergrad="newton")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="ll_lr"):
        TrainConfig(ll_lr=-1.0)


@pytest.mark.parametrize("value", [0, 0.0, False])
def test_lower_level_clip_off_spellings(value: object) -> None:
    assert TrainConfig(ll_max_grad_norm=value).ll_max_grad_norm is None  # type: ignore[arg-type]
    assert TrainConfig().ll_max_grad_norm is None  # off by default


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_lower_level_clip_bad_values_are_refused(value: float) -> None:
    with pytest.raises(ConfigError, match="ll_max_grad_norm"):
        TrainConfig(ll_max_grad_norm=value)


def test_lower_level_clip_bounds_every_private_step() -> None:
    """Each private SGD step moves y by at most ll_lr * ll_max_grad_norm; without it, more."""
    data = regression_data(64, d=6)

    def largest_step(clip: float | None) -> float:
        m = linear_model(d=6, r=3, r_hat=2)
        with torch.no_grad():
            for p in m.private_parameters().values():
                p.normal_(0, 1.0)  # far from the optimum: large lower-level gradients
        cfg = TrainConfig(
            local_steps=1,
            batch_size=32,
            ll_lr=0.05,
            ul_lr=0.01,
            ll_max_grad_norm=clip,
            ll_steps=1,  # one private step per round: the round's movement is that step
        )
        tr = BilevelTrainer(m, cfg, seed=0)
        src = source(data, 32)
        steps = []
        for _ in range(5):
            y0 = torch.cat([p.detach().flatten().clone() for p in m.private_parameters().values()])
            try:
                tr.train_round(src)
            except Diverged:  # unclipped, the private steps blow up (loss inf by round 4)
                return math.inf
            y1 = torch.cat([p.detach().flatten() for p in m.private_parameters().values()])
            steps.append(float((y1 - y0).norm()))
        return max(steps)

    clip = 0.1
    assert largest_step(clip) <= 0.05 * clip * (1 + 1e-5)
    assert largest_step(None) > 0.05 * clip * 2


@pytest.mark.parametrize("value", [0, 17, 1.5, True])
def test_lower_level_steps_bad_values_are_refused(value: object) -> None:
    with pytest.raises(ConfigError, match="ll_steps"):
        TrainConfig(ll_steps=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("hypergrad", ["unroll", "first-order"])
def test_more_lower_level_steps_move_the_private_adapter_further(hypergrad: str) -> None:
    """ll_steps = 3 takes two more SGD steps per local step on their own batches: the private
    adapter ends elsewhere, the loss still falls, and the run stays deterministic."""
    data = regression_data(64, d=6)

    def run(ll_steps: int) -> tuple[dict[str, torch.Tensor], float, float]:
        m = linear_model(d=6, r=3, r_hat=2)
        cfg = TrainConfig(
            local_steps=4,
            batch_size=16,
            ll_lr=0.05,
            ul_lr=0.01,
            hypergrad=hypergrad,
            ll_steps=ll_steps,
        )
        before = float(m.loss(data.tensors).detach())
        BilevelTrainer(m, cfg, seed=0).train_round(source(data, 16))
        y = {n: p.detach().clone() for n, p in m.private_parameters().items()}
        return y, before, float(m.loss(data.tensors).detach())

    one, _, _ = run(1)
    three, before, after = run(3)
    again, _, _ = run(3)
    assert after < before
    assert any(not torch.equal(one[k], three[k]) for k in one)
    assert all(torch.equal(three[k], again[k]) for k in three)


def test_a_diverging_round_stops_with_a_clear_error_instead_of_finishing() -> None:
    m = linear_model(d=6, r=3, r_hat=2)
    data = regression_data(128, d=6)
    # a lower-level step of 50 on an unclipped quadratic: the loss grows without bound
    cfg = TrainConfig(local_steps=40, batch_size=32, ll_lr=50.0, ul_lr=0.02, max_grad_norm=None)
    tr = BilevelTrainer(m, cfg, seed=0)
    with pytest.raises(Diverged, match="local training diverged at step") as err:
        tr.train_round(source(data, 32))
    assert "Lower the learning rates" in str(err.value)
    assert tr.rounds == 0  # the round did not complete
