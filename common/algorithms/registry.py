"""Algorithm registry: names as used in configs and on the command line."""

from __future__ import annotations

from pf2lora.common.algorithms.base import Algorithm, AlgorithmConfig
from pf2lora.common.algorithms.fedsa import FedSALoRA
from pf2lora.common.algorithms.hetlora import HETLoRA
from pf2lora.common.algorithms.homlora import HOMLoRA
from pf2lora.common.algorithms.local import LocalOnly
from pf2lora.common.algorithms.perfedavg import PerFedAvg
from pf2lora.common.algorithms.pf2lora import PF2LoRA
from pf2lora.common.errors import ConfigError
from pf2lora.common.learning.config import AdapterConfig

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (PF2LoRA, HOMLoRA, HETLoRA, PerFedAvg, LocalOnly, FedSALoRA)
}


def make_algorithm(cfg: AlgorithmConfig, adapters: AdapterConfig) -> Algorithm:
    try:
        cls = ALGORITHMS[cfg.name]
    except KeyError:
        raise ConfigError(f"algorithm={cfg.name!r}: use one of {sorted(ALGORITHMS)}") from None
    return cls(cfg, adapters)
