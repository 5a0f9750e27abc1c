"""Identities carried by certificates (SPIFFE URIs) and their checks inside gRPC handlers."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, TypeVar, cast, get_args

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from pf2lora.common.errors import ConfigError, InvalidArgument, PermissionDenied, bounded
from pf2lora.common.names import LABEL_PATTERN, LABEL_RULE, is_label

logger = logging.getLogger(__name__)

Role = Literal["silo", "admin"]
ROLES: tuple[str, ...] = get_args(Role)


SPIFFE_SCHEME = "spiffe://"
# The whole URI, nothing optional: no port, user info, query, fragment, percent-encoding,
# trailing slash or upper case. An identity has exactly one spelling.
_SPIFFE_RE = re.compile(
    rf"spiffe://(?P<federation>{LABEL_PATTERN})/(?P<role>silo|admin)/(?P<name>{LABEL_PATTERN})"
)

# The auth-context property holding the verified peer certificate (PEM). The identity is read
# from the certificate itself: gRPC's SAN property mixes every SAN type (a dNSName spelling
# spiffe://... would pass for a URI) and cuts strings at a NUL.
PEM_PROPERTY = "x509_pem_cert"
MIN_RSA_BITS = 2048
MIN_EC_BITS = 256


def validate_label(field: str, value: object) -> str:
    """Return `value` if it is one lower-case DNS label, else raise ConfigError naming `field`."""
    if not is_label(value):
        raise ConfigError(f"{field}={value!r}: {LABEL_RULE}")
    return value


@dataclass(frozen=True)
class Identity:
    """Who a certificate belongs to: `spiffe://FEDERATION/ROLE/NAME`."""

    federation: str
    role: Role
    name: str

    def __post_init__(self) -> None:
        validate_label("federation", self.federation)
        if self.role not in ROLES:
            raise ConfigError(f"role={self.role!r}: use one of {', '.join(ROLES)}")
        validate_label(f"{self.role} name", self.name)

    @property
    def uri(self) -> str:
        """The SPIFFE ID, as written in the certificate's SAN URI."""
        return f"{SPIFFE_SCHEME}{self.federation}/{self.role}/{self.name}"

    def __str__(self) -> str:
        return self.uri


def parse_spiffe_uri(uri: str) -> Identity:
    """Parse `spiffe://FEDERATION/{silo,admin}/NAME` strictly; InvalidArgument otherwise."""
    if not isinstance(uri, str) or len(uri) > 2048:
        raise InvalidArgument(f"SPIFFE ID {uri!r}: not a string of at most 2048 characters")
    m = _SPIFFE_RE.fullmatch(uri)
    if m is None:
        raise InvalidArgument(
            f"SPIFFE ID {uri!r}: expected spiffe://FEDERATION/silo/ID or "
            "spiffe://FEDERATION/admin/NAME with lower-case DNS labels"
        )
    return Identity(m["federation"], cast(Role, m["role"]), m["name"])


def _single_spiffe_uri(candidates: list[str], where: str) -> str:
    """The one SPIFFE URI among `candidates`; InvalidArgument when there are none or several."""
    spiffe = [c for c in candidates if c[: len(SPIFFE_SCHEME)].lower() == SPIFFE_SCHEME]
    if not spiffe:
        raise InvalidArgument(f"{where}: no SPIFFE URI in the subjectAltName")
    if len(spiffe) > 1:
        # The X.509-SVID specification allows exactly one; two would make the identity ambiguous.
        raise InvalidArgument(f"{where}: {len(spiffe)} SPIFFE URIs {spiffe!r}; expected one")
    return spiffe[0]


def identity_from_cert(cert: x509.Certificate) -> Identity:
    """The identity in a silo or admin certificate's SAN URI; InvalidArgument if none or several."""
    where = f"certificate {cert.subject.rfc4514_string()!r}"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise InvalidArgument(f"{where}: no subjectAltName extension") from None
    return parse_spiffe_uri(
        _single_spiffe_uri(san.get_values_for_type(x509.UniformResourceIdentifier), where)
    )


def check_key_strength(cert: x509.Certificate, where: str) -> None:
    """InvalidArgument unless the certificate's key is RSA >= 2048 bits, EC >= P-256 or Ed25519."""
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise InvalidArgument(f"{where}: RSA key of {key.key_size} bits; at least 2048")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.key_size < MIN_EC_BITS:
            raise InvalidArgument(f"{where}: EC key on {key.curve.name}; P-256 or stronger")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise InvalidArgument(f"{where}: {type(key).__name__} keys are not accepted")


def _peer_certificate(context: grpc.ServicerContext) -> x509.Certificate | None:
    """The verified client certificate (None without one)."""
    pems = (context.auth_context() or {}).get(PEM_PROPERTY)
    if not pems:
        return None
    return x509.load_pem_x509_certificate(pems[0])


def peer_identity(context: grpc.ServicerContext, federation: str) -> Identity:
    """The caller's identity from its verified client certificate, for `federation`.

    The TLS layer has already checked the chain to the federation CA; this reads the one SPIFFE
    URI among the certificate's URI-type SANs (no other SAN type, never the subject CN) and
    checks its key size. PermissionDenied when there is no certificate, no SPIFFE URI, more than
    one, a malformed one (a NUL included), a weak key, or an identity of another federation.
    """
    cert = _peer_certificate(context)
    if cert is None:
        raise PermissionDenied(
            f"peer {context.peer()}: no client certificate identity (mutual TLS required)"
        )
    where = f"peer {context.peer()}"
    try:
        check_key_strength(cert, where)
        ident = identity_from_cert(cert)
    except InvalidArgument as exc:
        raise PermissionDenied(str(exc)) from None
    if ident.federation != federation:
        raise PermissionDenied(
            f"{where}: identity {ident.uri!r} belongs to federation "
            f"{ident.federation!r}, not {federation!r}"
        )
    return ident


