"""Type-check the package with mypy, as it is imported: `pf2lora.common`, `pf2lora.coordinator`, ...

The import names map onto the repository's fixed top-level folders (pyproject's package-dir),
which mypy cannot follow through an editable install. This links the folders into a temporary
`pf2lora/` tree and runs mypy there with the settings in pyproject.toml ([tool.mypy]).

    .venv/bin/python scripts/typecheck.py [extra mypy arguments]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    pyproject = ROOT / "pyproject.toml"
    package_dir: dict[str, str] = tomllib.loads(pyproject.read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    with tempfile.TemporaryDirectory(prefix="pf2lora-mypy-") as tmp:
        top = Path(tmp) / "pf2lora"
        top.mkdir()
        # Only the top-level packages: their sub-packages come along inside the linked folder.
        for name, folder in package_dir.items():
            parts = name.split(".")
            if len(parts) == 2:
                (top / parts[1]).symlink_to(ROOT / folder, target_is_directory=True)
        cmd = [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(pyproject),
            "-p",
            "pf2lora",
            *argv,
        ]
        return subprocess.run(cmd, cwd=tmp, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
