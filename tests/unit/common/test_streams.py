"""Tensor streams: named tensors <-> StreamMessage; round trips and every refusal, real messages."""

from __future__ import annotations

import hashlib

import pytest
import torch

from pf2lora.common.errors import FailedPrecondition, InvalidArgument
from pf2lora.common.transport.grpc_factory import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE
from pf2lora.common.wire import streams
from pf2lora.common.wire.manifest import (
    expected_manifest,
    manifest_digest,
    spec_from_proto,
    tensor_spec,
)
from pf2lora.v1 import tensors_pb2 as pb

ALL_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.uint32,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.bool,
]


def _make(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype == torch.uint32:  # the whole range, as masked secure-aggregation vectors use it
        return torch.randint(0, 2**32, shape, generator=gen, dtype=torch.int64).to(torch.uint32)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64).to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: same dtype, shape and bytes (NaN-safe)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(
            a.contiguous().reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
        )
    )


def _stream(tensors, chunk_size: int = 16, **kw) -> list[pb.StreamMessage]:
    kw.setdefault("kind", streams.StreamKind.UPDATE)
    return list(
        streams.tensors_to_stream(tensors, run_id="run-1", round=7, chunk_size=chunk_size, **kw)
    )


def _roundtrip(tensors, chunk_size: int = 16, **kw):
    return streams.stream_to_tensors(_stream(tensors, chunk_size), **kw)


# -- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (5, 7), (2, 3, 11)], ids=str)
def test_round_trip_every_dtype_and_shape(dtype, shape):
    tensors = {"t": _make(dtype, shape), "other": _make(dtype, (4,), seed=1)}
    info, out = _roundtrip(tensors, chunk_size=5, expected=expected_manifest(tensors))
    assert list(out) == ["t", "other"]
    for name, tensor in tensors.items():
        assert _same(tensor, out[name]), name
    assert info.tensors[0].shape == shape and info.tensors[0].dtype == dtype


def test_round_trip_header_fields_and_scalars():
    tensors = {"a": torch.ones(3)}
    messages = streams.tensors_to_stream(
        tensors,
        run_id="run-9",
        round=2**32 - 1,
        silo_id="silo-a",
        kind="MASKED_UPDATE",
        scalars={"num_samples": 120, "train_loss": 0.25},
    )
    info, _ = streams.stream_to_tensors(messages)
    assert (info.run_id, info.round, info.silo_id) == ("run-9", 2**32 - 1, "silo-a")
    assert info.kind is streams.StreamKind.MASKED_UPDATE
    assert info.scalars == {"num_samples": 120.0, "train_loss": 0.25}
    assert info.chunk_size == DEFAULT_CHUNK_SIZE


def test_chunks_cover_each_tensor_in_order_and_within_chunk_size():
    tensors = {"a": torch.randn(10), "empty": torch.empty(0), "b": torch.randn(3)}
    messages = _stream(tensors, chunk_size=16)
    kinds = [m.WhichOneof("body") for m in messages]
    assert kinds == ["header"] + ["chunk"] * 4 + ["trailer"]  # 40 B -> 16+16+8; 12 B -> 12
    chunks = [m.chunk for m in messages[1:-1]]
    assert [(c.tensor_index, c.offset, len(c.data)) for c in chunks] == [
        (0, 0, 16),
        (0, 16, 16),
        (0, 32, 8),
        (2, 0, 12),
    ]
    trailer = messages[-1].trailer
    assert trailer.total_bytes == 52 and trailer.chunk_count == 4


def test_bf16_bytes_are_little_endian_bfloat16():
    tensors = {"x": torch.tensor([1.0, -2.0], dtype=torch.bfloat16)}
    data = b"".join(m.chunk.data for m in _stream(tensors)[1:-1])
    assert data == bytes([0x80, 0x3F, 0x00, 0xC0])  # 0x3f80 = 1.0, 0xc000 = -2.0


