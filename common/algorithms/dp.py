"""Silo-level DP-FedAvg on top of any algorithm that averages its shared tensors plainly.

With `[algorithm.dp] enabled = true` a silo's payload is no longer its weighted shared state but
its update (the trained shared tensors minus the global it received) clipped to L2 norm C, plus
its share of the Gaussian noise (mode "silo"), with weight 1: every silo counts the same, so one
silo moves the sum by at most C. The coordinator's new global is the previous one plus the mean
update; in mode "central" it adds the noise to the sum itself. A round whose sum holds fewer than
`min_silos` updates is refused (DataError): in mode "silo" it carries less noise than promised.
The mechanism and its parameters are common/privacy; this module only applies them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from pf2lora.common.algorithms.aggregate import (
    WEIGHT_KEY,
    is_weight_key,
    mean_from_sum,
    weighted_payload,
)
from pf2lora.common.errors import ConfigError, DataError
from pf2lora.common.learning.config import TrainConfig
from pf2lora.common.privacy import mechanism
from pf2lora.common.privacy.config import DPConfig

# Algorithms whose local step is one gradient of a mean loss over one batch (DP-SGD applies).
DP_SGD_PLAIN = ("homlora", "fedsa", "local")
# Algorithms whose payload is not a plain mean of the shared tensors, or that send nothing.
UNSUPPORTED = {
    "hetlora": "its payload is weighted per module by the update's norm, not a plain mean",
    "local": "it sends nothing: there is nothing to protect",
}


def estimator_name(algorithm: str, train: TrainConfig) -> str:
    """How an error names the local step: the algorithm, and PF2LoRA's hypergradient."""
    return f"pf2lora with hypergrad {train.hypergrad}" if algorithm == "pf2lora" else algorithm


def check_supported(algorithm: str, dp: DPConfig, train: TrainConfig) -> None:
    if dp.enabled and algorithm in UNSUPPORTED:
        raise ConfigError(
            f"dp.enabled=true with algorithm={algorithm!r}: {UNSUPPORTED[algorithm]}; use "
            "pf2lora, homlora, fedsa or perfedavg"
        )
    if train.dp_sgd_clip is None:
        return
    estimator = estimator_name(algorithm, train)
    pf2lora_ok = algorithm == "pf2lora" and train.hypergrad in ("joint", "first-order")
    if algorithm in DP_SGD_PLAIN or pf2lora_ok:
        return
    raise ConfigError(
        f"train.dp_sgd_clip with {estimator}: DP-SGD runs where every gradient a step uses is "
        "a mean over one batch (homlora, fedsa, local, pf2lora with hypergrad joint or "
        "first-order). Unroll and implicit differentiate the upper-level loss through the "
        "lower-level step, so one hypergradient mixes both batches' examples and clipping per "
        "example does not bound one example's influence; HETLoRA's regulariser and "
        "Per-FedAvg's meta-gradient are not yet supported"
    )


def private_payload(
    shared: Mapping[str, Tensor],
    received: Mapping[str, Tensor],
    dp: DPConfig,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """(payload, metrics): clip(shared - received) + N(0, silo_std^2), weight 1."""
    clipped, norm = mechanism.clip(mechanism.update(shared, received), dp.clip)
    noised = mechanism.gaussian(clipped, dp.silo_std, generator or mechanism.noise_generator())
    payload = weighted_payload({k: v.float() for k, v in noised.items()}, 1.0)
    return payload, {"dp_update_norm": norm, "dp_clipped": float(norm > dp.clip)}


def private_aggregate(
    summed: Mapping[str, Tensor],
    previous: Mapping[str, Tensor],
    dp: DPConfig,
    generator: torch.Generator | None = None,
    weight_key: Callable[[str], str] | None = None,
) -> dict[str, Tensor]:
    """previous + (sum of updates [+ central noise]) / number of updates."""
    survivors = float(summed[WEIGHT_KEY])
    if survivors < dp.min_silos - 1e-6:
        raise DataError(
            f"the round's sum holds {survivors:.0f} update(s), fewer than dp.min_silos = "
            f"{dp.min_silos}: it would carry less noise than promised, so it is not released"
        )
    total = dict(summed)
    if dp.mode == "central":
        gen = generator or mechanism.noise_generator()
        noisy = mechanism.gaussian(
            {k: v for k, v in summed.items() if not is_weight_key(k)}, dp.sum_std, gen
        )
        total.update({k: v.float() for k, v in noisy.items()})
    zero = {k: torch.zeros_like(v) for k, v in previous.items()}
    mean = mean_from_sum(total, zero)
    return {
        k: (previous[k] + mean[k].to(previous[k].dtype)) if k in summed else previous[k].clone()
        for k in previous
    }
