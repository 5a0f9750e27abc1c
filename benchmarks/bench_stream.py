"""Tensor stream throughput: serde alone, and serde + loopback gRPC upload (plaintext, mutual TLS).

    .venv/bin/python benchmarks/bench_stream.py [--sizes 1 16 64 200] [--repeats 5]

Tensors are LoRA-shaped fp32 pairs (A: r x d, B: d x r with r=16, d=4096, 256 KiB each), as
many as the size needs, so per-tensor costs (hashing, allocation) count as in a real adapter.
- serialise: tensors_to_stream -> SerializeToString -> FromString -> stream_to_tensors
  (everything a transfer does except the network), in this process.
- grpc-*: a client-streaming upload to a server in another process (its own GIL and cores,
  as coordinator and silo are), which assembles and validates the stream before replying;
  timed from tensors_to_stream (hashing included) to the reply.
Throughput is payload MiB / median seconds. Writes benchmarks/results/stream_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import multiprocessing.synchronize
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import cryptography
import google.protobuf
import grpc
import torch
from _common import (  # benchmarks/_common.py (scripts run from benchmarks/)
    platform_info,
    save_results,
)

from pf2lora.common.transport import grpc_factory, pki
from pf2lora.common.wire import streams
from pf2lora.v1 import tensors_pb2 as pb

RESULTS = Path(__file__).resolve().parent / "results"
SERVICE = "pf2lora.bench.Stream"
MIB = 1 << 20
RANK, WIDTH = 16, 4096


def lora_tensors(size_mib: float) -> dict[str, torch.Tensor]:
    """fp32 LoRA A/B matrices totalling size_mib (the last one cut to fit)."""
    gen = torch.Generator().manual_seed(0)
    per_tensor = RANK * WIDTH  # elements
    remaining = int(size_mib * MIB) // 4
    tensors: dict[str, torch.Tensor] = {}
    i = 0
    while remaining > 0:
        n = min(per_tensor, remaining)
        layer, which = divmod(i, 2)
        if n % RANK:
            shape: tuple[int, ...] = (n,)
        else:
            shape = (RANK, n // RANK) if which == 0 else (n // RANK, RANK)
        name = f"layers.{layer}.self_attn.q_proj.lora_{'AB'[which]}.weight"
        tensors[name] = torch.randn(shape, generator=gen)
        remaining -= n
        i += 1
    return tensors


# -- server process --------------------------------------------------------------------------


def _upload(request_iterator, context):
    from pf2lora.common.errors import InvalidArgument

    try:
        info, _ = streams.stream_to_tensors(request_iterator)
    except InvalidArgument as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    return pb.StreamMessage(
        trailer=pb.StreamTrailer(manifest_digest=info.manifest_digest, total_bytes=info.total_bytes)
    )


def _serve(
    tls: tuple[bytes, bytes, bytes], ports: mp.Queue, stop: multiprocessing.synchronize.Event
) -> None:
    server = grpc_factory.create_server(max_workers=4)
    handler = grpc.stream_unary_rpc_method_handler(
        _upload,
        request_deserializer=pb.StreamMessage.FromString,
        response_serializer=pb.StreamMessage.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Upload": handler}),)
    )
    insecure = grpc_factory.add_port(server, "127.0.0.1:0", None)
    secure = grpc_factory.add_port(server, "127.0.0.1:0", grpc_factory.server_credentials(*tls))
    server.start()
    ports.put((insecure, secure))
    stop.wait()
    server.stop(grace=None)


# -- measurements ----------------------------------------------------------------------------


def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up: first-touch allocations, connection setup
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def _serialise(tensors, chunk_size: int) -> None:
    wire = [
        m.SerializeToString()
        for m in streams.tensors_to_stream(
            tensors, run_id="bench", round=1, kind="UPDATE", chunk_size=chunk_size
        )
    ]
    streams.stream_to_tensors(pb.StreamMessage.FromString(b) for b in wire)


def _uploader(channel: grpc.Channel, chunk_size: int):
    call = channel.stream_unary(
        f"/{SERVICE}/Upload",
        request_serializer=pb.StreamMessage.SerializeToString,
        response_deserializer=pb.StreamMessage.FromString,
    )

    def upload(tensors):
        stream = streams.tensors_to_stream(
            tensors, run_id="bench", round=1, kind="UPDATE", chunk_size=chunk_size
        )
        reply = call(stream, timeout=600)
        assert reply.trailer.total_bytes == sum(t.numel() * 4 for t in tensors.values())

    return upload


def _machine() -> dict:
    return {
        **platform_info(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "cryptography": cryptography.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 16, 64, 200], help="MiB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=grpc_factory.DEFAULT_CHUNK_SIZE)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    ca = pki.create_ca("bench")
    server_cert = pki.issue_server_cert(ca, ["localhost"])
    client_cert = pki.issue_silo_cert(ca, "bench-silo")
    ca_pem = ca.cert_pem()

    ctx = mp.get_context("spawn")
    ports, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(
        target=_serve,
        args=((ca_pem, server_cert.cert_pem(), server_cert.key_pem()), ports, stop),
        daemon=True,
    )
    server.start()
    insecure_port, secure_port = ports.get(timeout=60)
    plain = grpc_factory.create_channel(f"127.0.0.1:{insecure_port}", None)
    creds = grpc_factory.channel_credentials(ca_pem, client_cert.cert_pem(), client_cert.key_pem())
    mtls = grpc_factory.create_channel(
        f"127.0.0.1:{secure_port}", creds, server_name_override="localhost"
    )
    modes = {
        "serialise": lambda t: _serialise(t, args.chunk_size),
        "grpc_insecure": _uploader(plain, args.chunk_size),
        "grpc_mtls": _uploader(mtls, args.chunk_size),
    }
    rows = []
    load_before = os.getloadavg()
    try:
        for size in args.sizes:
            tensors = lora_tensors(size)
            payload = sum(t.numel() * t.element_size() for t in tensors.values())
            row: dict[str, Any] = {"size_mib": payload / MIB, "tensors": len(tensors), "modes": {}}
            for mode, fn in modes.items():
                median, times = _median_time(lambda fn=fn, t=tensors: fn(t), args.repeats)
                row["modes"][mode] = {
                    "median_s": median,
                    "mib_per_s": payload / MIB / median,
                    "times_s": times,
                }
                print(f"{size:>6g} MiB {mode:<14} {payload / MIB / median:8.0f} MiB/s", flush=True)
            rows.append(row)
    finally:
        plain.close()
        mtls.close()
        stop.set()
        server.join(timeout=30)

    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])])
    result = {
        "benchmark": "tensor stream throughput (pf2lora.common.wire.streams over grpc_factory)",
        "command": command,
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "chunk_size": args.chunk_size,
        "repeats": args.repeats,
        "machine": _machine(),
        # Other work on the machine while measuring (1-minute load average, before and after).
        "loadavg_1min": [load_before[0], os.getloadavg()[0]],
        "rows": rows,
    }
    table = _markdown(result)
    print(table)
    save_results(args.out, "stream_throughput", result, table, indent=2)
    return 0


def _markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Tensor stream throughput",
        "",
        f"Command: `{result['command']}` ({result['date_utc']})",
        "",
        f"Machine: {m['cpu_model']}, {m['cpus_usable']} usable CPUs of {m['cpu_count']}; "
        f"Python {m['python']}, torch {m['torch']}, grpcio {m['grpcio']}, "
        f"protobuf {m['protobuf']}, cryptography {m['cryptography']}. 1-minute load average "
        f"{result['loadavg_1min'][0]:.1f} before, {result['loadavg_1min'][1]:.1f} after "
        "(other processes shared the CPUs when it is above 0).",
        "",
        f"Chunk size {result['chunk_size'] // 1024} KiB; median of {result['repeats']} runs "
        "after one warm-up; MiB/s of tensor payload. `serialise`: header+chunks+trailer "
        "encoded to bytes and decoded, validated and assembled, no network. `grpc_*`: "
        "client-streaming upload over loopback to a server in another process that assembles "
        "and validates before replying (SHA-256 on both ends included).",
        "",
        "| payload MiB | tensors | serialise MiB/s | gRPC plaintext MiB/s | gRPC mutual TLS MiB/s "
        "| mTLS median s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        modes = row["modes"]
        lines.append(
            f"| {row['size_mib']:g} | {row['tensors']} | {modes['serialise']['mib_per_s']:.0f} "
            f"| {modes['grpc_insecure']['mib_per_s']:.0f} | {modes['grpc_mtls']['mib_per_s']:.0f} "
            f"| {modes['grpc_mtls']['median_s']:.3f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
