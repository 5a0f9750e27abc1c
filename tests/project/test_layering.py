"""The architecture the folders show is the one the imports follow: every import points down.

Layers, lowest first (docs/architecture.md):
  0  common/errors
  1  common/names, version, state_io; the generated pf2lora.v1
  2  common/learning, data, transport, secagg, privacy   (independent of one another)
  3  common/algorithms, wire                    (independent of one another)
  4  common/runspec, client_runtime, simulation (the drivers)
  5  coordinator, silo                          (independent of one another)
  6  cli
Every import (module level or inside a function) of a pf2lora module is checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {
    "common": "pf2lora.common",
    "coordinator": "pf2lora.coordinator",
    "silo": "pf2lora.silo",
    "cli": "pf2lora.cli",
}
LAYER = {
    "common.errors": 0,
    "common": 0,  # the package's own __init__
    "common.names": 1,
    "common.version": 1,
    "common.state_io": 1,
    "v1": 1,
    "common.learning": 2,
    "common.data": 2,
    "common.transport": 2,
    "common.secagg": 2,
    "common.privacy": 2,
    "common.algorithms": 3,
    "common.wire": 3,
    "common.runspec": 4,
    "common.client_runtime": 4,
    "common.simulation": 4,
    "coordinator": 5,
    "silo": 5,
    "cli": 6,
}
# Within a layer only the drivers may import one another.
SAME_LAYER_ALLOWED = {4}
# Beyond the layers: the production coordinator never imports the in-process simulation.
FORBIDDEN = {("coordinator", "common.simulation")}


def unit_of(module: str) -> str:
    """The layered unit a module belongs to: common.<sub-package or module>, or a top package."""
    parts = module.split(".")[1:]  # drop "pf2lora"
    if parts[0] == "common" and len(parts) > 1:
        return f"common.{parts[1]}"
    return parts[0]


def imports() -> list[tuple[str, int, str, str]]:
    """(file, line, importing module, imported module) for every pf2lora import."""
    out = []
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            module = ".".join([package, *rel.parts]).removesuffix(".__init__")
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names: list[str] = []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                for name in names:
                    if name.startswith("pf2lora."):
                        out.append((str(path.relative_to(ROOT)), node.lineno, module, name))
    return out


def violations(edges: list[tuple[str, int, str, str]]) -> list[str]:
    found = []
    for where, line, importer, imported in edges:
        a, b = unit_of(importer), unit_of(imported)
        if a == b:
            continue
        if a not in LAYER or b not in LAYER:
            found.append(f"{where}:{line}: {a} or {b} has no layer (add it to this test)")
        elif LAYER[b] > LAYER[a]:
            found.append(f"{where}:{line}: {a} (layer {LAYER[a]}) imports {imported} (layer up)")
        elif LAYER[b] == LAYER[a] and LAYER[a] not in SAME_LAYER_ALLOWED:
            found.append(f"{where}:{line}: {a} imports {imported} from its own layer")
        elif (a, b) in FORBIDDEN:
            found.append(f"{where}:{line}: {a} must not import {imported}")
    return found


def test_every_import_points_down() -> None:
    edges = imports()
    assert len(edges) > 200  # the walk found the code
    assert violations(edges) == []


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("pf2lora.common.learning.trainer", "pf2lora.common.algorithms.base"),  # layer up
        ("pf2lora.common.data.splits", "pf2lora.common.learning.model"),  # same layer
        ("pf2lora.coordinator.engine", "pf2lora.silo.state"),  # same layer
        ("pf2lora.coordinator.engine", "pf2lora.common.simulation"),  # forbidden
        ("pf2lora.common.wire.tasks", "pf2lora.coordinator.store"),  # layer up
    ],
)
def test_the_check_catches_an_import_that_points_up_or_sideways(
    importer: str, imported: str
) -> None:
    assert len(violations([("x.py", 1, importer, imported)])) == 1
