"""The silo daemon's configuration: frozen dataclasses from silo.toml, flags override."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pf2lora.common.errors import ConfigError
from pf2lora.common.learning.config import from_mapping
from pf2lora.common.runspec import apply_overrides, load_toml
from pf2lora.common.transport.daemon_config import TLS_PATHS, TlsSection, is_address
from pf2lora.common.transport.identity import validate_label

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")  # or "cuda:N"


@dataclass(frozen=True)
class SiloSection:
    id: str = "silo"
    federation: str = "pf2lora"
    # Private adapter, trainer state and run records; never sent anywhere.
    state_dir: str = "/var/lib/pf2lora-silo"
    # "auto": the first CUDA GPU torch sees, else the CPU; "cpu"; "cuda" or "cuda:N".
    device: str = "auto"
    # torch intra-op threads; 0 keeps torch's default (all cores). Several silos on one
    # machine should split the cores: oversubscribed threads slow training by 10-100x.
    threads: int = 0
    # None: client_seed(run seed, client_index), exactly what `pf2lora simulate` uses.
    seed: int | None = None
    # Per-round state files kept per run (>= 2: a re-opened round restarts from the one before).
    keep_rounds: int = 2
    # Exit with status 0 once the run this silo worked on has ended (tests, the demo).
    exit_after_run: bool = False
    # Append every message this silo sends to the coordinator to this file (an audit record of
    # what left the silo; it holds nothing that did not cross the wire anyway).
    audit_log: str | None = None
    # Refuse TRAIN tasks of runs without secure aggregation: the coordinator would see this
    # silo's (weighted) update itself. false lets this silo take part in such runs.
    require_secure_aggregation: bool = True
    # Send per-round scalar metrics (losses, timings, accuracies) to the coordinator. They are
    # per silo and outside secure aggregation; false keeps them here (the silo's own /metrics
    # still has them): no training report, and the final evaluation is acknowledged with the
    # single value metrics_withheld = 1 so the run need not wait for its evaluation deadline.
    report_metrics: bool = True

    def __post_init__(self) -> None:
        validate_label("silo.id", self.id)
        validate_label("silo.federation", self.federation)
        if self.device not in DEVICES and not (
            self.device.startswith("cuda:") and self.device[5:].isdigit()
        ):
            raise ConfigError(f"silo.device={self.device!r}: use one of {DEVICES} or cuda:N")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ConfigError(f"silo.threads={self.threads!r}: must be an integer >= 0")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise ConfigError(f"silo.seed={self.seed!r}: must be an integer in [0, 2^63)")
        if not isinstance(self.keep_rounds, int) or self.keep_rounds < 2:
            raise ConfigError(f"silo.keep_rounds={self.keep_rounds!r}: must be an integer >= 2")


@dataclass(frozen=True)
class CoordinatorSection:
    address: str = "localhost:8443"
    # The DNS name to expect in the coordinator's certificate when it differs from the host
    # in `address` (port-forwards, tests dialling 127.0.0.1).
    server_name: str | None = None
    # How long a GetTask may be held by the coordinator when there is nothing to do.
    long_poll_s: float = 5.0
    # Deadline of small calls (Join, GetTask beyond its long poll, ReportMetrics).
    call_timeout_s: float = 30.0
    # Deadline of a tensor transfer (FetchGlobal, PushUpdate).
    transfer_timeout_s: float = 600.0
    # Exponential backoff with full jitter between retries on UNAVAILABLE; the channel's own
    # reconnection follows the same bounds. A short maximum brings silos back within seconds
    # of a coordinator restart (its re-opened round is waiting for them).
    retry_initial_s: float = 0.5
    retry_max_s: float = 5.0
    # Plaintext gRPC (`--insecure`); logs a warning.
    insecure: bool = False

    def __post_init__(self) -> None:
        if not is_address(self.address):
            raise ConfigError(f"coordinator.address={self.address!r}: use HOST:PORT")
        for name in (
            "long_poll_s",
            "call_timeout_s",
            "transfer_timeout_s",
            "retry_initial_s",
            "retry_max_s",
        ):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ConfigError(f"coordinator.{name}={v!r}: must be a number of seconds > 0")


@dataclass(frozen=True)
class ModelSection:
    # The local base model folder (or "minilm", "smollm2") for any run; None uses the run's
    # model.path as is.
    path: str | None = None
    # Per model id (the run's model.id): this silo's folder for it, e.g.
    # [model.paths] smollm2 = "/models/smollm2". Takes precedence over `path`.
    paths: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.paths, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in self.paths.items()
        ):
            raise ConfigError(f"model.paths={self.paths!r}: a table of model id = folder")


@dataclass(frozen=True)
class DataSection:
    """Local files (.jsonl, .json, .csv, .tsv, .parquet) with a text and a label column."""

    train_files: tuple[str, ...] = ()
    eval_files: tuple[str, ...] = ()
    text_column: str = "text"
    label_column: str = "label"
    # Label names in index order; None: integer labels 0..num_labels-1 of the run's model.
    labels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("train_files", "eval_files"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(self.labels))


@dataclass(frozen=True)
class ServerSection:
    # Plaintext grpc.health.v1 for probes ("" for off); the silo listens on nothing else.
    health_listen: str = "0.0.0.0:8081"
    # Prometheus /metrics over plaintext HTTP; "" (the default) turns it off. The manifests set
    # "0.0.0.0:9100". Off by default so that several silos on one host do not collide.
    metrics_listen: str = ""

    def __post_init__(self) -> None:
        for name in ("health_listen", "metrics_listen"):
            value = getattr(self, name)
            if value and not is_address(value):
                raise ConfigError(f'server.{name}={value!r}: use HOST:PORT, or "" for off')


@dataclass(frozen=True)
class SiloConfig:
    silo: SiloSection = field(default_factory=SiloSection)
    coordinator: CoordinatorSection = field(default_factory=CoordinatorSection)
    tls: TlsSection = field(default_factory=TlsSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    server: ServerSection = field(default_factory=ServerSection)

    def require_transport(self) -> None:
        """Serving needs TLS material unless --insecure (export and tools do not)."""
        if not self.coordinator.insecure and not self.tls.configured:
            raise ConfigError(
                "no TLS material: set [tls] ca_file, cert_file, key_file (see `pf2lora certs`), "
                "or pass --insecure for plaintext on a trusted network"
            )

    def require_data(self) -> None:
        if not self.data.train_files:
            raise ConfigError("data.train_files is empty: name this silo's training files")
        if not self.data.eval_files:
            raise ConfigError("data.eval_files is empty: name this silo's held-out files")


# Keys that hold paths: relative ones are relative to silo.toml's folder.
PATH_KEYS = (
    "silo.state_dir",
    "silo.audit_log",
    "model.path",
    "model.paths",
    "data.train_files",
    "data.eval_files",
    *TLS_PATHS,
)


def load_silo_config(
    path: str | Path | None, overrides: Mapping[str, Any] | None = None
) -> SiloConfig:
    """silo.toml (optional) with dotted-key overrides from flags, validated. Relative paths in
    the file are relative to the file's folder; those given as flags, to the working directory.
    """
    tree: dict[str, Any] = load_toml(path, PATH_KEYS) if path is not None else {}
    apply_overrides(tree, overrides)
    if tree.get("coordinator", {}).get("insecure") and tree.get("tls"):
        # The channel stays plaintext; the certificate and key still sign this silo's
        # secure-aggregation keys (peers check them against the federation CA).
        logger.warning(
            "--insecure: plaintext gRPC; [tls] is used only to sign secure-aggregation keys"
        )
    return from_mapping(SiloConfig, tree, "silo.toml")
