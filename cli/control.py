"""The admin side of the control API, shared by `pf2lora run ...` and `pf2lora silos`: connection,
errors, printing.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.json_format import MessageToDict

from pf2lora.common.errors import ConfigError, Pf2LoraError
from pf2lora.common.transport import grpc_factory, tls_check
from pf2lora.v1 import control_pb2 as cpb
from pf2lora.v1 import control_pb2_grpc

T = TypeVar("T")
DEFAULT_CONTROL = os.environ.get("PF2LORA_COORDINATOR", "localhost:8444")
CALL_TIMEOUT_S = 30.0
START_TIMEOUT_S = 300.0  # StartRun loads the base model to build the initial shared adapter


class ControlError(Pf2LoraError):
    """A control call failed; the message says what to do."""


def add_connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--coordinator",
        default=DEFAULT_CONTROL,
        help=f"HOST:PORT of the coordinator's control API (default {DEFAULT_CONTROL}, "
        "or $PF2LORA_COORDINATOR)",
    )
    p.add_argument("--insecure", action="store_true", help="plaintext, no admin certificate")
    p.add_argument(
        "--tls-dir", type=Path, help="folder with ca.crt, tls.crt, tls.key (an admin certificate)"
    )
    p.add_argument("--ca-file", type=Path, help="federation CA (PEM)")
    p.add_argument("--cert-file", type=Path, help="admin certificate (PEM)")
    p.add_argument("--key-file", type=Path, help="admin private key (PEM)")
    p.add_argument("--server-name", help="DNS name expected in the coordinator's certificate")


def tls_files(args: argparse.Namespace) -> grpc_factory.TlsFiles | None:
    """The admin certificate's files from --tls-dir or --ca/cert/key-file; None if not given."""
    if args.tls_dir:
        return grpc_factory.TlsFiles.in_dir(args.tls_dir)
    files = [args.ca_file, args.cert_file, args.key_file]
    return grpc_factory.TlsFiles(*files) if all(files) else None


def connect(args: argparse.Namespace) -> tuple[control_pb2_grpc.ControlApiStub, grpc.Channel]:
    given = [args.tls_dir, args.ca_file, args.cert_file, args.key_file]
    if args.insecure and any(given):
        raise ConfigError("--insecure conflicts with --tls-dir/--ca-file/--cert-file/--key-file")
    files = tls_files(args)
    if args.insecure:
        creds = None
    elif files is not None:
        creds = grpc_factory.channel_credentials(*files.read())
    else:
        raise ConfigError(
            "the control API needs an admin certificate: pass --tls-dir DIR (ca.crt, tls.crt, "
            "tls.key from `pf2lora certs admin`) or --ca-file/--cert-file/--key-file, or "
            "--insecure for a coordinator started with --insecure"
        )
    channel = grpc_factory.create_channel(
        args.coordinator, creds, server_name_override=args.server_name
    )
    return control_pb2_grpc.ControlApiStub(channel), channel


def call(args: argparse.Namespace, fn: Callable[[], T]) -> T:
    """Run one control call and turn a gRPC failure into a message that says what to do."""
    try:
        return fn()
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()  # type: ignore[attr-defined]
        where = args.coordinator
        files = None if args.insecure else tls_files(args)
        if code == grpc.StatusCode.UNAVAILABLE and files is not None:
            found = tls_check.diagnose(where, files, args.server_name)
            if found.cause not in ("ok", "unreachable"):  # unreachable: the hint below says more
                raise ControlError(f"{found.message} (gRPC: {details})") from None
        if code == grpc.StatusCode.UNAVAILABLE:
            hint = (
                f"cannot reach the coordinator's control API at {where}: is `pf2lora coordinator "
                "serve` running there (its control_api_listen)?"
            )
            if not args.insecure:
                hint += " If it was started with --insecure, pass --insecure too."
            raise ControlError(f"{hint} ({details})") from None
        if code == grpc.StatusCode.PERMISSION_DENIED:
            raise ControlError(
                f"the coordinator at {where} refused this caller: {details} "
                "(the control API needs an admin certificate of the federation)"
            ) from None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise ControlError(
                f"the coordinator at {where} did not answer in time ({details})"
            ) from None
        raise ControlError(f"{code.name}: {details}") from None


def to_dict(message: Any) -> dict[str, Any]:
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def print_json(message: Any) -> None:
    print(json.dumps(to_dict(message), indent=1, sort_keys=True))


STATE_NAMES = {v: k.removeprefix("RUN_STATE_").lower() for k, v in cpb.RunState.items()}
PHASE_NAMES = {v: k.removeprefix("RUN_PHASE_").lower() for k, v in cpb.RunPhase.items()}


def _ms(value: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value / 1000)) if value else "-"


def round_line(h: cpb.RoundSummary, rounds: int) -> str:
    m = dict(h.mean_metrics)
    loss = f", train loss {m['train_loss']:.4f}" if "train_loss" in m else ""
    secs = (h.completed_unix_ms - h.opened_unix_ms) / 1000 if h.completed_unix_ms else 0.0
    missing = sorted(set(h.participants) - set(h.reported))
    miss = f", without {', '.join(missing)}" if missing else ""
    if h.secure_aggregation:  # the coordinator saw only the sum
        miss += ", secure aggregation" + (
            f" (recovered {', '.join(h.dropped)})" if h.dropped else ""
        )
    if h.epsilon:  # differential privacy: spent once this round was released
        miss += f", epsilon {h.epsilon:.3f}"
    return (
        f"round {h.round}/{rounds} complete: {len(h.reported)} silo(s){miss}{loss} "
        f"({secs:.1f} s, attempt {h.attempt}, global {h.checkpoint_digest.hex()[:12]})"
    )


