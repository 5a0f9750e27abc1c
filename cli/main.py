"""Entry point of the `pf2lora` console command: builds the subcommand parser and dispatches."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from pf2lora.common.errors import Pf2LoraError

logger = logging.getLogger(__name__)

# Each module registers one top-level subcommand through `register(subparsers)` and sets
# `func` on its parser; the function takes the parsed namespace and returns an exit code.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "pf2lora.cli.simulate",
    "pf2lora.cli.certs",
    "pf2lora.cli.coordinator",
    "pf2lora.cli.silo",
    "pf2lora.cli.run",
    "pf2lora.cli.silos",
    "pf2lora.cli.demo",
)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pf2lora",
        description="Personalized federated fine-tuning with two-level LoRA.",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("PF2LORA_LOG_LEVEL", "INFO"),
        help="logging level (DEBUG, INFO, WARNING, ERROR); default INFO",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except Pf2LoraError as exc:
        print(f"pf2lora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
