"""An audit record of everything a silo sends: a client interceptor appending each serialised
request.

Enabled by `[silo] audit_log = PATH`. It sees exactly the request messages the channel sends
(unary requests and every message of a request stream) and appends them, as serialised, to
PATH: per message a u16 method-name length, the method name, a u32 length and the bytes (all
big-endian). `read_audit_log` reads them back, e.g. to show that only shared-adapter tensors
ever left the silo.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

logger = logging.getLogger(__name__)


class AuditLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        _cut_torn_tail(self.path)
        self._fh = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        logger.info("auditing every message sent to the coordinator in %s", self.path)

    def record(self, method: str, message: Any) -> None:
        data = message.SerializeToString()
        name = method.encode()
        with self._lock:
            self._fh.write(
                struct.pack(">H", len(name)) + name + struct.pack(">I", len(data)) + data
            )
            self._fh.flush()

    def close(self) -> None:
        with self._lock:
            self._fh.close()


def _records(raw: bytes) -> Iterator[tuple[int, str, bytes]]:
    """(end offset, method, request) of each complete record; stops at a torn tail."""
    pos = 0
    while pos + 2 <= len(raw):
        (n,) = struct.unpack_from(">H", raw, pos)
        if pos + 2 + n + 4 > len(raw):
            return
        method = raw[pos + 2 : pos + 2 + n].decode(errors="replace")
        (size,) = struct.unpack_from(">I", raw, pos + 2 + n)
        end = pos + 2 + n + 4 + size
        if end > len(raw):
            return
        yield end, method, raw[pos + 2 + n + 4 : end]
        pos = end


def _cut_torn_tail(path: Path) -> None:
    """Drop an incomplete last record (the process was killed mid-write) before appending:
    the next record would otherwise be read as part of it."""
    if not path.exists():
        return
    raw = path.read_bytes()
    good = max((end for end, _, _ in _records(raw)), default=0)
    if good < len(raw):
        logger.warning(
            "%s: dropping an incomplete last record (%d bytes) before appending",
            path,
            len(raw) - good,
        )
        with path.open("r+b") as fh:
            fh.truncate(good)


def read_audit_log(path: str | Path) -> Iterator[tuple[str, bytes]]:
    """(method, serialised request) for every complete recorded message, in order."""
    for _, method, data in _records(Path(path).read_bytes()):
        yield method, data


class AuditInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, log: AuditLog) -> None:
        self.log = log

    def _stream(self, method: str, requests: Iterator[Any]) -> Iterator[Any]:
        for message in requests:
            self.log.record(method, message)
            yield message

    def intercept_unary_unary(self, continuation: Callable, details: Any, request: Any) -> Any:
        self.log.record(details.method, request)
        return continuation(details, request)

    def intercept_unary_stream(self, continuation: Callable, details: Any, request: Any) -> Any:
        self.log.record(details.method, request)
        return continuation(details, request)

    def intercept_stream_unary(self, continuation: Callable, details: Any, requests: Any) -> Any:
        return continuation(details, self._stream(details.method, requests))

    def intercept_stream_stream(self, continuation: Callable, details: Any, requests: Any) -> Any:
        return continuation(details, self._stream(details.method, requests))
