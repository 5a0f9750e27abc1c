"""HETLoRA (Cho et al. 2024): heterogeneous silo ranks, zero-padding, norm-weighted aggregation,
self-pruning regularisation.

Deviation for secure aggregation: the server never sees an individual adapter, so each silo
zero-pads its own A_k, B_k to r_max and weights them by ||B_k A_k||_F before sending; the
server divides the summed tensors by the summed weights (per target module). Each silo
truncates the global adapter to its own rank on receipt. The arithmetic is the paper's.
All adapters keep r_max rows with PEFT's scaling alpha/r_max, so the products of silos with
different ranks are comparable; ranks above r_k are held at zero (masked gradients).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from pf2lora.common.algorithms.aggregate import WEIGHT_KEY, WEIGHT_PREFIX, weighted_payload
from pf2lora.common.algorithms.base import Algorithm, AlgorithmConfig, ClientAlgorithm
from pf2lora.common.errors import ConfigError
from pf2lora.common.learning.batching import BatchSource
from pf2lora.common.learning.config import AdapterConfig
from pf2lora.common.learning.model import TwoLevelModel
from pf2lora.common.learning.trainer import BilevelTrainer, Objective

logger = logging.getLogger(__name__)

_A = ".lora_A."
_B = ".lora_B."


# ---------------------------------------------------------------- pure rank math
def pad_rank_a(a: Tensor, r_max: int) -> Tensor:
    """A (r_k x n) -> (r_max x n), zero rows appended."""
    assert a.dim() == 2 and a.shape[0] <= r_max, a.shape
    return torch.cat([a, a.new_zeros(r_max - a.shape[0], a.shape[1])], dim=0)


def pad_rank_b(b: Tensor, r_max: int) -> Tensor:
    """B (m x r_k) -> (m x r_max), zero columns appended."""
    assert b.dim() == 2 and b.shape[1] <= r_max, b.shape
    return torch.cat([b, b.new_zeros(b.shape[0], r_max - b.shape[1])], dim=1)


def truncate_rank_a(a: Tensor, r: int) -> Tensor:
    """The first r rows of A."""
    return a[:r, :]


def truncate_rank_b(b: Tensor, r: int) -> Tensor:
    """The first r columns of B."""
    return b[:, :r]


def module_of(name: str) -> str | None:
    """The target-module prefix of a LoRA tensor name (None for other tensors, e.g. a head)."""
    for marker in (_A, _B):
        if marker in name:
            return name.split(marker)[0]
    for marker in (".lora_A.weight", ".lora_B.weight"):
        if name.endswith(marker):
            return name[: -len(marker)]
    return None


def hetlora_weight_key(name: str) -> str:
    module = module_of(name)
    return WEIGHT_KEY if module is None else WEIGHT_PREFIX + module


def norm_weights(state: Mapping[str, Tensor]) -> dict[str, float]:
    """||B A||_F per target module of a (padded or not) LoRA state, keyed like the payload."""
    out: dict[str, float] = {}
    for name, a in state.items():
        module = module_of(name)
        if module is None or ".lora_A" not in name:
            continue
        b = state[name.replace("lora_A", "lora_B")]
        out[WEIGHT_PREFIX + module] = float(torch.linalg.matrix_norm(b.float() @ a.float()))
    return out


def tail_norm(a: Tensor, b: Tensor, rank: int, gamma: float) -> Tensor:
    """||B[:, floor(gamma r):r]|| * ||A[floor(gamma r):r, :]||, the self-pruning regulariser."""
    cut = math.floor(gamma * rank)
    return torch.linalg.norm(b[:, cut:rank]) * torch.linalg.norm(a[cut:rank, :])


def prune_rank(
    rank: int, gamma: float, tail_now: float, tail_before: float | None, min_rank: int = 1
) -> int:
    """r -> floor(gamma r) when the tail's norm shrank since the last round; never regrows."""
    if tail_before is not None and tail_now < tail_before:
        return max(min_rank, math.floor(gamma * rank))
    return rank


def assigned_rank(client_index: int, num_ranks: tuple[int, int], seed: int) -> int:
    """Silo ranks spread over [r_min, r_max] in a seeded order (deterministic)."""
    lo, hi = num_ranks
    gen = torch.Generator().manual_seed(seed)
    choices = torch.arange(lo, hi + 1)
    order = choices[torch.randperm(len(choices), generator=gen)]
    return int(order[client_index % len(order)])


