"""`pf2lora simulate`: an in-process federation with a per-client results table and JSON output."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from pf2lora.cli.flags import ALGORITHM_FLAGS, MODEL_FLAGS, Flag, add_flags, apply_flags
from pf2lora.common.data.sources import describe_source_defaults
from pf2lora.common.errors import ConfigError

logger = logging.getLogger(__name__)

# flag -> (path in SimulationConfig, type, help); flags override --config, then the defaults.
FLAGS: dict[str, Flag] = {
    **ALGORITHM_FLAGS,
    "model": (("model", "path"), str, "minilm | smollm2 | a local Hugging Face folder"),
    **MODEL_FLAGS,
    "data": (
        ("data", "source"),
        str,
        "vader | rotten-tomatoes | trec | synthetic-rank | files | instructions",
    ),
    "partition": (("data", "partition"), str, "natural | similarity | dirichlet | iid"),
    "clients": (("data", "num_clients"), int, "number of clients"),
    "similarity": (("data", "similarity"), float, "label-sorted mixture similarity s in [0, 1]"),
    "dirichlet_alpha": (("data", "dirichlet_alpha"), float, "Dirichlet label-skew alpha"),
    "max_train": (("data", "max_train_per_client"), int, "cap on training examples per client"),
    "max_test": (("data", "max_test_per_client"), int, "cap on held-out examples per client"),
    "rounds": (("rounds",), int, "federated rounds"),
    "seed": (("seed",), int, "run seed (data split, initial adapter, batches)"),
    "eval_every": (("eval_every",), int, "evaluate every k rounds"),
    "device": (("device",), str, "cpu (default) | auto | cuda | cuda:N"),
}


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "simulate",
        help="run a federation in this process and print per-client results",
        description="In-process federation: N clients, one algorithm, rounds of local training "
        "and aggregation with the same functions the coordinator uses. Flags override --config, "
        "which overrides the data source's defaults (--data synthetic-rank: "
        f"{describe_source_defaults('synthetic-rank')}), which override the built-in ones.",
    )
    p.add_argument(
        "--config", type=Path, help="TOML file with [algorithm], [model], [data] sections"
    )
    add_flags(p, FLAGS)
    p.add_argument("--domains", help="comma-separated domains (VADER: tweets,movies,amazon,nyt)")
    p.add_argument(
        "--train-files", help="comma-separated local files, one per client (--data files)"
    )
    p.add_argument("--test-files", help="comma-separated held-out files, one per client")
    p.add_argument(
        "--json", type=Path, dest="json_path", help="write per-round and final metrics here"
    )
    p.add_argument(
        "--plot",
        type=Path,
        metavar="DIR",
        help="draw the per-round curves (PNG) and a markdown summary into DIR",
    )
    p.add_argument("--progress", action="store_true", help="progress bar over local steps")
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (1 is fastest for the tiny synthetic model)"
    )
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> Any:
    from pf2lora.common.data.sources import with_source_defaults
    from pf2lora.common.learning.config import from_mapping
    from pf2lora.common.learning.task_defaults import with_task_defaults
    from pf2lora.common.runspec import load_toml, set_path
    from pf2lora.common.simulation import SimulationConfig

    paths = ("model.path", "data.train_files", "data.test_files")  # relative to the file
    tree = load_toml(args.config, paths) if args.config is not None else {}
    tree = apply_flags(tree, args, FLAGS)
    if args.domains:
        domains = [d.strip() for d in args.domains.split(",") if d.strip()]
        set_path(tree, ("data", "domains"), domains)
    if args.train_files:
        set_path(tree, ("data", "train_files"), args.train_files.split(","))
        tree.setdefault("data", {}).setdefault("source", "files")
    if args.test_files:
        set_path(tree, ("data", "test_files"), args.test_files.split(","))
    if args.progress:
        set_path(tree, ("algorithm", "train", "progress"), True)
    return from_mapping(SimulationConfig, with_task_defaults(with_source_defaults(tree)))


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def print_table(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from pf2lora.cli.control import GENERATION_COLUMNS

    clients = result.clients
    synthetic = any("true_rank" in c for c in clients)
    decoder = any("personal_answer_loss" in c for c in clients)
    table = Table(
        title=f"pf2lora simulate: {result.config['algorithm']['name']}, "
        f"{len(result.rounds)} rounds, {result.wall_seconds:.0f} s"
    )
    cols = ["client", "train", "test"]
    if synthetic:
        cols += ["true rank", "learned rank", "test MSE"]
    elif decoder:
        cols += [header for header, _ in GENERATION_COLUMNS]
    else:
        cols += ["personalised acc", "shared-only acc"]
    for c in cols:
        table.add_column(c, justify="left" if c == "client" else "right")
    for c in clients:
        row = [c["name"], str(c["train_size"]), str(c["test_size"])]
        if synthetic:
            mse = c.get("test_mse")
            row += [
                str(c["true_rank"]),
                str(c["learned_rank"]),
                "-" if mse is None else f"{mse:.2e}",
            ]
        elif decoder:
            row += [_fmt(c.get(key)) for _, key in GENERATION_COLUMNS]
        else:
            row += [_fmt(c.get("personal_accuracy")), _fmt(c.get("shared_accuracy"))]
        table.add_row(*row)
    last = result.rounds[-1]
    if decoder:
        row = [_fmt(last.get(f"mean_{key}")) for _, key in GENERATION_COLUMNS]
        table.add_row("mean", "", "", *row, style="bold")
    elif not synthetic:
        table.add_row(
            "mean",
            "",
            "",
            _fmt(last.get("mean_personal_accuracy")),
            _fmt(last.get("mean_shared_accuracy")),
            style="bold",
        )
    Console().print(table)
    p = result.parameters
    print(
        f"parameters per client: trainable {p['trainable_per_client']:,} "
        f"(shared {p['shared']:,}, private {p['private']:,}), communicated "
        f"{p['communicated_per_client']:,}"
    )
    if "epsilon" in last:  # silo-level differential privacy
        print(
            f"differential privacy: epsilon {last['epsilon']:.3f} after {last['round']} round(s) "
            f"(delta {result.config['algorithm']['dp']['delta']:g})"
        )


def run(args: argparse.Namespace) -> int:
    from pf2lora.common.simulation import run_simulation
    from pf2lora.common.state_io import atomic_write_bytes

    cfg = build_config(args)
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise ConfigError(f"--threads={args.threads}: must be >= 1")
        torch.set_num_threads(args.threads)
    logger.info(
        "simulate: %s on %s (%s), %d clients, %d rounds",
        cfg.algorithm.name,
        cfg.data.source,
        cfg.data.partition,
        cfg.data.num_clients,
        cfg.rounds,
    )

    every = max(1, cfg.rounds // 20)  # at most ~20 progress lines, plus every evaluation

    def on_round(rec: dict[str, Any]) -> None:
        if rec["round"] % every and "eval" not in rec:
            return
        loss = sum(rec["train_loss"]) / len(rec["train_loss"])
        acc = rec.get("mean_personal_accuracy")
        mse = rec.get("mean_personal_mse")
        answer = rec.get("mean_personal_answer_loss")
        extra = f" personalised acc {acc:.3f}" if acc is not None else ""
        extra += f" personalised mse {mse:.4f}" if mse is not None else ""
        extra += f" personalised answer loss {answer:.4f}" if answer is not None else ""
        print(
            f"round {rec['round']}/{cfg.rounds}: train loss {loss:.4f}{extra} "
            f"({rec['seconds']:.1f} s)",
            flush=True,
        )

    result = run_simulation(cfg, on_round=on_round)
    print_table(result)
    if args.json_path is not None:
        doc = {
            "config": result.config,
            "parameters": result.parameters,
            "wall_seconds": result.wall_seconds,
            "rounds": result.rounds,
            "clients": result.clients,
        }
        atomic_write_bytes(
            args.json_path, json.dumps(doc, indent=1, default=_json_default).encode()
        )
        print(f"wrote {args.json_path}")
    if args.plot is not None:
        from pf2lora.cli.report import from_simulation, write_report

        title = f"simulate: {cfg.algorithm.name} on {cfg.data.source} ({cfg.data.partition})"
        files = write_report(from_simulation(result, title), args.plot)
        print(f"report: {files[-1]} ({len(files) - 1} plots)")
    return 0


def _json_default(o: Any) -> Any:
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)  # type: ignore[arg-type]
    return str(o)