@functools.cache
def _warn_insecure(kind: str) -> None:
    # Once per process and kind: every request in insecure mode would otherwise repeat it.
    logger.warning(
        "insecure mode: %s identities are taken from the request's claim, not from a "
        "certificate; anyone who can reach this port can act as any %s",
        kind,
        kind,
    )


def insecure_identity(federation: str, role: Role, claimed_name: str) -> Identity:
    """The explicit `--insecure` path: the claimed name IS the identity (no TLS, no proof)."""
    _warn_insecure(role)
    try:
        return Identity(federation, role, claimed_name)
    except ConfigError as exc:
        raise PermissionDenied(f"claimed {role} {claimed_name!r}: {exc}") from None


def require_silo(
    context: grpc.ServicerContext,
    federation: str,
    claimed_silo_id: str,
    allow_list: Collection[str] | None,
    *,
    insecure: bool = False,
) -> Identity:
    """Check a silo request: certificate role silo, same id as claimed, id on the allow-list.

    `allow_list=None` admits every silo of the federation (say so explicitly; an empty collection
    admits none). With `insecure=True` (only behind `--insecure`) the claimed id is trusted.
    Returns the identity; raises PermissionDenied.
    """
    if insecure:
        ident = insecure_identity(federation, "silo", claimed_silo_id)
    else:
        ident = peer_identity(context, federation)
        if ident.role != "silo":
            raise PermissionDenied(f"{ident.uri} is a {ident.role} certificate, not a silo's")
        if ident.name != claimed_silo_id:
            raise PermissionDenied(
                f"{ident.uri} claims to be silo {claimed_silo_id!r}; a silo may act only as itself"
            )
    if allow_list is not None and ident.name not in allow_list:
        raise PermissionDenied(f"silo {ident.name!r} is not on this run's allow-list")
    return ident


def require_admin(
    context: grpc.ServicerContext, federation: str, *, insecure: bool = False
) -> Identity:
    """Check an admin request: an admin certificate of `federation`; PermissionDenied otherwise.

    With `insecure=True` every caller is the admin `insecure` (no TLS, no proof).
    """
    if insecure:
        return insecure_identity(federation, "admin", "insecure")
    ident = peer_identity(context, federation)
    if ident.role != "admin":
        raise PermissionDenied(f"{ident.uri} is a {ident.role} certificate; admin required")
    return ident


# --- turning PermissionDenied into a gRPC status -------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


def _abort(context: grpc.ServicerContext, exc: PermissionDenied) -> NoReturn:
    message = bounded(str(exc))
    logger.warning("permission denied for %s: %s", context.peer(), message)
    context.abort(grpc.StatusCode.PERMISSION_DENIED, message)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


Behaviour = Callable[[Any, grpc.ServicerContext], Any]
Check = Callable[[grpc.ServicerContext], object]


def _guard(behaviour: Behaviour, response_streaming: bool, check: Check | None) -> Behaviour:
    """`behaviour` preceded by `check(context)`, PermissionDenied from either mapped to a status."""
    if response_streaming:
        # A generator, so that PermissionDenied raised while streaming is mapped as well.
        def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                if check is not None:
                    check(context)
                yield from behaviour(request, context)
            except PermissionDenied as exc:
                _abort(context, exc)

        return streaming

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            if check is not None:
                check(context)
            return behaviour(request, context)
        except PermissionDenied as exc:
            _abort(context, exc)

    return unary


def guard_handler(
    handler: grpc.RpcMethodHandler, check: Check | None = None
) -> grpc.RpcMethodHandler:
    """A copy of `handler` that first runs `check(context)` (e.g. require_admin) and maps
    PermissionDenied, from the check or the behaviour, to PERMISSION_DENIED.

    Use it where a ServerInterceptor would be the natural place: an interceptor sees no auth
    context, the wrapped behaviour runs with the real ServicerContext.
    """
    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    rs = bool(handler.response_streaming)
    if handler.request_streaming and rs:
        return grpc.stream_stream_rpc_method_handler(_guard(handler.stream_stream, rs, check), **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_guard(handler.stream_unary, rs, check), **kw)
    if rs:
        return grpc.unary_stream_rpc_method_handler(_guard(handler.unary_stream, rs, check), **kw)
    return grpc.unary_unary_rpc_method_handler(_guard(handler.unary_unary, rs, check), **kw)


class PermissionInterceptor(grpc.ServerInterceptor):
    """Applies guard_handler(handler, check) to every method of the server it is installed on."""

    def __init__(self, check: Check | None = None) -> None:
        self.check = check

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        return None if handler is None else guard_handler(handler, self.check)


def admin_only_interceptor(federation: str, *, insecure: bool = False) -> PermissionInterceptor:
    """An interceptor admitting only admin certificates of `federation` (the control API).

    With `insecure=True` (only behind `--insecure`) it admits everyone and logs a warning.
    """
    validate_label("federation", federation)
    return PermissionInterceptor(lambda ctx: require_admin(ctx, federation, insecure=insecure))
