"""The tensor manifest in its forms: dtypes on the wire, entries and their digest, protobuf, and
the JSON both ends record of every stream.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from pf2lora.common.errors import DataError, InvalidArgument
from pf2lora.common.wire import streams
from pf2lora.common.wire.manifest import (
    DTYPE_TO_PROTO,
    TensorInfo,
    dtype_from_proto,
    dtype_to_proto,
    layout_from_list,
    layout_to_list,
    manifest_digest,
    payload_layout,
    spec_from_proto,
    spec_to_proto,
    tensor_spec,
    tensors_from_json,
    tensors_to_json,
)
from pf2lora.v1 import tensors_pb2 as pb

ALL_DTYPES = list(DTYPE_TO_PROTO)


def test_dtype_conversions_cover_every_proto_value():
    for dtype in ALL_DTYPES:
        assert dtype_from_proto(dtype_to_proto(dtype)) == dtype
    values = {v.number for v in pb.DType.DESCRIPTOR.values if v.number != pb.DTYPE_UNSPECIFIED}
    assert values == {dtype_to_proto(d) for d in ALL_DTYPES}
    with pytest.raises(InvalidArgument, match="complex64"):
        dtype_to_proto(torch.complex64)
    with pytest.raises(InvalidArgument, match="unspecified"):
        dtype_from_proto(pb.DTYPE_UNSPECIFIED)
    for kind in streams.StreamKind:
        assert streams.kind_from_proto(streams.kind_to_proto(kind)) is kind


def test_tensor_spec_and_manifest_digest():
    t = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    spec = tensor_spec("w", t)
    assert spec == TensorInfo(
        "w", torch.int32, (2, 3), 24, hashlib.sha256(t.numpy().tobytes()).digest()
    )
    assert spec_from_proto(spec_to_proto(spec)) == spec
    digest = manifest_digest([spec])
    assert digest == manifest_digest([tensor_spec("w", t.clone())])
    # Any field of any entry changes it, and so does the order of entries.
    other = tensor_spec("v", t)
    variants = [
        [tensor_spec("w2", t)],
        [tensor_spec("w", t.reshape(3, 2))],
        [tensor_spec("w", t.to(torch.uint32))],
        [tensor_spec("w", t + 1)],
        [spec, other],
        [other, spec],
        [],
    ]
    digests = {manifest_digest(v) for v in variants}
    assert len(digests) == len(variants) and digest not in digests


def test_json_records_and_payload_layouts_round_trip() -> None:
    t = {"b": torch.zeros(2, 3), "a": torch.ones(4)}
    specs = [tensor_spec(n, v) for n, v in t.items()]
    kind, entries = tensors_from_json(tensors_to_json("UPDATE", specs))
    assert kind == "UPDATE"
    assert [(e["name"], e["dtype"], e["shape"], e["nbytes"]) for e in entries] == [
        ("b", "float32", [2, 3], 24),
        ("a", "float32", [4], 16),
    ]
    assert entries[0]["sha256"] == specs[0].sha256.hex()
    assert tensors_from_json(None) == ("", [])
    with pytest.raises(DataError, match="damaged"):
        tensors_from_json('{"kind": "UPDATE"}')
    layout = payload_layout({n: (tuple(v.shape), v.dtype) for n, v in t.items()})
    assert [(e.name, e.offset) for e in layout.entries] == [("a", 0), ("b", 4)]  # sorted names
    assert layout_from_list(layout_to_list(layout)) == layout
