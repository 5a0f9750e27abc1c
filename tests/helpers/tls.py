"""The tests' certificates, made with the project's own PKI (no keys committed, none duplicated):
in memory (`make_pki`) or on disk as `pf2lora certs init` writes them (`provision`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from pf2lora.common.transport import pki, pki_files
from pf2lora.common.transport.daemon_config import TlsSection


@dataclass(frozen=True)
class Issued:
    issued: pki.IssuedCertificate

    @property
    def cert(self) -> x509.Certificate:
        return self.issued.cert

    @property
    def key(self) -> ec.EllipticCurvePrivateKey:
        return self.issued.key  # type: ignore[return-value]

    @property
    def cert_pem(self) -> bytes:
        return self.issued.cert_pem()

    @property
    def key_pem(self) -> bytes:
        return self.issued.key_pem()


@dataclass(frozen=True)
class Pki:
    """One federation's test PKI: CA, server cert for localhost, one silo client cert."""

    ca: Issued
    server: Issued
    client: Issued

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem


def make_pki(federation: str = "test", silo_id: str = "silo-a") -> Pki:
    ca = pki.create_ca(federation)
    server = pki.issue_server_cert(ca, ("localhost",))
    client = pki.issue_silo_cert(ca, silo_id)
    return Pki(Issued(ca), Issued(server), Issued(client))


def write_tls_dir(tls_dir: Path, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> None:
    """Write {ca.crt,tls.crt,tls.key}, each replaced atomically (as a Secret update swaps files)."""
    tls_dir.mkdir(parents=True, exist_ok=True)
    for name, data in (("ca.crt", ca_pem), ("tls.crt", cert_pem), ("tls.key", key_pem)):
        tmp = tls_dir / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, tls_dir / name)


def provision(
    directory: Path,
    federation: str,
    silos: Iterable[str] = ("silo-a", "silo-b", "silo-c"),
    admins: Iterable[str] = ("ops",),
) -> Path:
    """A federation PKI on disk as `pf2lora certs init` writes it (server name localhost)."""
    pki_files.provision_federation(
        directory, federation, ("localhost",), silos=tuple(silos), admins=tuple(admins)
    )
    return directory


def tls_section(role_dir: Path) -> TlsSection:
    """The [tls] section of a daemon whose certificate is in role_dir."""
    return TlsSection(
        str(role_dir / "ca.crt"), str(role_dir / "tls.crt"), str(role_dir / "tls.key")
    )
