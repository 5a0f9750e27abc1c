"""System overhead of a real federation: the fraction of round wall time that is not local training,
with secure aggregation on (the default) and off.

    .venv/bin/python benchmarks/bench_federation.py [--rounds 5] [--settings demo tiny] [--secure on
    off]

Each setting runs `pf2lora demo` (a coordinator and 4 silo processes on loopback gRPC, mutual TLS
with demo certificates, one VADER domain per silo), once with SecAgg+ in every round and once with
`--no-secure-aggregation`, and then reads the coordinator's SQLite records of the run:
- round wall time W_r: from the round's opening to its commit (enrollment, task hand-out,
  FetchGlobal, local training, PushUpdate, aggregation, checkpoint, commit);
- local training T_r: the slowest participant's `train_seconds` (the local steps only; silos
  train in parallel, so the round waits for the slowest);
- overhead_r = (W_r - T_r) / W_r; reported per round and as the median over rounds (and over
  rounds >= 2: round 1 also pays each silo's one-time model load and tokenisation).
Per-silo `fetch_seconds`, `push_seconds` (with secure aggregation: from the end of training to
the silo's unmask answer, all five stages) and `local_seconds - train_seconds` (loading and
saving the private state) are averaged per round to show where the overhead goes; with secure
aggregation the coordinator's per-stage times (round_stages) are reported too. The comparison:
median round overhead in seconds (W_r - T_r) with SecAgg+ over the same without it.
Writes benchmarks/results/federation_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"

SETTINGS: dict[str, list[str]] = {
    # the demo's defaults: full MiniLM (6 layers), 10 local steps of 16, 200 examples per silo
    "demo": [],
    # a tiny model where the system's own costs dominate: 1 layer, 3 local steps, 48 examples
    "tiny": [
        "--num-layers",
        "1",
        "--local-steps",
        "3",
        "--max-train",
        "48",
        "--max-test",
        "24",
        "--max-length",
        "32",
    ],
}


def load_avg() -> float:
    return os.getloadavg()[0]


SECAGG_STAGES = ("share_keys", "masked_input", "consistency_check", "unmask", "aggregate")


def analyse(state_dir: Path, run_id: str = "demo") -> dict[str, Any]:
    from pf2lora.coordinator.store import Store

    store = Store(state_dir / "state.db")
    try:
        train = store.metrics(run_id, kind="train")
        rounds = []
        for rr in store.rounds(run_id):
            if rr.round == 0 or rr.completed_ms is None:
                continue
            silos = [
                p.silo_id for p in store.participants(run_id, rr.round, rr.attempt) if p.reported_ms
            ]
            m = [train[(rr.round, s, "train")] for s in silos if (rr.round, s, "train") in train]
            wall = (rr.completed_ms - rr.opened_ms) / 1000
            local = max(x["train_seconds"] for x in m)
            stages = {
                st.stage: (st.ended_ms - st.started_ms) / 1000
                for st in store.stages(run_id, rr.round, rr.attempt)
            }
            rounds.append(
                {
                    "round": rr.round,
                    "silos": len(silos),
                    "wall_s": wall,
                    "local_training_s": local,
                    "overhead_s": wall - local,
                    "overhead_fraction": (wall - local) / wall,
                    "mean_fetch_s": statistics.fmean(x["fetch_seconds"] for x in m),
                    "mean_push_s": statistics.fmean(x["push_seconds"] for x in m),
                    "mean_state_io_s": statistics.fmean(
                        x["local_seconds"] - x["train_seconds"] for x in m
                    ),
                    "stage_s": stages,
                }
            )
    finally:
        store.close()
    fractions = [r["overhead_fraction"] for r in rounds]
    later = [r["overhead_fraction"] for r in rounds if r["round"] >= 2]
    later_s = [r["overhead_s"] for r in rounds if r["round"] >= 2]
    return {
        "rounds": rounds,
        "median_overhead_fraction": statistics.median(fractions),
        "median_overhead_fraction_rounds_2_plus": statistics.median(later) if later else None,
        "median_overhead_s_rounds_2_plus": statistics.median(later_s) if later_s else None,
        "median_wall_s_rounds_2_plus": statistics.median(
            r["wall_s"] for r in rounds if r["round"] >= 2
        )
        if later
        else None,
    }


def run_setting(name: str, rounds: int, work: Path, secure: bool = True) -> dict[str, Any]:
    argv = [
        sys.executable,
        "-m",
        "pf2lora.cli.main",
        "--log-level",
        "WARNING",
        "demo",
        "--workdir",
        str(work),
        "--rounds",
        str(rounds),
        *SETTINGS[name],
        *([] if secure else ["--no-secure-aggregation"]),
    ]
    before = load_avg()
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(
            f"{name}: demo failed "
            f"({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    out = analyse(work / "coordinator")
    out.update(
        setting=name,
        secure_aggregation=secure,
        demo_args=SETTINGS[name],
        demo_wall_s=wall,
        load_before=before,
        load_after=load_avg(),
    )
    print(
        f"{name} (secure aggregation {'on' if secure else 'off'}): median overhead "
        f"{out['median_overhead_fraction']:.1%} over {rounds} rounds (rounds >= 2: "
        f"{out['median_overhead_fraction_rounds_2_plus']:.1%}, "
        f"{out['median_overhead_s_rounds_2_plus']:.2f} s), "
        f"demo {wall:.0f} s",
        flush=True,
    )
    return out


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def write(results: list[dict[str, Any]], command: str) -> None:
    import grpc

    RESULTS.mkdir(parents=True, exist_ok=True)
    env = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
    }
    doc = {"command": command, "environment": env, "settings": results}
    (RESULTS / "federation_overhead.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [
        "# Federation system overhead (4 silos, loopback, mutual TLS)",
        "",
        f"Command: `{command}` ({env['date']})",
        "",
        f"Machine: {env['machine']}; Python {env['python']}, torch {env['torch']}, grpcio "
        f"{env['grpcio']}. "
        "Coordinator and 4 silo processes share the CPUs (silo threads = CPUs / 4), as do other "
        "users' processes when the load average is above 0.",
        "",
        "Overhead of a round = (round wall time - slowest silo's local training time) / round wall "
        "time. Wall time runs from the round's opening to its commit in SQLite; training time is "
        "the silo-reported `train_seconds` of the local steps. Round 1 also pays each silo's "
        "one-time model load and tokenisation.",
        "",
        "With secure aggregation a silo's `push` time runs from the end of its own training to its "
        "unmask answer, all five stages: it includes waiting for the slowest silo to finish "
        "training (the key stage closes when every participant advertised keys), so it is not "
        "overhead; the overhead columns are. The coordinator's stage times (share_keys .. unmask) "
        "are the relays after the key stage; `aggregate` is unmasking, aggregation and the "
        "checkpoint.",
        "",
        "| setting | secure aggregation | demo flags | rounds | median overhead | median overhead, "
        "rounds >= 2 | median overhead s, rounds >= 2 | median round wall s, rounds >= 2 | demo "
        "wall s | load before/after |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        later = r["median_overhead_fraction_rounds_2_plus"]
        flags = " ".join(
            r["demo_args"] + ([] if r["secure_aggregation"] else ["--no-secure-aggregation"])
        )
        lines.append(
            f"| {r['setting']} | {'on' if r['secure_aggregation'] else 'off'} | "
            f"`{flags or '(defaults)'}` | "
            f"{len(r['rounds'])} | {r['median_overhead_fraction']:.1%} | "
            f"{'-' if later is None else f'{later:.1%}'} | "
            f"{_num(r['median_overhead_s_rounds_2_plus'])} | "
            f"{_num(r['median_wall_s_rounds_2_plus'])} | "
            f"{r['demo_wall_s']:.0f} | {r['load_before']:.1f} / {r['load_after']:.1f} |"
        )
    pairs = [
        (on, off)
        for on in results
        for off in results
        if on["setting"] == off["setting"]
        and on["secure_aggregation"]
        and not off["secure_aggregation"]
    ]
    if pairs:
        lines += [
            "",
            "## Secure aggregation on vs off",
            "",
            "Ratio of the median round overhead (seconds, rounds >= 2) with SecAgg+ to that "
            "without, "
            "and the extra seconds per round.",
            "",
            "| setting | overhead s on | overhead s off | ratio on/off | extra s per round | extra "
            "as % of round wall (off) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for on, off in pairs:
            a, b = on["median_overhead_s_rounds_2_plus"], off["median_overhead_s_rounds_2_plus"]
            if a is None or b is None:
                continue
            lines.append(
                f"| {on['setting']} | {a:.2f} | {b:.2f} | {a / b:.2f} | {a - b:.2f} | "
                f"{(a - b) / off['median_wall_s_rounds_2_plus']:.1%} |"
            )
    for r in results:
        lines += [
            "",
            f"## {r['setting']}, secure aggregation {'on' if r['secure_aggregation'] else 'off'}: "
            "per round",
            "",
            "| round | silos | wall s | local training s | overhead | mean fetch s | mean push s | "
            "mean state save/load s | coordinator stages s |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for x in r["rounds"]:
            stages = ", ".join(
                f"{k} {v:.2f}" for k, v in x["stage_s"].items() if k in SECAGG_STAGES
            )
            lines.append(
                f"| {x['round']} | {x['silos']} | {x['wall_s']:.2f} | {x['local_training_s']:.2f} "
                "| "
                f"{x['overhead_fraction']:.1%} | {x['mean_fetch_s']:.3f} | {x['mean_push_s']:.3f} "
                "| "
                f"{x['mean_state_io_s']:.3f} | {stages} |"
            )
    (RESULTS / "federation_overhead.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'federation_overhead.md'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument(
        "--secure",
        nargs="+",
        default=["on", "off"],
        choices=["on", "off"],
        help="secure aggregation modes to run each setting in",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = "python benchmarks/bench_federation.py " + " ".join(sys.argv[1:])
    results = []
    for name in args.settings:
        for mode in args.secure:
            with tempfile.TemporaryDirectory(prefix=f"pf2lora-bench-{name}-") as tmp:
                results.append(
                    run_setting(name, args.rounds, Path(tmp) / "work", secure=mode == "on")
                )
    write(results, command.strip())


if __name__ == "__main__":
    main()
