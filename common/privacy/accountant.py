"""Epsilon of silo-level DP-FedAvg, from Opacus's Renyi-DP accountant.

Every round is a Gaussian mechanism with noise multiplier z over the silos that take part
(sample rate 1: each silo's data is in every round it joins; sampling silos is not assumed, so
no amplification is claimed). Composition over rounds and the conversion to (epsilon, delta) are
Opacus's (`opacus.accountants.analysis.rdp`), not ours.
"""

from __future__ import annotations

from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512]


def epsilon(noise_multiplier: float, rounds: int, delta: float, sample_rate: float = 1.0) -> float:
    """Epsilon at `delta` after `rounds` released rounds (0 rounds: 0)."""
    if rounds <= 0:
        return 0.0
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=rounds, orders=ORDERS)
    eps, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(eps)


def rounds_within(noise_multiplier: float, delta: float, max_epsilon: float, limit: int) -> int:
    """The most rounds (at most `limit`) whose epsilon stays within `max_epsilon`."""
    lo, hi = 0, limit  # epsilon grows with the rounds: bisect
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if epsilon(noise_multiplier, mid, delta) <= max_epsilon:
            lo = mid
        else:
            hi = mid - 1
    return lo
