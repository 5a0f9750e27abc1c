"""One silo's local machinery, shared by the silo daemon and the in-process simulation."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pf2lora.common.algorithms.base import Algorithm, ClientAlgorithm
from pf2lora.common.data.dataset import column_values
from pf2lora.common.errors import DataError
from pf2lora.common.learning.base_model import base_model_skeleton
from pf2lora.common.learning.batching import BatchSource, EncodedData, derive_seed, encode_texts
from pf2lora.common.learning.config import ModelConfig
from pf2lora.common.learning.conversations import encode_conversations
from pf2lora.common.learning.distributed import SINGLE, Group, ShardedSource
from pf2lora.common.learning.model import SHARED, TwoLevelModel, build_two_level_model
from pf2lora.common.privacy import accountant

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundResult:
    """What one local round produces: the payload to send and scalar metrics to report."""

    payload: dict[str, Tensor]
    metrics: dict[str, float]


def client_seed(run_seed: int, client_index: int) -> int:
    """The seed a simulated client uses; a silo daemon takes the same value from its config."""
    return derive_seed(run_seed, "client", client_index)


def encode_dataset(ds: Any, tokenizer: Any, cfg: ModelConfig, where: str = "") -> EncodedData:
    """A `datasets.Dataset` -> EncodedData for the model's task: instruction data (a
    `messages` column) with answer-only labels, else text/label columns."""
    if "messages" in ds.column_names:
        if cfg.task != "causal-lm":
            raise DataError(
                f"{where or 'data'}: instruction data (messages, or prompt and completion) "
                f"needs task causal-lm, not {cfg.task!r}"
            )
        return encode_conversations(
            column_values(ds, "messages"), tokenizer, cfg.max_length, where=where
        )
    labels = list(ds["label"]) if cfg.task == "seq-cls" else None
    return encode_texts(list(ds["text"]), labels, tokenizer, cfg.max_length, cfg.task)


def initial_global_state(
    algorithm: Algorithm, model_cfg: ModelConfig, run_seed: int, base: nn.Module | None = None
) -> dict[str, Tensor]:
    """The round-0 shared state, drawn from the run's seed (the coordinator sends it to all).

    Without `base`, a model with a path is built from its config.json alone on the meta device
    (`base_model_skeleton`): the state depends only on the shapes and the seed, so the weights
    are never loaded (the coordinator's memory does not grow with the base model).
    """
    if not algorithm.communicates:
        return {}
    cfg = dataclasses.replace(model_cfg, adapters=algorithm.model_adapters())
    seed = derive_seed(run_seed, "shared")
    if base is None and cfg.path:
        base = base_model_skeleton(cfg)
        model = build_two_level_model(cfg, shared_seed=seed, base=base)
        model.materialize_adapter(SHARED, seed)
    else:
        model = build_two_level_model(cfg, shared_seed=seed, base=base)
    return {k: v for k, v in model.shared_state().items() if algorithm.communicated(k)}


class ClientRuntime:
    """Model + algorithm client + data of one silo. Rounds are deterministic given the seed."""

    def __init__(
        self,
        algorithm: Algorithm,
        model_cfg: ModelConfig,
        *,
        client_index: int,
        seed: int,
        train: EncodedData,
        test: EncodedData,
        base: nn.Module | None = None,
        name: str | None = None,
        device: torch.device | str = "cpu",
        group: Group = SINGLE,
    ) -> None:
        self.algorithm = algorithm
        self.model_cfg = model_cfg
        self.name = name or f"client-{client_index}"
        self.seed = seed
        adapters = algorithm.model_adapters()
        cfg = dataclasses.replace(model_cfg, adapters=adapters)
        self.model: TwoLevelModel = build_two_level_model(
            cfg, shared_seed=0, private_seed=derive_seed(seed, "private"), base=base
        )
        if model_cfg.quantize != "none" or model_cfg.device_map != "none":
            if group.world > 1:
                raise DataError(
                    "model.quantize/device_map with several processes per silo: each process "
                    "would place the whole base model on every GPU; run one process"
                )
            # placed by from_pretrained (on its GPUs): batches go where the inputs are embedded
            self.device = self.model.peft.get_input_embeddings().weight.device
        else:
            self.device = torch.device(device)
            self.model.to(self.device)  # before the client builds its optimizer
        self.client: ClientAlgorithm = algorithm.make_client(self.model, client_index, seed)
        self.train = train
        self.test = test
        dp_sgd = algorithm.cfg.train.dp_sgd_clip is not None
        self.full_source = BatchSource(
            train,
            algorithm.cfg.train.batch_size,
            derive_seed(seed, "batches"),
            self.device,
            poisson=dp_sgd,  # DP-SGD's accounting assumes Poisson sampling
        )
        self.group = group
        self.source: BatchSource = self.full_source
        if group.world > 1 and dp_sgd:
            raise DataError(
                "DP-SGD (train.dp_sgd_clip) runs in one process per silo, not under torchrun"
            )
        if group.world > 1:  # this rank trains on its shard of every batch (distributed.py)
            if self.full_source.batch_size < group.world:
                raise DataError(
                    f"batch_size {self.full_source.batch_size} is smaller than the silo's "
                    f"{group.world} processes: every process needs a share of each batch"
                )
            self.source = ShardedSource(self.full_source, group)
            self.client.trainer.distribute(group)

    @property
    def num_samples(self) -> int:
        return len(self.train)

    def run_round(self, global_state: Mapping[str, Tensor], weight: float) -> RoundResult:
        """Install the global state, train locally, and build the weighted payload."""
        self.client.receive_global(global_state)
        metrics = self.client.local_round(self.source)
        t0 = time.perf_counter()
        payload = self.client.payload(weight) if self.algorithm.communicates else {}
        metrics["payload_seconds"] = time.perf_counter() - t0
        metrics.update(self.client.dp_metrics)
        train = self.algorithm.cfg.train
        if train.dp_sgd_clip is not None:  # record-level: stays with the silo's metrics
            metrics["dp_sgd_epsilon"] = accountant.epsilon(
                train.dp_sgd_noise_multiplier,
                self.client.trainer.dp_sgd_queries(),
                train.dp_sgd_delta,
                sample_rate=self.full_source.sample_rate,
            )
        return RoundResult(payload, metrics)

    def evaluate(self, global_state: Mapping[str, Tensor]) -> dict[str, float]:
        """Metrics of the personalised (and shared-only) model under the given global state."""
        self.client.receive_global(global_state)
        return self.client.evaluate(
            self.test,
            self.full_source,  # one process evaluates (Per-FedAvg adapts on whole batches)
            generate=self.model_cfg.generate_examples,
            max_new_tokens=self.model_cfg.max_new_tokens,
        )
