"""Local cost of one round: PF2LoRA (each hypergradient estimator) against HOMLoRA, same model, same
batches.

    .venv/bin/python benchmarks/bench_local_cost.py [--repeats 7] [--local-steps 5] [--batch-size
    16]

Model: MiniLM (all 6 layers), LoRA on query/value (r = 8, r_hat = 2), a 2-class head; one
client's data (VADER movies, the `natural` 8-client split of seed 0, <= 250 sentences),
max_length 64. One round = `--local-steps` local steps + building the payload.

Wall time: all variants live in ONE process and their rounds are interleaved (the order rotates
every repeat), so background load on the shared machine hits every variant alike. Before every
timed round the trainer's step counter is reset to 0, so every repeat and every variant draws
the same minibatches: batch (step, stream) is a pure function of the client seed; HOMLoRA and
the joint ablation use the upper-level stream, PF2LoRA's estimators the lower-level stream (for
y) and the same upper-level stream. One warm-up round per variant is not timed. Reported: the
median over repeats and its ratio to HOMLoRA's median; also the median of per-repeat ratios.

Memory: each variant runs in a fresh subprocess. After the model, data and runtime are loaded
the peak-RSS counter is reset (/proc/self/clear_refs = 5); the process then runs two rounds and
reads VmHWM. Reported: the loaded baseline RSS, the peak, and the increase over the baseline,
as ratios to HOMLoRA (median over `--mem-repeats` fresh processes).
Writes benchmarks/results/local_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import machine_info  # benchmarks/_common.py (scripts run from benchmarks/)

RESULTS = Path(__file__).resolve().parent / "results"

# label -> (algorithm, hypergrad)
VARIANTS: dict[str, tuple[str, str]] = {
    "homlora": ("homlora", "unroll"),
    "pf2lora-unroll": ("pf2lora", "unroll"),
    "pf2lora-implicit": ("pf2lora", "implicit"),
    "pf2lora-first-order": ("pf2lora", "first-order"),
    "pf2lora-joint": ("pf2lora", "joint"),
    "perfedavg": ("perfedavg", "unroll"),
}
BASELINE = "homlora"


def _status_kib(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) if m else -1


def setup(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """(model config, base model, train data, test data) of one client."""
    from pf2lora.common.client_runtime import encode_dataset
    from pf2lora.common.data.splits import build_client_data
    from pf2lora.common.learning.base_model import load_base_model, load_tokenizer
    from pf2lora.common.learning.config import AdapterConfig, ModelConfig

    data = build_client_data(
        "vader", "natural", 8, 0, max_train_per_client=250, max_test_per_client=50
    )
    client = next(c for c in data if c.name == args.client)
    mc = ModelConfig(
        path="minilm", max_length=64, adapters=AdapterConfig(shared_rank=8, private_rank=2)
    )
    tok = load_tokenizer(mc)
    return (
        mc,
        load_base_model(mc),
        encode_dataset(client.train, tok, mc),
        encode_dataset(client.test, tok, mc),
    )


def make_runtime(
    args: argparse.Namespace, label: str, mc: Any, base: Any, train: Any, test: Any
) -> tuple[Any, Any]:
    from pf2lora.common.algorithms.base import AlgorithmConfig
    from pf2lora.common.algorithms.registry import make_algorithm
    from pf2lora.common.client_runtime import ClientRuntime, initial_global_state
    from pf2lora.common.learning.config import TrainConfig

    name, hypergrad = VARIANTS[label]
    cfg = AlgorithmConfig(
        name=name,
        train=TrainConfig(
            local_steps=args.local_steps,
            batch_size=args.batch_size,
            hypergrad=hypergrad,  # type: ignore[arg-type]
            ll_steps=1,  # the cost of one lower-level step per upper step (ll_steps k adds k - 1)
        ),
    )
    alg = make_algorithm(cfg, mc.adapters)
    g = initial_global_state(alg, mc, 0, base=copy.deepcopy(base))
    rt = ClientRuntime(
        alg, mc, client_index=0, seed=12345, train=train, test=test, base=copy.deepcopy(base)
    )
    return rt, g


def offline() -> None:
    """No model hub, no dataset downloads, no tokenizer threads."""
    for key, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("HF_DATASETS_OFFLINE", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(key, value)


def interleaved(
    runtimes: dict[str, tuple[Any, Any]], labels: list[str], repeats: int
) -> dict[str, list[float]]:
    """One untimed warm-up round per variant, then `repeats` timed rounds of every variant,
    the order rotating each repeat (background load hits every variant alike)."""
    for rt, g in runtimes.values():
        timed_round(rt, g)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for rep in range(repeats):
        order = labels[rep % len(labels) :] + labels[: rep % len(labels)]
        for label in order:
            rt, g = runtimes[label]
            times[label].append(timed_round(rt, g))
        print(
            f"repeat {rep}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True
        )
    return times


def timed_round(rt: Any, g: Any) -> float:
    rt.client.trainer.step = 0  # the same batches every repeat, for every variant
    cuda = torch.cuda.is_available() and rt.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    rt.run_round(g, 1.0)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def child(args: argparse.Namespace) -> int:
    """Fresh process: load, reset the peak counter, run two rounds, print RSS figures as JSON."""
    torch.set_num_threads(args.threads)
    mc, base, train, test = setup(args)
    rt, g = make_runtime(args, args.child, mc, base, train, test)
    del base
    gc.collect()
    baseline = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    for _ in range(2):
        timed_round(rt, g)
    peak = _status_kib("VmHWM")
    print(
        json.dumps(
            {
                "variant": args.child,
                "baseline_kib": baseline,
                "peak_kib": peak,
                "increase_kib": peak - baseline,
            }
        )
    )
    return 0


def measure_memory(args: argparse.Namespace, labels: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {label: [] for label in labels}
    for rep in range(args.mem_repeats):
        for label in labels:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                label,
                "--threads",
                str(args.threads),
                "--local-steps",
                str(args.local_steps),
                "--batch-size",
                str(args.batch_size),
                "--client",
                args.client,
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rec = json.loads(proc.stdout.strip().splitlines()[-1])
            out[label].append(rec)
            print(
                f"memory rep {rep} {label:20s}: baseline {rec['baseline_kib'] / 1024:.0f} MiB, "
                f"peak {rec['peak_kib'] / 1024:.0f} MiB, +{rec['increase_kib'] / 1024:.0f} MiB",
                flush=True,
            )
    return out


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    s = doc["settings"]
    lines = [
        "# Local cost of one round: PF2LoRA vs HOMLoRA",
        "",
        f"Command: `{doc['command']}` ({doc['date']}); wall time {doc['wall_seconds']:.0f} s.",
        "",
        f"Machine: {m['cpu']}, {m['cpus_usable']} usable CPUs shared with other engineers' jobs "
        "(1-minute load "
        f"average {doc['load_average_before'][0]:.1f} before, {doc['load_average_after'][0]:.1f} "
        "after), "
        f"{m['torch_threads']} torch thread; Python {m['python']}, torch {m['torch']}.",
        "",
        f"One round = {s['local_steps']} local steps at batch {s['batch_size']} (+ payload) on one "
        "client "
        f"({s['client']}, {s['train_size']} sentences), MiniLM 6 layers, LoRA q/v r=8, r̂=2, "
        "max_length 64. "
        f"Time: median of {s['repeats']} interleaved repeats in one process, identical minibatches "
        "for every "
        "variant and repeat (PF2LoRA draws a second, lower-level batch per step by design). "
        "Memory: a fresh "
        "process per variant; baseline = RSS with model, data and runtime loaded; peak = VmHWM "
        "over two rounds "
        f"after resetting it; median of {s['mem_repeats']} processes.",
        "",
        "| variant | median s / round | s / step | time ratio vs HOMLoRA | median of per-repeat "
        "ratios | "
        "peak RSS MiB | increase over loaded baseline MiB | peak ratio | increase ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in doc["results"].items():
        lines.append(
            f"| {label} | {r['median_round_s']:.2f} | {r['median_round_s'] / s['local_steps']:.3f} "
            "| "
            f"{r['time_ratio']:.2f} | {r['median_pairwise_ratio']:.2f} | {r['peak_mib']:.0f} | "
            f"{r['increase_mib']:.0f} | {r['peak_ratio']:.2f} | {r['increase_ratio']:.2f} |"
        )
    lines += [
        "",
        f"Loaded baseline RSS (HOMLoRA process): {doc['results'][BASELINE]['baseline_mib']:.0f} "
        "MiB.",
        "",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--mem-repeats", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--client", default="movies-0")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    offline()
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    labels = [BASELINE] + [v for v in args.variants if v != BASELINE]
    command = "python " + " ".join(
        shlex.quote(a) for a in ["benchmarks/bench_local_cost.py", *sys.argv[1:]]
    )
    load_before = os.getloadavg()
    t_start = time.perf_counter()

    mc, base, train, test = setup(args)
    runtimes = {label: make_runtime(args, label, mc, base, train, test) for label in labels}
    times = interleaved(runtimes, labels, args.repeats)
    del runtimes
    gc.collect()

    memory = measure_memory(args, labels)
    results: dict[str, Any] = {}
    base_t = statistics.median(times[BASELINE])
    mem_base = {
        k: statistics.median(r[k] for r in memory[BASELINE]) for k in ("peak_kib", "increase_kib")
    }
    for label in labels:
        med = statistics.median(times[label])
        peak = statistics.median(r["peak_kib"] for r in memory[label])
        inc = statistics.median(r["increase_kib"] for r in memory[label])
        results[label] = {
            "round_seconds": times[label],
            "median_round_s": med,
            "time_ratio": med / base_t,
            "median_pairwise_ratio": statistics.median(
                a / b for a, b in zip(times[label], times[BASELINE], strict=True)
            ),
            "memory_runs": memory[label],
            "baseline_mib": statistics.median(r["baseline_kib"] for r in memory[label]) / 1024,
            "peak_mib": peak / 1024,
            "increase_mib": inc / 1024,
            "peak_ratio": peak / mem_base["peak_kib"],
            "increase_ratio": inc / mem_base["increase_kib"],
        }
    doc = {
        "benchmark": "local_cost",
        "command": command,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_info(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "settings": {
            "local_steps": args.local_steps,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "mem_repeats": args.mem_repeats,
            "client": args.client,
            "train_size": len(train),
            "model": "minilm (6 layers)",
            "max_length": 64,
            "shared_rank": 8,
            "private_rank": 2,
            "neumann_terms": 3,
            "threads": args.threads,
        },
        "wall_seconds": time.perf_counter() - t_start,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "local_cost.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = markdown(doc)
    (args.out / "local_cost.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