def describe(status: cpb.RunStatus) -> str:
    lines = [
        f"run {status.run_id}: {STATE_NAMES.get(status.state, '?')}, "
        f"{status.completed_rounds}/{status.rounds} rounds complete, phase "
        f"{PHASE_NAMES.get(status.phase, '?')}",
        f"  created {_ms(status.created_unix_ms)}"
        + (f", finished {_ms(status.finished_unix_ms)}" if status.finished_unix_ms else ""),
    ]
    if status.reason:
        lines.append(f"  reason: {status.reason}")
    if status.current_round:
        lines.append(f"  round {status.current_round} (attempt {status.attempt})")
        if status.enrolled:
            lines.append(f"    enrolled: {', '.join(status.enrolled)}")
        for p in status.participants:
            lines.append(f"    {p.silo_id}: {p.state} (weight {p.weight:.4f})")
        waiting = waiting_line(status)
        if waiting:
            lines.append(f"    {waiting}")
    for r in status.refused:
        lines.append(f"  {refusal_line(r)}")
    for h in status.history:
        lines.append("  " + round_line(h, status.rounds))
    return "\n".join(lines)


GENERATION_COLUMNS = (
    ("answer loss: base", "base_answer_loss"),
    ("personalised", "personal_answer_loss"),
    ("shared-only", "shared_answer_loss"),
    ("exact match: pers.", "personal_exact_match"),
    ("shared", "shared_exact_match"),
    ("ROUGE-L: pers.", "personal_rouge_l"),
    ("shared", "shared_rouge_l"),
)


def generation_table(status: cpb.RunStatus, title: str = "") -> None:
    """The final evaluation of a decoder run: held-out answer loss of the base model (before
    training), the personalised and the shared-only model, then exact match and ROUGE-L of
    their greedy answers."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title or f"run {status.run_id}: final evaluation (round {status.rounds})")
    table.add_column("silo")
    table.add_column("held-out", justify="right")
    for header, _ in GENERATION_COLUMNS:
        table.add_column(header, justify="right")
    rows = [dict(e.metrics) for e in sorted(status.evaluation, key=lambda e: e.silo_id)]
    for e, m in zip(sorted(status.evaluation, key=lambda e: e.silo_id), rows, strict=True):
        cells = ["-" if key not in m else f"{m[key]:.3f}" for _, key in GENERATION_COLUMNS]
        table.add_row(e.silo_id, f"{int(m.get('personal_n', 0))}", *cells)
    means = []
    for _, key in GENERATION_COLUMNS:
        vals = [m[key] for m in rows if key in m]
        means.append(f"{sum(vals) / len(vals):.3f}" if vals and len(vals) == len(rows) else "")
    table.add_row("mean", "", *means, style="bold")
    Console(width=max(Console().width, 132)).print(table)  # 9 columns: never truncate them


def refusal_line(r: cpb.SiloRefusal) -> str:
    return f"refused by {r.silo_id} at {_ms(r.unix_ms)}: {r.reason}"


def waiting_line(status: cpb.RunStatus) -> str:
    """What the round in progress waits for and until when, e.g. "waiting for masked_input from
    silo-b, 94 s left"; empty when it waits for nobody."""
    if not status.waiting_for:
        return ""
    what = status.secagg_stage or PHASE_NAMES.get(status.phase, "?")
    line = f"waiting for {what} from {', '.join(status.waiting_for)}"
    if status.deadline_unix_ms:
        left = status.deadline_unix_ms / 1000 - time.time()
        line += f", {max(0, round(left))} s left"
    return line


def evaluation_table(status: cpb.RunStatus, title: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    if any("personal_answer_loss" in e.metrics for e in status.evaluation):
        return generation_table(status, title)

    table = Table(title=title or f"run {status.run_id}: final evaluation (round {status.rounds})")
    for col in ("silo", "held-out", "personalised acc", "shared-only acc", "personalised loss"):
        table.add_column(col, justify="left" if col == "silo" else "right")
    accs: list[tuple[float, float]] = []
    for e in sorted(status.evaluation, key=lambda e: e.silo_id):
        m = dict(e.metrics)
        p, s = m.get("personal_accuracy"), m.get("shared_accuracy")
        if p is not None and s is not None:
            accs.append((p, s))
        table.add_row(
            e.silo_id,
            f"{int(m.get('personal_n', 0))}",
            "-" if p is None else f"{p:.3f}",
            "-" if s is None else f"{s:.3f}",
            "-" if "personal_loss" not in m else f"{m['personal_loss']:.4f}",
        )
    if accs:
        table.add_row(
            "mean",
            "",
            f"{sum(a for a, _ in accs) / len(accs):.3f}",
            f"{sum(b for _, b in accs) / len(accs):.3f}",
            "",
            style="bold",
        )
    Console().print(table)
