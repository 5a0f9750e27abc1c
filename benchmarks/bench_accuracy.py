"""Personalised accuracy of PF2LoRA and every baseline: MiniLM on the 4-domain VADER sentiment data.

    # 1. tune learning rates on a validation split carved from each client's TRAINING data
    .venv/bin/python benchmarks/bench_accuracy.py --phase tune
    # 2. the table: the chosen hyperparameters, every algorithm, several seeds, the test split
    .venv/bin/python benchmarks/bench_accuracy.py --phase table --seeds 0 1 2

Setup: MiniLM (all 6 layers), LoRA on query/value (r = 8, r_hat = 2, alpha = 16), a new
2-class head (shared for the federated algorithms, private for local-only), 8 clients,
`partition = "natural"` (two clients per VADER domain: amazon, movies, nyt, tweets), at most
`--max-train` training and `--max-test` held-out sentences per client (stratified caps),
`--max-length` tokens, `--rounds` rounds of `--local-steps` local steps at batch `--batch-size`.

Algorithms: pf2lora (unrolled hypergradient), pf2lora-joint (hypergrad=joint, the paper's
"without bilevel" ablation: one AdamW over shared and private), homlora, hetlora (ranks 6..10),
perfedavg (Hessian-free MAML, one personalisation step of size alpha), local (rank 10, no
communication). Each silo evaluates at the end: personalised accuracy = global after the last
round + its private part (Per-FedAvg: after its personalisation step); shared-only = the
global alone (not defined for local-only).

Tuning (--phase tune): one seed, a validation split (`--val-fraction` of each client's capped
training data, stratified by label, drawn from the seed) is held out of training and used as
the evaluation split; the test split is never loaded into the evaluation. For each algorithm a
small grid of learning rates runs for `--tune-rounds` rounds; the configuration with the best
mean personalised validation accuracy is chosen. Writes accuracy_tuning.{json,md}.
The table phase reads the choice from accuracy_tuning.json and writes accuracy.{json,md};
runs are appended as they finish and `--resume` skips the ones already in accuracy.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _accuracy_report import (  # benchmarks/_accuracy_report.py
    GRIDS,
    VARIANTS,
    summarise,
    table_markdown,
    tuning_markdown,
)
from _common import (  # benchmarks/_common.py (scripts run from benchmarks/)
    machine_info,
    save_results,
)

import pf2lora.common.simulation as sim
from pf2lora.common.algorithms.base import AlgorithmConfig
from pf2lora.common.data.partition import train_test_split_indices
from pf2lora.common.learning.batching import EncodedData
from pf2lora.common.learning.config import AdapterConfig, ModelConfig, TrainConfig
from pf2lora.common.simulation import DataConfig, SimulationConfig, run_simulation

RESULTS = Path(__file__).resolve().parent / "results"


@contextlib.contextmanager
def validation_split(fraction: float) -> Iterator[None]:
    """Make run_simulation train on (1 - fraction) of each client's training data and
    evaluate on the rest: the test split is replaced, never used."""
    original = sim._prepare

    def prepare(cfg: SimulationConfig) -> Any:
        model_cfg, base, specs = original(cfg)
        out = []
        for k, s in enumerate(specs):
            labels = s.train.tensors["labels"].numpy()
            rng = np.random.default_rng([cfg.seed, 0xA1, k])
            tr, va = train_test_split_indices(labels, fraction, rng)
            tr_t, va_t = torch.from_numpy(tr), torch.from_numpy(va)
            train = EncodedData({n: t[tr_t] for n, t in s.train.tensors.items()})
            val = EncodedData({n: t[va_t] for n, t in s.train.tensors.items()})
            out.append(sim.ClientSpec(s.name, train, val, dict(s.extra)))
        return model_cfg, base, out

    sim._prepare = prepare  # type: ignore[assignment]
    try:
        yield
    finally:
        sim._prepare = original  # type: ignore[assignment]


def make_config(
    args: argparse.Namespace, label: str, hp: dict[str, float], seed: int, rounds: int
) -> SimulationConfig:
    name, hypergrad = VARIANTS[label]
    train = TrainConfig(
        local_steps=args.local_steps,
        batch_size=args.batch_size,
        hypergrad=hypergrad,  # type: ignore[arg-type]
        ul_lr=hp["ul_lr"],
        ll_lr=hp.get("ll_lr", TrainConfig.ll_lr),
        ll_max_grad_norm=hp.get("ll_max_grad_norm"),
        ll_steps=1,  # what the committed selection and table ran (the default was 1 then)
    )
    algo = AlgorithmConfig(name=name, train=train, perfedavg_alpha=hp.get("perfedavg_alpha", 0.05))
    return SimulationConfig(
        algorithm=algo,
        model=ModelConfig(
            path="minilm",
            max_length=args.max_length,
            adapters=AdapterConfig(shared_rank=8, private_rank=2),
        ),
        data=DataConfig(
            source="vader",
            partition="natural",
            num_clients=args.clients,
            max_train_per_client=args.max_train,
            max_test_per_client=args.max_test,
        ),
        rounds=rounds,
        seed=seed,
        eval_every=rounds,  # evaluate after the last round only
    )


def run_one(
    args: argparse.Namespace, label: str, hp: dict[str, float], seed: int, rounds: int, phase: str
) -> dict[str, Any]:
    cfg = make_config(args, label, hp, seed, rounds)
    t0 = time.perf_counter()
    if phase == "tune":
        with validation_split(args.val_fraction):
            res = run_simulation(cfg)
    else:
        res = run_simulation(cfg)
    wall = time.perf_counter() - t0
    last = res.rounds[-1]
    clients = [
        {
            "name": c["name"],
            "train_size": c["train_size"],
            "eval_size": c["test_size"],
            "personal_accuracy": c.get("personal_accuracy"),
            "shared_accuracy": c.get("shared_accuracy"),
            "hetlora_rank": c.get("hetlora_rank"),
        }
        for c in res.clients
    ]
    out = {
        "phase": phase,
        "variant": label,
        "algorithm": VARIANTS[label][0],
        "hypergrad": VARIANTS[label][1],
        "hparams": hp,
        "seed": seed,
        "rounds": rounds,
        "mean_personal_accuracy": last.get("mean_personal_accuracy"),
        "weighted_personal_accuracy": last.get("weighted_personal_accuracy"),
        "mean_shared_accuracy": last.get("mean_shared_accuracy"),
        "final_train_loss": statistics.fmean(last["train_loss"]),
        "train_seconds_per_round": [sum(r["train_seconds"]) for r in res.rounds],
        "wall_seconds": wall,
        "parameters": res.parameters,
        "clients": clients,
    }
    shared = out["mean_shared_accuracy"]
    print(
        f"[{phase}] {label:14s} seed {seed} {hp}: personalised {out['mean_personal_accuracy']:.4f} "
        f"shared-only {'-' if shared is None else f'{shared:.4f}'} "
        f"loss {out['final_train_loss']:.3f} ({wall:.0f} s)",
        flush=True,
    )
    return out


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": "minilm (all-MiniLM-L6-v2, 6 layers)",
        "targets": ["query", "value"],
        "shared_rank": 8,
        "private_rank": 2,
        "alpha": 16.0,
        "data": "vader (binary: score > 0)",
        "partition": "natural",
        "clients": args.clients,
        "max_train_per_client": args.max_train,
        "max_test_per_client": args.max_test,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "local_steps": args.local_steps,
        "rounds": args.rounds,
        "tune_rounds": args.tune_rounds,
        "tune_seed": args.tune_seed,
        "val_fraction": args.val_fraction,
        "max_grad_norm": 1.0,
        "weight_decay": 0.0,
        "weighting": "samples",
    }


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _save(doc: dict[str, Any], stem: str, md: str, out: Path) -> None:
    save_results(out, stem, doc, md)


def phase_tune(args: argparse.Namespace, command: str) -> None:
    path = args.out / "accuracy_tuning.json"
    prev = _load(path) if args.resume else None
    runs: list[dict[str, Any]] = list(prev["runs"]) if prev else []
    done = {(r["variant"], json.dumps(r["hparams"], sort_keys=True)) for r in runs}
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    for label in args.variants:
        for hp in GRIDS[label]:
            if (label, json.dumps(hp, sort_keys=True)) in done:
                continue
            runs.append(run_one(args, label, hp, args.tune_seed, args.tune_rounds, "tune"))
            doc = _tuning_doc(args, command, runs, t0, load_before, prev)
            _save(doc, "accuracy_tuning", tuning_markdown(doc), args.out)
    doc = _tuning_doc(args, command, runs, t0, load_before, prev)
    md = tuning_markdown(doc)
    _save(doc, "accuracy_tuning", md, args.out)
    print(md)


def _tuning_doc(
    args: argparse.Namespace,
    command: str,
    runs: list[dict[str, Any]],
    t0: float,
    load_before: tuple[float, ...],
    prev: dict[str, Any] | None,
) -> dict[str, Any]:
    chosen: dict[str, dict[str, float]] = {}
    for label in VARIANTS:
        cands = [r for r in runs if r["variant"] == label]
        if cands:
            # First max in grid order; rounded so that float summation order cannot break a tie.
            best = max(cands, key=lambda r: round(r["mean_personal_accuracy"], 9))
            chosen[label] = best["hparams"]
    commands = (prev.get("commands", [prev["command"]]) if prev else []) + [command]
    return {
        "benchmark": "accuracy_tuning",
        "command": command,
        "commands": commands,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_info(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "settings": settings(args),
        "grids": GRIDS,
        "wall_seconds": time.perf_counter() - t0 + (prev["wall_seconds"] if prev else 0.0),
        "runs": runs,
        "chosen": chosen,
    }


def phase_table(args: argparse.Namespace, command: str) -> None:
    tuning = _load(args.out / "accuracy_tuning.json")
    if tuning is None:
        raise SystemExit(
            "run --phase tune first (benchmarks/results/accuracy_tuning.json is missing)"
        )
    chosen = tuning["chosen"]
    path = args.out / "accuracy.json"
    prev = _load(path) if args.resume else None
    runs: list[dict[str, Any]] = list(prev["runs"]) if prev else []
    done = {(r["variant"], r["seed"]) for r in runs}
    t0 = time.perf_counter()
    load_before = tuple(prev["load_average_before"]) if prev else os.getloadavg()
    for seed in args.seeds:
        for label in args.variants:
            if (label, seed) in done:
                continue
            runs.append(run_one(args, label, chosen[label], seed, args.rounds, "table"))
            doc = _table_doc(args, command, runs, t0, load_before, prev, tuning)
            _save(doc, "accuracy", table_markdown(doc), args.out)
    doc = _table_doc(args, command, runs, t0, load_before, prev, tuning)
    md = table_markdown(doc)
    _save(doc, "accuracy", md, args.out)
    print(md)


def _table_doc(
    args: argparse.Namespace,
    command: str,
    runs: list[dict[str, Any]],
    t0: float,
    load_before: tuple[float, ...],
    prev: dict[str, Any] | None,
    tuning: dict[str, Any],
) -> dict[str, Any]:
    ts = tuning["settings"]
    commands = (prev.get("commands", [prev["command"]]) if prev else []) + [command]
    return {
        "benchmark": "accuracy",
        "command": command,
        "commands": commands,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_info(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "settings": settings(args),
        "tuning": {
            "command": tuning["command"],
            "chosen": tuning["chosen"],
            "grids": tuning["grids"],
            "procedure": f"seed {ts['tune_seed']}, {ts['val_fraction']:.0%} of each client's "
            f"training data held out (stratified), {ts['tune_rounds']} rounds, best mean "
            "personalised validation accuracy",
        },
        "wall_seconds": time.perf_counter() - t0 + (prev["wall_seconds"] if prev else 0.0),
        "runs": runs,
        "summary": summarise(runs),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--phase", choices=("tune", "table"), required=True)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tune-seed", type=int, default=0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-train", type=int, default=250)
    p.add_argument("--max-test", type=int, default=200)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tune-rounds", type=int, default=3)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared 2-core machine 2 threads were up to 9x slower)",
    )
    p.add_argument(
        "--resume", action="store_true", help="keep the runs already saved and skip them"
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite the .md files from the saved JSON, run nothing",
    )
    args = p.parse_args(argv)
    if args.render_only:
        for stem, render in (("accuracy_tuning", tuning_markdown), ("accuracy", table_markdown)):
            doc = _load(args.out / f"{stem}.json")
            if doc is not None:
                (args.out / f"{stem}.md").write_text(render(doc))
        return 0
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = "python " + " ".join(
        shlex.quote(a) for a in ["benchmarks/bench_accuracy.py", *sys.argv[1:]]
    )
    if args.phase == "tune":
        phase_tune(args, command)
    else:
        phase_table(args, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
