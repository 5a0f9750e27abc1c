"""PF2LoRA: shared LoRA (rank r) averaged by the server, private LoRA (rank r_hat) per silo,
bilevel.
"""

from __future__ import annotations

from typing import ClassVar

from pf2lora.common.algorithms.base import Algorithm, ClientAlgorithm
from pf2lora.common.learning.trainer import Objective


class PF2LoRAClient(ClientAlgorithm):
    objective: ClassVar[Objective] = "bilevel"


class PF2LoRA(Algorithm):
    """Two-level LoRA; `train.hypergrad` picks the estimator (`joint`: the no-bilevel ablation)."""

    name = "pf2lora"
    client_class = PF2LoRAClient
