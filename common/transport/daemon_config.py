"""Config sections both daemons share ([tls]) and address checks; each daemon's own sections live in
its package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pf2lora.common.errors import ConfigError
from pf2lora.common.transport.grpc_factory import TlsFiles

# [tls] keys that hold paths (resolved against the config file's folder, runspec.load_toml).
TLS_PATHS = ("tls.ca_file", "tls.cert_file", "tls.key_file")


@dataclass(frozen=True)
class TlsSection:
    """PEM files: the federation CA, this party's certificate and its private key."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        given = [f for f in (self.ca_file, self.cert_file, self.key_file) if f]
        if given and len(given) != 3:
            raise ConfigError("tls: give ca_file, cert_file and key_file together (or none)")

    @property
    def configured(self) -> bool:
        return bool(self.ca_file)

    def files(self) -> TlsFiles:
        if not (self.ca_file and self.cert_file and self.key_file):
            raise ConfigError("tls: ca_file, cert_file and key_file are not set")
        return TlsFiles(Path(self.ca_file), Path(self.cert_file), Path(self.key_file))


def is_address(value: object) -> bool:
    """HOST:PORT with a numeric port (host may be empty, a name, IPv4 or [IPv6])."""
    if not isinstance(value, str) or ":" not in value:
        return False
    port = value.rsplit(":", 1)[1]
    return port.isdigit() and 0 <= int(port) <= 65535
