"""`pf2lora demo`: a real local federation on loopback, one command.

It writes configs and per-silo data (one VADER domain per silo; with --task causal-lm one
packaged instruction task per silo) into a work folder, starts a coordinator and four silo
daemons as separate processes, runs a few rounds of PF2LoRA with per-round progress, prints
each silo's personalised vs shared-only accuracy (decoder: answer loss, exact match, ROUGE-L),
and stops every process it started (also on Ctrl-C). By default the processes talk mutual TLS
with certificates made for the demo and every round is securely aggregated (SecAgg+: the
coordinator only sees the sum of the silos' masked updates); `--insecure` uses plaintext gRPC
on loopback instead (the silos still sign their secure-aggregation keys with the demo
certificates), and `--no-secure-aggregation` sends plain updates.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pf2lora.common.errors import ConfigError, Pf2LoraError
from pf2lora.common.learning.task_defaults import CAUSAL_LM_DEFAULTS

logger = logging.getLogger(__name__)

FEDERATION = "pf2lora-demo"
JOIN_TIMEOUT_S = 300.0

# Settings per task, where the command line says nothing. seq-cls: rates chosen on the
# accuracy benchmark's validation split (benchmarks/results/accuracy_tuning.md), whose regime
# (one VADER domain per silo, a few dozen steps, one lower-level step per upper step) is the
# demo's; the library's classification defaults were selected for 300 local steps on
# label-sorted silos (ll_lr 0.1, 3 lower-level steps: docs/algorithm.md). causal-lm: the
# decoder defaults (common/learning/task_defaults.py), and a budget that fits a few minutes on
# 2 cores: SmolLM2 keeps all 30 layers (a truncated decoder forgets language), so the demo
# trains few steps on short prompts and scores few generated answers.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "seq-cls": {
        "rounds": 3,
        "local_steps": 10,
        "batch_size": 16,
        "ul_lr": 1e-2,
        "ll_lr": 0.02,
        "ll_max_grad_norm": 1.0,
        "ll_steps": 1,
        "max_train": 200,
        "max_test": 100,
        "max_length": 64,
    },
    "causal-lm": {
        "rounds": 2,
        "local_steps": 4,
        "batch_size": 4,
        "ul_lr": CAUSAL_LM_DEFAULTS["ul_lr"],
        "ll_lr": CAUSAL_LM_DEFAULTS["ll_lr"],
        "ll_max_grad_norm": CAUSAL_LM_DEFAULTS["ll_max_grad_norm"],
        "ll_steps": CAUSAL_LM_DEFAULTS["ll_steps"],
        "max_train": 64,
        "max_test": 24,
        "max_length": 80,
        "generate": 12,
    },
}
DEMO_FLAGS: tuple[tuple[str, Any, str], ...] = (
    ("rounds", int, "federated rounds"),
    ("local-steps", int, "local steps per round"),
    ("batch-size", int, "minibatch size"),
    ("ul-lr", float, "upper-level AdamW lr (shared adapter)"),
    ("ll-lr", float, "lower-level SGD step (private adapter)"),
    ("ll-max-grad-norm", float, "clip the lower-level gradient to this norm (0: off)"),
    ("ll-steps", int, "lower-level SGD steps per upper-level step"),
    ("max-train", int, "training examples per silo"),
    ("max-test", int, "held-out examples per silo"),
    ("max-length", int, "max tokens per example"),
    ("generate", int, "causal-lm: held-out answers generated and scored per silo"),
)


def _defaults_text(flag: str) -> str:
    key = flag.replace("-", "_")
    return ", ".join(
        f"{v} for {t}" for t, d in TASK_DEFAULTS.items() if (v := d.get(key)) is not None
    )


def with_task_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """The arguments with the task's defaults wherever the command line gave nothing."""
    for key, value in TASK_DEFAULTS[args.task].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "demo",
        help="run a real local federation: a coordinator and 4 silo processes on loopback",
        description="A coordinator and four silo daemons as separate processes on loopback "
        "gRPC and a few rounds of PF2LoRA. --task seq-cls (default): MiniLM, one VADER domain "
        "per silo, a per-silo table of personalised vs shared-only accuracy. --task causal-lm: "
        "SmolLM2-135M-Instruct, a different instruction task per silo, a per-silo table of "
        "answer loss (base, personalised, shared-only), exact match and ROUGE-L. Mutual TLS with "
        "demo certificates unless --insecure; secure aggregation (SecAgg+) in every round unless "
        "--no-secure-aggregation.",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC on loopback, identities not checked (logs a warning)",
    )
    p.add_argument(
        "--no-secure-aggregation",
        dest="secure_aggregation",
        action="store_false",
        help="send plain updates: the coordinator sees each silo's update (logs a warning)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        help="where configs, data, state and logs go (default: a new temp folder)",
    )
    p.add_argument(
        "--algorithm", default="pf2lora", help="pf2lora | homlora | hetlora | perfedavg | local"
    )
    p.add_argument(
        "--task",
        choices=sorted(TASK_DEFAULTS),
        default="seq-cls",
        help="seq-cls: MiniLM classifies sentiment, one VADER domain per silo (default); "
        "causal-lm: SmolLM2-135M-Instruct answers a different instruction task on each silo",
    )
    for flag, typ, what in DEMO_FLAGS:
        p.add_argument(
            f"--{flag}",
            type=typ,
            default=None,
            help=f"{what} (default: {_defaults_text(flag)})",
        )
    p.add_argument(
        "--num-layers", type=int, default=None, help="truncate the model to N layers (default: all)"
    )
    p.add_argument("--seed", type=int, default=0, help="run seed (data split, initial adapter)")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="library log lines on the terminal too (by default they go to logs/demo.log in "
        "the work folder and the terminal shows the demo's own progress only)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per silo (default: the cores divided among the silos)",
    )
    p.set_defaults(func=run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml(sections: dict[str, dict[str, Any]]) -> str:
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        for k, v in values.items():
            lines.append(
                f"{k} = {json.dumps(v)}"
            )  # JSON strings, numbers, booleans and lists are TOML
        lines.append("")
    return "\n".join(lines)


def _write_data(work: Path, args: argparse.Namespace) -> dict[str, tuple[Path, Path, int]]:
    """Each silo's train and held-out JSONL files: text/label rows (seq-cls, one VADER domain
    per silo) or chat messages (causal-lm, one packaged instruction task per silo)."""
    from pf2lora.common.data.splits import build_client_data, instruction_client_data

    if args.task == "causal-lm":
        clients = instruction_client_data(
            4, args.seed, train_per_client=args.max_train, test_per_client=args.max_test
        )
    else:
        clients = build_client_data(
            "vader",
            "natural",
            4,
            args.seed,
            max_train_per_client=args.max_train,
            max_test_per_client=args.max_test,
        )
    out: dict[str, tuple[Path, Path, int]] = {}
    for c in clients:
        d = work / "silos" / c.name / "data"
        d.mkdir(parents=True, exist_ok=True)
        paths = []
        for split, ds in (("train", c.train), ("test", c.test)):
            p = d / f"{split}.jsonl"
            with p.open("w") as fh:
                if args.task == "causal-lm":
                    rows: Any = ({"messages": m} for m in ds["messages"])
                else:
                    rows = (
                        {"text": t, "label": int(y)}
                        for t, y in zip(ds["text"], ds["label"], strict=True)
                    )
                for row in rows:
                    fh.write(json.dumps(row) + "\n")
            paths.append(p)
        out[c.name] = (paths[0], paths[1], len(c.train))
    return out


class Processes:
    """The demo's child processes; each is stopped by its own pid."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str]) -> None:
        log = (self.logs / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "pf2lora.cli.main", *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None and p.returncode != 0:
                tail = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
                raise ConfigError(
                    f"{name} exited with status {p.returncode}:\n  " + "\n  ".join(tail)
                )

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        end = time.monotonic() + 15
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@contextlib.contextmanager
def quiet_terminal(log_file: Path) -> Iterator[None]:
    """Library log lines go to log_file; the terminal keeps warnings and errors (and the demo's
    own progress, which it prints). Undone on exit."""
    root = logging.getLogger()
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    levels = {h: h.level for h in root.handlers}
    root_level = root.level
    for h in levels:
        h.setLevel(max(h.level, logging.WARNING))
    root.setLevel(min(root_level, logging.INFO))
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(root_level)
        for h, level in levels.items():
            h.setLevel(level)


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pf2lora-demo-"))
    if work.exists() and any(work.iterdir()):
        raise ConfigError(f"--workdir {work} is not empty: give a new or empty folder")
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir()
    print(f"pf2lora demo: work folder {work}", flush=True)
    with contextlib.nullcontext() if args.verbose else quiet_terminal(logs / "demo.log"):
        return _run(args, work, logs, t_start)


def _run(args: argparse.Namespace, work: Path, logs: Path, t_start: float) -> int:
    print("preparing the silos' data and the federation's certificates", flush=True)

    from pf2lora.cli import control
    from pf2lora.cli.run import follow
    from pf2lora.common.algorithms.base import AlgorithmConfig
    from pf2lora.common.learning.config import ModelConfig, TrainConfig
    from pf2lora.common.runspec import RunConfig, to_json
    from pf2lora.v1 import control_pb2 as cpb

    args = with_task_defaults(args)
    decoder = args.task == "causal-lm"
    model_path = "smollm2" if decoder else "minilm"
    if args.insecure:
        logger.warning("demo --insecure: plaintext gRPC on loopback, identities are not checked")
    if not args.secure_aggregation:
        logger.warning("demo --no-secure-aggregation: the coordinator sees each silo's update")
    if decoder:
        print(
            f"decoder demo: SmolLM2-135M-Instruct (all 30 layers) on 4 silos, each with its own "
            f"instruction task; a short budget to fit a few minutes on 2 cores: {args.rounds} "
            f"rounds x {args.local_steps} local steps at batch {args.batch_size}, "
            f"{args.max_train} training examples per silo, {args.generate} answers generated "
            "per silo (the benchmark trains longer: benchmarks/results/causal_lm.md)",
            flush=True,
        )
    run_cfg = RunConfig(
        algorithm=AlgorithmConfig(
            name=args.algorithm,
            train=TrainConfig(
                local_steps=args.local_steps,
                batch_size=args.batch_size,
                ul_lr=args.ul_lr,
                ll_lr=args.ll_lr,
                ll_max_grad_norm=args.ll_max_grad_norm or None,
                ll_steps=args.ll_steps,
            ),
        ),
        model=ModelConfig(
            path=model_path,
            task=args.task,
            max_length=args.max_length,
            num_hidden_layers=args.num_layers,
            num_labels=2,
            generate_examples=args.generate or 0,
            max_new_tokens=6,
        ),
        rounds=args.rounds,
        min_silos=4,
        round_deadline_s=1800.0,
        enroll_window_s=60.0,
        eval_deadline_s=600.0,
        seed=args.seed,
        secure_aggregation=args.secure_aggregation,
    )
    data = _write_data(work, args)
    silos = sorted(data)
    threads = args.threads or max(1, (os.cpu_count() or 1) // len(silos))
    silo_port, control_port = _free_port(), _free_port()
    from pf2lora.common.transport import pki_files

    # Certificates for the demo: the transport's (mutual TLS) and the silos' signing keys for
    # secure aggregation (needed with --insecure too).
    pki_files.provision_federation(
        work / "pki", FEDERATION, ("localhost",), silos=silos, admins=("demo",)
    )

    def tls_of(d: Path) -> dict[str, Any]:
        return {
            "tls": {
                "ca_file": str(d / "ca.crt"),
                "cert_file": str(d / "tls.crt"),
                "key_file": str(d / "tls.key"),
            }
        }

    tls: dict[str, dict[str, Any]] = {s: tls_of(pki_files.silo_dir(work / "pki", s)) for s in silos}
    if not args.insecure:
        tls["coordinator"] = tls_of(pki_files.coordinator_dir(work / "pki"))
    coord_toml = work / "coordinator.toml"
    coord_toml.write_text(
        _toml(
            {
                "federation": {"name": FEDERATION, "allowed_silos": silos},
                "server": {
                    "silo_api_listen": f"127.0.0.1:{silo_port}",
                    "control_api_listen": f"127.0.0.1:{control_port}",
                    "health_listen": "",
                    "metrics_listen": "",
                    "insecure": args.insecure,
                },
                "storage": {"state_dir": str(work / "coordinator")},
                **tls.get("coordinator", {}),
            }
        )
    )
    for s in silos:
        train, test, _ = data[s]
        (work / "silos" / s / "silo.toml").write_text(
            _toml(
                {
                    "silo": {
                        "id": s,
                        "federation": FEDERATION,
                        "state_dir": str(work / "silos" / s / "state"),
                        "threads": threads,
                        "exit_after_run": True,
                        "require_secure_aggregation": args.secure_aggregation,
                    },
                    "coordinator": {
                        "address": f"127.0.0.1:{silo_port}",
                        "server_name": "localhost",
                        "insecure": args.insecure,
                    },
                    "model": {"path": model_path},
                    "data": {"train_files": [str(train)], "eval_files": [str(test)]},
                    "server": {"health_listen": "", "metrics_listen": ""},
                    **tls.get(s, {}),
                }
            )
        )

    procs = Processes(logs)
    ctl_args = argparse.Namespace(
        coordinator=f"127.0.0.1:{control_port}",
        insecure=args.insecure,
        server_name="localhost",
        tls_dir=None if args.insecure else work / "pki" / "admins" / "demo",
        ca_file=None,
        cert_file=None,
        key_file=None,
    )
    try:
        procs.start("coordinator", ["coordinator", "serve", "--config", str(coord_toml)])
        for s in silos:
            procs.start(s, ["silo", "serve", "--config", str(work / "silos" / s / "silo.toml")])
        print(
            f"started a coordinator and {len(silos)} silos ({', '.join(silos)}); "
            f"{'plaintext' if args.insecure else 'mutual TLS'} on "
            f"127.0.0.1:{silo_port}/{control_port}, "
            f"{'secure aggregation (SecAgg+)' if args.secure_aggregation else 'PLAIN updates'}; "
            f"logs in {logs}",
            flush=True,
        )
        print(
            f"waiting for the silos to join: each process imports torch and loads "
            f"{'SmolLM2' if decoder else 'MiniLM'} and its data "
            f"({'about 20 s' if not decoder else 'under a minute'} on 2 idle cores)",
            flush=True,
        )
        stub, channel = control.connect(ctl_args)
        with channel:
            end = time.monotonic() + JOIN_TIMEOUT_S
            joined = 0
            while True:
                procs.check_alive()
                try:
                    reply = stub.ListSilos(cpb.ListSilosRequest(), timeout=5)
                    now = sum(x.joined for x in reply.silos)
                    if now == len(silos):
                        break
                    if now > joined:
                        waited = time.perf_counter() - t_start
                        print(f"  {now}/{len(silos)} silos joined ({waited:.0f} s)", flush=True)
                        joined = now
                except Exception:  # noqa: BLE001 - the coordinator is still starting
                    pass
                if time.monotonic() > end:
                    raise ConfigError(
                        f"silos did not join within {JOIN_TIMEOUT_S:.0f} s; see {logs}"
                    )
                time.sleep(0.5)
            print(
                f"all {len(silos)} silos joined ({time.perf_counter() - t_start:.0f} s); "
                f"starting {args.rounds} rounds of {args.algorithm}",
                flush=True,
            )
            req = cpb.StartRunRequest(run_config_json=to_json(run_cfg), run_id="demo")
            control.call(ctl_args, lambda: stub.StartRun(req, timeout=control.START_TIMEOUT_S))
            status = follow(ctl_args, stub, "demo")
        wall = time.perf_counter() - t_start
        if status.state != cpb.RUN_STATE_COMPLETED:
            print(control.describe(status))
            return 1
        control.evaluation_table(
            status, f"pf2lora demo: {args.algorithm}, {args.rounds} rounds, 4 silos, {wall:.0f} s"
        )
        from pf2lora.cli.report import from_status, write_report

        files = write_report(from_status(status), work / "report")
        print(f"report with {len(files) - 1} plots: {files[-1]}")
        print(
            f"state, logs and configs in {work}; export a silo's personalised model with:\n"
            f"  pf2lora silo export --config {work / 'silos' / silos[0] / 'silo.toml'} --out "
            f"{work / 'export'}"
        )
        return 0
    except KeyboardInterrupt:
        print("interrupted: stopping the demo's processes", file=sys.stderr)
        return 130
    except Pf2LoraError:
        raise
    finally:
        procs.stop()
