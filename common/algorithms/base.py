"""The algorithm interface: a client side (local round, payload) and a pure server side (aggregate).

The coordinator, the silo daemon and the in-process simulation all call exactly these
methods, so an algorithm behaves the same in every deployment. A new algorithm subclasses
`Algorithm` (server side, registered in registry.py) and `ClientAlgorithm` (silo side) and
overrides only the hooks listed on each class; everything else is shared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from torch import Tensor

from pf2lora.common.algorithms.aggregate import (
    global_weight_key,
    is_weight_key,
    mean_from_sum,
    payload_spec,
    weighted_payload,
)
from pf2lora.common.algorithms.dp import check_supported, private_aggregate, private_payload
from pf2lora.common.errors import ConfigError
from pf2lora.common.learning.batching import BatchSource, EncodedData
from pf2lora.common.learning.config import (
    MAX_LR,
    MAX_RANK,
    AdapterConfig,
    TrainConfig,
    check_int,
    check_number,
)
from pf2lora.common.learning.evaluation import evaluate
from pf2lora.common.learning.model import TwoLevelModel
from pf2lora.common.learning.trainer import BilevelTrainer, Objective
from pf2lora.common.privacy.config import DPConfig

logger = logging.getLogger(__name__)

Weighting = Literal["samples", "equal"]
# State tensors of shared-adapter parts an algorithm keeps on the silo (Algorithm.communicated).
KEPT_PREFIX = "kept/"


@dataclass(frozen=True)
class AlgorithmConfig:
    """Which algorithm and its hyperparameters; the run's single source of truth."""

    name: str = "pf2lora"
    train: TrainConfig = field(default_factory=TrainConfig)
    weighting: Weighting = "samples"  # p_k: sample counts (default) or equal
    hetlora_min_rank: int | None = None  # default r - r_hat
    hetlora_max_rank: int | None = None  # default r + r_hat
    hetlora_gamma: float = 0.99
    hetlora_lambda: float = 1e-3
    perfedavg_alpha: float = 0.05  # inner SGD step of the MAML objective and of personalisation
    perfedavg_personalize_steps: int = 1
    # Silo-level differential privacy of the shared updates (`[algorithm.dp]`, algorithms/dp.py)
    dp: DPConfig = field(default_factory=DPConfig)

    def __post_init__(self) -> None:
        if self.weighting not in ("samples", "equal"):
            raise ConfigError(f"weighting={self.weighting!r}: use 'samples' or 'equal'")
        check_number("hetlora_gamma", self.hetlora_gamma, 0, 1)
        if self.hetlora_gamma == 1:
            raise ConfigError("hetlora_gamma=1: must be in (0, 1)")
        check_number("hetlora_lambda", self.hetlora_lambda, 0, MAX_LR, low_open=False)
        check_number("perfedavg_alpha", self.perfedavg_alpha, 0, MAX_LR)
        check_int("perfedavg_personalize_steps", self.perfedavg_personalize_steps, 0, 1000)
        for name in ("hetlora_min_rank", "hetlora_max_rank"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1, MAX_RANK)
        check_supported(self.name, self.dp, self.train)

    def replace(self, **changes: Any) -> AlgorithmConfig:
        return dataclasses.replace(self, **changes)


