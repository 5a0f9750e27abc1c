"""Durable files: atomic writes (temp file, fsync, rename, fsync dir), safetensors state files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from pf2lora.common.errors import DataError

logger = logging.getLogger(__name__)

_META_KEY = "pf2lora"
_DIGEST_KEY = "pf2lora_sha256"  # over every tensor (name, dtype, shape, bytes) and the metadata


def _hash_tensors(tensors: Mapping[str, Tensor]) -> Any:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h


def tensors_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 (hex) over (name, dtype, shape, bytes) of named tensors in sorted order."""
    return str(_hash_tensors(tensors).hexdigest())


def content_digest(tensors: Mapping[str, Tensor], meta_json: str) -> str:
    """The digest of a state file's content: its tensors and its metadata string, independent
    of how safetensors lays them out."""
    h = _hash_tensors(tensors)
    h.update(b"meta|" + meta_json.encode())
    return str(h.hexdigest())


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
    """Tensors plus a JSON-able metadata dict in one safetensors file, written atomically, with
    a digest of both that `load_state` checks."""
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta_json = json.dumps(dict(meta or {}), sort_keys=True)
    metadata = {_META_KEY: meta_json, _DIGEST_KEY: content_digest(data, meta_json)}
    atomic_write_bytes(path, st_save(data, metadata=metadata), mode=0o600)


def load_state(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a file written by `save_state`; a damaged file (unreadable, or not what its digest
    says: a flipped bit) is a DataError naming it. Files from before digests are read as they
    are."""
    p = Path(path)
    try:
        raw = p.read_bytes()
        tensors = st_load(raw)
        from safetensors import safe_open  # metadata lives in the header

        with safe_open(str(p), framework="pt") as fh:
            metadata = fh.metadata() or {}
        meta_json = metadata.get(_META_KEY, "{}")
        meta = json.loads(meta_json)
    except FileNotFoundError:
        raise
    except (SafetensorError, ValueError, OSError) as exc:
        raise DataError(f"state file {p} is unreadable: {exc}") from exc
    recorded = metadata.get(_DIGEST_KEY)
    if recorded is not None and recorded != content_digest(tensors, meta_json):
        raise DataError(f"state file {p} does not match its digest: it was changed or damaged")
    return tensors, meta
