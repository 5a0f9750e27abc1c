"""FedSA-LoRA (ICLR 2025): A matrices shared and averaged, B matrices kept on the silo."""

from __future__ import annotations

import dataclasses

from pf2lora.common.algorithms.base import Algorithm, ClientAlgorithm
from pf2lora.common.learning.config import AdapterConfig


class FedSALoRA(Algorithm):
    """One LoRA of rank r per silo, AdamW locally; only A (and a shared head) is averaged.

    A learns what the silos share and B what is theirs, so B never leaves the silo: it is kept
    with the private state between rounds. `adapters.head = "private"` keeps the classifier
    head on the silo too (it stays in the LoRA's module list, it is just not sent).
    """

    name = "fedsa"
    client_class = ClientAlgorithm  # plain AdamW on the one adapter

    def model_adapters(self) -> AdapterConfig:
        return dataclasses.replace(self.base_adapters, private_rank=0, head="shared")

    def communicated(self, key: str) -> bool:
        if ".lora_B." in key:
            return False
        if ".lora_A." in key:
            return True
        return self.base_adapters.head == "shared"  # the classifier head
