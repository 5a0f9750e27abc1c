"""Personalised accuracy under label skew: PF2LoRA against HOMLoRA and local-only LoRA.

A supplement to `bench_accuracy.py`. The 4-domain VADER data is pooled and split over 8 clients
by the label-sorted mixture with similarity s (docs/algorithm.md §5: a fraction s of each client's
data is drawn i.i.d., the rest from the label-sorted pool, so small s means each client sees
mostly one label); each client's held-out split comes from its own distribution. Every run is
`pf2lora simulate` in a fresh process with the accuracy benchmark's settings and the
hyperparameters selected there on a validation split of the natural partition (not retuned
here: no test data was used for any choice). Per seed, the algorithms share the data split
and the batches, so differences are paired.

    python benchmarks/bench_label_skew.py --seeds 0 1 --similarity 0.1

Writes benchmarks/results/label_skew.{json,md}; `--resume` keeps finished runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PF2LORA = ROOT / ".venv" / "bin" / "pf2lora"

# Selected in bench_accuracy.py --phase tune (benchmarks/results/accuracy_tuning.md).
VARIANTS: dict[str, list[str]] = {
    "pf2lora": ["--algorithm", "pf2lora", "--ul-lr", "0.01", "--ll-lr", "0.02"],
    "homlora": ["--algorithm", "homlora", "--ul-lr", "0.01"],
    "local": ["--algorithm", "local", "--ul-lr", "0.01"],
}


def run_one(variant: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One `pf2lora simulate` process; returns its final per-client accuracies."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        cmd = [
            str(PF2LORA),
            "simulate",
            *VARIANTS[variant],
            "--data",
            "vader",
            "--partition",
            "similarity",
            "--similarity",
            str(args.similarity),
            "--clients",
            str(args.clients),
            "--model",
            "minilm",
            "--max-train",
            str(args.max_train),
            "--max-test",
            str(args.max_test),
            "--max-length",
            str(args.max_length),
            "--batch-size",
            str(args.batch_size),
            "--local-steps",
            str(args.local_steps),
            "--rounds",
            str(args.rounds),
            "--eval-every",
            str(args.rounds),
            "--seed",
            str(seed),
            "--threads",
            "1",
            "--json",
            str(out),
        ]
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
        }
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{variant} seed {seed} failed:\n{proc.stderr[-3000:]}")
        data = json.loads(out.read_text())
    clients = data["clients"]
    personal = statistics.fmean(c["personal_accuracy"] for c in clients)
    shared_vals = [c["shared_accuracy"] for c in clients if c.get("shared_accuracy") is not None]
    return {
        "variant": variant,
        "seed": seed,
        "command": " ".join(["pf2lora", *cmd[1:-2]]),
        "wall_s": wall,
        "mean_personal_accuracy": personal,
        "mean_shared_accuracy": statistics.fmean(shared_vals) if shared_vals else None,
        "parameters": data["parameters"],
        "clients": [
            {
                k: c.get(k)
                for k in ("name", "train_size", "test_size", "personal_accuracy", "shared_accuracy")
            }
            for c in clients
        ],
    }


def majority_reference(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Each client predicts the majority label of its own training split: the accuracy a
    personalised model gets from the label prior alone (same split as `pf2lora simulate`)."""
    import numpy as np

    from pf2lora.common.data.dataset import labels_of
    from pf2lora.common.data.splits import build_client_data

    data = build_client_data(
        "vader",
        "similarity",
        args.clients,
        seed,
        similarity=args.similarity,
        max_train_per_client=args.max_train,
        max_test_per_client=args.max_test,
    )
    clients = []
    for c in data:
        majority = int(np.bincount(labels_of(c.train)).argmax())
        clients.append(
            {
                "name": c.name,
                "personal_accuracy": float(np.mean(labels_of(c.test) == majority)),
                "shared_accuracy": None,
                "train_size": len(c.train),
                "test_size": len(c.test),
            }
        )
    return {
        "variant": "majority",
        "seed": seed,
        "wall_s": 0.0,
        "mean_personal_accuracy": float(np.mean([c["personal_accuracy"] for c in clients])),
        "mean_shared_accuracy": None,
        "clients": clients,
    }


def _pm(values: list[float]) -> str:
    if not values:
        return "-"
    pct = [100 * v for v in values]
    sd = statistics.stdev(pct) if len(pct) > 1 else 0.0
    return f"{statistics.fmean(pct):.2f} ± {sd:.2f} ({min(pct):.2f}–{max(pct):.2f})"


