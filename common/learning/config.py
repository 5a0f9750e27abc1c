"""Frozen, validated configuration of the two-level model and of local training."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

from pf2lora.common.errors import ConfigError

TaskType = Literal["seq-cls", "causal-lm", "regression"]
HeadPlacement = Literal["shared", "private"]
Hypergrad = Literal["unroll", "implicit", "first-order", "joint"]

TASK_TYPES: tuple[str, ...] = get_args(TaskType)
HYPERGRADS: tuple[str, ...] = get_args(Hypergrad)


def _check(cond: bool, name: str, value: object, why: str) -> None:
    if not cond:
        raise ConfigError(f"{name}={value!r}: {why}")


def check_int(name: str, value: object, lo: int, hi: int) -> None:
    """ConfigError unless value is an integer in [lo, hi] (bounds keep it inside what the wire,
    the clock and the machine can carry)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
    _check(ok, name, value, f"must be an integer in [{lo}, {hi}]")


def check_number(name: str, value: object, lo: float, hi: float, *, low_open: bool = True) -> None:
    """ConfigError unless value is a finite number in (lo, hi] ([lo, hi] with low_open=False)."""
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > lo if low_open else value >= lo)
        and value <= hi
    )
    _check(ok, name, value, f"must be a number in {'(' if low_open else '['}{lo:g}, {hi:g}]")


MAX_RANK = 4096
DTYPES = ("float32", "bfloat16", "float16", "auto")
QUANTIZE = ("none", "4bit", "8bit")  # bitsandbytes, on CUDA
DEVICE_MAPS = ("none", "auto")  # "auto": accelerate spreads the frozen base over the GPUs
# Model names that load the packaged models (learning/base_model.py) rather than a folder.
PACKAGED_MODELS = ("minilm", "smollm2")
MAX_SCALE = 1e6
MAX_LR = 1e3


