"""Personalisation that pays? PF2LoRA against every baseline in the paper's regime, on validation-
selected settings: label-sorted splits, 8 clients, 30 rounds x 10 local steps, 3 seeds.

    # 1. selection on a validation split of the training data (test data never used)
    nice -n 19 .venv/bin/python benchmarks/bench_personalization.py --phase tune --workers 2
    # 2. the table, every method on its selected settings
    nice -n 19 .venv/bin/python benchmarks/bench_personalization.py --phase table --workers 2
    # 3. (re)write personalization.json / .md, the selection record and the curves
    .venv/bin/python benchmarks/bench_personalization.py --phase report

Every run is appended to benchmarks/results/personalization_{selection,runs}.jsonl as soon as
it ends; a rerun skips what is there (resumable, any number of times). Each worker process
uses one torch thread (on a shared 2-core machine more threads were slower).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from _common import append_log, read_log  # benchmarks/_common.py (scripts run from benchmarks/)

RESULTS = Path(__file__).resolve().parent / "results"
SELECTION_LOG = "personalization_selection.jsonl"
RUN_LOG = "personalization_runs.jsonl"

# split label -> data settings (VADER pooled over its 4 domains: binary; TREC: 6 classes)
SPLITS: dict[str, dict[str, Any]] = {  # table order: the label-sorted splits first
    "trec/s=0.1": {"source": "trec", "partition": "similarity", "similarity": 0.1},
    "vader/s=0.1": {"source": "vader", "partition": "similarity", "similarity": 0.1},
    "trec/s=0.5": {"source": "trec", "partition": "similarity", "similarity": 0.5},
    "vader/natural": {"source": "vader", "partition": "natural"},
    "vader/s=0.5": {"source": "vader", "partition": "similarity", "similarity": 0.5},
}
# Selection on the label-sorted regime the promise is about. TREC only: VADER at s=0.1 is binary
# with nearly one label per client, so the first configurations tried all scored the same there
# (0.929) while costing twice TREC's time; its records stay in the log, unused.
TUNING_SPLITS = ("trec/s=0.1",)

# method -> (algorithm, fixed settings)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "pf2lora": ("pf2lora", {}),
    "pf2lora-first-order": ("pf2lora", {"hypergrad": "first-order"}),  # selected, other estimator
    "joint": ("pf2lora", {"hypergrad": "joint"}),  # two adapters, one AdamW: no bilevel step
    "homlora": ("homlora", {}),
    "hetlora": ("hetlora", {}),
    "perfedavg": ("perfedavg", {}),
    "fedsa": ("fedsa", {}),
    "local": ("local", {}),
}
# The same tuning budget for every method: six configurations, each run on the tuning split.
LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
PF2_BASE = {"ul_lr": 1e-2, "ll_lr": 0.1}  # the accuracy benchmark's validation choice
TUNING: dict[str, list[dict[str, Any]]] = {
    # PF2LoRA: each open choice varied alone around the base (docs/algorithm.md)
    "pf2lora": [
        PF2_BASE,
        {**PF2_BASE, "ll_lr": 0.02},
        {**PF2_BASE, "private_alpha": 4.0},  # private scaling alpha/r_hat -> the shared alpha/r
        {**PF2_BASE, "head": "private"},
        {**PF2_BASE, "ll_steps": 3},
        {**PF2_BASE, "hypergrad": "first-order"},
    ],
    "joint": [{"ul_lr": lr} for lr in LRS],
    "homlora": [{"ul_lr": lr} for lr in LRS],
    "hetlora": [{"ul_lr": lr} for lr in LRS],
    "perfedavg": [
        {"ul_lr": lr, "perfedavg_alpha": a} for lr in (3e-3, 1e-2, 3e-2) for a in (0.01, 0.05)
    ],
    "fedsa": [{"ul_lr": lr} for lr in LRS],
    "local": [{"ul_lr": lr} for lr in LRS],
}
TUNED_BY = {"pf2lora-first-order": "pf2lora"}  # methods that take another method's selection


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": f"minilm (all-MiniLM-L6-v2) cut to {args.layers} layers",
        "max_length": args.max_length,
        "shared_rank": 8,
        "private_rank": 2,
        "alpha": 16.0,
        "clients": args.clients,
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "batch_size": args.batch_size,
        "max_train_per_client": args.max_train,
        "max_test_per_client": args.max_test,
        "eval_every": args.eval_every,
        "validation_fraction": args.val_fraction,
        "tuning_splits": list(TUNING_SPLITS),
        "tuning_seed": args.tune_seed,
        "threads_per_worker": 1,
    }


def task(method: str, hp: dict[str, Any], split: str, seed: int, phase: str, s: dict) -> dict:
    """One spec a worker runs (plain values: it crosses a process boundary)."""
    return {"method": method, "hp": hp, "split": split, "seed": seed, "phase": phase, "s": s}


def run_task(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one simulation in this worker process; the record written to the log."""
    import torch

    from pf2lora.common.algorithms.base import AlgorithmConfig
    from pf2lora.common.learning.config import AdapterConfig, ModelConfig, TrainConfig
    from pf2lora.common.privacy.config import DPConfig
    from pf2lora.common.simulation import DataConfig, SimulationConfig, run_simulation

    torch.set_num_threads(1)
    s, hp = spec["s"], {**METHODS[spec["method"]][1], **spec["hp"]}
    train = TrainConfig(
        local_steps=s["local_steps"],
        batch_size=s["batch_size"],
        ul_lr=hp["ul_lr"],
        ll_lr=hp.get("ll_lr", TrainConfig.ll_lr),
        hypergrad=hp.get("hypergrad", "unroll"),
        ll_steps=hp.get("ll_steps", 1),
    )
    algo = AlgorithmConfig(
        name=METHODS[spec["method"]][0],
        train=train,
        perfedavg_alpha=hp.get("perfedavg_alpha", AlgorithmConfig.perfedavg_alpha),
        dp=DPConfig(**hp["dp"]) if "dp" in hp else DPConfig(),  # bench_dp_utility.py
    )
    adapters = AdapterConfig(
        shared_rank=s["shared_rank"],
        private_rank=s["private_rank"],
        alpha=s["alpha"],
        private_alpha=hp.get("private_alpha"),
        head=hp.get("head", "shared"),
    )
    data = DataConfig(
        num_clients=s["clients"],
        max_train_per_client=s["max_train_per_client"],
        max_test_per_client=s["max_test_per_client"],
        validation_fraction=s["validation_fraction"] if spec["phase"] == "tune" else None,
        **SPLITS[spec["split"]],
    )
    cfg = SimulationConfig(
        algorithm=algo,
        model=ModelConfig(
            path="minilm",
            num_hidden_layers=s["layers"],
            max_length=s["max_length"],
            adapters=adapters,
        ),
        data=data,
        rounds=s["rounds"],
        seed=spec["seed"],
        eval_every=s["eval_every"],
    )
    from pf2lora.common.learning.trainer import Diverged

    t0 = time.perf_counter()
    head = {
        "phase": spec["phase"],
        "dataset": spec["split"].split("/")[0],
        "split": spec["split"],
        "method": spec["method"],
        "algorithm": algo.name,
        "config": hp,
        "seed": spec["seed"],
        "rounds": s["rounds"],
        "local_steps": s["local_steps"],
        "clients": s["clients"],
    }
    try:
        res = run_simulation(cfg)
    except Diverged as exc:  # a result too: these settings do not train (scored worst)
        return {
            **head,
            "diverged": str(exc),
            "personalised_acc": None,
            "shared_acc": None,
            "worst_client_acc": None,
            "wall_seconds": time.perf_counter() - t0,
        }
    last = res.rounds[-1]
    per_client = {
        c["name"]: {
            "personalised_acc": c.get("personal_accuracy"),
            "shared_acc": c.get("shared_accuracy"),
        }
        for c in res.clients
    }
    personal = [v["personalised_acc"] for v in per_client.values()]
    return {
        **head,
        "personalised_acc": last.get("mean_personal_accuracy"),
        "shared_acc": last.get("mean_shared_accuracy"),
        "worst_client_acc": min(personal),
        "per_client": per_client,
        # local training seconds of one silo in one round (mean over silos and rounds)
        "seconds_per_round": sum(sum(r["train_seconds"]) for r in res.rounds)
        / (len(res.rounds) * s["clients"]),
        "curve": [
            [r["round"], r.get("mean_personal_accuracy"), r.get("mean_shared_accuracy")]
            for r in res.rounds
            if "eval" in r
        ],
        "parameters": res.parameters,
        "wall_seconds": time.perf_counter() - t0,
        **(
            {
                "epsilon": last.get("epsilon"),
                "dp_update_norms": [n for r in res.rounds for n in r.get("dp_update_norm", [])],
            }
            if algo.dp.enabled
            else {}
        ),
    }


