"""What crossed the wire, as both ends record it: tensor manifests and payload layouts in JSON form.

The coordinator stores the manifest of every accepted update (SQLite) and serves it with the
round's payload layout (GetRoundManifest); the silo appends the same records for what it sent
(silo/wire_record.py); `pf2lora run audit` compares the two (cli/audit.py). One JSON form for
both, so that a comparison is a comparison of equal values.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pf2lora.common.errors import DataError
from pf2lora.common.secagg.layout import LayoutEntry, VectorLayout
from pf2lora.common.wire.streams import TensorInfo

Spec = Mapping[str, tuple[Sequence[int], torch.dtype]]
MASKED_TENSOR = "masked"  # the one tensor of a MASKED_UPDATE stream: uint32 (L,)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_info_to_dict(t: TensorInfo) -> dict[str, Any]:
    return {"name": t.name, "dtype": dtype_name(t.dtype), "shape": list(t.shape),
            "nbytes": t.nbytes, "sha256": t.sha256.hex()}


def tensors_to_json(kind: str, tensors: Iterable[TensorInfo]) -> str:
    """The JSON the coordinator stores per accepted update: stream kind and manifest entries."""
    return json.dumps({"kind": kind, "tensors": [tensor_info_to_dict(t) for t in tensors]}, sort_keys=True)


def tensors_from_json(text: str | None) -> tuple[str, list[dict[str, Any]]]:
    if not text:
        return "", []
    try:
        doc = json.loads(text)
        return str(doc["kind"]), list(doc["tensors"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"stored update manifest is damaged: {exc}") from None


def payload_layout(spec: Spec) -> VectorLayout:
    """The flat-vector layout of a payload spec: what `layout.flatten` makes of a payload
    (names sorted, each tensor's elements in C order), without needing the tensors."""
    entries: list[LayoutEntry] = []
    offset = 0
    for name in sorted(spec):
        shape = tuple(int(d) for d in spec[name][0])
        entries.append(LayoutEntry(name=name, shape=shape, offset=offset))
        offset += math.prod(shape)
    return VectorLayout(entries=tuple(entries))


def layout_to_list(layout: VectorLayout) -> list[dict[str, Any]]:
    return [{"name": e.name, "shape": list(e.shape), "offset": e.offset} for e in layout.entries]


def layout_from_list(entries: Sequence[Mapping[str, Any]]) -> VectorLayout:
    return VectorLayout(entries=tuple(
        LayoutEntry(name=str(e["name"]), shape=tuple(int(d) for d in e["shape"]), offset=int(e["offset"]))
        for e in entries
    ))


@dataclass(frozen=True)
class Finding:
    """One discrepancy an audit found (printed one per line; any finding fails the audit)."""

    round: int
    attempt: int
    what: str

    def __str__(self) -> str:
        where = f"round {self.round}" + (f" attempt {self.attempt}" if self.attempt else "")
        return f"{where}: {self.what}"
