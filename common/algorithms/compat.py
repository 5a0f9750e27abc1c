"""Which local objectives run on which base-model placements (quantized, checkpointed).

Two properties of an estimator decide it:
  - it differentiates twice through the base model (unroll and implicit hypergradients,
    Per-FedAvg's Hessian-vector product). bitsandbytes' quantized matmuls are autograd
    functions whose backward is not guaranteed to be differentiable again (the 8-bit one
    quantizes the incoming gradient), so a second derivative through them could be silently
    wrong: quantized base weights take only estimators that differentiate once.
  - it evaluates the model with parameters substituted (torch.func.functional_call: y_hat in
    every bilevel estimator but `joint`, the adapted point in Per-FedAvg). Activation
    checkpointing recomputes the forward pass in the backward pass, where the substitution is
    gone: torch raises a CheckpointError for first-order and silently recomputes with the wrong
    parameters for the others. Gradient checkpointing takes only estimators that substitute
    nothing.
"""

from __future__ import annotations

from pf2lora.common.algorithms.base import AlgorithmConfig
from pf2lora.common.algorithms.dp import estimator_name
from pf2lora.common.errors import ConfigError
from pf2lora.common.learning.config import ModelConfig

ONCE = ("pf2lora with hypergrad first-order or joint", "homlora", "hetlora", "fedsa", "local")
NO_SUBSTITUTION = ("pf2lora with hypergrad joint", "homlora", "hetlora", "fedsa", "local")


def second_order(algo: AlgorithmConfig) -> bool:
    """The local step differentiates twice through the base model."""
    if algo.name == "pf2lora":
        return algo.train.hypergrad in ("unroll", "implicit")
    return algo.name == "perfedavg"


def substitutes(algo: AlgorithmConfig) -> bool:
    """The local step evaluates the model with substituted parameters (functional_call)."""
    if algo.name == "pf2lora":
        return algo.train.hypergrad != "joint"
    return algo.name == "perfedavg"


def check_model_support(algo: AlgorithmConfig, model: ModelConfig) -> None:
    """ConfigError naming the option and what works with it, for a combination that cannot run."""
    step = estimator_name(algo.name, algo.train)
    if model.quantize != "none" and second_order(algo):
        raise ConfigError(
            f"model.quantize={model.quantize!r} with {step}: this estimator "
            "differentiates twice through the base model, which bitsandbytes' quantized layers "
            f"do not support reliably. Use one of: {', '.join(ONCE)}; or quantize='none'"
        )
    if model.gradient_checkpointing and substitutes(algo):
        raise ConfigError(
            f"model.gradient_checkpointing=true with {step}: checkpointing "
            "recomputes activations without the parameters this estimator substitutes. Use one "
            f"of: {', '.join(NO_SUBSTITUTION)}; or gradient_checkpointing=false"
        )
