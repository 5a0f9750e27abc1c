"""Base-model placement options: quantized weights, sharding over GPUs, gradient checkpointing;
which estimators each allows, and clear refusals where this machine cannot do it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pf2lora.common.algorithms.base import AlgorithmConfig
from pf2lora.common.algorithms.registry import make_algorithm
from pf2lora.common.client_runtime import ClientRuntime, initial_global_state
from pf2lora.common.errors import ConfigError
from pf2lora.common.learning import hypergrad as hg
from pf2lora.common.learning.base_model import load_base_model
from pf2lora.common.learning.config import ModelConfig, TrainConfig
from pf2lora.common.learning.model import build_two_level_model
from pf2lora.common.runspec import RunConfig
from tests.helpers.tiny import MINI, text_data


@pytest.mark.parametrize(
    ("field", "value"),
    [("quantize", "3bit"), ("device_map", "balanced"), ("gradient_checkpointing", "yes")],
)
def test_invalid_placement_options_are_refused_by_name(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"{field}={value!r}"):
        ModelConfig(**{field: value})  # type: ignore[arg-type]


def _run(name: str, hypergrad: str = "unroll", **model: object) -> RunConfig:
    algo = AlgorithmConfig(name=name, train=TrainConfig(hypergrad=hypergrad))  # type: ignore[arg-type]
    return RunConfig(algorithm=algo, model=dataclasses.replace(MINI, **model))  # type: ignore[arg-type]


def test_quantized_base_takes_only_estimators_that_differentiate_once() -> None:
    for name, hypergrad in (
        ("pf2lora", "unroll"),
        ("pf2lora", "implicit"),
        ("perfedavg", "unroll"),
    ):
        with pytest.raises(ConfigError, match="model.quantize='4bit'.*first-order"):
            _run(name, hypergrad, quantize="4bit")
    for name, hypergrad in (
        ("pf2lora", "first-order"),
        ("pf2lora", "joint"),
        ("homlora", "unroll"),
    ):
        _run(name, hypergrad, quantize="8bit")  # accepted (loading needs CUDA: below)


def test_gradient_checkpointing_takes_only_estimators_that_substitute_nothing() -> None:
    for name, hypergrad in (
        ("pf2lora", "first-order"),
        ("pf2lora", "unroll"),
        ("perfedavg", "unroll"),
    ):
        with pytest.raises(ConfigError, match="gradient_checkpointing=true.*homlora"):
            _run(name, hypergrad, gradient_checkpointing=True)
    for name, hypergrad in (("pf2lora", "joint"), ("homlora", "unroll"), ("fedsa", "unroll")):
        _run(name, hypergrad, gradient_checkpointing=True)


def test_the_refusal_is_needed_checkpointing_breaks_a_substituting_estimator() -> None:
    """Built past the check: first-order's functional_call under checkpointing raises."""
    model = build_two_level_model(dataclasses.replace(MINI, gradient_checkpointing=True))
    model.train()
    batch = text_data().select(torch.arange(6))
    x, y = model.shared_parameters(), model.private_parameters()
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        hg.first_order(lambda o, b: model.loss(b, o), dict(x), dict(y), batch, batch, 0.1)


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
@pytest.mark.parametrize("option", [{"quantize": "4bit"}, {"device_map": "auto"}])
def test_gpu_placements_are_refused_without_cuda(option: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="needs a CUDA GPU and torch sees none"):
        load_base_model(dataclasses.replace(MINI, **option))


def test_gradient_checkpointing_trains_the_same_adapters() -> None:
    """HOMLoRA with and without checkpointing: the same losses and adapters (recomputation
    keeps the dropout RNG state), and checkpointing is really on."""
    out = []
    for checkpointing in (False, True):
        model = dataclasses.replace(MINI, gradient_checkpointing=checkpointing)
        train = TrainConfig(local_steps=3, batch_size=6, ul_lr=1e-2)
        algo = make_algorithm(AlgorithmConfig(name="homlora", train=train), model.adapters)
        data = text_data()
        rt = ClientRuntime(algo, model, client_index=0, seed=3, train=data, test=data)
        assert rt.model.peft.base_model.model.is_activation_checkpointing is checkpointing
        res = rt.run_round(initial_global_state(algo, model, run_seed=0), 1.0)
        out.append((res.metrics["train_loss"], rt.model.shared_state()))
    (loss0, state0), (loss1, state1) = out
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    for k in state0:
        torch.testing.assert_close(state1[k], state0[k], rtol=1e-5, atol=1e-6)


CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)"
)


def _cuda_round(**model: object) -> tuple[ClientRuntime, dict[str, float]]:
    mc = dataclasses.replace(MINI, **model)  # type: ignore[arg-type]
    train = TrainConfig(local_steps=3, batch_size=6, hypergrad="first-order")
    algo = make_algorithm(AlgorithmConfig(name="pf2lora", train=train), mc.adapters)
    data = text_data()
    rt = ClientRuntime(algo, mc, client_index=0, seed=3, train=data, test=data, device="cuda")
    return rt, rt.run_round(initial_global_state(algo, mc, run_seed=0), 1.0).metrics


@CUDA
def test_quantized_base_trains_first_order_with_float32_adapters_on_cuda() -> None:
    pytest.importorskip("bitsandbytes")
    for bits in ("4bit", "8bit"):
        rt, metrics = _cuda_round(quantize=bits)
        assert torch.isfinite(torch.tensor(metrics["train_loss"]))
        adapters = {**rt.model.shared_parameters(), **rt.model.private_parameters()}
        assert all(p.dtype == torch.float32 and p.is_cuda for p in adapters.values())


@CUDA
def test_base_spread_by_device_map_trains_on_cuda() -> None:
    rt, metrics = _cuda_round(device_map="auto")
    assert rt.device.type == "cuda"
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