@dataclass(frozen=True)
class AdapterConfig:
    """The two LoRA adapters: shared (rank r) and private (rank r_hat), both active."""

    shared_rank: int = 8
    private_rank: int = 2  # r/4, the paper's default; r/2 is the other setting it mentions
    alpha: float = 16.0  # the shared branch's scaling is alpha / r
    # The private branch's scaling is private_alpha / r_hat; None: the same alpha as the shared
    # branch (so alpha / r_hat, r / r_hat = 4x the shared branch's scaling at r = 8, r_hat = 2).
    private_alpha: float | None = None
    target_modules: tuple[str, ...] | None = None  # None: attention q and v for the architecture
    head: HeadPlacement = "shared"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_int("shared_rank", self.shared_rank, 0, MAX_RANK)
        check_int("private_rank", self.private_rank, 0, MAX_RANK)
        _check(
            self.shared_rank + self.private_rank > 0,
            "shared_rank+private_rank",
            self.shared_rank + self.private_rank,
            "at least one adapter must have a positive rank",
        )
        check_number("alpha", self.alpha, 0, MAX_SCALE)
        if self.private_alpha is not None:
            check_number("private_alpha", self.private_alpha, 0, MAX_SCALE)
        _check(self.head in ("shared", "private"), "head", self.head, "use 'shared' or 'private'")
        _check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
            _check(len(self.target_modules) > 0, "target_modules", self.target_modules, "empty")


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to wrap and for which task."""

    path: str = "minilm"  # a local HF folder, or "minilm" / "smollm2" for the packaged models
    # The model's name in a run: silos map it to their own folder ([model.paths] in silo.toml).
    # "" at run start: the packaged name or the folder's name.
    id: str = ""
    # `file=digest` of config.json, the tokenizer files and the weights files (learning/
    # fingerprint.py), filled in when a run starts; a silo whose folder differs refuses the run.
    fingerprint: tuple[str, ...] = ()
    task: TaskType = "seq-cls"
    num_labels: int = 2
    num_hidden_layers: int | None = None  # truncate the encoder (tests, quick runs)
    max_length: int = 64
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    # Instruction data (causal-lm): greedy answers to this many held-out prompts are scored by
    # exact match and ROUGE-L at each evaluation (0: answer loss and perplexity only).
    generate_examples: int = 32
    max_new_tokens: int = 32
    # Precision of the frozen base weights; the adapters (and a trained head) stay float32, so
    # the shared adapter on the wire is float32 whatever this is. "auto": bfloat16 where a CUDA
    # GPU that supports it is visible, else float32. float16 is for GPUs.
    dtype: str = "float32"
    # Frozen base weights quantized by bitsandbytes (CUDA only; the adapters stay float32).
    # Only estimators that do not differentiate twice through the base run on them
    # (common/algorithms/compat.py).
    quantize: str = "none"
    # "auto": shard the frozen base over the silo's GPUs (accelerate's device_map), for a model
    # larger than one GPU; one process per silo then (not under torchrun).
    device_map: str = "none"
    # Recompute the base model's activations in the backward pass instead of keeping them
    # (less memory, more time); only for estimators that do not substitute parameters
    # (common/algorithms/compat.py).
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        _check(self.task in TASK_TYPES, "task", self.task, f"use one of {TASK_TYPES}")
        _check(self.dtype in DTYPES, "dtype", self.dtype, f"use one of {DTYPES}")
        _check(self.quantize in QUANTIZE, "quantize", self.quantize, f"use one of {QUANTIZE}")
        _check(
            self.device_map in DEVICE_MAPS,
            "device_map",
            self.device_map,
            f"use one of {DEVICE_MAPS}",
        )
        _check(
            isinstance(self.gradient_checkpointing, bool),
            "gradient_checkpointing",
            self.gradient_checkpointing,
            "must be true or false",
        )
        if self.quantize != "none" or self.device_map != "none":
            _check(
                bool(self.path) and self.task in ("seq-cls", "causal-lm"),
                "quantize/device_map",
                (self.quantize, self.device_map),
                "need a Hugging Face model (a path and task seq-cls or causal-lm)",
            )
        check_int("num_labels", self.num_labels, 1, 1_000_000)
        check_int("max_length", self.max_length, 4, 1 << 20)
        check_int("generate_examples", self.generate_examples, 0, 1_000_000)
        check_int("max_new_tokens", self.max_new_tokens, 1, 1 << 16)
        if self.num_hidden_layers is not None:
            check_int("num_hidden_layers", self.num_hidden_layers, 1, 4096)
        _check(isinstance(self.path, str), "path", self.path, "must be a string")
        _check(isinstance(self.id, str) and len(self.id) <= 256, "id", self.id, "a short string")
        object.__setattr__(self, "fingerprint", tuple(self.fingerprint))
        _check(
            all(isinstance(x, str) and "=" in x for x in self.fingerprint),
            "fingerprint",
            self.fingerprint,
            "must be a list of 'file=digest' strings",
        )


@dataclass(frozen=True)
class TrainConfig:
    """Local training on one silo for one round (docs/algorithm.md §2)."""

    local_steps: int = 10
    batch_size: int = 16
    # The rates and ll_steps below are what validation selected (docs/algorithm.md, "Defaults"):
    # ll_lr 0.1, ul_lr 1e-2 and ll_steps 3 in the personalisation benchmark (TREC, label-sorted
    # silos, 300 local steps); ul_lr 1e-2 in the accuracy benchmark too, where 3e-3
    # stayed at the majority class. A task or data source may bring its own (task_defaults.py,
    # data/sources.py).
    ll_lr: float = 0.1  # beta: SGD step size of the lower level (private adapter)
    ul_lr: float = 1e-2  # eta: AdamW learning rate of the upper level (shared adapter)
    weight_decay: float = 0.0
    hypergrad: Hypergrad = "unroll"
    # Lower-level SGD steps per upper-level step: ll_steps - 1 plain steps on their own batches,
    # then the one the hypergradient differentiates through (a truncated unroll).
    ll_steps: int = 3
    neumann_terms: int = 3
    neumann_scale: float = 0.01
    reset_ul_optimizer: bool = False  # the UL AdamW state stays on the silo between rounds
    max_grad_norm: float | None = 1.0  # clip the UL gradient; None, 0 or false: no clipping
    # Clip the LL (private adapter) gradient before its SGD step; the unrolled hypergradient
    # differentiates through the clip. None (default), 0 or false: no clipping.
    ll_max_grad_norm: float | None = None
    progress: bool = False  # a progress bar over local steps
    # Record-level DP-SGD on the silo (learning/per_example.py): each example's gradient clipped
    # to this L2 norm, N(0, (dp_sgd_noise_multiplier * clip)^2) added to their sum, batches drawn
    # by Poisson sampling (rate batch_size / examples). None: off.
    dp_sgd_clip: float | None = None
    dp_sgd_noise_multiplier: float = 1.0
    dp_sgd_delta: float = 1e-5  # the record-level epsilon is reported at this delta

    def __post_init__(self) -> None:
        check_int("local_steps", self.local_steps, 1, 1_000_000)
        check_int("batch_size", self.batch_size, 1, 1 << 20)
        for name in ("ll_lr", "ul_lr", "neumann_scale"):
            check_number(name, getattr(self, name), 0, MAX_LR)
        check_number("weight_decay", self.weight_decay, 0, MAX_LR, low_open=False)
        _check(
            self.hypergrad in HYPERGRADS, "hypergrad", self.hypergrad, f"use one of {HYPERGRADS}"
        )
        check_int("neumann_terms", self.neumann_terms, 0, 100)
        check_int("ll_steps", self.ll_steps, 1, 16)
        if self.dp_sgd_clip is not None:
            check_number("dp_sgd_clip", self.dp_sgd_clip, 0, 1e6)
        check_number("dp_sgd_noise_multiplier", self.dp_sgd_noise_multiplier, 0, 1e3)
        check_number("dp_sgd_delta", self.dp_sgd_delta, 0, 1)
        _check(self.dp_sgd_delta < 1, "dp_sgd_delta", self.dp_sgd_delta, "must be below 1")
        for name in ("max_grad_norm", "ll_max_grad_norm"):
            v = getattr(self, name)
            if v is not None and not v:
                object.__setattr__(self, name, None)  # TOML has no null: 0/false = off
            elif v is not None:
                check_number(name, v, 0, 1e9)


T = TypeVar("T")


def from_mapping(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build a (nested) config dataclass from a mapping, refusing unknown keys by name."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in {where or cls.__name__}; known: {sorted(fields)}"
        )
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        f = fields[key]
        ftype = f.type if not isinstance(f.type, str) else _resolve(cls, f.name)
        if dataclasses.is_dataclass(ftype) and isinstance(value, Mapping):
            value = from_mapping(ftype, value, f"{where}.{key}" if where else key)  # type: ignore[arg-type]
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def _resolve(cls: type, name: str) -> Any:
    import typing

    hints = typing.get_type_hints(cls)
    return hints[name]
