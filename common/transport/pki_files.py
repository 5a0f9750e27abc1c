"""The federation PKI on disk: role directories, key and certificate files, reading them back.

File names are those of a Kubernetes TLS Secret in each role directory:

    DIR/ca.crt, DIR/ca.key                       the federation CA (keep ca.key offline)
    DIR/coordinator/{tls.crt,tls.key,ca.crt}     server certificate (DNS/IP SANs)
    DIR/silos/ID/{tls.crt,tls.key,ca.crt}        spiffe://FEDERATION/silo/ID
    DIR/admins/NAME/{tls.crt,tls.key,ca.crt}     spiffe://FEDERATION/admin/NAME

Keys are written owner-only (0600) in owner-only directories, atomically.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pf2lora.common.errors import ConfigError
from pf2lora.common.state_io import atomic_write_bytes
from pf2lora.common.transport.identity import validate_label
from pf2lora.common.transport.pki import (
    DEFAULT_CA_DAYS,
    DEFAULT_LEAF_DAYS,
    CertificateAuthority,
    IssuedCertificate,
    TlsMaterial,
    create_ca,
    issue_admin_cert,
    issue_server_cert,
    issue_silo_cert,
    validity_days,
)

logger = logging.getLogger(__name__)

CA_CERT, CA_KEY = "ca.crt", "ca.key"
TLS_CERT, TLS_KEY = "tls.crt", "tls.key"
KEY_MODE, CERT_MODE, DIR_MODE = 0o600, 0o644, 0o700


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomically, in an owner-only directory; the file never has a wider mode than `mode`."""
    atomic_write_bytes(path, data, mode=mode, dir_mode=DIR_MODE)


def coordinator_dir(directory: str | os.PathLike[str]) -> Path:
    return Path(directory) / "coordinator"


def silo_dir(directory: str | os.PathLike[str], silo_id: str) -> Path:
    return Path(directory) / "silos" / validate_label("silo id", silo_id)


def admin_dir(directory: str | os.PathLike[str], name: str) -> Path:
    return Path(directory) / "admins" / validate_label("admin name", name)


def refuse_existing_keys(keys: Iterable[Path], force: bool) -> None:
    """ConfigError listing those of `keys` that exist, unless `force`."""
    if force:
        return
    existing = [str(p) for p in keys if p.exists()]
    if existing:
        raise ConfigError(
            f"refusing to overwrite existing key(s) {', '.join(existing)}: "
            "use --force (force=True) to replace them"
        )


def write_ca(
    directory: str | os.PathLike[str], ca: CertificateAuthority, *, force: bool = False
) -> None:
    """Write DIR/ca.crt and DIR/ca.key (0600); ConfigError if ca.key exists and not `force`."""
    d = Path(directory)
    refuse_existing_keys([d / CA_KEY], force)
    _write(d / CA_KEY, ca.key_pem(), KEY_MODE)
    _write(d / CA_CERT, ca.cert_pem(), CERT_MODE)


def write_role(
    role_dir: str | os.PathLike[str],
    issued: IssuedCertificate,
    ca_cert: x509.Certificate,
    *,
    force: bool = False,
) -> None:
    """Write ROLE_DIR/{tls.key (0600), tls.crt, ca.crt}; ConfigError if tls.key exists."""
    d = Path(role_dir)
    refuse_existing_keys([d / TLS_KEY], force)
    # Key first, then certificate: a reader between the two sees a mismatched pair, which TLS
    # libraries reject at load time, rather than a new certificate with an old key.
    _write(d / TLS_KEY, issued.key_pem(), KEY_MODE)
    _write(d / TLS_CERT, issued.cert_pem(), CERT_MODE)
    _write(d / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), CERT_MODE)
    logger.info("wrote %s", d)


def _read_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    if mode & 0o077:
        logger.warning("%s is readable by others (mode %o): chmod 600 it", path, mode)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path}: expected an EC private key, got {type(key).__name__}")
    return key


def read_cert(path: str | os.PathLike[str]) -> x509.Certificate:
    """The first PEM certificate in `path`; ConfigError naming the file otherwise."""
    p = Path(path)
    try:
        return x509.load_pem_x509_certificate(p.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except ValueError as exc:
        raise ConfigError(f"{p}: not a PEM certificate ({exc})") from None


def ca_federation(ca_cert: x509.Certificate, where: object = "CA certificate") -> str:
    """The federation name a pf2lora CA carries as its subject's single OU."""
    ous = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(ous) != 1:
        raise ConfigError(
            f"{where}: subject {ca_cert.subject.rfc4514_string()!r} has no single OU naming the "
            "federation (not created by pf2lora certs init)"
        )
    return validate_label("federation", str(ous[0].value))


def load_ca(directory: str | os.PathLike[str]) -> CertificateAuthority:
    """The CA written by write_ca, to issue more leaves without creating a new CA."""
    d = Path(directory)
    cert = read_cert(d / CA_CERT)
    key = _read_key(d / CA_KEY)
    federation = ca_federation(cert, d / CA_CERT)
    return CertificateAuthority(cert=cert, key=key, federation=federation)


def load_tls_material(role_dir: str | os.PathLike[str]) -> TlsMaterial:
    """(ca, cert, key) PEM bytes from ROLE_DIR/{ca.crt,tls.crt,tls.key}, checked to match."""
    d = Path(role_dir)
    cert = read_cert(d / TLS_CERT)
    key = _read_key(d / TLS_KEY)
    ca = read_cert(d / CA_CERT)
    IssuedCertificate(cert=cert, key=key)  # raises ConfigError if they do not belong together
    return TlsMaterial(
        ca=ca.public_bytes(serialization.Encoding.PEM),
        cert=(d / TLS_CERT).read_bytes(),
        key=(d / TLS_KEY).read_bytes(),
    )


def provision_federation(
    directory: str | os.PathLike[str],
    federation: str,
    server_names: Sequence[str] = ("localhost",),
    *,
    server_ips: Sequence[str] = (),
    silos: Sequence[str] = (),
    admins: Sequence[str] = (),
    ca_days: int = DEFAULT_CA_DAYS,
    leaf_days: int = DEFAULT_LEAF_DAYS,
    force: bool = False,
) -> CertificateAuthority:
    """A new CA plus coordinator, silo and admin certificates written under `directory`.

    Every name is validated and every existing key checked before anything is written, so a
    refused call leaves the directory as it was.
    """
    d = Path(directory)
    silos = list(dict.fromkeys(validate_label("silo id", s) for s in silos))
    admins = list(dict.fromkeys(validate_label("admin name", a) for a in admins))
    validate_label("federation", federation)
    validity_days(ca_days)
    validity_days(leaf_days)
    targets = [d / CA_KEY, coordinator_dir(d) / TLS_KEY]
    targets += [silo_dir(d, s) / TLS_KEY for s in silos]
    targets += [admin_dir(d, a) / TLS_KEY for a in admins]
    refuse_existing_keys(targets, force)

    ca = create_ca(federation, days=ca_days)
    server = issue_server_cert(ca, server_names, server_ips, days=leaf_days)
    write_ca(d, ca, force=force)
    write_role(coordinator_dir(d), server, ca.cert, force=force)
    for s in silos:
        write_role(silo_dir(d, s), issue_silo_cert(ca, s, days=leaf_days), ca.cert, force=force)
    for a in admins:
        write_role(admin_dir(d, a), issue_admin_cert(ca, a, days=leaf_days), ca.cert, force=force)
    return ca
