"""`pf2lora silo serve` (the silo daemon) and `pf2lora silo export` (its model as PEFT adapters)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pf2lora.common.learning.distributed import Group
    from pf2lora.silo.config import SiloConfig

logger = logging.getLogger(__name__)

# flag -> dotted key of silo.toml
OVERRIDES: dict[str, str] = {
    "id": "silo.id",
    "federation": "silo.federation",
    "state_dir": "silo.state_dir",
    "threads": "silo.threads",
    "seed": "silo.seed",
    "audit_log": "silo.audit_log",
    "coordinator": "coordinator.address",
    "server_name": "coordinator.server_name",
    "model_path": "model.path",
    "health_listen": "server.health_listen",
    "metrics_listen": "server.metrics_listen",
    "ca_file": "tls.ca_file",
    "cert_file": "tls.cert_file",
    "key_file": "tls.key_file",
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="silo.toml (flags override it)")
    p.add_argument("--id", help="this silo's id (a DNS label, as in its certificate)")
    p.add_argument("--federation", help="federation name")
    p.add_argument("--state-dir", help="private adapter, trainer state, run records")
    p.add_argument("--model-path", help="local base model folder (default: the run's model path)")
    p.add_argument("--train-files", help="comma-separated training files")
    p.add_argument("--eval-files", help="comma-separated held-out files")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("silo", help="the silo daemon and its tools")
    ssub = p.add_subparsers(dest="silo_command", metavar="COMMAND")
    ssub.required = True
    s = ssub.add_parser(
        "serve",
        help="dial out to the coordinator and train in its rounds until SIGTERM",
        description="Run a silo: join the coordinator, train the rounds it hands out on local "
        "data, send only shared-adapter updates. Settings come from --config; flags override. "
        "Mutual TLS unless --insecure.",
    )
    _common(s)
    s.add_argument("--coordinator", help="HOST:PORT of the coordinator's silo API")
    s.add_argument("--server-name", help="DNS name expected in the coordinator's certificate")
    s.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC, no identities (trusted loopback only)",
    )
    s.add_argument("--ca-file", help="federation CA (PEM)")
    s.add_argument("--cert-file", help="this silo's certificate (PEM)")
    s.add_argument("--key-file", help="this silo's private key (PEM)")
    s.add_argument("--threads", type=int, help="torch threads (0: torch's default)")
    s.add_argument(
        "--seed", type=int, help="override the silo seed (default: derived from the run seed)"
    )
    s.add_argument("--health-listen", help='HOST:PORT of grpc.health.v1, "" for off')
    s.add_argument(
        "--metrics-listen",
        help='HOST:PORT of the Prometheus /metrics endpoint (HTTP), "" for off (default off)',
    )
    s.add_argument("--audit-log", help="append every message sent to the coordinator to this file")
    s.add_argument(
        "--exit-after-run", action="store_true", help="exit once the current run has ended"
    )
    s.add_argument(
        "--start-over",
        action="store_true",
        help="if this silo's private state for its run is missing or damaged, set it aside and "
        "start the private adapter again (without this flag the silo stops with exit code 5)",
    )
    s.set_defaults(func=run_serve)

    e = ssub.add_parser(
        "export",
        help="write the personalised model as PEFT adapters OUT/shared and OUT/private",
        description="Export the latest global shared adapter and this silo's private adapter of a "
        "run as two PEFT adapter folders (load with PeftModel.from_pretrained(base, OUT/shared) "
        "and load_adapter(OUT/private, 'private')).",
    )
    _common(e)
    e.add_argument("--out", type=Path, required=True, help="output folder")
    e.add_argument("--run-id", default="", help="which run (default: the current or latest one)")
    e.set_defaults(func=run_export)


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {key: getattr(args, flag, None) for flag, key in OVERRIDES.items()}
    for flag, key in (("train_files", "data.train_files"), ("eval_files", "data.eval_files")):
        value = getattr(args, flag, None)
        if value:
            out[key] = [f.strip() for f in value.split(",") if f.strip()]
    return out


def run_serve(args: argparse.Namespace) -> int:
    from pf2lora.common.errors import ConfigError
    from pf2lora.silo.config import load_silo_config
    from pf2lora.silo.daemon import SiloDaemon

    if args.insecure and any(getattr(args, f) for f in ("ca_file", "cert_file", "key_file")):
        raise ConfigError(
            "--insecure conflicts with --ca-file/--cert-file/--key-file: drop one of them"
        )
    overrides = _overrides(args)
    if args.insecure:
        overrides["coordinator.insecure"] = True
    if args.exit_after_run:
        overrides["silo.exit_after_run"] = True
    cfg = load_silo_config(args.config, overrides)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("received %s: stopping after the current step", signal.Signals(signum).name)
        stop.set()

    group = _ranks(cfg)
    if not group.leader:  # a follower: rank 0 says when to stop (torchrun kills what is left)
        from pf2lora.silo.ranks import follow

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: logger.info("rank 0 decides when to stop"))
        return follow(cfg, group)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return SiloDaemon(cfg, stop=stop, start_over=args.start_over, group=group).run()


def _ranks(cfg: SiloConfig) -> Group:
    """This process's place in the silo: alone, or one of torchrun's ranks (WORLD_SIZE > 1)."""
    from pf2lora.common.learning.batching import resolve_device
    from pf2lora.common.learning.distributed import init_from_env

    return init_from_env(resolve_device(cfg.silo.device))


def run_export(args: argparse.Namespace) -> int:
    from pf2lora.silo.config import load_silo_config
    from pf2lora.silo.export import export

    cfg = load_silo_config(args.config, _overrides(args))  # local files only: no TLS needed
    info = export(cfg, args.out, args.run_id)
    print(
        f"exported run {info['run_id']} (global round {info['global_round']}, private round "
        f"{info['private_round']}) to {args.out}: shared/ and private/"
    )
    return 0
