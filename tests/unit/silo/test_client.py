"""The silo's client on its own: what it retries (UNAVAILABLE only, until stopped) and how it
picks up a rotated certificate (whole rotations only), with real channels and real files."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from pf2lora.common.transport import pki, pki_files
from pf2lora.silo.client import Backoff, CoordinatorClient, Stopped
from pf2lora.v1 import silo_pb2, silo_pb2_grpc
from tests.helpers.federation import free_port
from tests.helpers.inprocess import silo_config


def _unreachable_join(port: int) -> Callable[[], object]:
    """A real Join call to a port nobody listens on: UNAVAILABLE."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = silo_pb2_grpc.SiloApiStub(channel)
    return lambda: stub.Join(silo_pb2.JoinRequest(silo_id="silo-a"), timeout=2)


def test_unavailable_is_retried_with_backoff_until_stopped() -> None:
    stop = threading.Event()
    retries: list[int] = []

    def before_retry() -> None:
        retries.append(1)
        if len(retries) == 3:
            stop.set()

    backoff = Backoff(0.01, 0.05, stop, before_retry)
    with pytest.raises(Stopped, match="Join"):
        backoff.call("Join", _unreachable_join(free_port()))
    assert len(retries) == 3  # each retry first looked for rotated certificates


def test_other_statuses_are_not_retried() -> None:
    class Refused(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.PERMISSION_DENIED

    calls: list[int] = []

    def refused() -> None:
        calls.append(1)
        raise Refused()

    with pytest.raises(Refused):
        Backoff(0.01, 0.05, threading.Event()).call("Join", refused)
    assert calls == [1]
    assert Backoff(0.01, 0.05, threading.Event()).call("Join", lambda: 42) == 42


def test_a_whole_rotation_is_picked_up_and_a_half_written_one_ignored(
    tmp_path: Path, pki_factory: Callable[..., Path]
) -> None:
    d = pki_factory("rotfed", ["silo-a", "silo-b"], [])
    role = pki_files.silo_dir(d, "silo-a")
    cfg = silo_config(tmp_path / "silo", "silo-a", "rotfed", free_port(), tls_dir=role)
    client = CoordinatorClient(cfg, threading.Event())
    try:
        assert not client.reload_tls_if_changed()  # nothing changed
        ca = pki_files.load_ca(d)
        pki_files.write_role(role, pki.issue_silo_cert(ca, "silo-a"), ca.cert, force=True)
        before = client.channel
        assert client.reload_tls_if_changed()  # a new key and certificate: a new channel
        assert client.channel is not before
        # half a rotation: a new certificate next to the old key does not fit, so it waits
        other = pki.issue_silo_cert(ca, "silo-a")
        (role / pki_files.TLS_CERT).write_bytes(other.cert_pem())
        current = client.channel
        assert not client.reload_tls_if_changed()
        assert client.channel is current
    finally:
        client.close()
