"""The committed generated protobuf code matches the .proto files, and generate.py --check catches
drift.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto"
GENERATE = PROTO / "generate.py"


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GENERATE), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def proto_copy(tmp_path: Path) -> Path:
    """A copy of proto/pf2lora (sources and generated files) to break on purpose."""
    shutil.copytree(
        PROTO / "pf2lora", tmp_path / "pf2lora", ignore=shutil.ignore_patterns("__pycache__")
    )
    return tmp_path


def test_committed_generated_code_is_up_to_date():
    result = _run("--check")
    assert result.returncode == 0, result.stderr


def test_added_field_is_detected_then_regenerated_deterministically(proto_copy: Path):
    source = proto_copy / "pf2lora" / "v1" / "tensors.proto"
    text = source.read_text()
    source.write_text(text.replace("bytes data = 3;", "bytes data = 3;\n  uint32 extra = 4;"))

    result = _run("--check", "--proto-root", proto_copy)
    assert result.returncode == 1
    assert "drifted: pf2lora/v1/tensors_pb2.py" in result.stderr
    assert "drifted: pf2lora/v1/tensors_pb2.pyi" in result.stderr

    assert _run("--proto-root", proto_copy).returncode == 0
    assert "extra" in (proto_copy / "pf2lora" / "v1" / "tensors_pb2.pyi").read_text()
    again = _run("--check", "--proto-root", proto_copy)
    assert again.returncode == 0, again.stderr


def test_missing_and_stale_files_are_detected_and_fixed(proto_copy: Path):
    v1 = proto_copy / "pf2lora" / "v1"
    (v1 / "tensors_pb2_grpc.py").unlink()
    (v1 / "removed_pb2.py").write_text("# generated from a .proto that no longer exists\n")

    result = _run("--check", "--proto-root", proto_copy)
    assert result.returncode == 1
    assert "missing: pf2lora/v1/tensors_pb2_grpc.py" in result.stderr
    assert "stale (no .proto): pf2lora/v1/removed_pb2.py" in result.stderr

    assert _run("--proto-root", proto_copy).returncode == 0
    assert not (v1 / "removed_pb2.py").exists()
    assert (v1 / "tensors_pb2_grpc.py").read_bytes() == (
        PROTO / "pf2lora" / "v1" / "tensors_pb2_grpc.py"
    ).read_bytes()


def test_out_option_writes_elsewhere_identically(tmp_path: Path):
    assert _run("--out", tmp_path).returncode == 0
    for generated in sorted((PROTO / "pf2lora" / "v1").glob("*_pb2*.py*")):
        assert (tmp_path / "pf2lora" / "v1" / generated.name).read_bytes() == generated.read_bytes()


def test_layout_package_and_imports():
    assert not (PROTO / "__init__.py").exists(), (
        "proto/ must not be a package: protoc's output is imported as pf2lora.common.*_pb2"
    )
    assert (PROTO / "pf2lora" / "v1" / "__init__.py").exists()
    for source in (PROTO / "pf2lora" / "v1").glob("*.proto"):
        assert re.search(r"^package pf2lora\.v1;$", source.read_text(), re.M), source.name
    from pf2lora.v1 import tensors_pb2

    assert tensors_pb2.DESCRIPTOR.package == "pf2lora.v1"
    for generated in (PROTO / "pf2lora" / "v1").glob("*_pb2*.py"):
        imports = re.findall(r"^(?:from|import) (\S+)", generated.read_text(), re.M)
        local = [i for i in imports if i.endswith("_pb2") or i.startswith("pf2lora")]
        assert all(i.startswith("pf2lora.v1") for i in local), (generated.name, local)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def test_dependency_floors_cover_the_generated_code_header():
    """pyproject's grpcio/protobuf floors are at least what the generated code checks at import."""
    v1 = PROTO / "pf2lora" / "v1"
    pb2 = (v1 / "tensors_pb2.py").read_text()
    m = re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", pb2)
    assert m, "protobuf runtime version check not found in tensors_pb2.py"
    protobuf_needed = tuple(int(g) for g in m.groups())
    grpc_text = (v1 / "tensors_pb2_grpc.py").read_text()
    grpc_needed = _version(re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", grpc_text)[1])

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {}
    for dep in deps:
        m = re.match(r"([A-Za-z0-9_.-]+)>=([\d.]+)", dep)
        if m:
            floors[m[1].lower()] = _version(m[2])
    assert floors["protobuf"] >= protobuf_needed
    assert floors["grpcio"] >= grpc_needed
