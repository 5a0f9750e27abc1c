"""Small real models and data for the core tests: MiniLM cut to one layer, a linear map."""

from __future__ import annotations

import functools
import os

import torch

from pf2lora.common.learning.base_model import resolve_model_path
from pf2lora.common.learning.batching import BatchSource, EncodedData, encode_texts
from pf2lora.common.learning.config import AdapterConfig, ModelConfig
from pf2lora.common.learning.model import TwoLevelModel, build_two_level_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = [
    "a wonderful, moving film",
    "dull and lifeless",
    "I loved every minute",
    "a total mess",
    "sharp writing and great acting",
    "boring from start to finish",
    "pure joy",
    "awful dialogue",
    "the best thing this year",
    "I want my money back",
    "charming and funny",
    "painfully slow",
]
LABELS = [1, 0] * 6

MINI = ModelConfig(path="minilm", num_hidden_layers=1, max_length=16)


@functools.lru_cache(maxsize=1)
def tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path("minilm"))


def text_data(n_repeat: int = 2) -> EncodedData:
    return encode_texts(TEXTS * n_repeat, LABELS * n_repeat, tokenizer(), 16, "seq-cls")


def mini_model(adapters: AdapterConfig | None = None, **kw: int) -> TwoLevelModel:
    cfg = MINI if adapters is None else ModelConfig(**{**MINI.__dict__, "adapters": adapters})
    return build_two_level_model(cfg, **kw)


class LinearMap(torch.nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def linear_model(d: int = 6, r: int = 3, r_hat: int = 2, seed: int = 0) -> TwoLevelModel:
    torch.manual_seed(seed)
    base = LinearMap(d, d)
    adapters = AdapterConfig(shared_rank=r, private_rank=r_hat, target_modules=("linear",))
    return TwoLevelModel(base, adapters, "regression", shared_seed=seed, private_seed=seed + 1)


def regression_data(n: int = 64, d: int = 6, seed: int = 0) -> EncodedData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, d, generator=g)
    return EncodedData({"x": x, "y": x @ w.T})


def source(data: EncodedData, batch_size: int = 8, seed: int = 0) -> BatchSource:
    return BatchSource(data, batch_size, seed)
