"""Per-example gradients and their clipped, noised sum: the step of DP-SGD.

Per-example gradients come from Opacus's hooks (`GradSampleModule`: for every trainable layer,
each example's gradient from the layer's activations and backpropagated gradients), not from a
loop over examples; its hooks are on only while a DP step computes them. The clip bounds each
example's gradient over all parameters together; the noise N(0, (sigma C)^2) is added to the sum,
which is divided by the expected batch size (Poisson sampling: batch sizes vary).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn


class PerExampleGrads:
    """Per-example gradients of `module`'s parameters, for a loss that is a mean over examples."""

    def __init__(self, module: nn.Module) -> None:
        from opacus import GradSampleModule

        self.gsm = GradSampleModule(module, batch_first=True, loss_reduction="mean")
        self.gsm.disable_hooks()

    def __call__(
        self, loss: Callable[[], Tensor], params: Mapping[str, nn.Parameter]
    ) -> tuple[dict[str, Tensor], float]:
        """({name: gradient per example, [B, *shape]}, the batch's mean loss)."""
        self.gsm.enable_hooks()
        try:
            value = loss()
            with warnings.catch_warnings():  # the frozen embeddings: no input requires grad
                warnings.filterwarnings("ignore", "Full backward hook is firing")
                torch.autograd.grad(value, list(params.values()), allow_unused=True)
            out: dict[str, Tensor] = {}
            for n, p in params.items():
                sample = getattr(p, "grad_sample", None)
                out[n] = sample.detach() if sample is not None else None  # type: ignore[assignment]
            rows = next((g.shape[0] for g in out.values() if g is not None), 0)
            for n, p in params.items():
                if out[n] is None:  # unused by this loss: zero for every example
                    out[n] = torch.zeros((rows, *p.shape), dtype=p.dtype, device=p.device)
            return out, float(value.detach())
        finally:
            self.gsm.disable_hooks()
            for p in self.gsm.parameters():  # every trainable layer's hooks fired, not only ours
                p.grad_sample = None  # type: ignore[attr-defined]


def clip_and_noise(
    per_example: Mapping[str, Tensor],
    clip: float,
    noise_multiplier: float,
    expected_batch: float,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """(sum_i g_i * min(1, C / ||g_i||) + N(0, (sigma C)^2)) / expected_batch, per parameter."""
    first = next(iter(per_example.values()))
    rows = first.shape[0]
    if rows:
        sq = sum(g.reshape(rows, -1).double().pow(2).sum(1) for g in per_example.values())
        factor = torch.clamp(clip / (torch.sqrt(sq) + 1e-12), max=1.0)  # type: ignore[arg-type]
    out: dict[str, Tensor] = {}
    for n, g in per_example.items():
        shape = g.shape[1:]
        total = (
            (g.double() * factor.view(-1, *([1] * len(shape)))).sum(0)
            if rows
            else torch.zeros(shape, dtype=torch.float64)
        )
        noise = torch.randn(shape, dtype=torch.float64, generator=generator).to(total.device)
        out[n] = ((total + noise_multiplier * clip * noise) / expected_batch).to(g.dtype)
    return out
