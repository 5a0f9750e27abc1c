"""The federation's small PKI: a CA and coordinator, silo and admin certificates (ECDSA P-256).

Certificates are complete in the RFC 5280 sense (basicConstraints, keyUsage, EKU, SAN, SKI/AKI)
because gRPC would accept much less; tests check them with `cryptography.x509.verification`.
Their files on disk are pki_files.py's.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pf2lora.common.errors import ConfigError
from pf2lora.common.names import is_label
from pf2lora.common.transport.identity import Identity, Role, validate_label

logger = logging.getLogger(__name__)

DEFAULT_CA_DAYS = (
    1826  # five years (with a leap day): re-issuing every leaf is the cost of a new CA
)
DEFAULT_LEAF_DAYS = 365  # one year: leaves are cheap to re-issue with the CA kept
# not_before is set this far in the past so that a peer whose clock runs behind does not reject
# a certificate issued a moment ago as "not yet valid".
CLOCK_SKEW = dt.timedelta(minutes=5)

ORGANIZATION = "pf2lora"


# --- validation ----------------------------------------------------------------------------------


def validate_dns_name(value: object) -> str:
    """A host name for the server certificate's SAN, lower-cased; ConfigError otherwise.

    ASCII labels only (write IDNs in punycode), no wildcards, no trailing dot; an IP address
    belongs in an IP SAN instead.
    """
    if not isinstance(value, str) or not value:
        raise ConfigError(f"server DNS name {value!r}: must be a non-empty string")
    name = value.lower()
    if _is_ip(name):
        raise ConfigError(
            f"server DNS name {value!r} is an IP address: give it as an IP SAN (--ip)"
        )
    if len(name) > 253 or not all(is_label(label) for label in name.split(".")):
        raise ConfigError(
            f"server DNS name {value!r}: use dot-separated labels of a-z, 0-9 and '-' "
            "(no wildcard, no trailing dot, at most 253 characters)"
        )
    return name


def validate_ip(value: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IP address for an IP SAN; ConfigError naming the value otherwise."""
    try:
        return ipaddress.ip_address(value)  # type: ignore[arg-type]
    except ValueError:
        raise ConfigError(f"server IP address {value!r}: not an IPv4 or IPv6 address") from None


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _utc(name: str, value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        raise ConfigError(f"{name}={value!r}: give a timezone-aware datetime (e.g. UTC)")
    return value.astimezone(dt.UTC)


def validity_days(days: int) -> int:
    """`days` if it is a whole number of days > 0, else ConfigError."""
    if isinstance(days, bool) or not isinstance(days, int) or days <= 0:
        raise ConfigError(f"days={days!r}: validity must be a whole number of days > 0")
    return days


def _validity(
    days: int, not_before: dt.datetime | None, not_after: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime]:
    """(not_before, not_after): explicit values win; otherwise now - CLOCK_SKEW and + days."""
    validity_days(days)
    start = (
        _utc("not_before", not_before)
        if not_before is not None
        else dt.datetime.now(dt.UTC) - CLOCK_SKEW
    )
    end = _utc("not_after", not_after) if not_after is not None else start + dt.timedelta(days=days)
    if end <= start:
        raise ConfigError(
            f"not_after={end.isoformat()}: must be after not_before={start.isoformat()}"
        )
    return start, end


# --- certificates in memory ----------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def __post_init__(self) -> None:
        if self.cert.public_key() != self.key.public_key():
            raise ConfigError(
                f"certificate {self.cert.subject.rfc4514_string()!r}: key does not match it"
            )

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        # Unencrypted PKCS#8: gRPC and Kubernetes Secrets need the key readable without a
        # passphrase; the file mode (0600) and the Secret's RBAC protect it.
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


@dataclass(frozen=True)
class CertificateAuthority(IssuedCertificate):
    """The federation CA: signs every leaf; its federation name is its subject's OU."""

    federation: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_label("federation", self.federation)
        try:
            bc = self.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise ConfigError(
                f"certificate {self.cert.subject.rfc4514_string()!r}: not a CA (basicConstraints)"
            )


class TlsMaterial(NamedTuple):
    """PEM bytes of one role directory, as gRPC credentials take them."""

    ca: bytes
    cert: bytes
    key: bytes


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


CN_MAX = 64  # RFC 5280 ub-common-name


def _subject(federation: str, *common_names: str) -> x509.Name:
    """O=pf2lora, OU=FEDERATION, CN=the first of `common_names` that fits in 64 characters.

    The CN is for people reading logs; verification uses the SAN (leaves) and the key (CA).
    Without a candidate that fits, the subject has no CN.
    """
    attrs = [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, federation),
    ]
    cn = next((c for c in common_names if 0 < len(c) <= CN_MAX), None)
    if cn is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def create_ca(
    federation: str,
    *,
    days: int = DEFAULT_CA_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> CertificateAuthority:
    """A new self-signed federation CA (path length 0: it signs leaves only)."""
    validate_label("federation", federation)
    start, end = _validity(days, not_before, not_after)
    key = _new_key()
    name = _subject(federation, f"pf2lora {federation} CA", "pf2lora CA")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
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
    logger.info("created CA %r valid until %s", cert.subject.rfc4514_string(), end.isoformat())
    return CertificateAuthority(cert=cert, key=key, federation=federation)


def _issue_leaf(
    ca: CertificateAuthority,
    common_names: Sequence[str],
    san: Sequence[x509.GeneralName],
    eku: x509.ObjectIdentifier,
    days: int,
    not_before: dt.datetime | None,
    not_after: dt.datetime | None,
) -> IssuedCertificate:
    start, end = _validity(days, not_before, not_after)
    label = common_names[0]
    if end > ca.cert.not_valid_after_utc:
        # A leaf cannot outlive its CA in practice: verifiers reject the chain once the CA expires.
        logger.warning("%s: validity cut to the CA's expiry %s", label, ca.cert.not_valid_after_utc)
        end = ca.cert.not_valid_after_utc
        if end <= start:
            raise ConfigError(f"the CA expired on {end.isoformat()}: create a new CA")
    key = _new_key()
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_subject(ca.federation, *common_names))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
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
        .add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    logger.info("issued %r valid until %s", label, end.isoformat())
    return IssuedCertificate(cert=cert, key=key)


