"""Per-FedAvg-LoRA: the MAML objective on the shared LoRA (Hessian-free), personalised at test."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any, ClassVar

import torch

from pf2lora.common.algorithms.base import Algorithm, ClientAlgorithm
from pf2lora.common.learning.batching import STREAM_AUX, BatchSource, derive_seed
from pf2lora.common.learning.config import AdapterConfig
from pf2lora.common.learning.hypergrad import grad_named
from pf2lora.common.learning.model import TwoLevelModel
from pf2lora.common.learning.trainer import BilevelTrainer, Objective

# Personalisation batches use step indices below zero: never drawn by training.
_PERSONALISE_STEP = -1


class PerFedAvgClient(ClientAlgorithm):
    objective: ClassVar[Objective] = "maml"

    def make_trainer(self, seed: int, **options: Any) -> BilevelTrainer:
        return super().make_trainer(seed, maml_alpha=self.algorithm.cfg.perfedavg_alpha, **options)

    @contextlib.contextmanager
    def personalised(self, source: BatchSource | None) -> Iterator[TwoLevelModel]:
        """Take `perfedavg_personalize_steps` SGD steps of size alpha, evaluate, restore."""
        steps = self.algorithm.cfg.perfedavg_personalize_steps
        if source is None or steps == 0:
            yield self.model
            return
        params = self.model.shared_parameters()
        saved = {n: p.detach().clone() for n, p in params.items()}
        alpha = self.algorithm.cfg.perfedavg_alpha
        try:
            self.model.train()
            for i in range(steps):
                torch.manual_seed(derive_seed(source.seed, _PERSONALISE_STEP - i, "dropout"))
                batch = source.batch(_PERSONALISE_STEP - i, STREAM_AUX)
                grads = grad_named(self.model.loss(batch), dict(params))
                with torch.no_grad():
                    for n, p in params.items():
                        p.sub_(alpha * grads[n])
            yield self.model
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])


class PerFedAvg(Algorithm):
    name = "perfedavg"
    client_class = PerFedAvgClient

    def model_adapters(self) -> AdapterConfig:
        return dataclasses.replace(self.base_adapters, private_rank=0, head="shared")