# ------------------------------------------------------------------- client
class HETLoRAClient(ClientAlgorithm):
    objective: ClassVar[Objective] = "plain"

    def __init__(
        self, algorithm: Algorithm, model: TwoLevelModel, client_index: int, seed: int
    ) -> None:
        assert isinstance(algorithm, HETLoRA)
        self.het = algorithm
        self.rank = assigned_rank(client_index, algorithm.rank_range, algorithm.rank_seed)
        self.prev_tail: float | None = None
        super().__init__(algorithm, model, client_index, seed)
        self._truncate_in_place()

    def make_trainer(self, seed: int, **options: Any) -> BilevelTrainer:
        return super().make_trainer(
            seed, extra_loss=self._regulariser, grad_mask=self._mask_grads, **options
        )

    def _pairs(self) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        params = self.model.shared_parameters()
        pairs = []
        for name, a in params.items():
            if ".lora_A." in name:
                pairs.append((a, params[name.replace(".lora_A.", ".lora_B.")]))
        return pairs

    def _regulariser(self) -> Tensor:
        lam = self.het.cfg.hetlora_lambda
        total = sum(
            tail_norm(a, b, self.rank, self.het.cfg.hetlora_gamma) for a, b in self._pairs()
        )
        return lam * total  # type: ignore[return-value]

    def _mask_grads(self, grads: dict[str, Tensor]) -> None:
        for name, g in grads.items():
            if ".lora_A." in name:
                g[self.rank :, :] = 0
            elif ".lora_B." in name:
                g[:, self.rank :] = 0

    def _truncate_in_place(self) -> None:
        with torch.no_grad():
            for a, b in self._pairs():
                a[self.rank :, :] = 0
                b[:, self.rank :] = 0

    def receive_global(self, global_state: Mapping[str, Tensor]) -> None:
        super().receive_global(global_state)
        self._truncate_in_place()  # the first r_k rows of A and columns of B

    def local_round(self, source: BatchSource) -> dict[str, float]:
        metrics = self.trainer.train_round(source)
        with torch.no_grad():
            tail = float(
                sum(
                    tail_norm(a, b, self.rank, self.het.cfg.hetlora_gamma) for a, b in self._pairs()
                )
            )
        new_rank = prune_rank(self.rank, self.het.cfg.hetlora_gamma, tail, self.prev_tail)
        if new_rank != self.rank:
            logger.info("silo %d prunes its rank %d -> %d", self.client_index, self.rank, new_rank)
        self.rank = new_rank
        self.prev_tail = tail
        self._truncate_in_place()
        metrics["rank"] = float(self.rank)
        return metrics

    def make_payload(self, shared: Mapping[str, Tensor], weight: float) -> dict[str, Tensor]:
        r_max = self.het.rank_range[1]
        padded: dict[str, Tensor] = {}
        for name, t in shared.items():
            if ".lora_A" in name:
                padded[name] = pad_rank_a(truncate_rank_a(t, self.rank), r_max)
            elif ".lora_B" in name:
                padded[name] = pad_rank_b(truncate_rank_b(t, self.rank), r_max)
            else:
                padded[name] = t
        weights: dict[str, float] = {WEIGHT_KEY: weight}
        weights.update({k: weight * v for k, v in norm_weights(padded).items()})
        return weighted_payload(padded, weights, hetlora_weight_key)

    def extra_state(self) -> dict[str, Any]:
        return {"rank": self.rank, "prev_tail": self.prev_tail}

    def load_extra_state(self, meta: Mapping[str, Any]) -> None:
        self.rank = int(meta["rank"])
        self.prev_tail = None if meta.get("prev_tail") is None else float(meta["prev_tail"])
        self._truncate_in_place()


class HETLoRA(Algorithm):
    name = "hetlora"
    client_class = HETLoRAClient

    def __init__(self, cfg: AlgorithmConfig, adapters: AdapterConfig) -> None:
        super().__init__(cfg, adapters)
        lo = (
            cfg.hetlora_min_rank
            if cfg.hetlora_min_rank is not None
            else adapters.shared_rank - adapters.private_rank
        )
        hi = (
            cfg.hetlora_max_rank
            if cfg.hetlora_max_rank is not None
            else adapters.shared_rank + adapters.private_rank
        )
        if not 1 <= lo <= hi:
            raise ConfigError(f"hetlora ranks [{lo}, {hi}]: need 1 <= min <= max")
        self.rank_range = (lo, hi)
        self.rank_seed = 0

    def model_adapters(self) -> AdapterConfig:
        return dataclasses.replace(
            self.base_adapters, shared_rank=self.rank_range[1], private_rank=0, head="shared"
        )

    def weight_key(self, name: str) -> str:
        return hetlora_weight_key(name)
