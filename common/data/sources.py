"""Settings a data source brings with it (a light module: the CLI shows them in --help)."""

from __future__ import annotations

from typing import Any

DEFAULT_SOURCE = "vader"  # what DataConfig.source defaults to (common/simulation.py)

# Settings a data source brings with it, used where the config file and flags say nothing.
# synthetic-rank: the rank-recovery regime (benchmarks/results/synthetic_rank.md): the lower
# level must be much faster than the upper (ll_lr / ul_lr = 100) and unclipped, one lower-level
# step per upper step as measured there; with the classification defaults every client learned
# rank 9.
SOURCE_DEFAULTS: dict[str, dict[tuple[str, ...], Any]] = {
    "synthetic-rank": {
        ("rounds",): 600,
        ("data", "num_clients"): 5,  # one per true rank (6..10)
        ("eval_every",): 100,
        ("algorithm", "train", "local_steps"): 20,
        ("algorithm", "train", "batch_size"): 64,
        ("algorithm", "train", "ll_lr"): 0.2,
        ("algorithm", "train", "ul_lr"): 0.002,
        ("algorithm", "train", "ll_steps"): 1,
        ("algorithm", "train", "max_grad_norm"): None,
        ("model", "path"): "",
        ("model", "task"): "regression",
    },
    # the packaged instruction tasks (one per client): a decoder's data
    "instructions": {
        ("data", "num_clients"): 4,
        ("model", "path"): "smollm2",
        ("model", "task"): "causal-lm",
        ("model", "max_length"): 80,
        ("algorithm", "train", "batch_size"): 4,
        ("algorithm", "train", "local_steps"): 5,
    },
}


def with_source_defaults(tree: dict[str, Any]) -> dict[str, Any]:
    """The config tree with its data source's defaults filled in wherever it sets nothing."""
    source = tree.get("data", {}).get("source", DEFAULT_SOURCE)
    for path, value in SOURCE_DEFAULTS.get(source, {}).items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node.setdefault(path[-1], value)
    return tree


def describe_source_defaults(source: str) -> str:
    """`key=value, ...` of a source's defaults (for --help)."""
    return ", ".join(f"{'.'.join(p)}={v}" for p, v in SOURCE_DEFAULTS.get(source, {}).items())
