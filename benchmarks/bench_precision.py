"""Memory and time of one local round by estimator, base precision and gradient checkpointing.

    .venv/bin/python benchmarks/bench_precision.py [--repeats 5] [--mem-repeats 2]

HOMLoRA, PF2LoRA-unroll and PF2LoRA-first-order with the frozen base in float32 and in
bfloat16 (the adapters stay float32), and HOMLoRA with gradient checkpointing (the estimators
that substitute parameters cannot use it: common/algorithms/compat.py). The set-up is
bench_local_cost.py's: MiniLM (6 layers), LoRA q/v r = 8, r_hat = 2, one VADER client
(movies-0, 250 sentences), max_length 64, batch 16, 5 local steps per round, one torch thread.

Time: every variant lives in one process, rounds interleaved (the order rotates each repeat) on
the same minibatches; median over repeats and its ratio to HOMLoRA float32 measured in the same
run. Memory: a fresh process per variant; after loading, the peak counter is reset
(/proc/self/clear_refs = 5) and two rounds run; reported the loaded RSS, the peak (VmHWM) and the
increase, median over `--mem-repeats` processes. Writes benchmarks/results/precision.{json,md}.
On a CUDA machine, `--device cuda` measures the same on the GPU (peak from
torch.cuda.max_memory_allocated) and adds tokens per second.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import machine_info  # benchmarks/_common.py (scripts run from benchmarks/)
from bench_local_cost import _status_kib, interleaved, offline, timed_round

RESULTS = Path(__file__).resolve().parent / "results"

# label -> (algorithm, hypergrad, base dtype, gradient checkpointing)
VARIANTS: dict[str, tuple[str, str, str, bool]] = {
    "homlora fp32": ("homlora", "unroll", "float32", False),
    "homlora bf16": ("homlora", "unroll", "bfloat16", False),
    "homlora fp32 +ckpt": ("homlora", "unroll", "float32", True),
    "homlora bf16 +ckpt": ("homlora", "unroll", "bfloat16", True),
    "pf2lora-unroll fp32": ("pf2lora", "unroll", "float32", False),
    "pf2lora-unroll bf16": ("pf2lora", "unroll", "bfloat16", False),
    "pf2lora-first-order fp32": ("pf2lora", "first-order", "float32", False),
    "pf2lora-first-order bf16": ("pf2lora", "first-order", "bfloat16", False),
}
BASELINE = "homlora fp32"


def model_config(label: str) -> Any:
    from pf2lora.common.learning.config import AdapterConfig, ModelConfig

    _, _, dtype, ckpt = VARIANTS[label]
    return ModelConfig(
        path="minilm",
        max_length=64,
        adapters=AdapterConfig(shared_rank=8, private_rank=2),
        dtype=dtype,
        gradient_checkpointing=ckpt,
    )


def client_data(args: argparse.Namespace) -> tuple[Any, Any]:
    from pf2lora.common.client_runtime import encode_dataset
    from pf2lora.common.data.splits import build_client_data
    from pf2lora.common.learning.base_model import load_tokenizer

    data = build_client_data(
        "vader", "natural", 8, 0, max_train_per_client=250, max_test_per_client=50
    )
    client = next(c for c in data if c.name == "movies-0")
    mc = model_config(BASELINE)
    tok = load_tokenizer(mc)
    return encode_dataset(client.train, tok, mc), encode_dataset(client.test, tok, mc)


def runtime(args: argparse.Namespace, label: str, train: Any, test: Any) -> tuple[Any, Any]:
    from pf2lora.common.algorithms.base import AlgorithmConfig
    from pf2lora.common.algorithms.registry import make_algorithm
    from pf2lora.common.client_runtime import ClientRuntime, initial_global_state
    from pf2lora.common.learning.base_model import load_base_model
    from pf2lora.common.learning.config import TrainConfig

    name, hypergrad, _, _ = VARIANTS[label]
    mc = model_config(label)
    train_cfg = TrainConfig(
        local_steps=args.local_steps,
        batch_size=args.batch_size,
        hypergrad=hypergrad,  # type: ignore[arg-type]
        ll_steps=1,  # one lower-level step per upper step, as bench_local_cost.py
    )
    alg = make_algorithm(AlgorithmConfig(name=name, train=train_cfg), mc.adapters)
    base = load_base_model(mc)
    g = initial_global_state(alg, mc, 0, base=copy.deepcopy(base))
    rt = ClientRuntime(
        alg, mc, client_index=0, seed=12345, train=train, test=test, base=base, device=args.device
    )
    return rt, g


def child(args: argparse.Namespace) -> int:
    """Fresh process: load, reset the peak counter, run two rounds, print memory as JSON."""
    torch.set_num_threads(args.threads)
    train, test = client_data(args)
    rt, g = runtime(args, args.child, train, test)
    gc.collect()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() // 1024
    else:
        baseline = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    for _ in range(2):
        timed_round(rt, g)
    peak = torch.cuda.max_memory_allocated() // 1024 if cuda else _status_kib("VmHWM")
    rec = {"variant": args.child, "baseline_kib": baseline, "peak_kib": peak}
    print(json.dumps({**rec, "increase_kib": peak - baseline}))
    return 0


def measure_memory(args: argparse.Namespace, labels: list[str]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {label: [] for label in labels}
    for rep in range(args.mem_repeats):
        for label in labels:
            cmd = [sys.executable, __file__, "--child", label, "--device", args.device]
            cmd += ["--threads", str(args.threads), "--local-steps", str(args.local_steps)]
            cmd += ["--batch-size", str(args.batch_size)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rec = json.loads(proc.stdout.strip().splitlines()[-1])
            out[label].append(rec)
            print(
                f"memory rep {rep} {label:26s}: peak {rec['peak_kib'] / 1024:.0f} MiB", flush=True
            )
    return out


def tokens_per_round(rt: Any, args: argparse.Namespace) -> int:
    """Non-padding tokens the round's upper-level batches hold (what a step reads)."""
    from pf2lora.common.learning.batching import STREAM_UL

    return sum(
        int(rt.source.batch(step, STREAM_UL)["attention_mask"].sum())
        for step in range(args.local_steps)
    )


