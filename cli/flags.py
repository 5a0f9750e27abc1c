"""Config flags shared by `pf2lora simulate` and `pf2lora run start`: each sets one config path.

A flag given on the command line overrides the TOML file (--config, --run-file), which
overrides the built-in defaults.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

# flag -> (path in the config tree, type, help)
Flag = tuple[tuple[str, ...], Any, str]

ALGORITHM_FLAGS: dict[str, Flag] = {
    "algorithm": (
        ("algorithm", "name"),
        str,
        "pf2lora | homlora | hetlora | perfedavg | fedsa | local",
    ),
    "weighting": (("algorithm", "weighting"), str, "silo weights: samples | equal"),
    "hypergrad": (
        ("algorithm", "train", "hypergrad"),
        str,
        "unroll | implicit | first-order | joint",
    ),
    "local_steps": (("algorithm", "train", "local_steps"), int, "local steps per round"),
    "batch_size": (("algorithm", "train", "batch_size"), int, "minibatch size"),
    "ll_lr": (("algorithm", "train", "ll_lr"), float, "lower-level SGD step (private adapter)"),
    "ll_steps": (
        ("algorithm", "train", "ll_steps"),
        int,
        "lower-level SGD steps per upper-level step (default 3; 1 for causal-lm)",
    ),
    "ul_lr": (("algorithm", "train", "ul_lr"), float, "upper-level AdamW lr (shared adapter)"),
    "weight_decay": (("algorithm", "train", "weight_decay"), float, "AdamW weight decay"),
    "max_grad_norm": (
        ("algorithm", "train", "max_grad_norm"),
        float,
        "clip the upper-level gradient to this norm (0: off; default 1.0)",
    ),
    "ll_max_grad_norm": (
        ("algorithm", "train", "ll_max_grad_norm"),
        float,
        "clip the lower-level (private) gradient before its SGD step (0: off, the default)",
    ),
}

MODEL_FLAGS: dict[str, Flag] = {
    "task": (
        ("model", "task"),
        str,
        "seq-cls (classification, the default) | causal-lm (a decoder on instruction data)",
    ),
    "generate_examples": (
        ("model", "generate_examples"),
        int,
        "causal-lm: greedy answers scored (exact match, ROUGE-L) per evaluation (default 32)",
    ),
    "max_new_tokens": (("model", "max_new_tokens"), int, "causal-lm: longest generated answer"),
    "num_layers": (("model", "num_hidden_layers"), int, "truncate the model to N layers"),
    "dtype": (
        ("model", "dtype"),
        str,
        "frozen base weights: float32 (default) | bfloat16 | float16 | auto (bf16 on a GPU that "
        "supports it); adapters stay float32",
    ),
    "max_length": (("model", "max_length"), int, "max tokens per text"),
    "shared_rank": (("model", "adapters", "shared_rank"), int, "r (shared adapter rank)"),
    "private_rank": (("model", "adapters", "private_rank"), int, "r_hat (private adapter rank)"),
    "alpha": (("model", "adapters", "alpha"), float, "LoRA alpha on both branches"),
}


def add_flags(parser: argparse.ArgumentParser, flags: Mapping[str, Flag]) -> None:
    """--flag-name for each entry (dest: the entry's name; absent flags stay None)."""
    for name, (_, typ, help_text) in flags.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=typ, help=help_text)


def apply_flags(
    tree: dict[str, Any], args: argparse.Namespace, flags: Mapping[str, Flag]
) -> dict[str, Any]:
    """Set each flag given on the command line at its path in `tree`."""
    from pf2lora.common.runspec import set_path

    for name, (path, _, _) in flags.items():
        value = getattr(args, name)
        if value is not None:
            set_path(tree, path, value)
    return tree