def markdown(result: dict[str, Any]) -> str:
    runs = result["runs"]
    by = {(r["variant"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    lines = [
        "# Personalised accuracy under label skew (supplement to accuracy.md)",
        "",
        f"Command: `{result['command']}` ({result['date_utc']}); wall time "
        f"{result['wall_s']:.0f} s for {len(runs)} runs. Load average before/after: "
        f"{result['load_before']:.1f} / {result['load_after']:.1f} (2 CPUs, 1 torch thread).",
        "",
        f"Setup: MiniLM (6 layers), LoRA q/v r = 8, r̂ = 2, α = 16; VADER's 4 domains pooled and "
        f"split over {result['settings']['clients']} clients by the label-sorted mixture with "
        f"similarity s = {result['settings']['similarity']} (each client's data is mostly one "
        f"label; its test split follows its own label mix); at most "
        f"{result['settings']['max_train']} training / {result['settings']['max_test']} test "
        f"sentences per client; {result['settings']['rounds']} rounds x "
        f"{result['settings']['local_steps']} local steps, batch "
        f"{result['settings']['batch_size']}. Hyperparameters as selected on the natural "
        "partition's validation split (accuracy_tuning.md), not retuned here. Accuracy: the "
        "mean over clients, then mean ± sample std (min–max) over seeds; Δ is paired by seed.",
        "",
        "| algorithm | personalised acc % | shared-only acc % | Δ personalised vs HOMLoRA (pts) "
        "| median wall s |",
        "|---|---:|---:|---:|---:|",
    ]
    for v in [*VARIANTS, "majority"]:
        mine = [by[(v, s)] for s in seeds if (v, s) in by]
        if not mine:
            continue
        pers = [r["mean_personal_accuracy"] for r in mine]
        shared = [r["mean_shared_accuracy"] for r in mine if r["mean_shared_accuracy"] is not None]
        deltas = [
            by[(v, s)]["mean_personal_accuracy"] - by[("homlora", s)]["mean_personal_accuracy"]
            for s in seeds
            if (v, s) in by and ("homlora", s) in by
        ]
        delta = "-" if v == "homlora" or not deltas else _pm(deltas)
        wall = statistics.median(r["wall_s"] for r in mine)
        name = "majority label of own training split (reference)" if v == "majority" else v
        lines.append(f"| {name} | {_pm(pers)} | {_pm(shared)} | {delta} | {wall:.0f} |")
    lines += [
        "",
        "## Per seed",
        "",
        "| algorithm | seed | personalised % | shared-only % | per client personalised % |",
        "|---|---:|---:|---:|---|",
    ]
    for r in runs:
        shared = r["mean_shared_accuracy"]
        per_client = ", ".join(
            f"{c['name']} {100 * c['personal_accuracy']:.1f}" for c in r["clients"]
        )
        lines.append(
            f"| {r['variant']} | {r['seed']} | {100 * r['mean_personal_accuracy']:.2f} | "
            f"{'-' if shared is None else f'{100 * shared:.2f}'} | {per_client} |"
        )
    return "\n".join(lines) + "\n"


def _save(path: Path, result: dict[str, Any], runs: list[dict[str, Any]], wall_s: float) -> None:
    """Write the results so far atomically: an interrupted benchmark resumes from them."""
    result.update(
        runs=runs,
        wall_s=wall_s,
        load_after=os.getloadavg()[0],
        date_utc=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--similarity", type=float, default=0.1)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-train", type=int, default=250)
    p.add_argument("--max-test", type=int, default=200)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--resume", action="store_true", help="keep the runs already saved")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if not PF2LORA.is_file():
        p.error(f"{PF2LORA} not found: run `bash scripts/bootstrap.sh` first")

    path = args.out / "label_skew.json"
    command = "python " + " ".join(["benchmarks/bench_label_skew.py", *(argv or sys.argv[1:])])
    settings = {
        k: getattr(args, k)
        for k in (
            "similarity",
            "clients",
            "max_train",
            "max_test",
            "max_length",
            "batch_size",
            "local_steps",
            "rounds",
        )
    }
    prior: dict[str, Any] = json.loads(path.read_text()) if args.resume and path.is_file() else {}
    if prior and prior["settings"] != settings:
        p.error(f"--resume: {path} was made with other settings {prior['settings']}")
    runs: list[dict[str, Any]] = prior.get("runs", [])
    done = {(r["variant"], r["seed"]) for r in runs}
    result: dict[str, Any] = {
        "benchmark": "personalised accuracy under label skew (VADER pooled, similarity split)",
        # The first command made the runs; a --resume only adds the missing ones.
        "command": prior.get("command", command),
        "commands": [*prior.get("commands", []), command],
        "settings": settings,
        "load_before": prior.get("load_before", os.getloadavg()[0]),
    }
    wall_before = float(prior.get("wall_s", 0.0))
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        if ("majority", seed) not in done:
            runs.append(majority_reference(seed, args))
        for v in args.variants:
            if (v, seed) in done:
                continue
            run = run_one(v, seed, args)
            runs.append(run)
            print(
                f"{v:8s} seed {seed}: personalised {run['mean_personal_accuracy']:.4f} "
                f"shared-only {run['mean_shared_accuracy']} ({run['wall_s']:.0f} s)",
                flush=True,
            )
            _save(path, result, runs, wall_before + time.perf_counter() - start)
    _save(path, result, runs, wall_before + time.perf_counter() - start)
    table = markdown(result)
    print(table)
    (args.out / "label_skew.md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
