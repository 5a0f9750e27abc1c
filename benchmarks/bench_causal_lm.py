"""A decoder on heterogeneous instruction data: PF2LoRA against HOMLoRA and local-only with
SmolLM2-135M-Instruct (all 30 layers), four silos that each ask a different question of a
different corpus (the packaged instruction tasks: tweet sentiment, question type, critic
verdict, editorial tone).

    # 1. selection on a validation split of each silo's training data (test data never used):
    #    every method gets three configurations; the criterion is the mean held-out answer
    #    loss of the personalised models
    .venv/bin/python benchmarks/bench_causal_lm.py --phase tune
    # 2. the table: each method on its selected configuration, 3 seeds, on the test splits,
    #    with greedy generation scored by exact match and ROUGE-L
    .venv/bin/python benchmarks/bench_causal_lm.py --phase table
    # 3. (re)write causal_lm.json / .md from the logs
    .venv/bin/python benchmarks/bench_causal_lm.py --phase report

Every run is appended to benchmarks/results/causal_lm_{selection,runs}.jsonl as it ends; a
rerun skips what is there. One process with two torch threads, or (faster on 2 cores) two
workers with one thread each, the second taking the runs in reverse order:
    .venv/bin/python benchmarks/bench_causal_lm.py --phase table --threads 1 &
    .venv/bin/python benchmarks/bench_causal_lm.py --phase table --threads 1 --reverse
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import append_log, machine_info, read_log, save_results

RESULTS = Path(__file__).resolve().parent / "results"
SELECTION_LOG = "causal_lm_selection.jsonl"
RUN_LOG = "causal_lm_runs.jsonl"

SETTINGS: dict[str, Any] = {
    "clients": 4,  # one per packaged instruction task
    "train_per_client": 64,
    "test_per_client": 32,
    "validation_fraction": 0.25,  # tuning: 48 train, 16 validation examples per silo
    "rounds": 3,
    "local_steps": 4,
    "batch_size": 4,
    "max_length": 80,
    "generate_examples": 24,  # table only (selection uses answer loss)
    "max_new_tokens": 6,
}
# The same three configurations for each method (its own knobs where it has them).
TUNING: dict[str, list[dict[str, Any]]] = {
    "pf2lora": [
        {"ul_lr": 2e-3, "ll_lr": 0.1},  # the classification defaults
        {"ul_lr": 5e-4, "ll_lr": 0.01},  # the decoder demo's first choice
        {"ul_lr": 2e-3, "ll_lr": 0.01},
    ],
    "homlora": [{"ul_lr": lr} for lr in (5e-4, 1e-3, 2e-3)],
    "local": [{"ul_lr": lr} for lr in (5e-4, 1e-3, 2e-3)],
}
SEEDS = (0, 1, 2)


def run_one(
    method: str, hp: dict[str, Any], seed: int, phase: str, threads: int = 2
) -> dict[str, Any]:
    import torch

    from pf2lora.common.algorithms.base import AlgorithmConfig
    from pf2lora.common.learning.config import ModelConfig, TrainConfig
    from pf2lora.common.simulation import DataConfig, SimulationConfig, run_simulation

    torch.set_num_threads(threads)
    s = SETTINGS
    train = TrainConfig(
        local_steps=s["local_steps"],
        batch_size=s["batch_size"],
        ul_lr=hp["ul_lr"],
        ll_lr=hp.get("ll_lr", TrainConfig.ll_lr),
        ll_max_grad_norm=hp.get("ll_max_grad_norm"),
        ll_steps=1,  # what the committed selection and table ran (the causal-lm default)
    )
    tune = phase == "tune"
    cfg = SimulationConfig(
        algorithm=AlgorithmConfig(name=method, train=train),
        model=ModelConfig(
            path="smollm2",
            task="causal-lm",
            max_length=s["max_length"],
            generate_examples=0 if tune else s["generate_examples"],
            max_new_tokens=s["max_new_tokens"],
        ),
        data=DataConfig(
            source="instructions",
            num_clients=s["clients"],
            max_train_per_client=s["train_per_client"],
            max_test_per_client=s["test_per_client"],
            validation_fraction=s["validation_fraction"] if tune else None,
        ),
        rounds=s["rounds"],
        seed=seed,
        eval_every=s["rounds"],
        evaluate_initial=True,
    )
    from pf2lora.common.learning.trainer import Diverged

    head = {"phase": phase, "method": method, "config": hp, "seed": seed, "settings": s}
    t0 = time.perf_counter()
    try:
        res = run_simulation(cfg)
    except Diverged as exc:  # a result too: these settings do not train
        return {
            **head,
            "diverged": str(exc),
            "mean_personal_answer_loss": None,
            "wall_seconds": time.perf_counter() - t0,
        }
    first, last = res.rounds[0], res.rounds[-1]
    keys = ("answer_loss", "exact_match", "rouge_l")
    per_client = {}
    for c, c0 in zip(res.clients, first["eval"], strict=True):
        row = {f"{lvl}_{k}": c.get(f"{lvl}_{k}") for k in keys for lvl in ("personal", "shared")}
        row.update({f"initial_{k}": c0.get(f"personal_{k}") for k in keys})
        per_client[c["name"]] = row
    trained = [r for r in res.rounds if r["round"] > 0]
    return {
        **head,
        "per_client": per_client,
        **{
            f"mean_{lvl}_{k}": last.get(f"mean_{lvl}_{k}")
            for k in keys
            for lvl in ("personal", "shared")
        },
        **{f"initial_{k}": first.get(f"mean_personal_{k}") for k in keys},
        "seconds_per_round": sum(sum(r["train_seconds"]) for r in trained)
        / (len(trained) * s["clients"]),
        "parameters": res.parameters,
        "wall_seconds": time.perf_counter() - t0,
    }


def key(phase: str, method: str, hp: dict[str, Any], seed: int) -> str:
    return json.dumps([phase, method, hp, seed], sort_keys=True)


def _claim(run_key: str) -> bool:
    """True for the one worker process that takes this run (a file made with O_EXCL in the temp
    dir, so that a second worker started with --reverse meets the first without overlap)."""
    claims = Path(tempfile.gettempdir()) / "pf2lora-bench-causal-lm-claims"
    claims.mkdir(exist_ok=True)
    name = hashlib.sha256(run_key.encode()).hexdigest()[:16]
    try:
        (claims / name).open("x").close()
    except FileExistsError:
        return False
    return True


def run_phase(
    specs: list[tuple[str, dict[str, Any], int]], phase: str, log: Path, threads: int = 2
) -> None:
    done = {key(r["phase"], r["method"], r["config"], r["seed"]) for r in read_log(log)}
    todo = [sp for sp in specs if key(phase, *sp) not in done]
    print(f"{len(specs) - len(todo)} of {len(specs)} runs already in {log.name}", flush=True)
    for n, (method, hp, seed) in enumerate(todo, start=1):
        if not _claim(key(phase, method, hp, seed)):
            continue  # another worker runs it
        rec = run_one(method, hp, seed, phase, threads)
        rec["machine"] = machine_info()
        append_log(log, rec)
        if "diverged" in rec:
            print(f"[{n}/{len(todo)}] {phase} {method} {hp} seed {seed}: {rec['diverged']}")
            continue
        print(
            f"[{n}/{len(todo)}] {phase} {method} {hp} seed {seed}: answer loss "
            f"{rec['initial_answer_loss']:.3f} -> {rec['mean_personal_answer_loss']:.3f} "
            f"(shared-only {rec['mean_shared_answer_loss']}), {rec['wall_seconds']:.0f} s",
            flush=True,
        )


def _loss(rec: dict[str, Any]) -> float:
    """The selection criterion; a diverged run scores worst."""
    value = rec.get("mean_personal_answer_loss")
    return float("inf") if value is None else float(value)


def selected(out: Path) -> dict[str, dict[str, Any]]:
    """method -> the configuration with the lowest mean validation answer loss (personalised)."""
    recs = [r for r in read_log(out / SELECTION_LOG) if r["phase"] == "tune"]
    choice = {}
    for method, grid in TUNING.items():
        scored = [
            (_loss(r), i)
            for i, hp in enumerate(grid)
            for r in recs
            if r["method"] == method and r["config"] == hp
        ]
        if len(scored) == len(grid):
            choice[method] = grid[min(scored)[1]]
    return choice


def _pm(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def report(out: Path) -> None:
    sel = [r for r in read_log(out / SELECTION_LOG) if r["phase"] == "tune"]
    runs = [r for r in read_log(out / RUN_LOG) if r["phase"] == "table"]
    choice = selected(out)
    lines = [
        "# Decoder on heterogeneous instruction data (SmolLM2-135M-Instruct, 4 silos)",
        "",
        "Command: `"
        + " ".join(shlex.quote(a) for a in ["benchmarks/bench_causal_lm.py", *sys.argv[1:]])
        + "`",
        "",
        f"Settings: {json.dumps(SETTINGS)}.",
        "",
        "## Selection (validation split of each silo's training data; lower is better)",
        "",
        "| method | configuration | validation answer loss, personalised | shared-only | chosen |",
        "|---|---|---|---|---|",
    ]
    for r in sel:
        mark = "yes" if choice.get(r["method"]) == r["config"] else ""
        loss = "diverged" if "diverged" in r else f"{r['mean_personal_answer_loss']:.4f}"
        shared = r.get("mean_shared_answer_loss")
        lines.append(
            f"| {r['method']} | {r['config']} | {loss} | "
            f"{'-' if shared is None else f'{shared:.4f}'} | {mark} |"
        )
    lines += [
        "",
        "## Test splits (mean over silos, then mean ± sd over seeds)",
        "",
        "| method | answer loss before | answer loss after | shared-only after | exact match | "
        "ROUGE-L | shared-only ROUGE-L | seeds | s/round/silo |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    table: dict[str, Any] = {}
    for method in TUNING:
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue

        def col(name: str, rs: list[dict[str, Any]] = rs) -> list[float]:
            return [r[name] for r in rs if r.get(name) is not None]

        table[method] = {
            name: col(name)
            for name in (
                "initial_answer_loss",
                "mean_personal_answer_loss",
                "mean_shared_answer_loss",
                "mean_personal_exact_match",
                "mean_personal_rouge_l",
                "mean_shared_rouge_l",
            )
        }
        lines.append(
            f"| {method} | {_pm(col('initial_answer_loss'))} | "
            f"{_pm(col('mean_personal_answer_loss'))} | {_pm(col('mean_shared_answer_loss'))} | "
            f"{_pm(col('mean_personal_exact_match'))} | {_pm(col('mean_personal_rouge_l'))} | "
            f"{_pm(col('mean_shared_rouge_l'))} | {len(rs)} | "
            f"{statistics.mean(col('seconds_per_round')):.0f} |"
        )
    lines += ["", "## Per silo (seed 0): answer loss before -> after, exact match", ""]
    for r in runs:
        if r["seed"] != 0:
            continue
        per = ", ".join(
            f"{n} {v['initial_answer_loss']:.2f} -> {v['personal_answer_loss']:.2f} "
            f"(EM {v['personal_exact_match']:.2f})"
            for n, v in r["per_client"].items()
        )
        lines.append(f"- {r['method']}: {per}")
    doc = {"settings": SETTINGS, "selected": choice, "table": table, "selection": sel, "runs": runs}
    save_results(out, "causal_lm", doc, "\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--phase", choices=("tune", "table", "report"), required=True)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (2 workers: 1 each)")
    ap.add_argument(
        "--reverse",
        action="store_true",
        help="take the runs in reverse order (a second worker process beside the first)",
    )
    args = ap.parse_args(argv)
    if args.phase == "tune":
        # the cheap single-level methods first (a broken setting shows in minutes)
        order = sorted(TUNING, key=lambda m: m == "pf2lora")
        specs = [(m, hp, 0) for m in order for hp in TUNING[m]]
        run_phase(
            specs[::-1] if args.reverse else specs, "tune", args.out / SELECTION_LOG, args.threads
        )
    elif args.phase == "table":
        choice = selected(args.out)
        missing = sorted(set(TUNING) - set(choice))
        if missing:
            print(f"selection incomplete for {missing}: run --phase tune first", file=sys.stderr)
            return 2
        specs = [(m, choice[m], seed) for seed in SEEDS for m in TUNING]
        run_phase(specs[::-1] if args.reverse else specs, "table", args.out / RUN_LOG, args.threads)
    report(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
