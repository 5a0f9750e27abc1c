"""`[dp]` of a run file: silo-level differential privacy of the shared adapter's updates.

Each silo's contribution to a round is its update, the shared adapter after local training minus
the global state it received, clipped to L2 norm `clip` (C) and sent with equal weight. The
securely aggregated sum then carries Gaussian noise of standard deviation z * C
(z = `noise_multiplier`), which makes each round a Gaussian mechanism of sensitivity C over whole
silos: one institution's data, all of it, changes the sum by at most C.

mode "silo": every silo adds noise of std z * C / sqrt(min_silos) before masking, so the sum of
at least `min_silos` contributions carries the full std z * C and nobody ever sees a less-noised
value (secure aggregation hides each silo's share); a round with fewer survivors is not
released. mode "central": silos send clipped updates and the coordinator adds z * C to the sum;
this trusts the coordinator with the un-noised sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pf2lora.common.errors import ConfigError

Mode = Literal["silo", "central"]
MODES = ("silo", "central")


def _require(ok: bool, name: str, value: object, why: str) -> None:
    if not ok:
        raise ConfigError(f"dp.{name}={value!r}: {why}")


def _real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class DPConfig:
    """Silo-level DP-FedAvg. Off unless `enabled`; every field is checked when enabled or not."""

    enabled: bool = False
    mode: Mode = "silo"
    clip: float = 1.0  # C: the L2 bound of one silo's update (all shared tensors together)
    noise_multiplier: float = 1.0  # z: the released sum carries N(0, (z C)^2) per coordinate
    # The noise is split across this many silos (mode "silo"); the coordinator never releases a
    # round with fewer survivors (the sum would carry less noise than promised).
    min_silos: int = 2
    delta: float = 1e-5  # epsilon is reported at this delta
    max_epsilon: float | None = None  # end the run before a round would exceed it
    # Per-silo scalar metrics (losses, accuracy) leave the silo only if this is true.
    report_metrics: bool = False

    def __post_init__(self) -> None:
        _require(isinstance(self.enabled, bool), "enabled", self.enabled, "true or false")
        _require(self.mode in MODES, "mode", self.mode, f"use one of {MODES}")
        _require(
            _real(self.clip) and 0 < self.clip <= 1e6, "clip", self.clip, "must be in (0, 1e6]"
        )
        _require(
            _real(self.noise_multiplier) and 0 < self.noise_multiplier <= 1e3,
            "noise_multiplier",
            self.noise_multiplier,
            "must be in (0, 1000] (to train without noise, set enabled = false)",
        )
        _require(
            isinstance(self.min_silos, int)
            and not isinstance(self.min_silos, bool)
            and 1 <= self.min_silos <= 100_000,
            "min_silos",
            self.min_silos,
            "must be an integer in [1, 100000]",
        )
        _require(_real(self.delta) and 0 < self.delta < 1, "delta", self.delta, "in (0, 1)")
        if self.max_epsilon is not None:
            _require(
                _real(self.max_epsilon) and self.max_epsilon > 0,
                "max_epsilon",
                self.max_epsilon,
                "must be positive (or absent: no budget)",
            )
        _require(
            isinstance(self.report_metrics, bool), "report_metrics", self.report_metrics, "bool"
        )
        if self.enabled and self.max_epsilon is not None:
            from pf2lora.common.privacy.accountant import epsilon

            first = epsilon(self.noise_multiplier, 1, self.delta)
            _require(
                first <= self.max_epsilon,
                "max_epsilon",
                self.max_epsilon,
                f"below one round's epsilon ({first:.3g} at noise_multiplier "
                f"{self.noise_multiplier:g}): raise the budget or the noise",
            )

    @property
    def sum_std(self) -> float:
        """The noise std per coordinate of the released sum: z * C."""
        return self.noise_multiplier * self.clip

    @property
    def silo_std(self) -> float:
        """What one silo adds in mode "silo" (0 in mode "central")."""
        if self.mode == "central":
            return 0.0
        return self.sum_std / math.sqrt(self.min_silos)