def key(rec: dict[str, Any]) -> str:
    return json.dumps(
        [rec["phase"], rec["split"], rec["method"], rec["config"], rec["seed"]], sort_keys=True
    )


def run_all(specs: list[dict[str, Any]], log: Path, workers: int) -> None:
    done = {key({**r, "config": r["config"]}) for r in read_log(log)}
    todo = [
        sp
        for sp in specs
        if key({**sp, "config": {**METHODS[sp["method"]][1], **sp["hp"]}}) not in done
    ]
    print(f"{len(specs) - len(todo)} of {len(specs)} runs already in {log.name}", flush=True)
    if not todo:
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_task, sp): sp for sp in todo}
        for n, fut in enumerate(as_completed(futures), start=1):
            rec = fut.result()
            append_log(log, rec)
            what = f"[{n}/{len(todo)}] {rec['phase']} {rec['split']} {rec['method']} seed "
            what += f"{rec['seed']} {rec['config']}"
            if rec.get("diverged"):
                print(f"{what}: DIVERGED ({rec['diverged']})", flush=True)
                continue
            print(
                f"{what}: personalised {rec['personalised_acc']:.4f} "
                f"(worst {rec['worst_client_acc']:.3f}), {rec['seconds_per_round']:.1f} s/round, "
                f"{rec['wall_seconds']:.0f} s",
                flush=True,
            )


