"""The one module converting named torch tensors to and from pf2lora.v1 tensor streams.

Sending: `tensors_to_stream(tensors, run_id=..., round=..., kind=...)` yields a header with the
manifest (per-tensor SHA-256), then chunks cut lazily from each tensor's bytes, then a trailer.
Receiving: `stream_to_tensors(messages, expected)` (or `StreamAssembler` fed one message at a
time) checks every message against the header and the expected manifest and raises
`InvalidArgument` naming the tensor on the first problem; a servicer maps that to
INVALID_ARGUMENT. Serde serialises exactly what it is given: callers pass only the shared
adapter's tensors (the privacy invariant is kept by the model layer, recorded by the manifest).
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from pf2lora.common.errors import InvalidArgument
from pf2lora.common.transport.grpc_factory import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE
from pf2lora.common.wire.manifest import (
    DTYPE_TO_PROTO,
    MAX_NAME_LENGTH,
    SWAP_BYTES,
    Spec,
    TensorInfo,
    manifest_digest,
    spec_from_proto,
    spec_of,
    spec_to_proto,
    wire_bytes,
)
from pf2lora.v1 import tensors_pb2 as pb

# Limits on what a receiver accepts; servicers may pass tighter ones.
DEFAULT_MAX_TOTAL_BYTES = 1 << 30  # 1 GiB: a rank-16 adapter of a 7B model is 16-160 MB

DEFAULT_MAX_TENSORS = 65_536

# Float dtype -> (same-width unsigned type, mask clearing the sign bit, bits of +inf).
_FLOAT_BITS: dict[torch.dtype, tuple[type, int, int]] = {
    torch.float16: (np.uint16, 0x7FFF, 0x7C00),
    torch.bfloat16: (np.uint16, 0x7FFF, 0x7F80),
    torch.float32: (np.uint32, 0x7FFF_FFFF, 0x7F80_0000),
    torch.float64: (np.uint64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
}

assert set(_FLOAT_BITS) == {d for d in DTYPE_TO_PROTO if d.is_floating_point}
_FINITE_BLOCK = 1 << 16  # elements per block of the finiteness check (<= 512 KiB, cache-hot)


class StreamKind(enum.StrEnum):
    """What a stream carries (pf2lora.v1.StreamKind)."""

    GLOBAL_MODEL = "GLOBAL_MODEL"
    UPDATE = "UPDATE"
    MASKED_UPDATE = "MASKED_UPDATE"


def kind_to_proto(kind: StreamKind | str) -> pb.StreamKind:
    """StreamKind -> pf2lora.v1.StreamKind value."""
    try:
        return _KIND_TO_PROTO[StreamKind(kind)]
    except ValueError:
        raise InvalidArgument(f"unknown stream kind {kind!r}") from None


def kind_from_proto(value: int) -> StreamKind:
    """pf2lora.v1.StreamKind value -> StreamKind."""
    try:
        return _KIND_FROM_PROTO[value]
    except KeyError:
        raise InvalidArgument(f"unknown or unspecified stream kind value {value}") from None


_KIND_TO_PROTO: dict[StreamKind, pb.StreamKind] = {
    StreamKind.GLOBAL_MODEL: pb.STREAM_KIND_GLOBAL_MODEL,
    StreamKind.UPDATE: pb.STREAM_KIND_UPDATE,
    StreamKind.MASKED_UPDATE: pb.STREAM_KIND_MASKED_UPDATE,
}

_KIND_FROM_PROTO: dict[int, StreamKind] = {v: k for k, v in _KIND_TO_PROTO.items()}


@dataclass(frozen=True)
class StreamInfo:
    """A stream header (pf2lora.v1.StreamHeader) as plain Python values."""

    run_id: str
    round: int
    silo_id: str
    kind: StreamKind
    tensors: tuple[TensorInfo, ...]
    scalars: Mapping[str, float] = field(default_factory=dict)
    chunk_size: int = DEFAULT_CHUNK_SIZE

    @property
    def total_bytes(self) -> int:
        return sum(spec.nbytes for spec in self.tensors)

    @property
    def manifest_digest(self) -> bytes:
        return manifest_digest(self.tensors)


def header_to_proto(info: StreamInfo) -> pb.StreamHeader:
    return pb.StreamHeader(
        run_id=info.run_id,
        round=info.round,
        silo_id=info.silo_id,
        kind=kind_to_proto(info.kind),
        tensors=[spec_to_proto(spec) for spec in info.tensors],
        scalars=dict(info.scalars),
        chunk_size=info.chunk_size,
    )


def header_from_proto(
    msg: pb.StreamHeader, *, max_tensors: int = DEFAULT_MAX_TENSORS
) -> StreamInfo:
    """Validated StreamInfo: known kind, chunk size within limits, unique names, finite scalars."""
    if not 1 <= msg.chunk_size <= MAX_CHUNK_SIZE:
        raise InvalidArgument(f"header chunk_size {msg.chunk_size}: must be 1..{MAX_CHUNK_SIZE}")
    if len(msg.tensors) > max_tensors:
        raise InvalidArgument(f"header lists {len(msg.tensors)} tensors, more than {max_tensors}")
    specs = tuple(spec_from_proto(s) for s in msg.tensors)
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise InvalidArgument(f"tensor {spec.name!r} appears twice in the manifest")
        seen.add(spec.name)
    scalars = dict(msg.scalars)
    _check_scalars(scalars)
    return StreamInfo(
        run_id=msg.run_id,
        round=msg.round,
        silo_id=msg.silo_id,
        kind=kind_from_proto(msg.kind),
        tensors=specs,
        scalars=scalars,
        chunk_size=msg.chunk_size,
    )


def tensors_to_stream(
    tensors: Mapping[str, torch.Tensor],
    *,
    run_id: str,
    round: int,
    kind: StreamKind | str,
    silo_id: str = "",
    scalars: Mapping[str, float] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[pb.StreamMessage]:
    """Header, chunks (manifest order, at most chunk_size bytes each), trailer.

    Arguments are checked and every tensor hashed now (errors surface here, not inside a gRPC
    thread); chunks are cut lazily, one at a time, from the tensors' own bytes (contiguous
    CPU tensors are not copied). The tensors must not be modified until the stream is consumed.
    """
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise InvalidArgument(f"chunk_size={chunk_size}: must be 1..{MAX_CHUNK_SIZE}")
    if not 0 <= round < 2**32:
        raise InvalidArgument(f"round={round}: must fit in uint32")
    scalars = {str(k): float(v) for k, v in (scalars or {}).items()}
    _check_scalars(scalars)
    views: list[memoryview] = []
    specs: list[TensorInfo] = []
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
            raise InvalidArgument(
                f"tensor name {name!r}: must be a 1-{MAX_NAME_LENGTH} character str"
            )
        view = wire_bytes(name, tensor)
        views.append(view)
        specs.append(spec_of(name, view, tensor))
    info = StreamInfo(run_id, round, silo_id, StreamKind(kind), tuple(specs), scalars, chunk_size)
    header = pb.StreamMessage(header=header_to_proto(info))
    return _stream(header, views, info)


def _stream(
    header: pb.StreamMessage, views: list[memoryview], info: StreamInfo
) -> Iterator[pb.StreamMessage]:
    yield header
    chunk_size = info.chunk_size
    count = 0
    for index, view in enumerate(views):
        for offset in range(0, len(view), chunk_size):
            data = bytes(view[offset : offset + chunk_size])
            yield pb.StreamMessage(
                chunk=pb.TensorChunk(tensor_index=index, offset=offset, data=data)
            )
            count += 1
    yield pb.StreamMessage(
        trailer=pb.StreamTrailer(
            manifest_digest=info.manifest_digest, total_bytes=info.total_bytes, chunk_count=count
        )
    )


class StreamAssembler:
    """Validates and assembles one stream, fed message by message with add().

    After the header arrives (`info` is set) a servicer can check run, round and identity
    before any tensor data is buffered. Memory for a tensor is allocated when its first chunk
    arrives, bounded by max_total_bytes.
    """

    def __init__(
        self,
        expected: Spec | None = None,
        *,
        require_all: bool = True,
        kinds: Collection[StreamKind] | None = None,
        allow_nonfinite: bool = False,
        max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
        max_tensors: int = DEFAULT_MAX_TENSORS,
    ) -> None:
        """expected: name -> (shape, dtype); every streamed tensor must be in it and match, and
        with require_all every entry must be streamed. kinds: the accepted stream kinds.
        allow_nonfinite: accept NaN/inf in float tensors (integer tensors, e.g. masked uint32
        vectors, never have any)."""
        self._expected = (
            None
            if expected is None
            else {
                name: (tuple(int(d) for d in shape), dtype)
                for name, (shape, dtype) in expected.items()
            }
        )
        self._require_all = require_all
        self._kinds = None if kinds is None else {StreamKind(k) for k in kinds}
        self._allow_nonfinite = allow_nonfinite
        self._max_total_bytes = max_total_bytes
        self._max_tensors = max_tensors
        self.info: StreamInfo | None = None
        self._tensors: dict[str, torch.Tensor] = {}
        self._index = 0  # tensor currently being filled
        self._filled = 0  # bytes of it received so far
        self._buffer: torch.Tensor | None = None
        self._view: memoryview | None = None
        self._hash = hashlib.sha256()
        self._chunks = 0
        self._done = False

    @property
    def done(self) -> bool:
        """True once a valid trailer arrived."""
        return self._done

    def add(self, message: pb.StreamMessage) -> None:
        """Check and take one message; InvalidArgument on the first problem."""
        if self._done:
            raise InvalidArgument("message after the stream trailer")
        body = message.WhichOneof("body")
        if body == "header":
            self._on_header(message.header)
        elif self.info is None:
            raise InvalidArgument(
                f"stream must start with a header, got {f'a {body}' if body else 'an empty'} "
                "message"
            )
        elif body == "chunk":
            self._on_chunk(message.chunk)
        elif body == "trailer":
            self._on_trailer(message.trailer)
        else:
            raise InvalidArgument("stream message without a body")

    def result(self) -> tuple[StreamInfo, dict[str, torch.Tensor]]:
        """(header, tensors in manifest order) of a complete stream; InvalidArgument if cut."""
        if self.info is None:
            raise InvalidArgument("empty stream: no header")
        if not self._done:
            self._skip_empty()
            if self._index < len(self.info.tensors):
                spec = self.info.tensors[self._index]
                raise InvalidArgument(
                    f"truncated stream: tensor {spec.name!r} has {self._filled} of {spec.nbytes} "
                    f"bytes ({len(self.info.tensors) - self._index} of {len(self.info.tensors)} "
                    "tensors incomplete)"
                )
            raise InvalidArgument("truncated stream: no trailer after the last tensor")
        return self.info, self._tensors

    # -- steps ---------------------------------------------------------------------------

    def _on_header(self, header: pb.StreamHeader) -> None:
        if self.info is not None:
            raise InvalidArgument("second header in one stream")
        info = header_from_proto(header, max_tensors=self._max_tensors)
        if self._kinds is not None and info.kind not in self._kinds:
            allowed = ", ".join(sorted(self._kinds))
            raise InvalidArgument(f"stream kind {info.kind} not accepted here (expected {allowed})")
        if info.total_bytes > self._max_total_bytes:
            raise InvalidArgument(
                f"stream declares {info.total_bytes} bytes of tensors, more than the limit "
                f"{self._max_total_bytes}"
            )
        if self._expected is not None:
            for spec in info.tensors:
                if spec.name not in self._expected:
                    raise InvalidArgument(f"tensor {spec.name!r} is not in the expected manifest")
                shape, dtype = self._expected[spec.name]
                if spec.shape != shape or spec.dtype != dtype:
                    raise InvalidArgument(
                        f"tensor {spec.name!r}: got shape {list(spec.shape)} {spec.dtype}, "
                        f"expected {list(shape)} {dtype}"
                    )
            if self._require_all:
                names = {spec.name for spec in info.tensors}
                missing = [name for name in self._expected if name not in names]
                if missing:
                    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                    raise InvalidArgument(f"stream lacks expected tensors {missing[:3]}{more}")
        self.info = info

    def _on_chunk(self, chunk: pb.TensorChunk) -> None:
        assert self.info is not None
        specs = self.info.tensors
        if chunk.tensor_index >= len(specs):
            raise InvalidArgument(
                f"chunk for tensor index {chunk.tensor_index}, but the manifest has {len(specs)} "
                "tensors"
            )
        target = specs[chunk.tensor_index]
        data = chunk.data
        if not data:
            raise InvalidArgument(f"tensor {target.name!r}: empty chunk at offset {chunk.offset}")
        if len(data) > self.info.chunk_size:
            raise InvalidArgument(
                f"tensor {target.name!r}: chunk of {len(data)} bytes exceeds the stream's "
                f"chunk_size {self.info.chunk_size}"
            )
        self._skip_empty()
        if chunk.tensor_index != self._index:
            if chunk.tensor_index < self._index:
                raise InvalidArgument(
                    f"tensor {target.name!r}: chunk arrived after the tensor was complete (out of "
                    "order)"
                )
            current = specs[self._index]
            raise InvalidArgument(
                f"tensor {target.name!r}: chunk arrived before tensor {current.name!r} was "
                f"complete ({self._filled} of {current.nbytes} bytes; out of order)"
            )
        if chunk.offset != self._filled:
            raise InvalidArgument(
                f"tensor {target.name!r}: chunk at offset {chunk.offset}, expected offset "
                f"{self._filled} (gap or out of order)"
            )
        end = self._filled + len(data)
        if end > target.nbytes:
            raise InvalidArgument(
                f"tensor {target.name!r}: chunk ends at byte {end}, past its nbytes {target.nbytes}"
            )
        if self._view is None:
            self._buffer = torch.empty(target.nbytes, dtype=torch.uint8)
            self._view = self._buffer.numpy().data
        self._view[self._filled : end] = data
        self._hash.update(data)
        self._filled = end
        self._chunks += 1
        if end == target.nbytes:
            self._finish_tensor()

    def _on_trailer(self, trailer: pb.StreamTrailer) -> None:
        assert self.info is not None
        self._skip_empty()
        if self._index < len(self.info.tensors):
            spec = self.info.tensors[self._index]
            raise InvalidArgument(
                f"trailer arrived before tensor {spec.name!r} was complete "
                f"({self._filled} of {spec.nbytes} bytes)"
            )
        if trailer.manifest_digest != self.info.manifest_digest:
            raise InvalidArgument("trailer manifest digest does not match the header's manifest")
        if trailer.total_bytes != self.info.total_bytes or trailer.chunk_count != self._chunks:
            raise InvalidArgument(
                f"trailer counts {trailer.total_bytes} bytes in {trailer.chunk_count} chunks, "
                f"received {self.info.total_bytes} bytes in {self._chunks} chunks"
            )
        self._done = True

    def _skip_empty(self) -> None:
        """Complete the zero-byte tensors at the cursor (they get no chunks)."""
        assert self.info is not None
        specs = self.info.tensors
        while self._index < len(specs) and specs[self._index].nbytes == 0 and self._filled == 0:
            self._finish_tensor()

    def _finish_tensor(self) -> None:
        assert self.info is not None
        spec = self.info.tensors[self._index]
        if self._hash.digest() != spec.sha256:
            raise InvalidArgument(
                f"tensor {spec.name!r}: SHA-256 of the received bytes does not match the manifest"
            )
        if self._buffer is None:  # zero bytes
            tensor = torch.empty(spec.shape, dtype=spec.dtype)
        else:
            raw = self._buffer  # (nbytes,) uint8, native byte order below
            if SWAP_BYTES and spec.dtype.itemsize > 1:
                raw = raw.view(-1, spec.dtype.itemsize).flip(1).reshape(-1)
            if spec.dtype in _FLOAT_BITS and not self._allow_nonfinite:
                if not _all_finite(raw, spec.dtype):
                    raise InvalidArgument(f"tensor {spec.name!r} contains NaN or infinite values")
            if spec.dtype == torch.bool and int(raw.numpy().max()) > 1:
                raise InvalidArgument(f"tensor {spec.name!r}: bool bytes must be 0 or 1")
            tensor = raw.view(spec.dtype).reshape(spec.shape)
        self._tensors[spec.name] = tensor
        self._index += 1
        self._filled = 0
        self._buffer = None
        self._view = None
        self._hash = hashlib.sha256()


def stream_to_tensors(
    messages: Iterable[pb.StreamMessage],
    expected: Spec | None = None,
    *,
    on_header: Callable[[StreamInfo], None] | None = None,
    require_all: bool = True,
    kinds: Collection[StreamKind] | None = None,
    allow_nonfinite: bool = False,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_tensors: int = DEFAULT_MAX_TENSORS,
) -> tuple[StreamInfo, dict[str, torch.Tensor]]:
    """Assemble a whole stream (see StreamAssembler); on_header runs right after the header
    is validated and may raise (e.g. FailedPrecondition for a stale round) to stop early."""
    assembler = StreamAssembler(
        expected,
        require_all=require_all,
        kinds=kinds,
        allow_nonfinite=allow_nonfinite,
        max_total_bytes=max_total_bytes,
        max_tensors=max_tensors,
    )
    for message in messages:
        had_header = assembler.info is not None
        assembler.add(message)
        if on_header is not None and not had_header and assembler.info is not None:
            on_header(assembler.info)
    return assembler.result()


def _all_finite(raw: torch.Tensor, dtype: torch.dtype) -> bool:
    """No NaN or inf among the floats in raw (native-order bytes of one tensor of dtype).

    A float is non-finite exactly when its exponent bits are all ones, i.e. when its bits with
    the sign cleared are >= those of +inf. Integer numpy reductions over cache-sized blocks run
    at several GB/s on one core for every float width (bf16 included), without torch's
    intra-op thread pool, whose per-op hand-off costs milliseconds on a busy 2-core machine.
    """
    utype, mask, inf_bits = _FLOAT_BITS[dtype]
    bits: np.ndarray = raw.numpy().view(utype)
    block: np.ndarray = np.empty(min(len(bits), _FINITE_BLOCK), dtype=utype)
    for start in range(0, len(bits), _FINITE_BLOCK):
        part = bits[start : start + _FINITE_BLOCK]
        out = block[: len(part)]
        np.bitwise_and(part, mask, out=out)
        if out.max() >= inf_bits:
            return False
    return True


def _check_scalars(scalars: Mapping[str, float]) -> None:
    for key, value in scalars.items():
        if not key:
            raise InvalidArgument("scalar with an empty name")
        if not math.isfinite(value):
            raise InvalidArgument(f"scalar {key!r} is {value}: must be finite")
