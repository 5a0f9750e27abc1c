"""The Gaussian mechanism on a silo's update, as pure functions of tensors: clip the update to an
L2 norm, add Gaussian noise. Norms are taken over all tensors together, in float64."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

Named = dict[str, Tensor]


def update(trained: Mapping[str, Tensor], received: Mapping[str, Tensor]) -> Named:
    """The update a silo contributes: its trained shared tensors minus the global it received."""
    if set(trained) != set(received):
        raise ValueError(f"tensor names differ: {sorted(set(trained) ^ set(received))[:4]}")
    return {n: trained[n].detach().double() - received[n].detach().double() for n in trained}


def l2_norm(tensors: Mapping[str, Tensor]) -> float:
    return float(sum(float((t.double() ** 2).sum()) for t in tensors.values())) ** 0.5


def clip(tensors: Mapping[str, Tensor], bound: float) -> tuple[Named, float]:
    """(tensors scaled by min(1, bound / norm), the norm before clipping)."""
    norm = l2_norm(tensors)
    factor = min(1.0, bound / norm) if norm > 0 else 1.0
    return {n: t.double() * factor for n, t in tensors.items()}, norm


def gaussian(tensors: Mapping[str, Tensor], std: float, generator: torch.Generator) -> Named:
    """tensors + N(0, std^2) on every coordinate (float64 noise, drawn from `generator`)."""
    if std == 0:
        return {n: t.double() for n, t in tensors.items()}
    return {
        n: t.double() + std * torch.randn(t.shape, dtype=torch.float64, generator=generator)
        for n, t in tensors.items()
    }


def noise_generator() -> torch.Generator:
    """A generator seeded from the operating system's random source, fresh for each use.

    torch's generator (Mersenne Twister) is not a cryptographic generator: someone who saw
    enough of its output could predict the rest. Only the noised, masked value leaves the silo,
    and a fresh 64-bit OS seed per round keeps draws unrelated across rounds; a deployment that
    needs a cryptographic noise source must substitute one here."""
    import secrets

    return torch.Generator().manual_seed(secrets.randbits(63))
