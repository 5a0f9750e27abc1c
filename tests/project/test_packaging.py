"""The wheel holds the whole package under its import names.

pyproject maps the fixed top-level folders (`common/`, `coordinator/`, ...) onto `pf2lora.*` and
lists every package by hand: a sub-package missing from that list would be left out of the
wheel silently and only fail on a user's machine. This builds the real wheel and checks that
every module of the mapped folders, and the wire protocol's .proto and .pyi files, are in it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _package_dirs() -> dict[str, str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return data["tool"]["setuptools"]["package-dir"]


def _expected_files() -> set[str]:
    """Import paths (as wheel paths) of every module and protocol file in the mapped folders."""
    expected: set[str] = set()
    mapped = _package_dirs()
    tops = {name: folder for name, folder in mapped.items() if name.count(".") == 1}
    for name, folder in tops.items():
        root = ROOT / folder
        for path in root.rglob("*"):
            if "__pycache__" in path.parts or not path.is_file():
                continue
            if path.suffix == ".py" or (name == "pf2lora.v1" and path.suffix in (".proto", ".pyi")):
                expected.add("/".join([*name.split("."), *path.relative_to(root).parts]))
    return expected


def test_every_listed_package_has_a_folder_with_an_init() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapped = _package_dirs()
    for package in data["tool"]["setuptools"]["packages"]:
        assert package in mapped, f"{package} has no package-dir entry"
        assert (ROOT / mapped[package] / "__init__.py").is_file(), f"{package}: no __init__.py"


def test_wheel_contains_every_module_under_its_import_name(tmp_path: Path) -> None:
    # Build from a clean copy: pip builds a local folder in place, and a stale build/ of an
    # earlier layout could supply files the current configuration would leave out.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in {f.split("/")[0] for f in _package_dirs().values()}:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("pf2lora-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = _expected_files()
    assert len(expected) > 50  # the walk found the package, not an empty folder
    missing = sorted(expected - names)
    assert not missing, f"left out of the wheel (add the package to pyproject): {missing}"
    assert "pf2lora/cli/main.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "pf2lora = pf2lora.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
