"""In-process federation: N clients, one algorithm, rounds of local training, pure aggregation."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pf2lora.common.algorithms.aggregate import client_weights, sum_payloads
from pf2lora.common.algorithms.base import Algorithm, AlgorithmConfig
from pf2lora.common.algorithms.compat import check_model_support
from pf2lora.common.algorithms.registry import make_algorithm
from pf2lora.common.client_runtime import (
    ClientRuntime,
    client_seed,
    encode_dataset,
    initial_global_state,
)
from pf2lora.common.data.sources import DEFAULT_SOURCE
from pf2lora.common.errors import ConfigError
from pf2lora.common.learning.base_model import load_base_model, load_tokenizer
from pf2lora.common.learning.batching import EncodedData, resolve_device
from pf2lora.common.learning.config import ModelConfig
from pf2lora.common.privacy import accountant

logger = logging.getLogger(__name__)

SOURCES = ("vader", "rotten-tomatoes", "trec", "synthetic-rank", "files", "instructions")


# Per-client metrics averaged over the clients after each evaluation (those every client has).
SUMMARY_METRICS = ("accuracy", "mse", "answer_loss", "perplexity", "exact_match", "rouge_l")
SUMMARY_KEYS = (
    *(f"{level}_{m}" for m in SUMMARY_METRICS for level in ("personal", "shared")),
    "base_answer_loss",
)


@dataclass(frozen=True)
class DataConfig:
    """Where each simulated client's data comes from and how it is split."""

    source: str = DEFAULT_SOURCE
    partition: str = "natural"
    num_clients: int = 4
    similarity: float = 0.0
    dirichlet_alpha: float = 0.5
    test_fraction: float = 0.2
    # Choose hyperparameters without the test split: hold out this stratified fraction of each
    # client's training data and evaluate on it instead (the test split is not used at all).
    validation_fraction: float | None = None
    max_train_per_client: int | None = 200
    max_test_per_client: int | None = 200
    domains: tuple[str, ...] | None = None
    train_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()
    text_column: str = "text"
    label_column: str = "label"
    # synthetic-rank (docs/algorithm.md §6)
    synthetic_dim: int = 64
    synthetic_true_ranks: tuple[int, ...] = (6, 7, 8, 9, 10)
    synthetic_noise_std: float = 0.0
    synthetic_train_samples: int = 2000
    synthetic_test_samples: int = 500

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"data.source={self.source!r}: use one of {SOURCES}")
        if self.num_clients < 1:
            raise ConfigError(f"data.num_clients={self.num_clients!r}: must be >= 1")
        if self.source == "files" and not self.train_files:
            raise ConfigError("data.source='files' needs data.train_files (one file per client)")
        if self.domains is not None:
            object.__setattr__(self, "domains", tuple(self.domains))
        if self.validation_fraction is not None and not 0.0 < self.validation_fraction < 1.0:
            raise ConfigError(
                f"data.validation_fraction={self.validation_fraction!r}: must be in (0, 1)"
            )


@dataclass(frozen=True)
class SimulationConfig:
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rounds: int = 3
    seed: int = 0
    eval_every: int = 1  # evaluate every k rounds (and always after the last)
    # Also evaluate the initial model before any training (recorded as round 0).
    evaluate_initial: bool = False
    device: str = "cpu"  # "auto" picks a CUDA GPU when torch sees one

    def __post_init__(self) -> None:
        check_model_support(self.algorithm, self.model)
        if self.rounds < 1:
            raise ConfigError(f"rounds={self.rounds!r}: must be >= 1")
        if self.eval_every < 1:
            raise ConfigError(f"eval_every={self.eval_every!r}: must be >= 1")


@dataclass
class ClientSpec:
    name: str
    train: EncodedData
    test: EncodedData
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SimulationResult:
    config: dict[str, Any]
    clients: list[dict[str, Any]]
    rounds: list[dict[str, Any]]
    final_global: dict[str, Tensor]
    parameters: dict[str, int]
    wall_seconds: float