class ClientAlgorithm:
    """One silo's side of an algorithm: owns the model's private state and the local trainer.

    Hooks a subclass may override (each has a working default):
      objective          the trainer's objective ("plain", "bilevel" or "maml")
      make_trainer       build the local trainer (extra loss terms, gradient masks, options)
      receive_global     install the coordinator's shared state (e.g. truncate to a rank)
      local_round        train for one round (e.g. prune after training)
      make_payload       the weighted payload from the shared state (e.g. per-module weights;
                         only the tensors Algorithm.communicated names reach it)
      personalised       the model as the silo uses it at evaluation (e.g. adapt it first)
      extra_state, load_extra_state   algorithm state kept beside the trainer's
    Not hooks: `payload` (it reads the shared state only: the privacy invariant), `evaluate`,
    `state` and `restore` (they keep the shared tensors that are not communicated, too).
    """

    objective: ClassVar[Objective] = "plain"

    def __init__(
        self, algorithm: Algorithm, model: TwoLevelModel, client_index: int, seed: int
    ) -> None:
        self.algorithm = algorithm
        self.model = model
        self.client_index = client_index
        self.trainer = self.make_trainer(seed)
        self.received: dict[str, Tensor] = {}  # the last global state installed (DP updates)
        self.dp_metrics: dict[str, float] = {}  # the last DP payload's (stay on the silo)

    def make_trainer(self, seed: int, **options: Any) -> BilevelTrainer:
        """The local trainer over `self.model` with this client's objective; an override passes
        its trainer options (extra loss, gradient mask, ...) up to this one."""
        return BilevelTrainer(
            self.model, self.algorithm.cfg.train, seed, objective=self.objective, **options
        )

    # -- round ---------------------------------------------------------------------
    def receive_global(self, global_state: Mapping[str, Tensor]) -> None:
        """Install the coordinator's shared state (the communicated part) into the local model."""
        if self.model.has_shared:
            keys = self.communicated_keys()
            self.model.load_shared_state(global_state, keys=keys)
            if self.algorithm.cfg.dp.enabled:  # a DP payload is the update from this state
                self.received = {k: global_state[k].detach().clone() for k in keys}

    def communicated_keys(self) -> set[str]:
        """The shared-state keys that travel (all of them unless the algorithm keeps some)."""
        return {k for k in self.model.shared_state_keys() if self.algorithm.communicated(k)}

    def local_round(self, source: BatchSource) -> dict[str, float]:
        return self.trainer.train_round(source)

    def payload(self, weight: float) -> dict[str, Tensor]:
        """The update to send: built from the shared state ONLY (never the private adapter),
        and of that only what the algorithm communicates."""
        shared = self.model.shared_state()
        sent = {k: shared[k] for k in self.communicated_keys()}
        dp = self.algorithm.cfg.dp
        if dp.enabled:  # clipped, noised update with weight 1 (algorithms/dp.py)
            payload, self.dp_metrics = private_payload(sent, self.received, dp)
            return payload
        return self.make_payload(sent, weight)

    def make_payload(self, shared: Mapping[str, Tensor], weight: float) -> dict[str, Tensor]:
        return weighted_payload(shared, weight, self.algorithm.weight_key)

    # -- evaluation ----------------------------------------------------------------
    @contextlib.contextmanager
    def personalised(self, source: BatchSource | None) -> Iterator[TwoLevelModel]:
        """The model as this silo would use it (Per-FedAvg adapts it first)."""
        yield self.model

    def evaluate(
        self,
        test: EncodedData,
        source: BatchSource | None = None,
        *,
        generate: int = 0,
        max_new_tokens: int = 32,
    ) -> dict[str, float]:
        """Personalised and shared-only metrics on the silo's held-out split (with generate > 0,
        also greedy answers to that many held-out prompts, on instruction data)."""
        out: dict[str, float] = {}
        gen: dict[str, int] = {"generate": generate, "max_new_tokens": max_new_tokens}
        with self.personalised(source) as model:
            for k, v in evaluate(model, test, **gen).items():
                out[f"personal_{k}"] = v
        if self.algorithm.communicates and self.model.has_shared:
            with self.model.private_disabled():
                for k, v in evaluate(self.model, test, **gen).items():
                    out[f"shared_{k}"] = v
        if "answer_start" in test.tensors:  # the base model before any training, for reference
            with self.model.peft.disable_adapter():
                out["base_answer_loss"] = evaluate(self.model, test)["answer_loss"]
        return out

    # -- durable state -------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, meta: Mapping[str, Any]) -> None:
        return None

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Everything this client keeps between rounds: the trainer's state (private adapter,
        optimizer, counters) and, in its metadata, the algorithm and its extra state."""
        tensors, meta = self.trainer.state_tensors()
        sent = self.communicated_keys()
        kept = {k: v for k, v in self.model.shared_state().items() if k not in sent}
        tensors.update({KEPT_PREFIX + k: v for k, v in kept.items()})
        return tensors, {**meta, "algorithm": self.algorithm.name, "extra": self.extra_state()}

    def restore(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Take back what `state` gave (from a file the caller read and names in errors)."""
        if meta.get("algorithm") != self.algorithm.name:
            raise ConfigError(
                f"the state belongs to algorithm {meta.get('algorithm')!r}, "
                f"not {self.algorithm.name!r}"
            )
        self.trainer.load_state_tensors(tensors, meta)
        kept_keys = self.model.shared_state_keys() - self.communicated_keys()
        if kept_keys:
            n = len(KEPT_PREFIX)
            kept = {k[n:]: v for k, v in tensors.items() if k.startswith(KEPT_PREFIX)}
            self.model.load_shared_state(kept, keys=kept_keys)
        self.load_extra_state(meta.get("extra", {}))


class Algorithm:
    """Server side and metadata of one federated algorithm. Aggregation is pure.

    Class attributes: `name` (registry key), `communicates` (False: nothing is sent),
    `client_class` (the ClientAlgorithm subclass). Hooks a subclass may override:
      model_adapters     the adapter layout its clients train (ranks, head placement)
      communicated       whether a shared-state tensor travels (False: it stays on the silo,
                         kept with the private state; FedSA-LoRA keeps B)
      weight_key         which weight key each payload tensor is averaged by
      aggregate          the new global state from the SUM of payloads (pure; default: the
                         weighted mean per weight key, see aggregate.py)
    """

    name: ClassVar[str] = ""
    communicates: ClassVar[bool] = True
    client_class: ClassVar[type[ClientAlgorithm]] = ClientAlgorithm

    def __init__(self, cfg: AlgorithmConfig, adapters: AdapterConfig) -> None:
        self.cfg = cfg
        self.base_adapters = adapters

    def model_adapters(self) -> AdapterConfig:
        """The adapter layout this algorithm trains (ranks, head placement)."""
        return self.base_adapters

    def communicated(self, key: str) -> bool:
        """Whether the shared-state tensor `key` (PEFT's name) is sent and averaged."""
        return True

    def weight_key(self, name: str) -> str:
        return global_weight_key(name)

    def payload_spec(
        self, global_spec: Mapping[str, tuple[tuple[int, ...], Any]]
    ) -> dict[str, Any]:
        if not self.communicates:
            return {}
        return payload_spec(global_spec, self.weight_key)

    def aggregate(
        self, summed: Mapping[str, Tensor], previous: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """The new global shared state from the SUM of payloads (pure)."""
        if not self.communicates:
            return {k: v.clone() for k, v in previous.items()}
        if self.cfg.dp.enabled:
            return private_aggregate(summed, previous, self.cfg.dp)
        return mean_from_sum(summed, previous, self.weight_key)

    def make_client(self, model: TwoLevelModel, client_index: int, seed: int) -> ClientAlgorithm:
        return self.client_class(self, model, client_index, seed)

    def communicated_parameters(self, payload: Mapping[str, Tensor]) -> int:
        return sum(int(v.numel()) for k, v in payload.items() if not is_weight_key(k))