def selected(out: Path) -> dict[str, dict[str, Any]]:
    """method -> its configuration with the best mean validation accuracy over the tuning
    splits (rounded to 4 decimals, ties to the earlier configuration)."""
    recs = [
        r
        for r in read_log(out / SELECTION_LOG)
        if r["phase"] == "tune" and r["split"] in TUNING_SPLITS
    ]
    choice: dict[str, dict[str, Any]] = {}
    for method, grid in TUNING.items():
        scores = []
        for i, hp in enumerate(grid):
            cfg = {**METHODS[method][1], **hp}
            accs = [  # a diverged run scores 0
                r["personalised_acc"] or 0.0
                for r in recs
                if r["method"] == method and r["config"] == cfg
            ]
            if len(accs) == len(TUNING_SPLITS):
                scores.append((round(sum(accs) / len(accs), 4), -i, hp))
        if len(scores) == len(grid):
            choice[method] = max(scores, key=lambda s: (s[0], s[1]))[2]
    for method, source in TUNED_BY.items():
        if source in choice:
            choice[method] = {k: v for k, v in choice[source].items() if k != "hypergrad"}
    return choice


def parser() -> argparse.ArgumentParser:
    """The benchmark's options and defaults (bench_dp_utility.py takes its settings from here)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=("tune", "table", "report"), required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tune-seed", type=int, default=0)
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--layers", type=int, default=2, help="MiniLM encoder layers kept")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-train", type=int, default=500)
    p.add_argument("--max-test", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=3)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    s = {**settings(args), "layers": args.layers}
    command = " ".join(
        shlex.quote(a) for a in ["benchmarks/bench_personalization.py", *sys.argv[1:]]
    )
    if args.phase == "tune":
        specs = [
            task(m, hp, split, args.tune_seed, "tune", s)
            for m in args.methods
            if m in TUNING
            for hp in TUNING[m]
            for split in TUNING_SPLITS
        ]
        run_all(specs, args.out / SELECTION_LOG, args.workers)
    elif args.phase == "table":
        choice = selected(args.out)
        missing = [m for m in args.methods if m not in choice]
        if missing:
            raise SystemExit(f"no complete selection for {missing}: run --phase tune first")
        specs = [
            task(m, choice[m], split, seed, "table", s)
            for seed in args.seeds
            for split in args.splits
            for m in args.methods
        ]
        run_all(specs, args.out / RUN_LOG, args.workers)
    from _personalization_report import write_report  # benchmarks/ (scripts run from there)

    write_report(args.out, s, selected(args.out), command, {m: f for m, (_, f) in METHODS.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
