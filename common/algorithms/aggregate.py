"""Pure server-side math over named tensors: the coordinator only ever needs a SUM of payloads.

A client payload holds its tensors already multiplied by the client's weight, plus the weight
itself under a weight key (`__weight__`, or `__weight__/<group>` for per-module weights). The
sum of payloads therefore carries both numerator and denominator, so the weighted mean is
computable from what secure aggregation reveals and from nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

WEIGHT_KEY = "__weight__"
WEIGHT_PREFIX = WEIGHT_KEY + "/"
# Below this total weight the mean is undefined (e.g. every HETLoRA norm is zero in round 1);
# the aggregation then keeps the previous global value for that group.
MIN_TOTAL_WEIGHT = 1e-12

WeightKeyFn = Callable[[str], str]


def is_weight_key(name: str) -> bool:
    return name == WEIGHT_KEY or name.startswith(WEIGHT_PREFIX)


def global_weight_key(_: str) -> str:
    return WEIGHT_KEY


def weighted_payload(
    tensors: Mapping[str, Tensor],
    weight: float | Mapping[str, float],
    weight_key: WeightKeyFn = global_weight_key,
) -> dict[str, Tensor]:
    """x -> {name: w * x} plus {weight_key: w}; `weight` per weight key or one for all."""
    out: dict[str, Tensor] = {}
    weights: dict[str, float] = {}
    for name, t in tensors.items():
        key = weight_key(name)
        w = float(weight[key]) if isinstance(weight, Mapping) else float(weight)
        if not torch.isfinite(torch.tensor(w)) or w < 0:
            raise ValueError(f"weight for {name!r} must be finite and >= 0, got {w}")
        weights[key] = w
        out[name] = t.detach().to(torch.float32) * w
    for key, w in weights.items():
        out[key] = torch.tensor(w, dtype=torch.float32)
    return out


def sum_payloads(payloads: Iterable[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The plain sum, name by name: what secure aggregation reveals. All key sets must agree."""
    total: dict[str, Tensor] | None = None
    for p in payloads:
        if total is None:
            total = {k: v.detach().to(torch.float32).clone() for k, v in p.items()}
            continue
        if set(p) != set(total):
            raise ValueError(f"payload keys differ: {sorted(set(p) ^ set(total))[:5]}")
        for k, v in p.items():
            if v.shape != total[k].shape:
                raise ValueError(
                    f"payload {k!r}: shape {tuple(v.shape)} != {tuple(total[k].shape)}"
                )
            total[k] += v.to(torch.float32)
    if total is None:
        raise ValueError("no payloads to sum")
    return total


def mean_from_sum(
    summed: Mapping[str, Tensor],
    previous: Mapping[str, Tensor],
    weight_key: WeightKeyFn = global_weight_key,
) -> dict[str, Tensor]:
    """new[name] = summed[name] / summed[weight_key(name)]; names absent stay as `previous`."""
    out = {k: v.clone() for k, v in previous.items()}
    for name, value in summed.items():
        if is_weight_key(name):
            continue
        if name not in previous:
            raise ValueError(f"aggregate has unknown tensor {name!r}")
        if value.shape != previous[name].shape:
            raise ValueError(
                f"aggregate {name!r}: shape {tuple(value.shape)} != {tuple(previous[name].shape)}"
            )
        total = float(summed[weight_key(name)])
        if total > MIN_TOTAL_WEIGHT:
            out[name] = (value / total).to(previous[name].dtype)
    return out


def payload_spec(
    global_spec: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    weight_key: WeightKeyFn = global_weight_key,
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of a client payload for a given global state spec."""
    spec = {k: (tuple(s), torch.float32) for k, (s, _) in global_spec.items()}
    for name in global_spec:
        spec[weight_key(name)] = ((), torch.float32)
    return spec


def client_weights(num_samples: Sequence[int], weighting: str) -> list[float]:
    """Public FedAvg weights p_k, normalised over the round's participants."""
    if weighting == "equal":
        return [1.0 / len(num_samples)] * len(num_samples)
    total = float(sum(num_samples))
    return [n / total for n in num_samples]
