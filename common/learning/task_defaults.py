"""Settings a task brings with it where the run file and flags say nothing: a decoder on
instruction data learns with other rates than a classifier.

With the classification rates (ul_lr 2e-3 or more, ll_lr 0.1, no lower-level clip) SmolLM2's
bilevel training diverges: in the decoder benchmark's selection the loss went from 2.1 to 26.6
within 3 steps. The causal-lm values below had the lowest validation answer loss
of the three PF2LoRA configurations tried there (0.330, against 0.420 at ul_lr 5e-4; HOMLoRA's
best 0.520, local-only's 0.407): benchmarks/results/causal_lm.md. That selection ran one
lower-level step per upper step, so that is the decoder's default too (the classification
default is 3).
"""

from __future__ import annotations

from typing import Any

CAUSAL_LM_DEFAULTS: dict[str, Any] = {
    "ul_lr": 2e-3,
    "ll_lr": 0.01,
    "ll_max_grad_norm": None,
    "ll_steps": 1,
}

# config path -> value, per task (paths as in a simulation or run config tree)
TASK_DEFAULTS: dict[str, dict[tuple[str, ...], Any]] = {
    "causal-lm": {
        ("algorithm", "train", "ul_lr"): CAUSAL_LM_DEFAULTS["ul_lr"],
        ("algorithm", "train", "ll_lr"): CAUSAL_LM_DEFAULTS["ll_lr"],
        ("algorithm", "train", "ll_max_grad_norm"): CAUSAL_LM_DEFAULTS["ll_max_grad_norm"],
        ("algorithm", "train", "ll_steps"): CAUSAL_LM_DEFAULTS["ll_steps"],
    },
}


def with_task_defaults(tree: dict[str, Any]) -> dict[str, Any]:
    """The config tree with its task's defaults filled in wherever it sets nothing."""
    task = tree.get("model", {}).get("task", "seq-cls")
    for path, value in TASK_DEFAULTS.get(task, {}).items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node.setdefault(path[-1], value)
    return tree


def describe_task_defaults(task: str) -> str:
    """`key=value, ...` of a task's defaults (for --help)."""
    return ", ".join(f"{'.'.join(p)}={v}" for p, v in TASK_DEFAULTS.get(task, {}).items())
