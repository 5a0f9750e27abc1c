"""`pf2lora run start|status|stop|manifest`: operate federated runs through the coordinator's
control API.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from pf2lora.cli import control
from pf2lora.cli.flags import ALGORITHM_FLAGS, MODEL_FLAGS, Flag, add_flags, apply_flags

logger = logging.getLogger(__name__)

# flag -> (path in RunConfig, type, help); flags override --run-file, which overrides defaults.
RUN_FLAGS: dict[str, Flag] = {
    **ALGORITHM_FLAGS,
    "model": (("model", "path"), str, "base model as the COORDINATOR sees it (minilm | a folder)"),
    **MODEL_FLAGS,
    "num_labels": (("model", "num_labels"), int, "number of classes"),
    "rounds": (("rounds",), int, "federated rounds"),
    "min_silos": (("min_silos",), int, "updates needed to close a round at its deadline"),
    "deadline": (("round_deadline_s",), float, "round deadline in seconds"),
    "enroll_window": (("enroll_window_s",), float, "seconds to wait for silos to enroll"),
    "eval_deadline": (("eval_deadline_s",), float, "seconds to wait for the final evaluation"),
    "seed": (("seed",), int, "run seed (initial shared adapter, silo seeds)"),
    "secagg_clip": (
        ("secagg", "clip"),
        float,
        "secure aggregation: clip bound C of the weighted payload",
    ),
    "secagg_threshold": (
        ("secagg", "threshold"),
        int,
        "secure aggregation: Shamir threshold t (default: majority)",
    ),
    "secagg_neighbours": (
        ("secagg", "neighbours"),
        int,
        "secure aggregation: k-regular graph (SecAgg+; default: all pairs)",
    ),
    "secagg_stage_deadline": (
        ("secagg", "stage_deadline_s"),
        float,
        "secure aggregation: seconds per stage",
    ),
}


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="start, watch and stop federated runs (control API)")
    rsub = p.add_subparsers(dest="run_command", metavar="COMMAND")
    rsub.required = True

    s = rsub.add_parser(
        "start",
        help="start a run",
        description="Start a run on the coordinator. The run file (TOML: rounds, min_silos, "
        "round_deadline_s, enroll_window_s, seed, [algorithm], [algorithm.train], [model]) is "
        "overridden by flags.",
    )
    control.add_connection_flags(s)
    s.add_argument("--run-file", type=Path, help="TOML run configuration")
    add_flags(s, RUN_FLAGS)
    s.add_argument(
        "--no-secure-aggregation",
        dest="secure_aggregation",
        action="store_false",
        default=None,
        help="send plain updates: the coordinator sees each silo's update (silos must allow it)",
    )
    s.add_argument("--run-id", default="", help="choose the run id (default: generated)")
    s.add_argument("--wait", action="store_true", help="follow the run and print each round")
    s.add_argument("--json", action="store_true", help="print the run status as JSON")
    s.set_defaults(func=run_start)

    st = rsub.add_parser("status", help="show a run (the latest by default)")
    control.add_connection_flags(st)
    st.add_argument("run_id", nargs="?", default="", help="run id (default: the latest run)")
    st.add_argument("--json", action="store_true", help="print the full status as JSON")
    st.add_argument("--wait", action="store_true", help="follow the run until it ends")
    st.set_defaults(func=run_status)

    sp = rsub.add_parser("stop", help="stop a run (the active one by default)")
    control.add_connection_flags(sp)
    sp.add_argument("run_id", nargs="?", default="", help="run id (default: the active run)")
    sp.add_argument("--reason", default="", help="recorded with the run")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=run_stop)

    m = rsub.add_parser("manifest", help="what crossed the wire in a completed round")
    control.add_connection_flags(m)
    m.add_argument("run_id")
    m.add_argument("round", type=int)
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=run_manifest)

    rp = rsub.add_parser(
        "report",
        help="plots and a markdown summary of a run",
        description="Per-round curves of a run from the coordinator's records (training loss, "
        "silos per round, round time split into local training and the rest) and the final "
        "personalised vs shared-only evaluation per silo, as PNG plots (matplotlib) and "
        "report.md in --out.",
    )
    control.add_connection_flags(rp)
    rp.add_argument("run_id", nargs="?", default="", help="run id (default: the latest run)")
    rp.add_argument("--out", type=Path, required=True, help="folder for the plots and report.md")
    rp.set_defaults(func=run_report)

    fp = rsub.add_parser(
        "fingerprint",
        help="a model folder's fingerprint, as a run file line",
        description="Print the fingerprint of a base model folder (config.json, tokenizer and "
        "weights files) as the [model] fingerprint line of a run file. For a coordinator that "
        "holds only the model's config.json: run this where the full model is.",
    )
    fp.add_argument("folder", help="Hugging Face model folder, or minilm / smollm2")
    fp.set_defaults(func=run_fingerprint)

    from pf2lora.cli.audit import register_audit

    register_audit(rsub)


def build_run_config(args: argparse.Namespace) -> Any:
    from pf2lora.common.learning.config import from_mapping
    from pf2lora.common.learning.task_defaults import with_task_defaults
    from pf2lora.common.runspec import RUN_FILE_PATHS, RunConfig, load_toml

    tree = load_toml(args.run_file, RUN_FILE_PATHS) if args.run_file else {}
    tree = apply_flags(tree, args, RUN_FLAGS)
    if getattr(args, "secure_aggregation", None) is False:
        tree["secure_aggregation"] = False
    tree = with_task_defaults(tree)
    cfg = from_mapping(RunConfig, tree, str(args.run_file or "run configuration"))
    if not cfg.secure_aggregation:
        logger.warning(
            "secure_aggregation = false: the coordinator will see each silo's weighted update"
        )
    return cfg


WAITING_NOTE_S = 10.0  # how long a round waits on the same silos before --wait says so


def follow(args: argparse.Namespace, stub: Any, run_id: str, poll_s: float = 1.0) -> Any:
    """Print each completed round and phase change until the run ends; returns the last status."""
    from pf2lora.v1 import control_pb2 as cpb

    printed: set[int] = set()
    refusals: set[str] = set()
    last_phase = None
    last_waiting: tuple[Any, ...] = ()
    waiting_since, told = time.monotonic(), False
    while True:
        status = control.call(
            args,
            lambda: stub.GetRunStatus(
                cpb.GetRunStatusRequest(run_id=run_id), timeout=control.CALL_TIMEOUT_S
            ),
        )
        for h in status.history:
            if h.round not in printed:
                printed.add(h.round)
                print(control.round_line(h, status.rounds), flush=True)
        for r in status.refused:
            if r.silo_id not in refusals:
                refusals.add(r.silo_id)
                print(control.refusal_line(r), flush=True)
        phase = (status.phase, status.current_round, status.attempt)
        if phase != last_phase and status.state == cpb.RUN_STATE_RUNNING:
            last_phase = phase
            name = control.PHASE_NAMES.get(status.phase, "?")
            where = (
                f"round {status.current_round}"
                if status.phase != cpb.RUN_PHASE_EVALUATING
                else "final model"
            )
            parts = (
                f" ({', '.join(p.silo_id for p in status.participants)})"
                if status.participants
                else ""
            )
            print(f"{where}: {name}{parts}", flush=True)
        # What the round waits for and until when: said once it has not changed for
        # WAITING_NOTE_S (a slow or missing silo), and again whenever it changes after that.
        waiting = (status.current_round, status.attempt, status.secagg_stage, *status.waiting_for)
        if waiting != last_waiting:
            last_waiting, waiting_since, told = waiting, time.monotonic(), False
        slow = time.monotonic() - waiting_since >= WAITING_NOTE_S
        if slow and not told and status.waiting_for and status.state == cpb.RUN_STATE_RUNNING:
            print(f"  {control.waiting_line(status)}", flush=True)
            told = True
        if status.state != cpb.RUN_STATE_RUNNING:
            return status
        time.sleep(poll_s)


def _finish(args: argparse.Namespace, stub: Any, status: Any) -> int:
    from pf2lora.v1 import control_pb2 as cpb

    if args.wait:
        status = follow(args, stub, status.run_id)
    if args.json:
        control.print_json(status)
    else:
        print(control.describe(status))
        if status.evaluation:
            control.evaluation_table(status)
    return 0 if status.state in (cpb.RUN_STATE_RUNNING, cpb.RUN_STATE_COMPLETED) else 1


def run_start(args: argparse.Namespace) -> int:
    from pf2lora.common.runspec import to_json
    from pf2lora.v1 import control_pb2 as cpb

    cfg = build_run_config(args)
    stub, channel = control.connect(args)
    with channel:
        req = cpb.StartRunRequest(run_config_json=to_json(cfg), run_id=args.run_id)
        status = control.call(args, lambda: stub.StartRun(req, timeout=control.START_TIMEOUT_S))
        print(
            f"started run {status.run_id}: {cfg.algorithm.name}, {cfg.rounds} rounds, "
            f"min {cfg.min_silos} silos, deadline {cfg.round_deadline_s:.0f} s",
            flush=True,
        )
        return _finish(args, stub, status)


def run_status(args: argparse.Namespace) -> int:
    from pf2lora.v1 import control_pb2 as cpb

    stub, channel = control.connect(args)
    with channel:
        status = control.call(
            args,
            lambda: stub.GetRunStatus(
                cpb.GetRunStatusRequest(run_id=args.run_id), timeout=control.CALL_TIMEOUT_S
            ),
        )
        return _finish(args, stub, status)


def run_stop(args: argparse.Namespace) -> int:
    from pf2lora.v1 import control_pb2 as cpb

    stub, channel = control.connect(args)
    with channel:
        req = cpb.StopRunRequest(run_id=args.run_id, reason=args.reason)
        status = control.call(args, lambda: stub.StopRun(req, timeout=control.CALL_TIMEOUT_S))
        if args.json:
            control.print_json(status)
        else:
            print(control.describe(status))
        return 0


def run_report(args: argparse.Namespace) -> int:
    from pf2lora.cli.report import from_status, write_report
    from pf2lora.v1 import control_pb2 as cpb

    stub, channel = control.connect(args)
    with channel:
        req = cpb.GetRunStatusRequest(run_id=args.run_id)
        status = control.call(args, lambda: stub.GetRunStatus(req, timeout=control.CALL_TIMEOUT_S))
    files = write_report(from_status(status), args.out)
    print(f"run {status.run_id}: {len(files) - 1} plots and {files[-1]}")
    for f in files[:-1]:
        print(f"  {f}")
    return 0


def run_fingerprint(args: argparse.Namespace) -> int:
    import json

    from pf2lora.common.learning.base_model import resolve_model_path
    from pf2lora.common.learning.fingerprint import fingerprint

    print("[model]")
    print(f"fingerprint = {json.dumps(list(fingerprint(resolve_model_path(args.folder))))}")
    return 0


def run_manifest(args: argparse.Namespace) -> int:
    from pf2lora.v1 import control_pb2 as cpb

    stub, channel = control.connect(args)
    with channel:
        req = cpb.GetRoundManifestRequest(run_id=args.run_id, round=args.round)
        m = control.call(args, lambda: stub.GetRoundManifest(req, timeout=control.CALL_TIMEOUT_S))
        if args.json:
            control.print_json(m)
            return 0
        print(f"run {m.run_id} round {m.round}: global {m.global_manifest_digest.hex()}")
        for t in m.global_tensors:
            print(f"  {t.name}  {list(t.shape)}  {t.nbytes} B  sha256 {t.sha256.hex()[:16]}")
        for u in m.updates:
            print(f"  update from {u.silo_id} (attempt {u.attempt}): {u.manifest_digest.hex()}")
        return 0
