"""Named tensors <-> one flat float32 vector, in a layout every silo derives identically.

Secure aggregation works on one flat vector per silo. ``flatten`` orders tensors by name (so all
silos agree without exchanging the layout) and records each name, shape and offset; ``unflatten``
cuts a vector (e.g. the decoded sum) back into named arrays. Torch tensors are accepted without
importing torch here: anything with ``detach()`` is moved to the CPU as float32 first.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pf2lora.common.errors import InvalidArgument
from pf2lora.common.secagg.messages import canonical_bytes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayoutEntry:
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class VectorLayout:
    """Where each named tensor lives in the flat vector (entries sorted by name)."""

    entries: tuple[LayoutEntry, ...]

    @property
    def size(self) -> int:
        return sum(e.size for e in self.entries)

    def digest(self) -> str:
        """SHA-256 over names and shapes: equal on two parties iff their layouts agree."""
        fields: list[str | int] = []
        for e in self.entries:
            fields += [e.name, len(e.shape), *e.shape]
        return hashlib.sha256(canonical_bytes("pf2lora/secagg/v1/layout", *fields)).hexdigest()


def _to_numpy(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (any dtype, any device)
        value = value.detach().to("cpu").float().numpy()
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating):
        raise InvalidArgument(f"tensor {name!r} has non-float dtype {array.dtype}")
    return array


def flatten(tensors: Mapping[str, Any]) -> tuple[np.ndarray, VectorLayout]:
    """(float32 vector (L,), layout) from named tensors (numpy arrays or torch tensors)."""
    if not tensors:
        raise InvalidArgument("nothing to flatten: no tensors")
    entries: list[LayoutEntry] = []
    arrays: list[np.ndarray] = []
    offset = 0
    for name in sorted(tensors):
        array = _to_numpy(tensors[name], name)
        entries.append(
            LayoutEntry(name=name, shape=tuple(int(d) for d in array.shape), offset=offset)
        )
        arrays.append(array)
        offset += array.size
    vector = np.empty(offset, dtype=np.float32)  # (L,)
    for entry, array in zip(entries, arrays, strict=True):
        vector[entry.offset : entry.offset + entry.size] = array.reshape(-1)
    return vector, VectorLayout(entries=tuple(entries))


def unflatten(vector: np.ndarray, layout: VectorLayout) -> dict[str, np.ndarray]:
    """Named arrays (views into ``vector``) in the shapes recorded by ``layout``."""
    if vector.ndim != 1 or vector.shape[0] != layout.size:
        raise InvalidArgument(
            f"vector of shape {vector.shape} does not match the layout's {layout.size} elements"
        )
    return {e.name: vector[e.offset : e.offset + e.size].reshape(e.shape) for e in layout.entries}
