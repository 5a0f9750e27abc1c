"""What every benchmark records and writes: the machine it ran on, and its results as JSON plus
markdown (shared by the benchmark scripts, run as `python benchmarks/X.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows, else "unknown"."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def platform_info() -> dict[str, Any]:
    """CPU model and count, usable cores, platform and Python (no ML libraries imported)."""
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def machine_info() -> dict[str, Any]:
    """CPU, usable cores, torch threads, load and library versions, recorded with every result."""
    import peft
    import torch
    import transformers

    return {
        "cpu": cpu_model(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def save_results(out: Path, stem: str, doc: dict[str, Any], markdown: str, indent: int = 1) -> None:
    """out/STEM.json and out/STEM.md, each replaced atomically (an interrupted run keeps the
    previous complete files)."""
    from pf2lora.common.state_io import atomic_write_bytes

    atomic_write_bytes(out / f"{stem}.json", (json.dumps(doc, indent=indent) + "\n").encode())
    atomic_write_bytes(out / f"{stem}.md", markdown.encode())


def read_log(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL log; a torn last line (a killed run) is skipped with a warning."""
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"{path.name}: line {i + 1} is not a complete record; ignored", file=sys.stderr)
    return out


def append_log(path: Path, rec: dict[str, Any]) -> None:
    """One record appended to a JSONL log and synced (a finished run is never lost)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(rec, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
