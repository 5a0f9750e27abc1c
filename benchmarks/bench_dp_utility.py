"""Accuracy against epsilon: silo-level DP-FedAvg for PF2LoRA and HOMLoRA on the personalisation
benchmark's label-sorted split (TREC, s = 0.1, 8 clients, 30 rounds x 10 local steps), each
method on its validation-selected settings (bench_personalization.py).

    cd benchmarks
    # 1. the clip bound C per method: the median update norm of a run on the validation split
    #    of the training data (seed 0, no clipping, noise std z C = 1e-6): test data never used
    ../.venv/bin/python bench_dp_utility.py --phase calibrate --workers 2
    # 2. the table: noise multipliers x methods x seeds (resumable, one record per run)
    ../.venv/bin/python bench_dp_utility.py --phase table --workers 2
    # 3. dp_utility.json / .md and dp_utility.png (accuracy against epsilon)
    ../.venv/bin/python bench_dp_utility.py --phase report

DP runs use mode "silo" (each of the 8 silos adds noise of std z C / sqrt(8)), delta 1e-5;
epsilon is after all 30 rounds (Opacus RDP accountant, sample rate 1). The no-DP reference is
the personalisation table's runs of the same split, method and seed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

from _common import read_log, save_results
from bench_personalization import (
    RESULTS,
    RUN_LOG,
    parser,
    run_all,
    selected,
    settings,
    task,
)

from pf2lora.common.privacy import accountant

LOG = "dp_utility_runs.jsonl"
SPLIT = "trec/s=0.1"
METHODS = ("pf2lora", "homlora")
NOISE = (0.5, 1.0, 2.0, 4.0)
DELTA = 1e-5


def dp_hp(hp: dict[str, Any], clip: float, z: float, clients: int) -> dict[str, Any]:
    dp = {"enabled": True, "clip": clip, "noise_multiplier": z, "min_silos": clients}
    return {**hp, "dp": {**dp, "delta": DELTA}}


def calibrated(out: Path) -> dict[str, float]:
    """method -> C: the median update norm over clients and rounds of its calibration run."""
    out_c: dict[str, float] = {}
    for r in read_log(out / LOG):
        if r["phase"] == "tune" and r.get("dp_update_norms"):
            out_c[r["method"]] = statistics.median(r["dp_update_norms"])
    return out_c


def report(out: Path, s: dict[str, Any], command: str) -> None:
    runs = [r for r in read_log(out / LOG) if r["phase"] == "table"]
    ref = [
        r
        for r in read_log(out / RUN_LOG)
        if r["phase"] == "table" and r["split"] == SPLIT and r["method"] in METHODS
    ]
    rows = []
    for method in METHODS:
        base = [r["personalised_acc"] for r in ref if r["method"] == method]
        if base:
            rows.append(
                {
                    "method": method,
                    "noise_multiplier": None,
                    "epsilon": None,
                    "acc": base,
                    "worst": [r["worst_client_acc"] for r in ref if r["method"] == method],
                }
            )
        for z in NOISE:
            mine = [
                r
                for r in runs
                if r["method"] == method and r["config"]["dp"]["noise_multiplier"] == z
            ]
            if mine:  # epsilon after all rounds (a diverged run scores 0, counted apart)
                rows.append(
                    {
                        "method": method,
                        "noise_multiplier": z,
                        "epsilon": accountant.epsilon(z, s["rounds"], DELTA),
                        "acc": [r["personalised_acc"] or 0.0 for r in mine],
                        "worst": [r["worst_client_acc"] or 0.0 for r in mine],
                        "diverged": sum(1 for r in mine if r.get("diverged")),
                    }
                )
    lines = [
        "# Accuracy against epsilon (silo-level DP-FedAvg)",
        "",
        f"Command: `{command}`. Split {SPLIT}, {s['clients']} clients, {s['rounds']} rounds x "
        f"{s['local_steps']} local steps; clip C per method from its calibration run on the "
        f"validation split: {json.dumps(calibrated(out))}; delta {DELTA}; mode silo.",
        "",
        "| method | noise multiplier z | epsilon after all rounds | personalised acc % "
        "(mean ± sd) | worst client % | seeds | diverged (scored 0) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        acc = [100 * a for a in r["acc"]]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        z = "no DP" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:g}"
        eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        lines.append(
            f"| {r['method']} | {z} | {eps} | {statistics.mean(acc):.1f} ± {sd:.1f} | "
            f"{100 * statistics.mean(r['worst']):.1f} | {len(acc)} | {r.get('diverged', 0)} |"
        )
    save_results(
        out,
        "dp_utility",
        {"command": command, "settings": s, "rows": rows},
        "\n".join(lines) + "\n",
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method and r["epsilon"]]
        if not mine:
            continue
        eps = [r["epsilon"] for r in mine]
        (line,) = ax.plot(
            eps,
            [100 * statistics.mean(r["acc"]) for r in mine],
            marker="o",
            label=f"{method} (diverged runs count 0)",
        )
        color = line.get_color()
        bad = [r for r in mine if r.get("diverged")]
        if bad:
            ax.scatter(
                [r["epsilon"] for r in bad],
                [100 * statistics.mean(r["acc"]) for r in bad],
                marker="x",
                s=80,
                color="black",
                zorder=3,
            )
        base = [r for r in rows if r["method"] == method and r["epsilon"] is None]
        if base:
            ax.axhline(
                100 * statistics.mean(base[0]["acc"]),
                color=color,
                linestyle="--",
                linewidth=0.8,
                label=f"{method}, no DP",
            )
    ax.set_xscale("log")
    ax.set_xlabel(f"epsilon after all rounds (delta {DELTA:g})")
    ax.set_ylabel("mean personalised accuracy %")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "dp_utility.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=("calibrate", "table", "report"), required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--noise", type=float, nargs="+", default=list(NOISE))
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    # the personalisation benchmark's settings, defaults included: its no-DP runs are the reference
    base = parser().parse_args(["--phase", "table", "--rounds", str(args.rounds)])
    s = {**settings(base), "layers": base.layers}
    command = " ".join(shlex.quote(a) for a in ["benchmarks/bench_dp_utility.py", *sys.argv[1:]])
    choice = selected(args.out)
    if args.phase == "calibrate":  # validation split; no clipping in effect, negligible noise
        specs = [
            task(m, dp_hp(choice[m], 1e6, 1e-12, s["clients"]), SPLIT, 0, "tune", s)
            for m in METHODS
        ]
        run_all(specs, args.out / LOG, args.workers)
    elif args.phase == "table":
        clip = calibrated(args.out)
        missing = [m for m in METHODS if m not in clip]
        if missing:
            raise SystemExit(f"no calibration for {missing}: run --phase calibrate first")
        specs = [
            task(m, dp_hp(choice[m], clip[m], z, s["clients"]), SPLIT, seed, "table", s)
            for seed in args.seeds
            for z in args.noise
            for m in METHODS
        ]
        run_all(specs, args.out / LOG, args.workers)
    report(args.out, s, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