def test_non_contiguous_and_grad_tensors_are_sent_as_their_values():
    base = torch.randn(4, 6, requires_grad=True)
    tensors = {"t": base.t(), "s": base[:, ::2]}
    _, out = _roundtrip(tensors)
    assert torch.equal(out["t"], base.detach().t()) and out["t"].is_contiguous()
    assert torch.equal(out["s"], base.detach()[:, ::2])
    assert not out["t"].requires_grad


def test_uint32_masked_values_are_not_checked_for_finiteness():
    # 0x7fc00000 and 0x7f800000 are NaN/inf as float32 bits, but plain numbers as uint32.
    bits = torch.tensor([0x7FC00000, 0x7F800000, 2**32 - 1], dtype=torch.int64).to(torch.uint32)
    _, out = _roundtrip({"masked": bits}, kinds={streams.StreamKind.UPDATE})
    assert _same(bits, out["masked"])


def test_multi_chunk_large_tensor_default_chunk_size():
    tensors = {"w": torch.randn(3 * DEFAULT_CHUNK_SIZE // 4 + 5)}
    messages = _stream(tensors, chunk_size=DEFAULT_CHUNK_SIZE)
    assert sum(m.WhichOneof("body") == "chunk" for m in messages) == 4
    _, out = streams.stream_to_tensors(messages)
    assert _same(tensors["w"], out["w"])


def test_chunks_are_cut_lazily_from_the_tensor_bytes():
    """Chunks are read from the tensor when produced, not copied up front: a tensor modified
    after the header (which the caller must not do) is caught by the per-tensor digest."""
    tensor = torch.zeros(64)
    stream = streams.tensors_to_stream({"w": tensor}, run_id="r", round=1, kind="UPDATE")
    header = next(stream)
    tensor += 1
    with pytest.raises(InvalidArgument, match="'w': SHA-256"):
        streams.stream_to_tensors([header, *stream])


# -- helpers ---------------------------------------------------------------------------------


def test_header_records_the_manifest_digest():
    tensors = {"a": torch.randn(3), "b": torch.randn(2, 2)}
    messages = _stream(tensors)
    info, _ = streams.stream_to_tensors(messages)
    specs = [tensor_spec(n, t) for n, t in tensors.items()]
    assert info.manifest_digest == manifest_digest(specs) == messages[-1].trailer.manifest_digest


# -- refusals --------------------------------------------------------------------------------

TENSORS = {
    "layer.0.lora_A": torch.randn(4, 5),  # 80 B: chunks of 16 -> 5 chunks
    "layer.0.lora_B": torch.randn(3, 3),  # 36 B -> 16, 16, 4
}
A, B = "layer.0.lora_A", "layer.0.lora_B"


def _msgs(**kw) -> list[pb.StreamMessage]:
    return _stream(TENSORS, chunk_size=16, **kw)


def _chunks(messages):
    return [m for m in messages if m.WhichOneof("body") == "chunk"]


def _header(messages) -> pb.StreamHeader:
    return messages[0].header


def _swap(ms, i, j):
    ms[i], ms[j] = ms[j], ms[i]
    return ms


def _set(obj, **fields):
    for k, v in fields.items():
        setattr(obj, k, v)


def _extend_last_chunk_of_b(ms):
    last = _chunks(ms)[-1]  # 4 bytes of B at offset 32; 8 more go past nbytes 36
    last.chunk.data += b"\0" * 8
    return ms


def _flip_data_bit(ms):
    c = _chunks(ms)[1]
    c.chunk.data = bytes([c.chunk.data[0] ^ 0x01]) + c.chunk.data[1:]
    return ms


def _bad_shape(ms):
    del _header(ms).tensors[0].shape[:]
    _header(ms).tensors[0].shape.extend([-4, -5])
    return ms


def _reorder_tensors(ms):
    # B's first chunk before A is complete.
    chunks = _chunks(ms)
    i, j = ms.index(chunks[4]), ms.index(chunks[5])
    return _swap(ms, i, j)


def _replay_chunk_of_a(ms):
    a_last = _chunks(ms)[4]
    copy = pb.StreamMessage()
    copy.CopyFrom(a_last)
    ms.insert(ms.index(_chunks(ms)[6]), copy)
    return ms


MUTATIONS = {
    # stream structure
    "empty stream": (lambda ms: [], "empty stream: no header"),
    "missing header": (lambda ms: ms[1:], "must start with a header, got a chunk"),
    "header not first": (lambda ms: _swap(ms, 0, 1), "must start with a header"),
    "empty message first": (lambda ms: [pb.StreamMessage(), *ms], "got an empty message"),
    "empty message": (lambda ms: ms[:2] + [pb.StreamMessage()] + ms[2:], "without a body"),
    "second header": (lambda ms: ms[:1] + ms, "second header"),
    "message after trailer": (lambda ms: ms + ms[1:2], "after the stream trailer"),
    # truncation
    "no trailer": (lambda ms: ms[:-1], "truncated stream: no trailer"),
    "cut mid tensor": (lambda ms: ms[:3], f"truncated stream: tensor '{A}' has 32 of 80 bytes"),
    "trailer early": (lambda ms: ms[:-2] + ms[-1:], f"before tensor '{B}' was complete"),
    # chunk order and bounds
    "offset gap": (lambda ms: ms[:2] + ms[3:], f"'{A}': chunk at offset 32, expected offset 16"),
    "chunks swapped": (lambda ms: _swap(ms, 1, 2), f"'{A}': chunk at offset 16, expected offset 0"),
    "next tensor early": (_reorder_tensors, f"before tensor '{A}' was complete"),
    "chunk replayed": (_replay_chunk_of_a, f"'{A}': chunk arrived after the tensor was complete"),
    "overflow": (_extend_last_chunk_of_b, f"'{B}': chunk ends at byte 44, past its nbytes 36"),
    "unknown index": (
        lambda ms: [_set(_chunks(ms)[0].chunk, tensor_index=9), ms][1],
        "tensor index 9, but the manifest has 2",
    ),
    "empty chunk": (lambda ms: [_set(_chunks(ms)[0].chunk, data=b""), ms][1], "empty chunk"),
    "chunk above chunk_size": (
        lambda ms: [_set(_header(ms), chunk_size=8), ms][1],
        "chunk of 16 bytes exceeds the stream's chunk_size 8",
    ),
    "chunk_size above 4 MiB": (
        lambda ms: [_set(_header(ms), chunk_size=MAX_CHUNK_SIZE + 1), ms][1],
        f"chunk_size {MAX_CHUNK_SIZE + 1}: must be 1..{MAX_CHUNK_SIZE}",
    ),
    "chunk_size zero": (lambda ms: [_set(_header(ms), chunk_size=0), ms][1], "chunk_size 0"),
    # digests
    "flipped data bit": (_flip_data_bit, f"'{A}': SHA-256 of the received bytes"),
    "header digest altered": (
        lambda ms: [_set(_header(ms).tensors[1], sha256=b"\1" * 32), ms][1],
        f"'{B}': SHA-256",
    ),
    "short digest": (
        lambda ms: [_set(_header(ms).tensors[1], sha256=b"\1" * 8), ms][1],
        f"'{B}': sha256 must be 32 bytes",
    ),
    "trailer digest altered": (
        lambda ms: [_set(ms[-1].trailer, manifest_digest=b"\0" * 32), ms][1],
        "manifest digest does not match",
    ),
    "trailer chunk count": (
        lambda ms: [_set(ms[-1].trailer, chunk_count=99), ms][1],
        "trailer counts 116 bytes in 99 chunks, received 116 bytes in 8 chunks",
    ),
    # manifest entries
    "duplicate name": (
        lambda ms: [_set(_header(ms).tensors[1], name=A), ms][1],
        f"'{A}' appears twice",
    ),
    "empty name": (lambda ms: [_set(_header(ms).tensors[1], name=""), ms][1], "must be 1-1024"),
    "nbytes inconsistent": (
        lambda ms: [_set(_header(ms).tensors[0], nbytes=84), ms][1],
        f"'{A}': nbytes 84 is inconsistent with shape [4, 5] and dtype torch.float32 (80 bytes)",
    ),
    "negative dims": (_bad_shape, f"'{A}': invalid shape [-4, -5]"),
    "unknown dtype": (
        lambda ms: [_set(_header(ms).tensors[0], dtype=99), ms][1],
        f"'{A}': unknown or unspecified DType value 99",
    ),
    "unspecified kind": (
        lambda ms: [_set(_header(ms), kind=pb.STREAM_KIND_UNSPECIFIED), ms][1],
        "unspecified stream kind",
    ),
    "non-finite scalar": (
        lambda ms: [_header(ms).scalars.__setitem__("num_samples", float("inf")), ms][1],
        "scalar 'num_samples' is inf",
    ),
}


@pytest.mark.parametrize("case", list(MUTATIONS), ids=list(MUTATIONS))
def test_mutated_stream_is_refused(case):
    mutate, needle = MUTATIONS[case]
    messages = mutate(_msgs())
    with pytest.raises(InvalidArgument) as err:
        streams.stream_to_tensors(messages)
    assert needle in str(err.value)


def test_unmutated_reference_stream_is_accepted():
    """The refusals above come from the mutation, not from the reference stream."""
    _, out = streams.stream_to_tensors(_msgs(), expected_manifest(TENSORS))
    assert all(_same(TENSORS[k], out[k]) for k in TENSORS)


@pytest.mark.parametrize(
    "expected, needle",
    [
        ({A: ((4, 5), torch.float32)}, f"tensor '{B}' is not in the expected manifest"),
        (
            {**expected_manifest(TENSORS), "layer.1.lora_A": ((4, 5), torch.float32)},
            "stream lacks expected tensors ['layer.1.lora_A']",
        ),
        (
            {A: ((5, 4), torch.float32), B: ((3, 3), torch.float32)},
            f"'{A}': got shape [4, 5] torch.float32, expected [5, 4] torch.float32",
        ),
        (
            {A: ((4, 5), torch.bfloat16), B: ((3, 3), torch.float32)},
            f"'{A}': got shape [4, 5] torch.float32, expected [4, 5] torch.bfloat16",
        ),
    ],
    ids=["unexpected name", "missing expected", "wrong shape", "wrong dtype"],
)
def test_stream_not_matching_expected_manifest_is_refused(expected, needle):
    with pytest.raises(InvalidArgument) as err:
        streams.stream_to_tensors(_msgs(), expected)
    assert needle in str(err.value)


def test_partial_stream_allowed_when_not_all_expected_required():
    expected = {**expected_manifest(TENSORS), "extra": ((1,), torch.float32)}
    _, out = streams.stream_to_tensors(_msgs(), expected, require_all=False)
    assert set(out) == set(TENSORS)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("size, where", [(40, 17), (200_003, 150_000)], ids=["small", "late-block"])
def test_non_finite_floats_refused_unless_allowed(bad, dtype, size, where):
    t = torch.randn(size).to(dtype)
    t[where] = bad
    messages = _stream({"w": t}, chunk_size=DEFAULT_CHUNK_SIZE)
    with pytest.raises(InvalidArgument, match="'w' contains NaN or infinite values"):
        streams.stream_to_tensors(messages)
    _, out = streams.stream_to_tensors(messages, allow_nonfinite=True)
    assert _same(t, out["w"])


def test_largest_finite_values_and_negative_zero_accepted():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        info = torch.finfo(dtype)
        t = torch.tensor(
            [info.max, info.min, info.tiny, -0.0, info.smallest_normal / 4], dtype=dtype
        )
        _, out = _roundtrip({"w": t})
        assert _same(t, out["w"]), dtype


def test_bool_bytes_other_than_0_or_1_refused():
    messages = _stream({"mask": torch.tensor([True, False, True])})
    _chunks(messages)[0].chunk.data = b"\x01\x02\x01"
    _header(messages).tensors[0].sha256 = hashlib.sha256(b"\x01\x02\x01").digest()
    messages[-1].trailer.manifest_digest = manifest_digest(
        [spec_from_proto(_header(messages).tensors[0])]
    )
    with pytest.raises(InvalidArgument, match="bool bytes must be 0 or 1"):
        streams.stream_to_tensors(messages)


def test_limits_on_total_bytes_tensor_count_and_kind():
    with pytest.raises(
        InvalidArgument, match="declares 116 bytes of tensors, more than the limit 100"
    ):
        streams.stream_to_tensors(_msgs(), max_total_bytes=100)
    with pytest.raises(InvalidArgument, match="lists 2 tensors, more than 1"):
        streams.stream_to_tensors(_msgs(), max_tensors=1)
    with pytest.raises(InvalidArgument, match="stream kind UPDATE not accepted here"):
        streams.stream_to_tensors(_msgs(), kinds={streams.StreamKind.GLOBAL_MODEL})


def test_limit_is_checked_before_any_data_is_read():
    consumed = []

    def messages():
        for m in _msgs():
            consumed.append(m.WhichOneof("body"))
            yield m

    with pytest.raises(InvalidArgument, match="more than the limit"):
        streams.stream_to_tensors(messages(), max_total_bytes=10)
    assert consumed == ["header"]


def test_on_header_can_stop_the_stream_early():
    consumed = []

    def messages():
        for m in _msgs():
            consumed.append(m.WhichOneof("body"))
            yield m

    def check(info: streams.StreamInfo) -> None:
        if info.round != 8:
            raise FailedPrecondition(f"round {info.round} is not the current round 8")

    with pytest.raises(FailedPrecondition, match="round 7"):
        streams.stream_to_tensors(messages(), on_header=check)
    assert consumed == ["header"]


def test_assembler_exposes_header_before_data():
    assembler = streams.StreamAssembler()
    messages = _msgs(silo_id="silo-b")
    assembler.add(messages[0])
    assert assembler.info is not None and assembler.info.silo_id == "silo-b"
    assert not assembler.done
    for m in messages[1:]:
        assembler.add(m)
    assert assembler.done
    info, out = assembler.result()
    assert list(out) == [A, B]


# -- sender-side refusals --------------------------------------------------------------------


@pytest.mark.parametrize(
    "tensors, kw, needle",
    [
        ({"c": torch.zeros(2, dtype=torch.complex64)}, {}, "'c': dtype torch.complex64"),
        ({"m": torch.empty(3, device="meta")}, {}, "'m': only dense tensors"),
        ({"s": torch.eye(2).to_sparse()}, {}, "'s': only dense tensors"),
        ({"n": [1.0, 2.0]}, {}, "'n': expected a torch.Tensor, got list"),
        ({"": torch.zeros(1)}, {}, "tensor name ''"),
        ({"a": torch.zeros(1)}, {"chunk_size": 0}, "chunk_size=0"),
        ({"a": torch.zeros(1)}, {"chunk_size": MAX_CHUNK_SIZE + 1}, "chunk_size="),
        ({"a": torch.zeros(1)}, {"round": -1}, "round=-1"),
        ({"a": torch.zeros(1)}, {"scalars": {"w": float("nan")}}, "scalar 'w' is nan"),
    ],
    ids=[
        "complex",
        "meta",
        "sparse",
        "not-a-tensor",
        "empty-name",
        "chunk0",
        "chunk-big",
        "round",
        "scalar",
    ],
)
def test_sender_refuses_bad_input_before_streaming(tensors, kw, needle):
    args = {"run_id": "r", "round": 1, "kind": "UPDATE", **kw}
    with pytest.raises(InvalidArgument) as err:
        streams.tensors_to_stream(tensors, **args)  # raises at the call, not at iteration
    assert needle in str(err.value)
