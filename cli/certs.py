"""`pf2lora certs`: provision the federation CA and the coordinator, silo and admin certificates."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from pf2lora.common.errors import ConfigError, InvalidArgument
from pf2lora.common.transport import pki, pki_files
from pf2lora.common.transport.identity import identity_from_cert

logger = logging.getLogger(__name__)

EXPIRY_WARNING = dt.timedelta(days=30)

_LAYOUT = """\
layout written under DIR (tls.crt/tls.key/ca.crt are the keys of a Kubernetes TLS Secret):
  DIR/ca.crt, DIR/ca.key                    federation CA; keep ca.key offline
  DIR/coordinator/{tls.crt,tls.key,ca.crt}  coordinator server certificate (DNS/IP SANs)
  DIR/silos/ID/{tls.crt,tls.key,ca.crt}     silo ID: spiffe://FEDERATION/silo/ID
  DIR/admins/NAME/{tls.crt,tls.key,ca.crt}  admin NAME: spiffe://FEDERATION/admin/NAME
Private keys are written with mode 0600. Certificates start 5 minutes in the past to
tolerate clock skew between machines.
"""


def _add_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dir", required=True, type=Path, metavar="DIR", help="the federation's PKI directory"
    )


def _add_days(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--days",
        type=int,
        default=pki.DEFAULT_LEAF_DAYS,
        metavar="N",
        help=f"validity of each issued certificate in days (default {pki.DEFAULT_LEAF_DAYS})",
    )


def _add_force(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--force", action="store_true", help=f"overwrite {what}")


def _add_server_names(p: argparse.ArgumentParser, default_help: str) -> None:
    p.add_argument(
        "--server-name",
        action="append",
        default=None,
        metavar="NAME",
        help="a DNS name silos and admins dial to reach the coordinator (repeat for each: "
        f"public name, NAME.NAMESPACE.svc, localhost for tests); {default_help}",
    )
    p.add_argument(
        "--ip",
        action="append",
        default=[],
        metavar="ADDR",
        help="an IP address silos dial directly (repeat for each; IP SAN)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "certs",
        help="create the federation CA and issue TLS certificates",
        description="Create the federation CA and issue the coordinator's server certificate and "
        "the silos' and admins' client certificates (ECDSA P-256, mutual TLS).",
        epilog=_LAYOUT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="certs_command", metavar="ACTION")
    sub.required = True

    p = sub.add_parser(
        "init",
        help="new CA plus coordinator, silo and admin certificates",
        description="Create a new federation CA and issue the coordinator's server certificate "
        "and one client certificate per --silo and --admin.",
        epilog=_LAYOUT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_dir(p)
    p.add_argument(
        "--federation",
        required=True,
        metavar="NAME",
        help="federation name, the trust domain of spiffe://NAME/... (a lower-case DNS label)",
    )
    _add_server_names(p, "default: localhost")
    p.add_argument(
        "--silo",
        action="append",
        default=[],
        metavar="ID",
        help="issue a certificate for silo ID (repeat for each)",
    )
    p.add_argument(
        "--admin",
        action="append",
        default=[],
        metavar="NAME",
        help="issue an admin certificate for NAME (repeat for each)",
    )
    p.add_argument(
        "--ca-days",
        type=int,
        default=pki.DEFAULT_CA_DAYS,
        metavar="N",
        help=f"validity of the CA in days (default {pki.DEFAULT_CA_DAYS}, five years)",
    )
    _add_days(p)
    _add_force(p, "an existing CA and keys (every certificate the old CA issued stops working)")
    p.set_defaults(func=_init)

    p = sub.add_parser(
        "issue-silo",
        help="onboard a silo: a client certificate from the existing CA",
        description="Issue a client certificate for a new (or re-keyed) silo with the existing "
        "CA in DIR; the other certificates stay valid.",
    )
    _add_dir(p)
    p.add_argument(
        "--silo",
        action="append",
        required=True,
        metavar="ID",
        help="silo id (a lower-case DNS label; repeat to issue several)",
    )
    _add_days(p)
    _add_force(p, "the silo's existing key (re-key it)")
    p.set_defaults(func=_issue_silo)

    p = sub.add_parser(
        "issue-admin",
        help="an admin client certificate from the existing CA",
        description="Issue a client certificate for the control API with the existing CA in DIR.",
    )
    _add_dir(p)
    p.add_argument(
        "--admin",
        action="append",
        required=True,
        metavar="NAME",
        help="admin name (a lower-case DNS label; repeat to issue several)",
    )
    _add_days(p)
    _add_force(p, "the admin's existing key (re-key it)")
    p.set_defaults(func=_issue_admin)

    p = sub.add_parser(
        "rotate-server",
        help="new coordinator key and certificate from the existing CA",
        description="Replace DIR/coordinator/{tls.key,tls.crt} with a new key and certificate "
        "signed by the existing CA. Silos keep trusting it: only ca.crt anchors trust.",
    )
    _add_dir(p)
    _add_server_names(p, "default: the DNS names and IP addresses of the current certificate")
    _add_days(p)
    p.set_defaults(func=_rotate_server)

    p = sub.add_parser(
        "show",
        help="list certificates, identities and expiry",
        description="List every certificate under DIR with its identity or DNS names, its "
        "expiry, and whether it is signed by DIR/ca.crt, matches its key and carries the "
        "identity its directory names. Exits 1 when a certificate is expired, not signed by the "
        "CA, does not match its key or carries another identity.",
    )
    _add_dir(p)
    p.set_defaults(func=_show)


# --- actions -------------------------------------------------------------------------------------


def _init(args: argparse.Namespace) -> int:
    names = args.server_name or ["localhost"]
    ca = pki_files.provision_federation(
        args.dir,
        args.federation,
        names,
        server_ips=args.ip,
        silos=args.silo,
        admins=args.admin,
        ca_days=args.ca_days,
        leaf_days=args.days,
        force=args.force,
    )
    stale = [
        d
        for group, wanted in (("silos", set(args.silo)), ("admins", set(args.admin)))
        if (args.dir / group).is_dir()
        for d in sorted((args.dir / group).iterdir())
        if d.is_dir() and d.name not in wanted
    ]
    for d in stale:
        logger.warning("%s was issued by an older CA and no longer works: re-issue or delete", d)
    print(f"created CA for federation {ca.federation!r} in {args.dir}")
    print(f"coordinator: {', '.join(names + args.ip)}")
    for s in args.silo:
        print(f"silo {s}: {pki_files.silo_dir(args.dir, s)}")
    for a in args.admin:
        print(f"admin {a}: {pki_files.admin_dir(args.dir, a)}")
    return 0


def _issue_silo(args: argparse.Namespace) -> int:
    ca = pki_files.load_ca(args.dir)
    silos = [s for s in dict.fromkeys(args.silo)]
    dirs = [pki_files.silo_dir(args.dir, s) for s in silos]  # validates every id before writing
    pki_files.refuse_existing_keys([d / pki_files.TLS_KEY for d in dirs], args.force)
    for s, d in zip(silos, dirs, strict=True):
        pki_files.write_role(
            d, pki.issue_silo_cert(ca, s, days=args.days), ca.cert, force=args.force
        )
        print(f"silo {s}: {d} (spiffe://{ca.federation}/silo/{s})")
    return 0


def _issue_admin(args: argparse.Namespace) -> int:
    ca = pki_files.load_ca(args.dir)
    admins = [a for a in dict.fromkeys(args.admin)]
    dirs = [pki_files.admin_dir(args.dir, a) for a in admins]
    pki_files.refuse_existing_keys([d / pki_files.TLS_KEY for d in dirs], args.force)
    for a, d in zip(admins, dirs, strict=True):
        pki_files.write_role(
            d, pki.issue_admin_cert(ca, a, days=args.days), ca.cert, force=args.force
        )
        print(f"admin {a}: {d} (spiffe://{ca.federation}/admin/{a})")
    return 0


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def _rotate_server(args: argparse.Namespace) -> int:
    ca = pki_files.load_ca(args.dir)
    target = pki_files.coordinator_dir(args.dir)
    names, ips = args.server_name, args.ip
    if names is None:
        current = target / pki_files.TLS_CERT
        if not current.exists():
            raise ConfigError(f"{current} does not exist: give the names with --server-name")
        san = _san(pki_files.read_cert(current))
        names = san.get_values_for_type(x509.DNSName) if san else []
        if not ips and san is not None:
            ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    server = pki.issue_server_cert(ca, names, ips, days=args.days)
    # Rotation replaces the key by definition: no --force needed.
    pki_files.write_role(target, server, ca.cert, force=True)
    print(
        f"rotated coordinator certificate in {target}: {', '.join(list(names) + list(ips))}, "
        f"valid until {server.cert.not_valid_after_utc:%Y-%m-%d}"
    )
    return 0


def _describe(cert: x509.Certificate) -> str:
    try:
        return identity_from_cert(cert).uri
    except InvalidArgument:
        san = _san(cert)
        if san is None:
            return cert.subject.rfc4514_string()
        return ", ".join(str(v) for v in san.get_values_for_type(x509.DNSName)) + "".join(
            f", {ip}" for ip in san.get_values_for_type(x509.IPAddress)
        )


def _problems(
    cert: x509.Certificate, ca: x509.Certificate, role_dir: Path | None, now: dt.datetime
) -> tuple[list[str], bool]:
    """(what is wrong or worth knowing, whether any of it stops the certificate working)."""
    notes: list[str] = []
    fatal = False
    if cert.not_valid_after_utc <= now:
        notes, fatal = notes + ["EXPIRED"], True
    elif cert.not_valid_before_utc > now:
        notes, fatal = notes + ["NOT YET VALID"], True
    elif cert.not_valid_after_utc - now < EXPIRY_WARNING:
        notes.append(f"expires in {(cert.not_valid_after_utc - now).days} days")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        notes, fatal = notes + ["NOT SIGNED BY ca.crt"], True
    if role_dir is not None:
        try:
            pki_files.load_tls_material(role_dir)
        except ConfigError as exc:
            notes, fatal = notes + [f"BAD KEY ({exc})"], True
    return notes, fatal


def _show(args: argparse.Namespace) -> int:
    d: Path = args.dir
    ca = pki_files.read_cert(d / pki_files.CA_CERT)
    now = dt.datetime.now(dt.UTC)
    rows: list[tuple[str, str, str, str]] = []
    bad = 0

    def add(label: str, role_dir: Path | None, expected_uri: str | None = None) -> None:
        nonlocal bad
        path = d / pki_files.CA_CERT if role_dir is None else role_dir / pki_files.TLS_CERT
        cert = pki_files.read_cert(path)
        notes, fatal = _problems(cert, ca, role_dir, now)
        described = _describe(cert)
        if expected_uri is not None and described != expected_uri:
            notes, fatal = notes + [f"WRONG IDENTITY (expected {expected_uri})"], True
        bad += fatal
        rows.append(
            (label, described, f"{cert.not_valid_after_utc:%Y-%m-%d}", "; ".join(notes) or "ok")
        )

    add("ca", None)
    federation = pki_files.ca_federation(ca, d / pki_files.CA_CERT)
    if (pki_files.coordinator_dir(d) / pki_files.TLS_CERT).exists():
        add("coordinator", pki_files.coordinator_dir(d))
    for group, role in (("silos", "silo"), ("admins", "admin")):
        for cert_path in sorted((d / group).glob(f"*/{pki_files.TLS_CERT}")):
            name = cert_path.parent.name
            add(f"{role} {name}", cert_path.parent, f"spiffe://{federation}/{role}/{name}")

    header = ("CERTIFICATE", "IDENTITY / NAMES", "EXPIRES", "STATUS")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3])
    if bad:
        print(f"{bad} certificate(s) unusable: see STATUS", file=sys.stderr)
    return 1 if bad else 0
