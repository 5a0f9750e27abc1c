"""The tensor manifest, the one description of what a stream carries, in each of its forms.

A manifest is the list of `TensorInfo` entries (name, dtype, shape, byte count, SHA-256 of the
wire bytes) in a stream's header; `manifest_digest` identifies it (global checkpoints, task
digests, receipts). Forms: plain values here, protobuf (`spec_to_proto` / `spec_from_proto`),
and the JSON both ends record of every stream (the coordinator in SQLite per accepted update,
the silo in its wire record) together with a secure round's payload layout, so that
`pf2lora run audit` compares equal values.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pf2lora.common.errors import DataError, InvalidArgument
from pf2lora.common.secagg.layout import LayoutEntry, VectorLayout
from pf2lora.v1 import tensors_pb2 as pb

MAX_NAME_LENGTH = 1024

MAX_NDIM = 16

DTYPE_TO_PROTO: dict[torch.dtype, pb.DType] = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.float64: pb.DTYPE_FLOAT64,
    torch.int64: pb.DTYPE_INT64,
    torch.int32: pb.DTYPE_INT32,
    torch.uint32: pb.DTYPE_UINT32,
    torch.uint8: pb.DTYPE_UINT8,
    torch.int8: pb.DTYPE_INT8,
    torch.int16: pb.DTYPE_INT16,
    torch.bool: pb.DTYPE_BOOL,
}

_DTYPE_FROM_PROTO: dict[int, torch.dtype] = {v: k for k, v in DTYPE_TO_PROTO.items()}

# Wire bytes are little-endian; only a big-endian host has to swap.
SWAP_BYTES = sys.byteorder != "little"

MASKED_TENSOR = "masked"  # the one tensor of a MASKED_UPDATE stream: uint32 (L,)

# name -> (shape, dtype): what a stream must hold, or a payload's layout before any tensor exists.
Spec = Mapping[str, tuple[Sequence[int], torch.dtype]]


def dtype_to_proto(dtype: torch.dtype) -> pb.DType:
    """torch dtype -> pf2lora.v1.DType value."""
    try:
        return DTYPE_TO_PROTO[dtype]
    except KeyError:
        supported = ", ".join(str(d).removeprefix("torch.") for d in DTYPE_TO_PROTO)
        raise InvalidArgument(
            f"dtype {dtype} cannot be streamed (supported: {supported})"
        ) from None


def dtype_from_proto(value: int) -> torch.dtype:
    """pf2lora.v1.DType value -> torch dtype."""
    try:
        return _DTYPE_FROM_PROTO[value]
    except KeyError:
        raise InvalidArgument(f"unknown or unspecified DType value {value}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorInfo:
    """One manifest entry (pf2lora.v1.TensorSpec) as plain Python values."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    sha256: bytes


def tensor_spec(name: str, tensor: torch.Tensor) -> TensorInfo:
    """The manifest entry of one tensor: dtype, shape, byte count and SHA-256 of its wire bytes."""
    return spec_of(name, wire_bytes(name, tensor), tensor)


def wire_bytes(name: str, tensor: torch.Tensor) -> memoryview:
    """The tensor's little-endian C-contiguous bytes, without a copy for contiguous CPU tensors."""
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgument(
            f"tensor {name!r}: expected a torch.Tensor, got {type(tensor).__name__}"
        )
    if tensor.layout != torch.strided or tensor.device.type == "meta":
        raise InvalidArgument(f"tensor {name!r}: only dense tensors with data can be streamed")
    try:
        dtype_to_proto(tensor.dtype)
    except InvalidArgument as exc:
        raise InvalidArgument(f"tensor {name!r}: {exc}") from None
    t = tensor.detach().cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8)  # (numel * itemsize,)
    if SWAP_BYTES and t.element_size() > 1:
        raw = raw.view(-1, t.element_size()).flip(1).reshape(-1)
    return raw.numpy().data


def spec_of(name: str, view: memoryview, tensor: torch.Tensor) -> TensorInfo:
    return TensorInfo(
        name, tensor.dtype, tuple(tensor.shape), view.nbytes, hashlib.sha256(view).digest()
    )


def spec_to_proto(spec: TensorInfo) -> pb.TensorSpec:
    return pb.TensorSpec(
        name=spec.name,
        dtype=dtype_to_proto(spec.dtype),
        shape=list(spec.shape),
        nbytes=spec.nbytes,
        sha256=spec.sha256,
    )


def spec_from_proto(msg: pb.TensorSpec) -> TensorInfo:
    """Validated TensorInfo; InvalidArgument naming the tensor if the entry is inconsistent."""
    name = msg.name
    if not name or len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"tensor name {name[:64]!r}: must be 1-{MAX_NAME_LENGTH} characters")
    try:
        dtype = dtype_from_proto(msg.dtype)
    except InvalidArgument as exc:
        raise InvalidArgument(f"tensor {name!r}: {exc}") from None
    shape = tuple(msg.shape)
    if len(shape) > MAX_NDIM or any(d < 0 for d in shape):
        raise InvalidArgument(f"tensor {name!r}: invalid shape {list(shape)}")
    expected_nbytes = math.prod(shape) * dtype.itemsize
    if msg.nbytes != expected_nbytes:
        raise InvalidArgument(
            f"tensor {name!r}: nbytes {msg.nbytes} is inconsistent with shape {list(shape)} "
            f"and dtype {dtype} ({expected_nbytes} bytes)"
        )
    if len(msg.sha256) != 32:
        raise InvalidArgument(f"tensor {name!r}: sha256 must be 32 bytes, got {len(msg.sha256)}")
    return TensorInfo(name, dtype, shape, msg.nbytes, bytes(msg.sha256))


def manifest_digest(specs: Sequence[TensorInfo]) -> bytes:
    """SHA-256 over a canonical encoding of the manifest (independent of protobuf encoding).

    Per entry, in order: name length (u32) and UTF-8 name, DType value (u32), ndim (u32), each
    dimension (i64), nbytes (u64), per-tensor SHA-256; all little-endian.
    """
    h = hashlib.sha256(b"pf2lora.v1.manifest\x00")
    h.update(struct.pack("<Q", len(specs)))
    for spec in specs:
        name = spec.name.encode()
        h.update(struct.pack("<I", len(name)) + name)
        h.update(struct.pack("<II", dtype_to_proto(spec.dtype), len(spec.shape)))
        h.update(struct.pack(f"<{len(spec.shape)}q", *spec.shape))
        h.update(struct.pack("<Q", spec.nbytes) + spec.sha256)
    return h.digest()


def expected_manifest(
    tensors: Mapping[str, torch.Tensor],
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The Spec (the `expected` argument of stream_to_tensors) that matches these (template)
    tensors.
    """
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}


def tensor_info_to_dict(t: TensorInfo) -> dict[str, Any]:
    return {
        "name": t.name,
        "dtype": dtype_name(t.dtype),
        "shape": list(t.shape),
        "nbytes": t.nbytes,
        "sha256": t.sha256.hex(),
    }


def tensors_to_json(kind: str, tensors: Iterable[TensorInfo]) -> str:
    """The JSON the coordinator stores per accepted update: stream kind and manifest entries."""
    return json.dumps(
        {"kind": kind, "tensors": [tensor_info_to_dict(t) for t in tensors]}, sort_keys=True
    )


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
    return VectorLayout(
        entries=tuple(
            LayoutEntry(
                name=str(e["name"]),
                shape=tuple(int(d) for d in e["shape"]),
                offset=int(e["offset"]),
            )
            for e in entries
        )
    )
