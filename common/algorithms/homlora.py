"""HOMLoRA: one LoRA of rank r on every silo, AdamW locally, FedAvg of A and B."""

from __future__ import annotations

import dataclasses

from pf2lora.common.algorithms.base import Algorithm, ClientAlgorithm
from pf2lora.common.learning.config import AdapterConfig


class HOMLoRA(Algorithm):
    name = "homlora"
    client_class = ClientAlgorithm  # plain AdamW on the shared adapter

    def model_adapters(self) -> AdapterConfig:
        return dataclasses.replace(self.base_adapters, private_rank=0, head="shared")
