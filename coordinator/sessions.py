"""One live session per silo identity: the silo process whose requests count, and whether it is
alive (a call in flight, a long poll included).

Each silo process sends a random session id with every request (gRPC metadata
`pf2lora-session`, common/wire/task_proto.py). Join binds the silo to its session; a Join from
another session while the bound one has a call in flight is refused (ALREADY_EXISTS, naming the
live one: a second process with the same certificate would otherwise overwrite the silo's
sample count and weight); once the bound process is gone, a new Join takes over at once (a
restart). Requests of a session that is no longer bound are refused with "call Join again".
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from pf2lora.common.errors import AlreadyExists, FailedPrecondition, bounded


@dataclass
class Session:
    session_id: str
    peer: str  # the connection it joined from (for messages only)
    inflight: int = 0


class Sessions:
    """Thread-safe bindings silo id -> its live session."""

    def __init__(self, grace_s: float = 2.0) -> None:
        self._lock = threading.Lock()
        self._ended = threading.Condition(self._lock)
        self._by_silo: dict[str, Session] = {}
        # A restarted process joins while the server still finishes the dead one's long poll
        # (it notices the closed connection within a fraction of a second): wait that long.
        self.grace_s = grace_s

    def join(self, silo_id: str, session_id: str, peer: str) -> bool:
        """Bind silo_id to this session, unless another session of it is alive; True when this
        replaced an earlier session (the silo restarted)."""
        with self._lock:
            s = self._by_silo.get(silo_id)
            if s is not None and s.session_id != session_id:
                self._ended.wait_for(lambda: s.inflight == 0, timeout=self.grace_s)
            if s is not None and s.session_id != session_id and s.inflight > 0:
                raise AlreadyExists(
                    f"silo {silo_id!r} already has a live session (from {bounded(s.peer, 100)}, "
                    "a call in flight): a second process with the same certificate is refused; "
                    "stop one of them"
                )
            if s is None or s.session_id != session_id:
                self._by_silo[silo_id] = Session(session_id, peer)
            return s is not None and s.session_id != session_id

    @contextlib.contextmanager
    def call(self, silo_id: str, session_id: str) -> Iterator[None]:
        """A request of silo_id's bound session (counted in flight while it runs)."""
        with self._lock:
            s = self._by_silo.get(silo_id)
            if s is None:
                raise FailedPrecondition(f"silo {silo_id!r} has not joined: call Join first")
            if s.session_id != session_id:
                raise FailedPrecondition(
                    f"silo {silo_id!r}: this process's session was replaced by a newer Join; "
                    "call Join again"
                )
            s.inflight += 1
        try:
            yield
        finally:
            with self._lock:
                s.inflight -= 1
                self._ended.notify_all()
