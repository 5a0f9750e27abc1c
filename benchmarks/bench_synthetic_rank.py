"""Automatic rank recovery on the synthetic problem of docs/algorithm.md §6, at full size.

    .venv/bin/python benchmarks/bench_synthetic_rank.py [--seeds 0 1 2] [--rounds 600]

d = 64, M = 5 clients, r = 8, r_hat = 2, true ranks (6, 7, 8, 9, 10), W0 = 0,
2000 train / 500 test samples per client, noise sigma in {0, 0.01}.
For every case: per client the true rank, the learned rank of the client's update
Delta W_k = (alpha/r) B A + (alpha/r_hat) D_k C_k at tau = 0.05 and 0.01 (number of singular
values above tau * sigma_1), the leading singular values and the held-out MSE.

Cases
- main: PF2LoRA (unroll, ll_lr 0.2, ul_lr 0.002), HOMLoRA and HETLoRA (AdamW lr 0.002),
  noise 0 and 0.01, every seed. 20 local steps of batch 64 per round, no gradient clipping.
- sweep: PF2LoRA with the lower level slower relative to the upper level
  (ll_lr/ul_lr = 40: ul_lr 0.005; and 25: ll_lr 0.05), noise 0, every seed.
  The seed draws the problem (S*, P_k*, data) and the initial adapters.

No tuning happens here: the learning rates are fixed in advance (docs/algorithm.md explains
how the timescale finding was made); the held-out split is only reported.
Writes benchmarks/results/synthetic_rank.{json,md}. One torch thread (64x64 matrices).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import machine_info  # benchmarks/_common.py (scripts run from benchmarks/)

from pf2lora.common.algorithms.base import AlgorithmConfig
from pf2lora.common.learning.config import AdapterConfig, ModelConfig, TrainConfig
from pf2lora.common.simulation import DataConfig, SimulationConfig, run_simulation

RESULTS = Path(__file__).resolve().parent / "results"
TRUE_RANKS = (6, 7, 8, 9, 10)
TOP_SV = 12  # singular values kept in the JSON per client (r + r_hat = 10, plus two)


def make_config(
    algorithm: str,
    *,
    seed: int,
    noise: float,
    rounds: int,
    ll_lr: float,
    ul_lr: float,
    local_steps: int,
    batch_size: int,
    eval_every: int,
) -> SimulationConfig:
    return SimulationConfig(
        algorithm=AlgorithmConfig(
            name=algorithm,
            train=TrainConfig(
                local_steps=local_steps,
                batch_size=batch_size,
                ll_lr=ll_lr,
                ul_lr=ul_lr,
                max_grad_norm=None,
                hypergrad="unroll",
                ll_steps=1,
            ),
        ),
        model=ModelConfig(
            path="", task="regression", adapters=AdapterConfig(shared_rank=8, private_rank=2)
        ),
        data=DataConfig(
            source="synthetic-rank",
            synthetic_dim=64,
            synthetic_true_ranks=TRUE_RANKS,
            synthetic_noise_std=noise,
            synthetic_train_samples=2000,
            synthetic_test_samples=500,
        ),
        rounds=rounds,
        seed=seed,
        eval_every=eval_every,
    )


def run_case(label: str, algorithm: str, **kw: Any) -> dict[str, Any]:
    cfg = make_config(algorithm, **kw)
    t0 = time.perf_counter()
    res = run_simulation(cfg)
    wall = time.perf_counter() - t0
    clients = []
    for c in res.clients:
        clients.append(
            {
                "name": c["name"],
                "true_rank": c["true_rank"],
                "learned_rank": c["learned_rank"],
                "learned_rank_tau_0.01": c["learned_rank_tau_0.01"],
                "hetlora_rank": c.get("hetlora_rank"),
                "test_mse": c["test_mse"],
                "shared_only_mse": c.get("shared_mse"),
                "singular_values": [round(s, 5) for s in c["singular_values"][:TOP_SV]],
            }
        )
    curve = [
        {
            "round": r["round"],
            "mean_personal_mse": r.get("mean_personal_mse"),
            "train_loss": statistics.fmean(r["train_loss"]),
        }
        for r in res.rounds
        if "mean_personal_mse" in r
    ]
    exact = sum(c["learned_rank"] == c["true_rank"] for c in clients)
    out = {
        "case": label,
        "algorithm": algorithm,
        "seed": kw["seed"],
        "noise": kw["noise"],
        "ll_lr": kw["ll_lr"] if algorithm == "pf2lora" else None,
        "ul_lr": kw["ul_lr"],
        "rounds": kw["rounds"],
        "wall_seconds": wall,
        "ranks_exact": exact,
        "mean_test_mse": statistics.fmean(c["test_mse"] for c in clients),
        "parameters": res.parameters,
        "clients": clients,
        "curve": curve,
    }
    ranks = [c["learned_rank"] for c in clients]
    print(
        f"{label:28s} seed {kw['seed']} noise {kw['noise']:<5}: learned ranks {ranks} "
        f"(tau 0.01: {[c['learned_rank_tau_0.01'] for c in clients]}), exact {exact}/5, "
        f"mean test MSE {out['mean_test_mse']:.2e}, {wall:.0f} s",
        flush=True,
    )
    return out


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# Synthetic rank recovery (docs/algorithm.md §6, full size)",
        "",
        f"Command: `{doc['command']}` ({doc['date']}); total wall time {doc['wall_seconds']:.0f} "
        "s.",
        "",
        f"Machine: {doc['machine']['cpu']}, {doc['machine']['cpus_usable']} usable CPUs "
        f"(shared with other jobs; 1-minute load average {doc['machine']['load_average'][0]:.1f} "
        f"before, {doc['load_average_after'][0]:.1f} after), torch {doc['machine']['torch']}, "
        f"{doc['machine']['torch_threads']} torch thread.",
        "",
        "Setup: d = 64, 5 clients, r = 8, r̂ = 2, α = 16, W0 = 0, true ranks 6..10, 2000 train / "
        f"500 test samples per client; {doc['settings']['rounds']} rounds x "
        f"{doc['settings']['local_steps']} local steps, batch {doc['settings']['batch_size']}, "
        "no gradient clipping; PF2LoRA uses the unrolled hypergradient. HOMLoRA and HETLoRA use "
        "AdamW at the same upper-level lr (0.002). Learned rank = number of singular values of "
        "ΔW_k above τ·σ1 (τ = 0.05; τ = 0.01 in brackets). Test MSE is on the held-out samples "
        "(noise-free targets would give 0; with σ_ε = 0.01 the floor is 1e-4).",
        "",
        "## Summary over seeds",
        "",
        "| case | noise | seeds | clients with exact rank (τ=0.05) | per-seed exact | "
        "median mean test MSE | median wall s |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for c in doc["cases"]:
        groups.setdefault((c["case"], c["noise"]), []).append(c)
    for (case, noise), runs in groups.items():
        exact = sum(r["ranks_exact"] for r in runs)
        per = ", ".join(f"s{r['seed']}: {r['ranks_exact']}/5" for r in runs)
        lines.append(
            f"| {case} | {noise} | {len(runs)} | {exact}/{5 * len(runs)} | {per} | "
            f"{statistics.median(r['mean_test_mse'] for r in runs):.2e} | "
            f"{statistics.median(r['wall_seconds'] for r in runs):.0f} |"
        )
    lines += ["", "## Per client (every case and seed)", ""]
    lines += [
        "| case | noise | seed | client | true rank | learned rank τ=0.05 (τ=0.01) | HETLoRA rank "
        "| "
        "test MSE | shared-only MSE | leading singular values |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in doc["cases"]:
        for cl in c["clients"]:
            sv = ", ".join(f"{s:.3g}" for s in cl["singular_values"][:11])
            het = "-" if cl["hetlora_rank"] is None else str(cl["hetlora_rank"])
            shared = "-" if cl["shared_only_mse"] is None else f"{cl['shared_only_mse']:.2e}"
            lines.append(
                f"| {c['case']} | {c['noise']} | {c['seed']} | {cl['name']} | {cl['true_rank']} | "
                f"{cl['learned_rank']} ({cl['learned_rank_tau_0.01']}) | {het} | "
                f"{cl['test_mse']:.2e} | {shared} | {sv} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--sweep-seeds",
        type=int,
        nargs="+",
        default=None,
        help="seeds of the ll/ul ratio sweep (default: --seeds)",
    )
    p.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.01])
    p.add_argument("--rounds", type=int, default=600)
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="synthetic_rank", help="output file stem")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(
        shlex.quote(a) for a in ["benchmarks/bench_synthetic_rank.py", *sys.argv[1:]]
    )
    machine = machine_info()
    common = {
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "batch_size": args.batch_size,
        "eval_every": args.eval_every,
    }
    t0 = time.perf_counter()
    cases: list[dict[str, Any]] = []
    for noise in args.noise:
        for seed in args.seeds:
            cases.append(
                run_case(
                    "pf2lora ll0.2/ul0.002 (100x)",
                    "pf2lora",
                    seed=seed,
                    noise=noise,
                    ll_lr=0.2,
                    ul_lr=0.002,
                    **common,
                )
            )
            if not args.no_baselines:
                for alg in ("homlora", "hetlora"):
                    cases.append(
                        run_case(
                            f"{alg} lr0.002",
                            alg,
                            seed=seed,
                            noise=noise,
                            ll_lr=0.2,
                            ul_lr=0.002,
                            **common,
                        )
                    )
    if not args.no_sweep:
        for seed in args.sweep_seeds or args.seeds:
            cases.append(
                run_case(
                    "pf2lora ll0.2/ul0.005 (40x)",
                    "pf2lora",
                    seed=seed,
                    noise=0.0,
                    ll_lr=0.2,
                    ul_lr=0.005,
                    **common,
                )
            )
            cases.append(
                run_case(
                    "pf2lora ll0.05/ul0.002 (25x)",
                    "pf2lora",
                    seed=seed,
                    noise=0.0,
                    ll_lr=0.05,
                    ul_lr=0.002,
                    **common,
                )
            )
    doc = {
        "benchmark": "synthetic_rank",
        "command": command,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine,
        "load_average_after": os.getloadavg(),
        "settings": {
            **common,
            "dim": 64,
            "clients": 5,
            "shared_rank": 8,
            "private_rank": 2,
            "alpha": 16.0,
            "true_ranks": list(TRUE_RANKS),
            "train_samples": 2000,
            "test_samples": 500,
            "max_grad_norm": None,
            "tau": [0.05, 0.01],
        },
        "wall_seconds": time.perf_counter() - t0,
        "cases": cases,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = markdown(doc)
    (args.out / f"{args.name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