def markdown(doc: dict[str, Any]) -> str:
    s, m = doc["settings"], doc["machine"]
    memory = "GPU memory allocated" if s["device"].startswith("cuda") else "RSS"
    lines = [
        "# Local round by estimator, base precision and gradient checkpointing",
        "",
        f"Command: `{doc['command']}` ({doc['date']}); wall time {doc['wall_seconds']:.0f} s.",
        "",
        f"Machine: {m['cpu']}, {m['cpus_usable']} usable CPUs, {m['torch_threads']} torch thread, "
        f"device {s['device']}; 1-minute load average {doc['load_average_before'][0]:.1f} "
        f"before, {doc['load_average_after'][0]:.1f} after. {s['note']}",
        "",
        f"One round = {s['local_steps']} local steps at batch {s['batch_size']} on one client "
        "(VADER movies-0, 250 sentences), MiniLM 6 layers, LoRA q/v r=8, r̂=2, max_length 64; "
        f"the adapters are float32 in every variant. Time: median of {s['repeats']} interleaved "
        f"repeats, same minibatches. Memory: {memory} in a fresh process per variant, median of "
        f"{s['mem_repeats']}.",
        "",
        f"| variant | median s / round | time ratio vs {BASELINE} | tokens / s | peak {memory} MiB "
        "| increase over loaded MiB | increase ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in doc["results"].items():
        lines.append(
            f"| {label} | {r['median_round_s']:.2f} | {r['time_ratio']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {r['peak_mib']:.0f} | {r['increase_mib']:.0f} | "
            f"{r['increase_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mem-repeats", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    offline()
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    labels = [BASELINE] + [v for v in args.variants if v != BASELINE]
    command = "python " + " ".join(
        shlex.quote(a) for a in ["benchmarks/bench_precision.py", *sys.argv[1:]]
    )
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    train, test = client_data(args)
    runtimes = {label: runtime(args, label, train, test) for label in labels}
    tokens = tokens_per_round(runtimes[BASELINE][0], args)
    times = interleaved(runtimes, labels, args.repeats)  # CUDA: synchronised around each round
    del runtimes
    gc.collect()
    memory = measure_memory(args, labels)
    base_t = statistics.median(times[BASELINE])
    base_inc = statistics.median(r["increase_kib"] for r in memory[BASELINE])
    results: dict[str, Any] = {}
    for label in labels:
        med = statistics.median(times[label])
        inc = statistics.median(r["increase_kib"] for r in memory[label])
        results[label] = {
            "round_seconds": times[label],
            "median_round_s": med,
            "time_ratio": med / base_t,
            "tokens_per_s": tokens / med,
            "memory_runs": memory[label],
            "peak_mib": statistics.median(r["peak_kib"] for r in memory[label]) / 1024,
            "increase_mib": inc / 1024,
            "increase_ratio": inc / base_inc,
        }
    doc = {
        "benchmark": "precision",
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
            "device": args.device,
            "threads": args.threads,
            "tokens_per_round": tokens,
            "note": args.note,
        },
        "wall_seconds": time.perf_counter() - t_start,
        "results": results,
    }
    stem = "precision" if args.device == "cpu" else "precision_cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = markdown(doc)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