class LinearMap(nn.Module):
    """y = W0 x: the plain torch module of the synthetic experiment (LoRA targets `linear`)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


def _prepare(cfg: SimulationConfig) -> tuple[ModelConfig, nn.Module, list[ClientSpec]]:
    d = cfg.data
    if d.source == "synthetic-rank":
        from pf2lora.common.data.synthetic import SyntheticRankConfig, make_synthetic_rank_problem

        syn = SyntheticRankConfig(
            num_clients=len(d.synthetic_true_ranks),
            dim=d.synthetic_dim,
            shared_rank=cfg.model.adapters.shared_rank,
            private_rank=cfg.model.adapters.private_rank,
            true_ranks=tuple(d.synthetic_true_ranks),
            noise_std=d.synthetic_noise_std,
            train_samples=d.synthetic_train_samples,
            test_samples=d.synthetic_test_samples,
            seed=cfg.seed,
        )
        problem = make_synthetic_rank_problem(syn)
        adapters = dataclasses.replace(cfg.model.adapters, target_modules=("linear",))
        model_cfg = dataclasses.replace(cfg.model, task="regression", adapters=adapters)
        clients = [
            ClientSpec(
                f"client-{k}",
                EncodedData({"x": c.x_train, "y": c.y_train}),
                EncodedData({"x": c.x_test, "y": c.y_test}),
                {"true_rank": c.true_rank},
            )
            for k, c in enumerate(problem.clients)
        ]
        return model_cfg, LinearMap(problem.base_weight), clients

    from pf2lora.common.data.splits import (
        build_client_data,
        client_data_from_files,
        instruction_client_data,
        instruction_data_from_files,
    )

    if d.source == "instructions":
        data = instruction_client_data(
            d.num_clients,
            cfg.seed,
            tasks=d.domains,
            train_per_client=d.max_train_per_client or 200,
            test_per_client=d.max_test_per_client or 100,
        )
    elif d.source == "files" and cfg.model.task == "causal-lm" and d.test_files:
        data = instruction_data_from_files(list(d.train_files), list(d.test_files))
    elif d.source == "files":
        data = client_data_from_files(
            list(d.train_files),
            list(d.test_files) or None,
            text_column=d.text_column,
            label_column=d.label_column,
        )
    else:
        data = build_client_data(
            d.source,
            d.partition,
            d.num_clients,
            cfg.seed,
            test_fraction=d.test_fraction,
            similarity=d.similarity,
            dirichlet_alpha=d.dirichlet_alpha,
            max_train_per_client=d.max_train_per_client,
            max_test_per_client=d.max_test_per_client,
            domains=d.domains,
        )
    num_labels = max(c.num_labels for c in data)
    model_cfg = dataclasses.replace(cfg.model, num_labels=num_labels)
    tok = load_tokenizer(model_cfg)
    clients = [
        ClientSpec(
            c.name,
            encode_dataset(c.train, tok, model_cfg, where=f"{c.name} train"),
            encode_dataset(c.test, tok, model_cfg, where=f"{c.name} held-out"),
        )
        for c in data
    ]
    return model_cfg, load_base_model(model_cfg), clients


def _validation_split(specs: list[ClientSpec], fraction: float, seed: int) -> list[ClientSpec]:
    """Each client's training data split (stratified by label) into train and validation; the
    validation part takes the place of the test split, which is dropped."""
    from pf2lora.common.data.partition import train_test_split_indices

    out = []
    for k, s in enumerate(specs):
        if "labels" not in s.train.tensors:
            raise ConfigError("data.validation_fraction needs labelled or instruction data")
        labels = s.train.tensors["labels"].numpy()
        if labels.ndim != 1:  # token labels (instruction data): one stratum
            labels = np.zeros(len(labels), dtype=np.int64)
        rng = np.random.default_rng([seed, 0xA1, k])
        tr, va = (torch.from_numpy(i) for i in train_test_split_indices(labels, fraction, rng))
        tok = s.train.tokenizer
        train = EncodedData({n: t[tr] for n, t in s.train.tensors.items()}, tok)
        val = EncodedData({n: t[va] for n, t in s.train.tensors.items()}, tok)
        out.append(ClientSpec(s.name, train, val, dict(s.extra)))
    return out


def run_simulation(
    cfg: SimulationConfig,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> SimulationResult:
    """Run the whole federation in this process; returns per-round and final per-client metrics."""
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model_cfg, base, specs = _prepare(cfg)
    if cfg.data.validation_fraction is not None:
        specs = _validation_split(specs, cfg.data.validation_fraction, cfg.seed)
    algorithm: Algorithm = make_algorithm(cfg.algorithm, model_cfg.adapters)
    global_state = initial_global_state(algorithm, model_cfg, cfg.seed, base=copy.deepcopy(base))
    runtimes = [
        ClientRuntime(
            algorithm,
            model_cfg,
            client_index=k,
            seed=client_seed(cfg.seed, k),
            train=s.train,
            test=s.test,
            base=copy.deepcopy(base),
            name=s.name,
            device=resolve_device(cfg.device),
        )
        for k, s in enumerate(specs)
    ]
    runtimes[0].model.log_trainable()
    weights = client_weights([r.num_samples for r in runtimes], cfg.algorithm.weighting)
    rounds: list[dict[str, Any]] = []
    last_eval: list[dict[str, float]] = [{} for _ in runtimes]
    communicated = 0
    if cfg.evaluate_initial:
        initial = [rt.evaluate(global_state) for rt in runtimes]
        record0: dict[str, Any] = {"round": 0, "eval": initial, "seconds": 0.0}
        record0.update(_summary(initial, [len(r.test) for r in runtimes]))
        rounds.append(record0)
        if on_round is not None:
            on_round(record0)
    dp = cfg.algorithm.dp
    for rnd in range(1, cfg.rounds + 1):
        if dp.enabled and dp.max_epsilon is not None:
            if accountant.epsilon(dp.noise_multiplier, rnd, dp.delta) > dp.max_epsilon:
                logger.warning(
                    "round %d would exceed dp.max_epsilon = %g: the run ends after round %d",
                    rnd,
                    dp.max_epsilon,
                    rnd - 1,
                )
                break
        t0 = time.perf_counter()
        results = [rt.run_round(global_state, w) for rt, w in zip(runtimes, weights, strict=True)]
        if algorithm.communicates:
            summed = sum_payloads(r.payload for r in results)
            global_state = algorithm.aggregate(summed, global_state)
            communicated = algorithm.communicated_parameters(results[0].payload)
        record: dict[str, Any] = {
            "round": rnd,
            "train_loss": [r.metrics["train_loss"] for r in results],
            "train_seconds": [r.metrics["train_seconds"] for r in results],
        }
        if dp.enabled:  # after this round's release (docs/security.md, differential privacy)
            record["epsilon"] = accountant.epsilon(dp.noise_multiplier, rnd, dp.delta)
            record["dp_update_norm"] = [r.metrics["dp_update_norm"] for r in results]
        if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
            last_eval = [rt.evaluate(global_state) for rt in runtimes]
            record["eval"] = last_eval
            record.update(_summary(last_eval, [len(r.test) for r in runtimes]))
        record["seconds"] = time.perf_counter() - t0
        rounds.append(record)
        if on_round is not None:
            on_round(record)
    clients = []
    for rt, spec, ev in zip(runtimes, specs, last_eval, strict=True):
        entry: dict[str, Any] = {
            "name": rt.name,
            "train_size": len(rt.train),
            "test_size": len(rt.test),
        }
        entry.update(ev)
        entry.update(spec.extra)
        if hasattr(rt.client, "rank"):
            entry["hetlora_rank"] = rt.client.rank
        clients.append(entry)
    counts = runtimes[0].model.parameter_counts()
    params = {
        "trainable_per_client": counts["shared"] + counts["private"],
        "shared": counts["shared"],
        "private": counts["private"],
        "communicated_per_client": communicated,
    }
    _attach_rank_analysis(clients, runtimes, cfg)
    return SimulationResult(
        config=_as_dict(cfg),
        clients=clients,
        rounds=rounds,
        final_global=global_state,
        parameters=params,
        wall_seconds=time.perf_counter() - t_start,
    )


def _attach_rank_analysis(
    clients: list[dict[str, Any]], runtimes: list[ClientRuntime], cfg: SimulationConfig
) -> None:
    """For the synthetic experiment: learned rank and spectrum of each client's update."""
    if cfg.data.source != "synthetic-rank":
        return
    from pf2lora.common.data.synthetic import learned_rank, singular_values

    for entry, rt in zip(clients, runtimes, strict=True):
        deltas = rt.model.delta_weights()
        (delta,) = deltas.values()
        entry["learned_rank"] = learned_rank(delta, 0.05)
        entry["learned_rank_tau_0.01"] = learned_rank(delta, 0.01)
        entry["singular_values"] = singular_values(delta)
        entry["test_mse"] = entry.get("personal_mse")


def _summary(evals: list[dict[str, float]], sizes: list[int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in SUMMARY_KEYS:
        vals = [e[key] for e in evals if key in e]
        if len(vals) == len(evals):
            out[f"mean_{key}"] = sum(vals) / len(vals)
            out[f"weighted_{key}"] = sum(v * n for v, n in zip(vals, sizes, strict=True)) / sum(
                sizes
            )
    return out


def _as_dict(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        return {f.name: _as_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return list(cfg)
    if isinstance(cfg, float) and not math.isfinite(cfg):
        return str(cfg)
    return cfg
