"""The coordinator daemon's configuration: frozen dataclasses from coordinator.toml and flags."""

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


@dataclass(frozen=True)
class FederationSection:
    name: str = "pf2lora"
    # Silo ids allowed to join; None admits every silo that can prove an identity of this
    # federation (logged as a warning: list them in production).
    allowed_silos: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        validate_label("federation.name", self.name)
        if self.allowed_silos is not None:
            object.__setattr__(self, "allowed_silos", tuple(self.allowed_silos))
            for s in self.allowed_silos:
                validate_label("federation.allowed_silos[]", s)
            if len(set(self.allowed_silos)) != len(self.allowed_silos):
                raise ConfigError(
                    f"federation.allowed_silos={list(self.allowed_silos)}: duplicates"
                )


@dataclass(frozen=True)
class ServerSection:
    silo_api_listen: str = "0.0.0.0:8443"
    control_api_listen: str = "0.0.0.0:8444"
    # Plaintext grpc.health.v1 only; "" turns it off.
    health_listen: str = "0.0.0.0:8081"
    # Prometheus /metrics over plaintext HTTP; "" (the default) turns it off. The manifests set
    # "0.0.0.0:9100". Off by default so that several coordinators on one host do not collide.
    metrics_listen: str = ""
    # Worker threads: each long poll and each tensor stream holds one for its duration, so
    # this must exceed the number of silos (plus a few for admin calls).
    max_workers: int = 64
    # How long GetTask holds a call when there is nothing to do.
    long_poll_s: float = 5.0
    # Plaintext gRPC without identities (`--insecure`); logs a warning.
    insecure: bool = False

    def __post_init__(self) -> None:
        for name in ("silo_api_listen", "control_api_listen"):
            if not is_address(getattr(self, name)):
                raise ConfigError(f"server.{name}={getattr(self, name)!r}: use HOST:PORT")
        for name in ("health_listen", "metrics_listen"):
            value = getattr(self, name)
            if value and not is_address(value):
                raise ConfigError(f'server.{name}={value!r}: use HOST:PORT, or "" for off')
        if not isinstance(self.max_workers, int) or self.max_workers < 4:
            raise ConfigError(f"server.max_workers={self.max_workers!r}: must be an integer >= 4")
        if not (isinstance(self.long_poll_s, int | float) and 0 < self.long_poll_s <= 60):
            raise ConfigError(f"server.long_poll_s={self.long_poll_s!r}: must be in (0, 60]")


@dataclass(frozen=True)
class StorageSection:
    # SQLite database (state.db) and the global checkpoints (runs/RUN/global-NNNNN.safetensors).
    state_dir: str = "/var/lib/pf2lora"


@dataclass(frozen=True)
class CoordinatorConfig:
    federation: FederationSection = field(default_factory=FederationSection)
    server: ServerSection = field(default_factory=ServerSection)
    tls: TlsSection = field(default_factory=TlsSection)
    storage: StorageSection = field(default_factory=StorageSection)

    def __post_init__(self) -> None:
        if not self.server.insecure and not self.tls.configured:
            raise ConfigError(
                "no TLS material: set [tls] ca_file, cert_file, key_file (see `pf2lora certs`), "
                "or pass --insecure for plaintext on a trusted network"
            )


# Keys that hold paths: relative ones are relative to coordinator.toml's folder.
PATH_KEYS = ("storage.state_dir", *TLS_PATHS)


def load_coordinator_config(
    path: str | Path | None, overrides: Mapping[str, Any] | None = None
) -> CoordinatorConfig:
    """coordinator.toml (optional) with dotted-key overrides from flags, validated.

    Relative paths in the file are relative to the file's folder; those given as flags, to the
    working directory. `--insecure` with [tls] in the file: the flag wins and the TLS files are
    ignored, with a warning (handy for a local test of a deployed config).
    """
    tree: dict[str, Any] = load_toml(path, PATH_KEYS) if path is not None else {}
    apply_overrides(tree, overrides)
    server = tree.get("server", {})
    if server.get("insecure") and tree.get("tls"):
        logger.warning("--insecure: ignoring the [tls] section (%s)", sorted(tree["tls"]))
        tree = {**tree, "tls": {}}
    cfg = from_mapping(CoordinatorConfig, tree, "coordinator.toml")
    if not math.isfinite(cfg.server.long_poll_s):
        raise ConfigError("server.long_poll_s must be finite")
    if cfg.federation.allowed_silos is None:
        logger.warning(
            "federation.allowed_silos is not set: every silo of federation %r may join",
            cfg.federation.name,
        )
    return cfg