def issue_server_cert(
    ca: CertificateAuthority,
    dns_names: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = (),
    *,
    days: int = DEFAULT_LEAF_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> IssuedCertificate:
    """The coordinator's server certificate: EKU serverAuth, a SAN for every name silos dial."""
    if isinstance(dns_names, str):
        raise ConfigError(f"dns_names={dns_names!r}: give a list of names, not one string")
    names = list(dict.fromkeys(validate_dns_name(n) for n in dns_names))
    ips = list(dict.fromkeys(validate_ip(ip) for ip in ip_addresses))
    if not names:
        raise ConfigError("dns_names=[]: the server certificate needs at least one DNS name")
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    san += [x509.IPAddress(ip) for ip in ips]
    return _issue_leaf(ca, names, san, ExtendedKeyUsageOID.SERVER_AUTH, days, not_before, not_after)


def _issue_client(
    ca: CertificateAuthority,
    role: Role,
    name: str,
    days: int,
    not_before: dt.datetime | None,
    not_after: dt.datetime | None,
) -> IssuedCertificate:
    ident = Identity(ca.federation, role, name)
    san = [x509.UniformResourceIdentifier(ident.uri)]
    return _issue_leaf(
        ca,
        [f"{role} {name}", name],
        san,
        ExtendedKeyUsageOID.CLIENT_AUTH,
        days,
        not_before,
        not_after,
    )


def issue_silo_cert(
    ca: CertificateAuthority,
    silo_id: str,
    *,
    days: int = DEFAULT_LEAF_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> IssuedCertificate:
    """A silo's client certificate: EKU clientAuth, SAN URI spiffe://FEDERATION/silo/SILO_ID."""
    return _issue_client(ca, "silo", silo_id, days, not_before, not_after)


def issue_admin_cert(
    ca: CertificateAuthority,
    name: str,
    *,
    days: int = DEFAULT_LEAF_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> IssuedCertificate:
    """An admin's client certificate: EKU clientAuth, SAN URI spiffe://FEDERATION/admin/NAME."""
    return _issue_client(ca, "admin", name, days, not_before, not_after)
