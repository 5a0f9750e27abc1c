"""The installed pf2lora version (reported by silos on Join and by the coordinator)."""

from __future__ import annotations

import importlib.metadata


def software_version() -> str:
    try:
        return importlib.metadata.version("pf2lora")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
        return "0+unknown"
