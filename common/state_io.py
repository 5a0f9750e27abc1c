"""Durable files: atomic writes (temp file, fsync, rename, fsync dir), safetensors state files."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from pf2lora.common.errors import DataError

logger = logging.getLogger(__name__)

_META_KEY = "pf2lora"


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str | os.PathLike[str], mode: int = 0o700) -> Path:
    """Create `path` and its missing parents, each with `mode` (less the umask; `Path.mkdir`
    gives missing parents the default mode instead). Existing directories are left as they are."""
    target = Path(path)
    missing: list[Path] = []
    p = target
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            d.mkdir(mode=mode)
    return target


def atomic_write_bytes(
    path: str | os.PathLike[str], data: bytes, mode: int = 0o644, *, dir_mode: int = 0o700
) -> None:
    """Write `data` so that `path` holds either the old or the new content, never a mix.

    A temp file beside the target (mkstemp: 0600, O_EXCL) gets its final `mode` before any
    byte is written, so a key is never readable by others, not even for a moment; then fsync,
    rename, fsync of the directory. Missing parent directories are created with `dir_mode`
    (owner-only unless asked otherwise; less the umask).
    """
    target = Path(path)
    make_dirs(target.parent, dir_mode)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def save_state(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Tensor],
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Tensors plus a JSON-able metadata dict in one safetensors file, written atomically."""
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {_META_KEY: json.dumps(dict(meta or {}), sort_keys=True)}
    atomic_write_bytes(path, st_save(data, metadata=metadata), mode=0o600)


def load_state(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a file written by `save_state`; a damaged file is a DataError naming it."""
    p = Path(path)
    try:
        raw = p.read_bytes()
        tensors = st_load(raw)
        from safetensors import safe_open  # metadata lives in the header

        with safe_open(str(p), framework="pt") as fh:
            metadata = fh.metadata() or {}
        meta = json.loads(metadata.get(_META_KEY, "{}"))
    except FileNotFoundError:
        raise
    except (SafetensorError, ValueError, OSError) as exc:
        raise DataError(f"state file {p} is unreadable: {exc}") from exc
    return tensors, meta
