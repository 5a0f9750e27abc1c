"""Local-only LoRA: each silo trains its own LoRA of rank r + r_hat and never communicates."""

from __future__ import annotations

import dataclasses

from pf2lora.common.algorithms.base import Algorithm, ClientAlgorithm
from pf2lora.common.learning.config import AdapterConfig


class LocalOnly(Algorithm):
    """The "is federation worth it" reference: the same parameter budget as PF2LoRA."""

    name = "local"
    communicates = False
    client_class = ClientAlgorithm

    def model_adapters(self) -> AdapterConfig:
        a = self.base_adapters
        return dataclasses.replace(
            a, shared_rank=0, private_rank=a.shared_rank + a.private_rank, head="private"
        )
