"""Encoded client data and deterministic minibatches: a batch depends on (seed, step, stream)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pf2lora.common.errors import DataError

logger = logging.getLogger(__name__)

# Independent minibatch streams of one local step (docs/algorithm.md §2).
STREAM_LL = 0  # xi: lower level (private adapter)
STREAM_UL = 1  # zeta: upper level (shared adapter)
STREAM_AUX = 2  # a third batch where an algorithm needs one (Per-FedAvg's Hessian batch)
STREAM_LL_EXTRA = 3  # extra lower-level steps (train.ll_steps > 1): streams 3, 4, ...


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any parts, stable across processes and platforms."""
    h = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class EncodedData:
    """Tensors of one split. Text tasks: input_ids/attention_mask/labels; regression: x/y.
    Instruction data also has answer_start/answer_end and keeps its tokenizer (to decode
    generated answers)."""

    tensors: Mapping[str, Tensor]
    tokenizer: Any = None

    def __post_init__(self) -> None:
        lengths = {k: v.shape[0] for k, v in self.tensors.items()}
        if len(set(lengths.values())) != 1:
            raise DataError(f"encoded tensors disagree in length: {lengths}")

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def select(self, index: Tensor) -> dict[str, Tensor]:
        out = {k: v[index] for k, v in self.tensors.items()}
        if "attention_mask" in out and len(index):
            # trim padding columns the whole batch does not use (speed; results unchanged)
            used = int(out["attention_mask"].sum(dim=1).max().item())
            for k in ("input_ids", "attention_mask"):
                out[k] = out[k][:, :used]
            if out.get("labels") is not None and out["labels"].dim() == 2:
                out["labels"] = out["labels"][:, :used]
        return out


def encode_texts(
    texts: Sequence[str],
    labels: Sequence[int] | None,
    tokenizer: Any,
    max_length: int,
    task: str,
) -> EncodedData:
    """Tokenize once, padded to the longest text (at most max_length)."""
    if len(texts) == 0:
        raise DataError("no examples to encode")
    enc = tokenizer(
        list(texts),
        truncation=True,
        max_length=max_length,
        padding="longest",
        return_tensors="pt",
    )
    tensors: dict[str, Tensor] = {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
    }
    if task == "seq-cls":
        if labels is None:
            raise DataError("sequence classification needs labels")
        tensors["labels"] = torch.as_tensor(list(labels), dtype=torch.long)
    elif task == "causal-lm":
        lm_labels = enc["input_ids"].clone()
        lm_labels[enc["attention_mask"] == 0] = -100
        tensors["labels"] = lm_labels
    else:
        raise DataError(f"cannot encode text for task {task!r}")
    return EncodedData(tensors)


class BatchSource:
    """Draws minibatches of one client's training data without state of its own.

    Batch (step, stream) is a pure function of the client's seed: a silo that stops between
    two rounds and restarts draws exactly the batches it would have drawn.
    """

    def __init__(
        self,
        data: EncodedData,
        batch_size: int,
        seed: int,
        device: torch.device | str = "cpu",
        *,
        poisson: bool = False,
    ) -> None:
        if len(data) == 0:
            raise DataError("client has no training examples")
        self.data = data
        self.batch_size = min(batch_size, len(data))
        self.seed = seed
        self.device = torch.device(device)
        # Poisson sampling (DP-SGD): every example joins a batch with probability
        # batch_size / examples, independently; batch sizes vary (and may be 0).
        self.poisson = poisson

    @property
    def sample_rate(self) -> float:
        return self.batch_size / len(self.data)

    def batch(self, step: int, stream: int) -> dict[str, Tensor]:
        # indices are drawn on the CPU with a seeded generator: the same on every device
        gen = torch.Generator().manual_seed(derive_seed(self.seed, step, stream))
        if self.poisson:
            drawn = torch.rand(len(self.data), generator=gen) < self.sample_rate
            return to_device(self.data.select(torch.nonzero(drawn).flatten()), self.device)
        index = torch.randperm(len(self.data), generator=gen)[: self.batch_size]
        return to_device(self.data.select(index), self.device)


def iter_batches(
    data: EncodedData, batch_size: int, device: torch.device | str = "cpu"
) -> Iterator[dict[str, Tensor]]:
    """Sequential batches over a whole split (evaluation)."""
    n = len(data)
    for start in range(0, n, batch_size):
        yield to_device(data.select(torch.arange(start, min(n, start + batch_size))), device)


def to_device(batch: dict[str, Tensor], device: torch.device | str) -> dict[str, Tensor]:
    dev = torch.device(device)
    if dev.type == "cpu":
        return batch
    return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}


def resolve_device(spec: str) -> torch.device:
    """ "auto": the first CUDA GPU when torch sees one, else the CPU; or "cpu", "cuda", "cuda:N"."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as exc:
        raise DataError(f"device={spec!r}: use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"device={spec!r}: torch sees no CUDA GPU (torch {torch.__version__})")
    if dev.type not in ("cpu", "cuda"):
        raise DataError(f"device={spec!r}: use auto, cpu, cuda or cuda:N")
    return dev
