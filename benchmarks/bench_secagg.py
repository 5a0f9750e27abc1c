"""Secure-aggregation cost against the number of silos and the adapter size.

    .venv/bin/python benchmarks/bench_secagg.py [--silos 2 4 8 16 32 64] [--sizes 0.3 3 30 100]

Each cell runs the whole SecAgg+ protocol in this process (real keys, real pki certificates, one
PeerVerifier per silo so nothing is verified twice for free) and times each party's calls
separately: the per-silo figures are medians over all silos and repeats, the coordinator's are
medians over repeats. Sizes are fp32 adapter megabytes (10^6 bytes). Wire bytes are what the
messages would occupy as protobuf fields (``wire_size()``) plus the raw uint32 masked vector,
relative to the fp32 adapter itself. The grid uses the complete graph (every silo masks with every
other); --extra adds cells written NxMB[:kK][:dD]: a random K-regular neighbourhood (SecAgg+)
and/or D silos dropping after the share stage (so the coordinator also reconstructs their mask
keys and removes their masks from their neighbours' inputs).
Writes benchmarks/results/secagg.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import cryptography
import numpy as np
from _common import (  # benchmarks/_common.py (scripts run from benchmarks/)
    platform_info,
    save_results,
)

from pf2lora.common.secagg.config import SecAggConfig
from pf2lora.common.secagg.keys import PeerVerifier
from pf2lora.common.secagg.server import SecAggServer
from pf2lora.common.secagg.silo import SecAggSilo
from pf2lora.common.transport import pki

RESULTS = Path(__file__).resolve().parent / "results"
FEDERATION = "bench"
RUN = "bench-run"
SILO_STAGES = (
    "advertise_keys",
    "receive_keys",
    "share_keys",
    "receive_shares",
    "masked_input",
    "consistency_check",
    "unmask",
)
SERVER_STAGES = (
    "keys",
    "shares",
    "masked_inputs",
    "proposal",
    "consistency",
    "unmask_responses",
    "finish",
)
T = TypeVar("T")


CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}
_clock = CLOCKS["cpu"]


def _timed(times: dict[str, float], stage: str, fn: Callable[[], T]) -> T:
    start = _clock()
    result = fn()
    times[stage] += _clock() - start
    return result


def run_cell(
    creds: dict[str, pki.IssuedCertificate],
    ca: pki.CertificateAuthority,
    n: int,
    length: int,
    config: SecAggConfig,
    dropped: int,
    round_: int,
) -> dict[str, Any]:
    """One round: per-stage times of every silo and of the coordinator, and wire bytes."""
    ids = [f"silo-{i:03d}" for i in range(n)]
    update = (np.random.default_rng(round_).standard_normal(length) * 0.01).astype(np.float32)
    silo_t = {s: defaultdict(float) for s in ids}  # silo -> stage -> seconds
    server_t: dict[str, float] = defaultdict(float)  # stage -> seconds over all its calls
    sent = dict.fromkeys(ids, 0)
    received = dict.fromkeys(ids, 0)

    server = SecAggServer(RUN, round_, ids, length, config)
    silos = {
        s: SecAggSilo(
            RUN,
            round_,
            s,
            ids,
            creds[s].key,
            creds[s].cert,
            PeerVerifier([ca.cert], FEDERATION),
            config,
        )
        for s in ids
    }
    for s in ids:
        message = _timed(silo_t[s], "advertise_keys", silos[s].advertise_keys)
        sent[s] += message.wire_size()
        _timed(server_t, "keys", lambda s=s, m=message: server.receive_keys(s, m))
    relayed = _timed(server_t, "keys", server.close_keys)
    for s in ids:
        received[s] += sum(m.wire_size() for m in relayed[s] if m.silo_id != s)
        _timed(silo_t[s], "receive_keys", lambda s=s: silos[s].receive_keys(relayed[s]))
    for s in ids:
        shares = _timed(silo_t[s], "share_keys", silos[s].share_keys)
        sent[s] += sum(m.wire_size() for m in shares)
        _timed(server_t, "shares", lambda s=s, m=shares: server.receive_shares(s, m))
    routed = _timed(server_t, "shares", server.close_shares)
    for s in ids:
        received[s] += sum(m.wire_size() for m in routed[s])
        _timed(silo_t[s], "receive_shares", lambda s=s: silos[s].receive_shares(routed[s]))
    gone = set(ids[:: max(1, n // dropped)][:dropped]) if dropped else set()
    for s in ids:
        if s in gone:
            continue
        masked = _timed(silo_t[s], "masked_input", lambda s=s: silos[s].masked_input(update))
        sent[s] += masked.nbytes
        _timed(server_t, "masked_inputs", lambda s=s, m=masked: server.receive_masked_input(s, m))
        del masked
    proposal = _timed(server_t, "proposal", server.close_masked_inputs)
    for s in proposal.survivors:
        received[s] += proposal.wire_size()
        signature = _timed(
            silo_t[s], "consistency_check", lambda s=s: silos[s].consistency_check(proposal)
        )
        sent[s] += signature.wire_size()
        _timed(server_t, "consistency", lambda s=s, m=signature: server.receive_consistency(s, m))
    request = _timed(server_t, "consistency", server.close_consistency)
    for s in request.survivors:
        received[s] += request.wire_size()
        response = _timed(silo_t[s], "unmask", lambda s=s: silos[s].unmask(request))
        sent[s] += response.wire_size()
        _timed(server_t, "unmask_responses", lambda s=s, r=response: server.receive_unmask(s, r))
    total = _timed(server_t, "finish", server.finish)
    error = float(np.abs(total - len(request.survivors) * update.astype(np.float64)).max())
    assert error <= n * 2.0**-server.plan.frac_bits, error

    survivors = list(request.survivors)
    fp32 = 4 * length
    return {
        # Per surviving silo: its time in each stage; medians are taken by the caller.
        "silo_stage_s": {st: [silo_t[s][st] for s in survivors] for st in SILO_STAGES},
        "silo_total_s": [sum(silo_t[s].values()) for s in survivors],
        "server_stage_s": {st: server_t[st] for st in SERVER_STAGES},
        "wire_sent_ratio": statistics.median(sent[s] / fp32 for s in survivors),
        "wire_total_ratio": statistics.median((sent[s] + received[s]) / fp32 for s in survivors),
        "wire_overhead_bytes": statistics.median(sent[s] + received[s] - fp32 for s in survivors),
        "max_abs_error": error,
        "threshold": server.plan.threshold,
        "quorum": server.plan.signature_quorum,
        "frac_bits": server.plan.frac_bits,
        "degree": len(server.plan.neighbours[ids[0]]),
    }


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def _machine() -> dict:
    return {
        **platform_info(),
        "numpy": np.__version__,
        "cryptography": cryptography.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--silos", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.3, 3, 30, 100], help="MB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--big-cell-repeats",
        type=int,
        default=1,
        help="repeats where N x degree x MB exceeds --big-cell",
    )
    parser.add_argument("--big-cell", type=float, default=20000.0)
    parser.add_argument(
        "--extra",
        nargs="*",
        default=["32x100:k16", "64x30:k16", "64x100:k16", "16x30:d2", "64x30:d6", "64x30:k16:d6"],
        help="extra cells NxMB[:kK][:dD]: K-regular neighbourhood, D dropped after sharing",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="cpu: process CPU time (robust to other tenants of a shared machine; every call "
        "is single-threaded), wall: elapsed time",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    global _clock
    _clock = CLOCKS[args.clock]
    logging.getLogger("pf2lora").setLevel(logging.ERROR)  # the N=2 warning, once per party

    ca = pki.create_ca(FEDERATION)
    plans: list[tuple[int, float, int | None, int]] = [
        (n, mb, None, 0) for mb in args.sizes for n in args.silos
    ]
    for cell in args.extra:
        size, *opts = cell.split(":")
        n, mb = size.split("x")
        k = next((int(o[1:]) for o in opts if o.startswith("k")), None)
        dropped = next((int(o[1:]) for o in opts if o.startswith("d")), 0)
        plans.append((int(n), float(mb), k, dropped))
    creds = {
        f"silo-{i:03d}": pki.issue_silo_cert(ca, f"silo-{i:03d}")
        for i in range(max(n for n, *_ in plans))
    }
    rows = []
    round_ = 0
    start_all = time.perf_counter()
    for n, mb, k, dropped in plans:
        length = int(mb * 1e6) // 4
        config = SecAggConfig(neighbours=k)
        degree = n - 1 if k is None else min(k, n - 1)
        repeats = args.repeats if n * (degree + 1) * mb <= args.big_cell else args.big_cell_repeats
        runs = []
        for _ in range(repeats):
            round_ += 1
            runs.append(run_cell(creds, ca, n, length, config, dropped, round_))
        silo_stage = {
            st: _median([t for r in runs for t in r["silo_stage_s"][st]]) for st in SILO_STAGES
        }
        server_stage = {
            st: _median([r["server_stage_s"][st] for r in runs]) for st in SERVER_STAGES
        }
        row = {
            "silos": n,
            "adapter_mb": mb,
            "elements": length,
            "neighbourhood": "all" if k is None else f"k={degree}",
            "threshold": runs[0]["threshold"],
            "quorum": runs[0]["quorum"],
            "frac_bits": runs[0]["frac_bits"],
            "dropped": dropped,
            "repeats": repeats,
            "silo_stage_s": silo_stage,
            "silo_total_s": _median([t for r in runs for t in r["silo_total_s"]]),
            "server_stage_s": server_stage,
            "server_total_s": _median([sum(r["server_stage_s"].values()) for r in runs]),
            "wire_sent_ratio": _median([r["wire_sent_ratio"] for r in runs]),
            "wire_total_ratio": _median([r["wire_total_ratio"] for r in runs]),
            "wire_overhead_bytes": _median([r["wire_overhead_bytes"] for r in runs]),
            "max_abs_error": max(r["max_abs_error"] for r in runs),
        }
        rows.append(row)
        print(_row_md(row), f"  [{time.perf_counter() - start_all:.0f} s]", flush=True)

    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])])
    result = {
        "benchmark": "SecAgg+ (pf2lora.common.secagg), whole protocol in one process, "
        "each party timed separately",
        "command": command,
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "wall_s": time.perf_counter() - start_all,
        "clock": args.clock,
        "repeats": args.repeats,
        "big_cell_repeats": args.big_cell_repeats,
        "big_cell": args.big_cell,
        "load_average_at_end": os.getloadavg(),
        "machine": _machine(),
        "rows": rows,
    }
    table = _markdown(result)
    print(table)
    save_results(args.out, "secagg", result, table, indent=2)
    return 0


HEADER = (
    "| N | MB fp32 | graph | t | quorum | dropped | silo total ms | silo masked_input ms "
    "| silo keys+shares ms | silo consistency+unmask ms | coord total ms | coord finish ms "
    "| sent / fp32 | sent+recv / fp32 | overhead KB |\n"
    "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def _row_md(row: dict) -> str:
    s, c = row["silo_stage_s"], row["server_stage_s"]
    setup = sum(s[st] for st in ("advertise_keys", "receive_keys", "share_keys", "receive_shares"))
    check = s["consistency_check"] + s["unmask"]
    return (
        f"| {row['silos']} | {row['adapter_mb']:g} | {row['neighbourhood']} | {row['threshold']} "
        f"| {row['quorum']} | {row['dropped']} | {1e3 * row['silo_total_s']:.1f} "
        f"| {1e3 * s['masked_input']:.1f} | {1e3 * setup:.1f} | {1e3 * check:.1f} "
        f"| {1e3 * row['server_total_s']:.1f} | {1e3 * c['finish']:.1f} "
        f"| {row['wire_sent_ratio']:.4f} | {row['wire_total_ratio']:.4f} "
        f"| {row['wire_overhead_bytes'] / 1e3:.1f} |"
    )


def _markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Secure aggregation (SecAgg+) cost",
        "",
        f"Command: `{result['command']}` ({result['date_utc']}, {result['wall_s']:.0f} s)",
        "",
        f"Machine: {m['cpu_model']}, {m['cpus_usable']} usable CPUs of {m['cpu_count']}; "
        f"Python {m['python']}, numpy {m['numpy']}, cryptography {m['cryptography']}.",
        "",
        f"Whole protocol in one process, one thread; each party's calls timed separately "
        f"({'process CPU time' if result['clock'] == 'cpu' else 'wall-clock time'}; load "
        f"average at the end {result['load_average_at_end'][0]:.1f}). "
        "`silo total`: one silo's time over all seven stages (median over silos and repeats); "
        "`masked_input`: fixed-point encoding + self mask + one AES-CTR mask per neighbour; "
        "`keys+shares`: key generation, signing, certificate and signature checks of every "
        "neighbour, X25519/HKDF, Shamir, AES-GCM; `consistency+unmask`: signing the unmask "
        "proposal, then checking a quorum of the other survivors' signatures and answering "
        "with shares. `coord total`: the coordinator's time over "
        "the round (relaying, adding every masked vector, reconstructing seeds and dropped "
        "keys, removing masks, decoding; median over repeats). `sent / fp32`: bytes one silo "
        "sends relative to the fp32 adapter; `sent+recv`: with what it receives (relayed keys, "
        "shares, unmask proposal, unmask request with every collected signature and its "
        "certificate; not the aggregate download). `overhead KB`: sent+recv bytes "
        "beyond the masked vector. graph `all`: every silo masks with every other (SecAgg); "
        "`k=..`: random k-regular neighbourhood (SecAgg+). t: Shamir threshold (majority of "
        "share holders); quorum: consistency signatures an unmask request needs (a majority of "
        "all N silos, at least t). `dropped`: silos gone after sharing keys. "
        f"Repeats: {result['repeats']}, or {result['big_cell_repeats']} where "
        f"N x (degree + 1) x MB > {result['big_cell']:g} (the per-silo medians then still "
        "run over all N silos).",
        "",
        HEADER,
    ]
    lines += [_row_md(row) for row in result["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
