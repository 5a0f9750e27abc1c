"""`pf2lora silos`: the silos the coordinator knows (joined, allowed, samples, last contact)."""

from __future__ import annotations

import argparse
import time

from pf2lora.cli import control


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("silos", help="list the silos the coordinator knows (control API)")
    control.add_connection_flags(p)
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from pf2lora.v1 import control_pb2 as cpb

    stub, channel = control.connect(args)
    with channel:
        reply = control.call(
            args, lambda: stub.ListSilos(cpb.ListSilosRequest(), timeout=control.CALL_TIMEOUT_S)
        )
    if args.json:
        control.print_json(reply)
        return 0
    table = Table(title=f"federation {reply.federation}: {len(reply.silos)} silo(s)")
    for col in ("silo", "allowed", "joined", "examples", "version", "last contact"):
        table.add_column(col)
    now = time.time() * 1000
    for s in reply.silos:
        ago = f"{(now - s.last_seen_unix_ms) / 1000:.0f} s ago" if s.last_seen_unix_ms else "-"
        table.add_row(
            s.silo_id,
            "yes" if s.allowed else "NO",
            "yes" if s.joined else "no",
            str(s.num_samples) if s.joined else "-",
            s.software_version or "-",
            ago,
        )
    Console().print(table)
    return 0
