#!/usr/bin/env python3
"""Regenerate the committed protobuf/gRPC Python code from proto/pf2lora/**/*.proto.

    python proto/generate.py            # rewrite the generated files in place
    python proto/generate.py --check    # exit 1 listing every drifted, missing or stale file

Each `.proto` under `<proto-root>/pf2lora/` yields `x_pb2.py`, `x_pb2.pyi` and `x_pb2_grpc.py`
next to it (protoc writes imports that follow the .proto path, so `package pf2lora.v1;` files
live in `pf2lora/v1/` and import as `from pf2lora.v1 import x_pb2`). Generation always goes
into a fresh temporary folder first, so `--check` compares exactly what a rewrite would
produce. The output depends only on the .proto files and the grpcio-tools version, which is
pinned (pyproject `dev` extra): its generated code checks the runtime at import time and needs
protobuf >= 7.35.1 and grpcio >= 1.85.1 (grpcio-tools 1.85.1), the floors in pyproject.
"""

from __future__ import annotations

import argparse
import importlib.resources
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
# Generated-file suffixes; anything matching them without a .proto beside it is stale.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
PACKAGE_ROOT = "pf2lora"


def find_protos(proto_root: Path) -> list[Path]:
    """The .proto files under proto_root/pf2lora, relative to proto_root, sorted."""
    return sorted(p.relative_to(proto_root) for p in (proto_root / PACKAGE_ROOT).rglob("*.proto"))


def generated_names(proto: Path) -> list[Path]:
    """The three files protoc writes for one .proto (relative paths)."""
    stem = proto.with_suffix("")
    return [stem.parent / (stem.name + suffix) for suffix in GENERATED_SUFFIXES]


def existing_generated(out: Path) -> set[Path]:
    """Generated-looking files currently present under out/pf2lora (relative to out)."""
    root = out / PACKAGE_ROOT
    if not root.is_dir():
        return set()
    return {
        p.relative_to(out)
        for p in root.rglob("*")
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    }


def run_protoc(proto_root: Path, protos: list[Path], dest: Path) -> None:
    """Run grpc_tools' bundled protoc on every .proto at once, writing into dest."""
    # The well-known types (google/protobuf/*.proto) ship inside grpc_tools.
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={dest}",
        f"--pyi_out={dest}",
        f"--grpc_python_out={dest}",
        *[str(proto_root / p) for p in protos],
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code} (arguments: {' '.join(args[1:])})")
    # Every .proto must yield all three files (a _pb2_grpc.py even without services), so
    # the committed set is the same whether or not a file declares a service.
    for proto in protos:
        for name in generated_names(proto):
            if not (dest / name).is_file():
                raise SystemExit(f"protoc did not write {name}")


def generate(proto_root: Path, out: Path, check: bool) -> int:
    """Regenerate into a temp folder, then compare with (check) or copy to (write) out."""
    protos = find_protos(proto_root)
    if not protos:
        print(f"no .proto files under {proto_root / PACKAGE_ROOT}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="pf2lora-protoc-") as tmp:
        fresh_root = Path(tmp)
        run_protoc(proto_root, protos, fresh_root)
        fresh = {
            name: (fresh_root / name).read_bytes() for p in protos for name in generated_names(p)
        }

    present = existing_generated(out)
    problems: list[str] = []
    for name, content in sorted(fresh.items()):
        target = out / name
        if not target.is_file():
            problems.append(f"missing: {name}")
            if not check:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
        elif target.read_bytes() != content:
            problems.append(f"drifted: {name}")
            if not check:
                target.write_bytes(content)
    for name in sorted(present - fresh.keys()):
        problems.append(f"stale (no .proto): {name}")
        if not check:
            (out / name).unlink()

    if check:
        if problems:
            print("generated protobuf code is out of date:", file=sys.stderr)
            for line in problems:
                print(f"  {line}", file=sys.stderr)
            print(
                "run: .venv/bin/python proto/generate.py   (and commit the result)", file=sys.stderr
            )
            return 1
        print(f"generated code up to date ({len(protos)} .proto files)")
        return 0
    for line in problems:
        print(line)
    print(f"generated code written for {len(protos)} .proto files ({len(problems)} changed)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if any generated file is missing, drifted or stale",
    )
    parser.add_argument(
        "--proto-root",
        type=Path,
        default=HERE,
        help="include root holding pf2lora/<version>/*.proto (default: this script's folder)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where the generated files live (default: the proto root)",
    )
    args = parser.parse_args(argv)
    proto_root = args.proto_root.resolve()
    out = (args.out or args.proto_root).resolve()
    return generate(proto_root, out, args.check)


if __name__ == "__main__":
    sys.exit(main())
