"""Test-only PKI: a CA, server and client certificates made with `cryptography` (no keys committed).

Certificates are complete in the RFC 5280 sense (SECURITY.md): ECDSA P-256 / SHA-256,
basicConstraints, keyUsage, extendedKeyUsage, SAN, SKI/AKI, so they also pass
`cryptography.x509.verification`, not just gRPC's laxer checks.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _validity() -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=1)


def make_ca(common_name: str = "pf2lora test CA") -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, not_after = _validity()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue(
    ca: Issued,
    common_name: str,
    *,
    server: bool,
    dns: tuple[str, ...] = (),
    uris: tuple[str, ...] = (),
    key: ec.EllipticCurvePrivateKey | None = None,
) -> Issued:
    """A leaf certificate: serverAuth with DNS SANs, or clientAuth with URI SANs."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = _validity()
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.UniformResourceIdentifier(u) for u in uris]
    eku = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(cert, key)


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
    ca = make_ca(f"pf2lora {federation} CA")
    server = issue(ca, "coordinator", server=True, dns=("localhost",))
    client = issue(ca, silo_id, server=False, uris=(f"spiffe://{federation}/silo/{silo_id}",))
    return Pki(ca, server, client)


def write_tls_dir(tls_dir: Path, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> None:
    """Write {ca.crt,tls.crt,tls.key}, each replaced atomically (as a Secret update swaps files)."""
    tls_dir.mkdir(parents=True, exist_ok=True)
    for name, data in (("ca.crt", ca_pem), ("tls.crt", cert_pem), ("tls.key", key_pem)):
        tmp = tls_dir / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, tls_dir / name)
