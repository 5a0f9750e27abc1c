"""The one tiny model config and the one toy corpus of the tests: MiniLM cut to one layer (real
weights, fast), a linear map for regression, short sentiment sentences, and data built from them.
"""

from __future__ import annotations

import functools
import json
import os
import random
from pathlib import Path

import torch

from pf2lora.common.learning.base_model import resolve_model_path
from pf2lora.common.learning.batching import BatchSource, EncodedData, encode_texts
from pf2lora.common.learning.config import AdapterConfig, ModelConfig
from pf2lora.common.learning.model import TwoLevelModel, build_two_level_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The toy corpus: short sentences of clear sentiment (label 1 positive, 0 negative).
POS = [
    "a wonderful, moving film",
    "I loved every minute of it",
    "sharp writing and great acting",
    "pure joy from start to end",
    "the best thing this year",
    "charming and very funny",
]
NEG = [
    "dull and lifeless",
    "a total mess of a movie",
    "boring from start to finish",
    "awful dialogue throughout",
    "I want my money back",
    "painfully slow and long",
]
TEXTS = [s for pair in zip(POS, NEG, strict=True) for s in pair]
LABELS = [1, 0] * len(POS)

# The tiny model: MiniLM with one encoder layer; every sentence above fits in 16 tokens.
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


def write_silo_data(d: Path, k: int, n_train: int, n_test: int = 12) -> tuple[Path, Path]:
    """Toy-corpus JSONL files (train, test) with integer labels; silo k leans to one label."""
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1000 + k)
    paths = []
    for split, n in (("train", n_train), ("test", n_test)):
        p = d / f"{split}.jsonl"
        with p.open("w") as fh:
            for i in range(n):
                label = int(rng.random() < 0.3 + 0.2 * k)
                text = f"{rng.choice(POS if label else NEG)} number {i}"
                fh.write(json.dumps({"text": text, "label": label}) + "\n")
        paths.append(p)
    return paths[0], paths[1]


@functools.lru_cache(maxsize=1)
def chat_tokenizer():  # type: ignore[no-untyped-def]
    """SmolLM2's tokenizer (a ChatML chat template), read from the packaged GGUF file."""
    from transformers import AutoTokenizer

    from pf2lora.common.learning.smollm import gguf_path

    path = gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def tiny_llama_folder(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama (SmolLM2's architecture, hidden 32) saved with
    SmolLM2's tokenizer: a causal LM with a chat template that loads in well under a second."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = chat_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
