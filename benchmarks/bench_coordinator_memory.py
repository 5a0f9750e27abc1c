"""Coordinator memory against the base model's size: peak RSS of a real `pf2lora coordinator
serve` process that starts one run (the initial shared adapter is drawn and checkpointed as
round 0) on MiniLM (22.7 M parameters) and on SmolLM2-135M (6x larger).

    .venv/bin/python benchmarks/bench_coordinator_memory.py --label after [--repeats 3]

Each repeat starts a fresh coordinator (plaintext, loopback, no silos), waits for it to serve,
starts a run with `pf2lora run start`, waits until round 0's checkpoint exists, then reads the
process's peak resident memory (VmHWM in /proc/PID/status) and stops it. Results append to
benchmarks/results/coordinator_memory_runs.jsonl; coordinator_memory.json/.md show the median
per label and model and the SmolLM2 / MiniLM ratio.
"""

from __future__ import annotations

import argparse
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import append_log, platform_info, read_log, save_results

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
PF2LORA = str(ROOT / ".venv" / "bin" / "pf2lora")
MODELS = {"minilm": "seq-cls", "smollm2": "causal-lm"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def measure(model: str) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-coord-mem-"))
    silo_port, control_port = free_port(), free_port()
    argv = [
        PF2LORA,
        "coordinator",
        "serve",
        "--insecure",
        "--state-dir",
        str(work / "state"),
        "--silo-api-listen",
        f"127.0.0.1:{silo_port}",
        "--control-api-listen",
        f"127.0.0.1:{control_port}",
        "--health-listen",
        "",
    ]
    with (work / "coordinator.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        start = [
            PF2LORA, "run", "start", "--insecure", "--coordinator", f"127.0.0.1:{control_port}",
            "--model", model, "--task", MODELS[model], "--rounds", "1", "--run-id", "mem",
        ]  # fmt: skip
        t0 = time.perf_counter()
        for _ in range(120):
            p = subprocess.run(start, capture_output=True, text=True)
            if p.returncode == 0:
                break
            if "cannot reach" not in p.stderr:
                raise SystemExit(f"run start failed: {p.stderr}")
            time.sleep(0.5)
        seconds = time.perf_counter() - t0
        checkpoint = work / "state" / "runs" / "mem" / "global-00000.safetensors"
        assert checkpoint.is_file(), "round 0 was not checkpointed"
        return {
            "model": model,
            "peak_rss_mib": round(vm_hwm_mib(proc.pid), 1),
            "start_run_seconds": round(seconds, 2),
            "checkpoint_bytes": checkpoint.stat().st_size,
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def report(out: Path) -> None:
    runs = read_log(out / "coordinator_memory_runs.jsonl")
    rows = []
    summary: dict[str, Any] = {}
    for label in dict.fromkeys(r["label"] for r in runs):
        per = {}
        for model in MODELS:
            xs = [r["peak_rss_mib"] for r in runs if r["label"] == label and r["model"] == model]
            if xs:
                per[model] = {"median_peak_rss_mib": statistics.median(xs), "repeats": len(xs)}
        if len(per) == len(MODELS):
            ratio = per["smollm2"]["median_peak_rss_mib"] / per["minilm"]["median_peak_rss_mib"]
            per["ratio_smollm2_to_minilm"] = round(ratio, 2)
            rows.append(
                f"| {label} | {per['minilm']['median_peak_rss_mib']:.0f} MiB | "
                f"{per['smollm2']['median_peak_rss_mib']:.0f} MiB | {ratio:.2f} | "
                f"{per['minilm']['repeats']} |"
            )
        summary[label] = per
    md = [
        "# Coordinator peak memory against the base model",
        "",
        "Command: `.venv/bin/python benchmarks/bench_coordinator_memory.py --label LABEL "
        "--repeats 3`. Peak RSS (VmHWM) of `pf2lora coordinator serve` after `pf2lora run "
        "start` checkpointed round 0; medians.",
        "",
        "| label | MiniLM (22.7 M) | SmolLM2-135M | ratio | repeats |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
    ]
    machine = runs[-1]["machine"] if runs else {}
    save_results(out, "coordinator_memory", {"summary": summary, "machine": machine}, "\n".join(md))
    print("\n".join(md))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    for i in range(args.repeats):
        for model in MODELS:
            rec = measure(model)
            rec.update(label=args.label, commit=commit, machine=platform_info())
            append_log(args.out / "coordinator_memory_runs.jsonl", rec)
            print(f"[{i + 1}/{args.repeats}] {args.label} {model}: {rec}", flush=True)
    report(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
