"""Why a TLS connection to the coordinator fails, in words a person can act on.

gRPC reports every failed handshake as UNAVAILABLE with a detail such as "Socket closed" or
"CERTIFICATE_VERIFY_FAILED". When a call fails that way, `diagnose` reads the certificate files
and repeats the handshake with Python's `ssl` module (the same CA bundle, certificate, key and
server name), then names the cause and the file or setting to change: a coordinator certificate
from another CA, a server name not in it (set `server_name`), a certificate expired or not yet
valid on either side, our certificate refused by the coordinator, or nothing listening at all.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography import x509

from pf2lora.common.transport.grpc_factory import TlsFiles

logger = logging.getLogger(__name__)

TROUBLESHOOTING = "docs/operations.md, section 7 (Troubleshooting)"
# The HTTP/2 client preface and an empty SETTINGS frame: after a TLS 1.3 handshake the server
# checks our certificate, and its verdict (an alert, or its own SETTINGS) arrives on the first read.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
# OpenSSL verify codes (X509_V_ERR_*) of a server certificate this client does not accept
_NOT_YET_VALID, _EXPIRED, _HOSTNAME_MISMATCH, _IP_MISMATCH = 9, 10, 62, 64
_OTHER_CA = {2, 18, 19, 20, 21, 24}  # no issuer in our bundle, self-signed, not a CA
# TLS alerts with which a server refuses our certificate (OpenSSL reason names)
_REFUSED = (
    "ALERT_UNKNOWN_CA",
    "ALERT_BAD_CERTIFICATE",
    "ALERT_CERTIFICATE_UNKNOWN",
    "ALERT_UNSUPPORTED_CERTIFICATE",
    "ALERT_DECRYPT_ERROR",
    "ALERT_CERTIFICATE_REQUIRED",
    "ALERT_HANDSHAKE_FAILURE",
)


@dataclass(frozen=True)
class Diagnosis:
    """A cause (a short code, stable for tests and logs) and what to do about it."""

    cause: str  # ok | unreachable | not-tls | other-ca | name-mismatch | server-expired |
    # server-not-yet-valid | client-expired | client-not-yet-valid | client-refused | unknown
    message: str

    @property
    def ok(self) -> bool:
        return self.cause == "ok"


def split_address(address: str) -> tuple[str, int] | None:
    """(host, port) of a gRPC target such as host:port, [::1]:port, dns:///host:port."""
    target = address.split("///", 1)[-1] if "///" in address else address
    for prefix in ("ipv4:", "ipv6:", "dns:"):
        target = target.removeprefix(prefix)
    try:
        parts = urlsplit(f"//{target}")
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    return (host, port) if host and port else None


def _load_certificate(pem: bytes) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificates(pem)[0]
    except ValueError:
        return None


def _names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in san.get_values_for_type(x509.DNSName)] + [
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    ]


def _validity(cert: x509.Certificate, now: dt.datetime) -> str | None:
    """'expired' / 'not-yet-valid' / None."""
    if now > cert.not_valid_after_utc:
        return "expired"
    if now < cert.not_valid_before_utc:
        return "not-yet-valid"
    return None


def _paths(files: TlsFiles) -> str:
    return f"{files.ca}, {files.cert}, {files.key}"


def _when(t: dt.datetime) -> str:
    return f"{t:%Y-%m-%d %H:%M}Z"


def check_own_certificate(files: TlsFiles, now: dt.datetime | None = None) -> Diagnosis | None:
    """Our certificate is expired or not yet valid (by this machine's clock): the coordinator
    will refuse it. None when it is valid now (or unreadable: the loaders say so elsewhere)."""
    now = now or dt.datetime.now(dt.UTC)
    try:
        cert = _load_certificate(files.cert.read_bytes())
    except OSError:
        return None
    state = None if cert is None else _validity(cert, now)
    if cert is None or state is None:
        return None
    if state == "expired":
        return Diagnosis(
            "client-expired",
            f"this certificate ({files.cert}) expired at {_when(cert.not_valid_after_utc)}: "
            "the coordinator refuses it. Issue a new one from the federation CA (`pf2lora certs "
            "issue-silo` / `issue-admin`) and replace the files; a running silo picks them up "
            f"without a restart. See {TROUBLESHOOTING}.",
        )
    return Diagnosis(
        "client-not-yet-valid",
        f"this certificate ({files.cert}) is valid only from {_when(cert.not_valid_before_utc)}"
        ": this machine's clock is behind the CA machine's (or the certificate was made for "
        f"later). Fix the clock (NTP) or wait. See {TROUBLESHOOTING}.",
    )


