"""`pf2lora coordinator serve`: the coordinator daemon (coordinator.toml, flags override)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# flag -> dotted key of coordinator.toml
OVERRIDES: dict[str, str] = {
    "federation": "federation.name",
    "state_dir": "storage.state_dir",
    "silo_api_listen": "server.silo_api_listen",
    "control_api_listen": "server.control_api_listen",
    "health_listen": "server.health_listen",
    "metrics_listen": "server.metrics_listen",
    "ca_file": "tls.ca_file",
    "cert_file": "tls.cert_file",
    "key_file": "tls.key_file",
}


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("coordinator", help="the federation coordinator daemon")
    csub = p.add_subparsers(dest="coordinator_command", metavar="COMMAND")
    csub.required = True
    s = csub.add_parser(
        "serve",
        help="serve the silo and control APIs until SIGTERM",
        description="Run the coordinator: silo API (silos dial in), control API "
        "(pf2lora run/silos), plaintext health. Settings come from --config; flags override. "
        "Mutual TLS unless --insecure.",
    )
    s.add_argument("--config", type=Path, help="coordinator.toml (default: built-in defaults)")
    s.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC, silo and admin identities NOT checked (trusted loopback only)",
    )
    s.add_argument("--federation", help="federation name (identities spiffe://NAME/...)")
    s.add_argument("--allowed-silos", help="comma-separated silo ids allowed to join")
    s.add_argument("--state-dir", help="SQLite database and checkpoints")
    s.add_argument("--silo-api-listen", help="HOST:PORT of the silo API (default 0.0.0.0:8443)")
    s.add_argument(
        "--control-api-listen", help="HOST:PORT of the control API (default 0.0.0.0:8444)"
    )
    s.add_argument("--health-listen", help='HOST:PORT of grpc.health.v1, "" for off')
    s.add_argument(
        "--metrics-listen",
        help='HOST:PORT of the Prometheus /metrics endpoint (HTTP), "" for off (default off)',
    )
    s.add_argument("--ca-file", help="federation CA (PEM)")
    s.add_argument("--cert-file", help="coordinator certificate (PEM)")
    s.add_argument("--key-file", help="coordinator private key (PEM)")
    s.add_argument("--port-file", type=Path, help="write the bound ports here as JSON once serving")
    s.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from pf2lora.common.errors import ConfigError
    from pf2lora.coordinator.config import load_coordinator_config
    from pf2lora.coordinator.server import serve

    if args.insecure and any(getattr(args, f) for f in ("ca_file", "cert_file", "key_file")):
        raise ConfigError(
            "--insecure conflicts with --ca-file/--cert-file/--key-file: drop one of them"
        )
    overrides: dict[str, object] = {key: getattr(args, flag) for flag, key in OVERRIDES.items()}
    if args.allowed_silos is not None:
        overrides["federation.allowed_silos"] = [
            s.strip() for s in args.allowed_silos.split(",") if s.strip()
        ]
    if args.insecure:
        overrides["server.insecure"] = True
    cfg = load_coordinator_config(args.config, overrides)
    return serve(cfg, port_file=args.port_file)
