"""The first run a new user makes: `pf2lora demo`'s wall time, where it goes, and peak memory.

    .venv/bin/python benchmarks/bench_demo.py --label after [--repeats 2]

Runs the demo (MiniLM, 4 silos, 3 rounds, mutual TLS, secure aggregation) as a subprocess in a
fresh work folder, timestamps each line it prints, and samples the resident memory of the demo
and all its child processes every 0.2 s. Records: wall time, seconds to the demo's first line,
to "all 4 silos joined" (start-up: certificates, data, five processes importing torch and
loading the model) and to the results table; peak memory of the whole process tree (sum of
RSS) and of its largest process. Each labelled result is appended to
benchmarks/results/demo_runs.jsonl; demo.json/.md show the median per label. Measure on an
idle machine: another job on the cores changes every number.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import append_log, platform_info, read_log, save_results

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
MARKS = {  # a demo line that starts with this -> its event
    "pf2lora demo: work folder": "first_line",
    "all 4 silos joined": "joined",
    "round 1/": "round_1",
    "report with": "report",
}


def tree_rss(pid: int) -> tuple[int, int]:
    """(sum, max) resident bytes of a process and its descendants."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    sizes = []
    for p in procs:
        try:
            sizes.append(p.memory_info().rss)
        except psutil.NoSuchProcess:
            pass
    return sum(sizes), max(sizes, default=0)


def run_once(extra: list[str]) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-demo-")) / "demo"
    argv = [str(ROOT / ".venv" / "bin" / "pf2lora"), "demo", "--workdir", str(work), *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"sum": 0, "max": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            total, largest = tree_rss(proc.pid)
            peak["sum"], peak["max"] = max(peak["sum"], total), max(peak["max"], largest)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    events: dict[str, float] = {}
    lines: list[tuple[float, str]] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        t = time.perf_counter() - t0
        lines.append((round(t, 2), line.rstrip()))
        for mark, event in MARKS.items():
            if mark in line and event not in events:
                events[event] = round(t, 2)
    code = proc.wait()
    done.set()
    sampler.join()
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"demo exited with {code}:\n" + "\n".join(x for _, x in lines[-30:]))
    return {
        "wall_seconds": round(wall, 1),
        "events": events,
        "peak_tree_rss_mib": round(peak["sum"] / 2**20),
        "peak_process_rss_mib": round(peak["max"] / 2**20),
        "terminal_lines": len(lines),
        "output": lines,
    }


def report(out: Path) -> None:
    runs = read_log(out / "demo_runs.jsonl")
    labels = list(dict.fromkeys(r["label"] for r in runs))
    summary: dict[str, dict[str, Any]] = {}
    for label in labels:
        rs = [r for r in runs if r["label"] == label]
        med = {
            k: statistics.median(r[k] for r in rs)
            for k in ("wall_seconds", "peak_tree_rss_mib", "peak_process_rss_mib", "terminal_lines")
        }
        for event in MARKS.values():
            ts = [r["events"][event] for r in rs if event in r["events"]]
            if ts:
                med[f"{event}_s"] = statistics.median(ts)
        summary[label] = {"repeats": len(rs), "commit": rs[-1].get("commit"), **med}
    lines = [
        "# `pf2lora demo`: wall time and memory",
        "",
        "Command: `.venv/bin/python benchmarks/bench_demo.py --label LABEL` (from the repository",
        "root; medians over the repeats of each label). Seconds from the command's start.",
        "",
        "| label | repeats | first line | all silos joined | round 1 done | wall "
        "| peak memory, all processes | largest process | lines on the terminal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, s in summary.items():
        lines.append(
            f"| {label} | {s['repeats']} | {s.get('first_line_s', '-')} | {s.get('joined_s', '-')} "
            f"| {s.get('round_1_s', '-')} | {s['wall_seconds']:.0f} s | "
            f"{s['peak_tree_rss_mib'] / 1024:.2f} GiB | {s['peak_process_rss_mib'] / 1024:.2f} GiB "
            f"| {s['terminal_lines']:.0f} |"
        )
    machine = runs[-1]["machine"] if runs else {}
    lines += ["", f"Machine: {machine.get('cpu_model')}, {machine.get('cpus_usable')} cores.", ""]
    save_results(out, "demo", {"summary": summary, "machine": machine}, "\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", required=True, help="what this measures, e.g. before / after")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("demo_args", nargs="*", help="flags passed to pf2lora demo (after --)")
    args = p.parse_args(argv)
    if not args.report_only:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        for i in range(args.repeats):
            rec = run_once(args.demo_args)
            rec.update(label=args.label, commit=commit, machine=platform_info())
            rec["load_avg_1min"] = os.getloadavg()[0]
            append_log(args.out / "demo_runs.jsonl", rec)
            print(
                f"[{i + 1}/{args.repeats}] {args.label}: {rec['wall_seconds']} s, events "
                f"{rec['events']}, peak {rec['peak_tree_rss_mib']} MiB",
                flush=True,
            )
    report(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