def _peer_certificate(
    host: str, port: int, server_name: str, files: TlsFiles, timeout_s: float
) -> x509.Certificate:
    """The coordinator's certificate, fetched without verifying it (to describe it only)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.load_cert_chain(files.cert, files.key)  # spares the coordinator's log a refusal
    with socket.create_connection((host, port), timeout=timeout_s) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
    if der is None:
        raise ValueError("the server showed no certificate")
    return x509.load_der_x509_certificate(der)


def _server_verdict(
    exc: ssl.SSLCertVerificationError,
    files: TlsFiles,
    address: str,
    server_name: str,
    peer: x509.Certificate | None,
) -> Diagnosis:
    code = exc.verify_code
    about = ""
    if peer is not None:
        about = (
            f" (subject {peer.subject.rfc4514_string()!r}, issuer "
            f"{peer.issuer.rfc4514_string()!r}, names {', '.join(_names(peer)) or 'none'})"
        )
    if code in (_HOSTNAME_MISMATCH, _IP_MISMATCH):
        names = _names(peer) if peer is not None else []
        suggestion = f'server_name = "{names[0]}"' if names else "server_name"
        return Diagnosis(
            "name-mismatch",
            f"the coordinator's certificate at {address} is not valid for the name "
            f"{server_name!r}{about}. Dial one of its names, or set {suggestion} "
            "([coordinator] server_name in silo.toml, --server-name on the command line); or "
            "rotate the certificate with this name too (`pf2lora certs rotate-server`). See "
            f"{TROUBLESHOOTING}.",
        )
    if code == _EXPIRED:
        return Diagnosis(
            "server-expired",
            f"the coordinator's certificate at {address} has expired by this machine's clock"
            f"{about}. The federation operator rotates it (`pf2lora certs rotate-server`); if it "
            f"should still be valid, check this machine's clock. See {TROUBLESHOOTING}.",
        )
    if code == _NOT_YET_VALID:
        return Diagnosis(
            "server-not-yet-valid",
            f"the coordinator's certificate at {address} is not valid yet by this machine's "
            f"clock{about}: this clock is behind the CA machine's. Fix the clock (NTP) or wait. "
            f"See {TROUBLESHOOTING}.",
        )
    if code in _OTHER_CA:
        return Diagnosis(
            "other-ca",
            f"the coordinator's certificate at {address} is not issued by the CA in {files.ca}"
            f"{about}: that ca.crt belongs to another federation, or is stale after the CA was "
            "replaced. Use the federation's current ca.crt (the one `pf2lora certs` put next "
            f"to this certificate). See {TROUBLESHOOTING}.",
        )
    return Diagnosis(
        "unknown",
        f"the coordinator's certificate at {address} was refused here: {exc.verify_message}"
        f"{about}. See {TROUBLESHOOTING}.",
    )


def _refused(files: TlsFiles, address: str, reason: str) -> Diagnosis:
    try:
        cert = _load_certificate(files.cert.read_bytes())
    except OSError:
        cert = None
    about = ""
    if cert is not None:
        about = (
            f" (subject {cert.subject.rfc4514_string()!r}, issuer "
            f"{cert.issuer.rfc4514_string()!r}, valid {_when(cert.not_valid_before_utc)} to "
            f"{_when(cert.not_valid_after_utc)})"
        )
    try:
        cas = x509.load_pem_x509_certificates(files.ca.read_bytes())
    except (OSError, ValueError):
        cas = []
    if cert is not None and cas and all(cert.issuer != ca.subject for ca in cas):
        why = (
            f"it is issued by {cert.issuer.rfc4514_string()!r}, not by the CA in {files.ca} "
            f"({', '.join(repr(ca.subject.rfc4514_string()) for ca in cas)}): it is another "
            "federation's certificate, or one from a replaced CA"
        )
    elif "EXPIRED" in reason:
        why = (
            "it says it has expired, though this machine's clock says it is valid: one of the "
            "two clocks is wrong (NTP)"
        )
    else:
        why = (
            "it does not accept it: it is not issued by the CA the coordinator trusts (another "
            "federation's certificate, or one from a replaced CA), or the coordinator's clock "
            "says it is not valid yet"
        )
    return Diagnosis(
        "client-refused",
        f"the coordinator at {address} refused this certificate ({files.cert}){about}: {why}. "
        f"Issue a certificate from the federation's CA (`pf2lora certs issue-silo` / "
        f"`issue-admin`). See {TROUBLESHOOTING}.",
    )


def diagnose(
    address: str,
    files: TlsFiles,
    server_name: str | None = None,
    *,
    timeout_s: float = 5.0,
    now: dt.datetime | None = None,
) -> Diagnosis:
    """Why TLS to `address` fails with these files, or Diagnosis("ok", ...) when it does not."""
    own = check_own_certificate(files, now)
    if own is not None:
        return own
    hp = split_address(address)
    if hp is None:
        return Diagnosis("unknown", f"cannot check TLS to {address!r}: not HOST:PORT")
    host, port = hp
    name = server_name or host
    try:
        ca_pem = files.ca.read_bytes().decode("ascii", "replace")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cadata=ca_pem)
        ctx.load_cert_chain(files.cert, files.key)
        ctx.set_alpn_protocols(["h2"])
    except (OSError, ssl.SSLError) as exc:
        return Diagnosis("unknown", f"cannot load the TLS files {_paths(files)}: {exc}")
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        return Diagnosis(
            "unreachable",
            f"nothing answers at {address} ({exc}): is the coordinator running there, and is "
            f"this its address and port? See {TROUBLESHOOTING}.",
        )
    try:
        with raw, ctx.wrap_socket(raw, server_hostname=name) as tls:
            tls.sendall(_H2_PREFACE)
            answer = tls.recv(9)
    except ssl.SSLCertVerificationError as exc:
        try:
            peer = _peer_certificate(host, port, name, files, timeout_s)
        except (OSError, ValueError):
            peer = None
        return _server_verdict(exc, files, address, name, peer)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if any(r in reason for r in _REFUSED) or "EXPIRED" in reason:
            return _refused(files, address, reason)
        if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason:
            return Diagnosis(
                "not-tls",
                f"the server at {address} does not speak TLS (a coordinator started with "
                f"--insecure, or another service on that port). See {TROUBLESHOOTING}.",
            )
        return Diagnosis("unknown", f"TLS to {address} failed: {reason}. See {TROUBLESHOOTING}.")
    except (ConnectionError, TimeoutError) as exc:
        return _refused(files, address, f"connection closed after the handshake ({exc})")
    if not answer:
        return _refused(files, address, "connection closed after the handshake")
    return Diagnosis("ok", f"TLS to {address} as {name!r} works with {_paths(files)}")
