"""Per-round X25519 keys, their ECDSA signatures, peer certificate checks, and key derivation.

Each silo makes two fresh X25519 key pairs per round (mask agreement, share encryption) and signs
the canonical bytes of (run, round, silo id, both public keys) with its TLS key (ECDSA P-256,
SHA-256). A peer accepts the keys only if the attached certificate chains to the federation CA,
is valid now, is a client certificate and names exactly that silo in its SAN URI
``spiffe://FEDERATION/silo/SILO_ID``, and the signature verifies under it. The same signing
path and checks cover the consistency check: a survivor signs the canonical bytes of (run, round,
"unmask", sorted survivors, sorted dropped) and peers verify it against its certificate.

Derivations (HKDF-SHA256, no salt; info binds everything that must differ):
  mask seed  s_ij = HKDF(X25519(a_i, A_j), info = "mask" || run || round || lo || hi), 32 bytes
  share key  k_ij = HKDF(X25519(c_i, C_j), info = "share" || run || round || lo || hi), 32 bytes
where lo/hi are (index, silo id) of the two silos ordered by index, so both ends agree and no
mask key is ever reused across rounds or runs. Shares travel under AES-256-GCM with a random
96-bit nonce and (run, round, sender, receiver) as associated data.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from pf2lora.common.errors import InvalidArgument, PermissionDenied
from pf2lora.common.secagg.messages import (
    ConsistencySignature,
    SignedKeys,
    UnmaskProposal,
    canonical_bytes,
    check_silo_id,
    keys_payload,
)

logger = logging.getLogger(__name__)

Signer = Callable[[bytes], bytes]
"""Signs a payload with the silo's TLS key: ECDSA P-256 over SHA-256, DER-encoded signature."""

_NONCE_BYTES = 12


def make_signer(key: ec.EllipticCurvePrivateKey | Signer) -> Signer:
    """A Signer from a P-256 private key, or ``key`` itself if it already is a callable (HSM)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise InvalidArgument(f"the signing key must be ECDSA P-256, got {key.curve.name}")
        return lambda payload: key.sign(payload, ec.ECDSA(hashes.SHA256()))
    if callable(key):
        return key
    raise InvalidArgument(
        f"expected an EllipticCurvePrivateKey or a signer, got {type(key).__name__}"
    )


def x25519_public_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key of an X25519 private key."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True, repr=False)
class RoundKeyPairs:
    """A silo's two fresh X25519 private keys for one round (never leave the silo whole)."""

    mask: X25519PrivateKey
    share: X25519PrivateKey

    @classmethod
    def generate(cls) -> RoundKeyPairs:
        return cls(mask=X25519PrivateKey.generate(), share=X25519PrivateKey.generate())

    @property
    def mask_public(self) -> bytes:
        return x25519_public_bytes(self.mask)

    @property
    def share_public(self) -> bytes:
        return x25519_public_bytes(self.share)

    def mask_private_bytes(self) -> bytes:
        """The 32 raw bytes of the mask private key: the secret that is Shamir-shared."""
        return self.mask.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )


def sign_keys(
    signer: Signer,
    certificate_der: bytes,
    run_id: str,
    round_: int,
    silo_id: str,
    keys: RoundKeyPairs,
) -> SignedKeys:
    """Stage 1 message: both public keys signed over (run, round, silo id, keys)."""
    mask_public, share_public = keys.mask_public, keys.share_public
    signature = signer(keys_payload(run_id, round_, silo_id, mask_public, share_public))
    return SignedKeys(
        run_id=run_id,
        round=round_,
        silo_id=silo_id,
        mask_public_key=mask_public,
        share_public_key=share_public,
        signature=signature,
        certificate=certificate_der,
    )


def sign_unmask(
    signer: Signer, certificate_der: bytes, silo_id: str, proposal: UnmaskProposal
) -> ConsistencySignature:
    """Consistency-check message: the silo's signature over the proposal it was sent."""
    return ConsistencySignature(
        run_id=proposal.run_id,
        round=proposal.round,
        silo_id=silo_id,
        signature=signer(proposal.signed_payload()),
        certificate=certificate_der,
    )


class PeerVerifier:
    """Checks that signed keys and consistency signatures come from the silo they name, per the
    federation's PKI.

    ``ca_certificates``: the federation CA(s) (trust anchors). ``federation``: the trust domain in
    ``spiffe://FEDERATION/silo/SILO_ID``. ``clock``: current time (tests inject one).
    """

    def __init__(
        self,
        ca_certificates: Sequence[x509.Certificate],
        federation: str,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        if not ca_certificates:
            raise InvalidArgument("at least one federation CA certificate is required")
        if not federation or "/" in federation:
            raise InvalidArgument(
                f"federation must be a non-empty name without '/', got {federation!r}"
            )
        self._store = Store(list(ca_certificates))
        self._federation = federation
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._cache: dict[tuple[bytes, str], ec.EllipticCurvePublicKey] = {}

    def silo_uri(self, silo_id: str) -> str:
        return f"spiffe://{self._federation}/silo/{silo_id}"

    def verify_certificate(self, certificate_der: bytes, silo_id: str) -> ec.EllipticCurvePublicKey:
        """The certificate's P-256 public key if it is a valid client certificate for
        ``silo_id`` under the federation CA; PermissionDenied otherwise."""
        check_silo_id(silo_id)
        digest = hashlib.sha256(certificate_der).digest()
        cached = self._cache.get((digest, silo_id))
        if cached is not None:
            return cached
        try:
            cert = x509.load_der_x509_certificate(certificate_der)
        except ValueError as exc:
            raise PermissionDenied(f"silo {silo_id}: unreadable certificate ({exc})") from exc
        now = self._clock()
        try:
            verifier = PolicyBuilder().store(self._store).time(now).build_client_verifier()
            verified = verifier.verify(cert, [])
        except VerificationError as exc:
            raise PermissionDenied(
                f"silo {silo_id}: certificate does not verify against the federation CA ({exc})"
            ) from exc
        uris = {
            name.value
            for name in verified.subjects or ()
            if isinstance(name, x509.UniformResourceIdentifier)
        }
        silo_uris = {u for u in uris if u.startswith("spiffe://")}
        expected = self.silo_uri(silo_id)
        if silo_uris != {expected}:
            raise PermissionDenied(
                f"silo {silo_id}: certificate identity {sorted(silo_uris)} is not {expected}"
            )
        public_key = cert.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise PermissionDenied(f"silo {silo_id}: certificate key is not ECDSA P-256")
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[(digest, silo_id)] = public_key
        return public_key

    def verify_signed_keys(self, message: SignedKeys, run_id: str, round_: int) -> None:
        """Refuse (PermissionDenied) keys for another run or round, or not signed by the silo
        they name (a substituted key, a signature under another silo's certificate)."""
        if message.run_id != run_id or message.round != round_:
            raise PermissionDenied(
                f"silo {message.silo_id}: keys are for run {message.run_id!r} round "
                f"{message.round}, expected run {run_id!r} round {round_} (replayed?)"
            )
        self._verify_signature(
            message.certificate,
            message.silo_id,
            message.signature,
            message.signed_payload(),
            "signature over its round keys does not verify (substituted key?)",
        )

    def verify_consistency_signature(
        self, signature: ConsistencySignature, proposal: UnmaskProposal
    ) -> None:
        """Refuse (PermissionDenied) a consistency signature that is not ``signature.silo_id``'s
        signature over exactly ``proposal`` (another survivor set, run or round, another key)."""
        if (signature.run_id, signature.round) != (proposal.run_id, proposal.round):
            raise PermissionDenied(
                f"silo {signature.silo_id}: consistency signature is for run "
                f"{signature.run_id!r} round {signature.round}, expected run "
                f"{proposal.run_id!r} round {proposal.round} (replayed?)"
            )
        self._verify_signature(
            signature.certificate,
            signature.silo_id,
            signature.signature,
            proposal.signed_payload(),
            "consistency signature does not verify over this unmask proposal",
        )

    def _verify_signature(
        self, certificate: bytes, silo_id: str, signature: bytes, payload: bytes, failure: str
    ) -> None:
        """PermissionDenied("silo ID: failure") unless `signature` over `payload` verifies under
        the key of `certificate`, which must be silo_id's (verify_certificate)."""
        public_key = self.verify_certificate(certificate, silo_id)
        try:
            public_key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise PermissionDenied(f"silo {silo_id}: {failure}") from None


def _exchange(private_key: X25519PrivateKey, peer_public: bytes) -> bytes:
    try:
        return private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # all-zero output from a low-order point
        raise PermissionDenied(f"X25519 key agreement failed ({exc})") from exc


def _ordered(run_id: str, round_: int, a: tuple[int, str], b: tuple[int, str]) -> tuple:
    (lo_i, lo_id), (hi_i, hi_id) = sorted((a, b))
    if lo_i == hi_i:
        raise InvalidArgument(f"a silo cannot agree a key with itself (index {lo_i})")
    return (run_id, round_, lo_i, lo_id, hi_i, hi_id)


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def mask_seed(
    private_key: X25519PrivateKey,
    peer_public: bytes,
    run_id: str,
    round_: int,
    me: tuple[int, str],
    peer: tuple[int, str],
) -> bytes:
    """s_ij: the 32-byte pairwise mask seed of silos ``me`` and ``peer`` (index, id)."""
    info = canonical_bytes("pf2lora/secagg/v1/mask", *_ordered(run_id, round_, me, peer))
    return _hkdf(_exchange(private_key, peer_public), info)


def share_key(
    private_key: X25519PrivateKey,
    peer_public: bytes,
    run_id: str,
    round_: int,
    me: tuple[int, str],
    peer: tuple[int, str],
) -> bytes:
    """k_ij: the 32-byte AES-256-GCM key for shares between ``me`` and ``peer`` (index, id)."""
    info = canonical_bytes("pf2lora/secagg/v1/share", *_ordered(run_id, round_, me, peer))
    return _hkdf(_exchange(private_key, peer_public), info)


def _share_ad(run_id: str, round_: int, sender: str, receiver: str) -> bytes:
    return canonical_bytes("pf2lora/secagg/v1/share-ad", run_id, round_, sender, receiver)


def encrypt_share(
    key: bytes, plaintext: bytes, run_id: str, round_: int, sender: str, receiver: str
) -> bytes:
    """nonce || AES-256-GCM(plaintext) with (run, round, sender, receiver) authenticated."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(
        nonce, plaintext, _share_ad(run_id, round_, sender, receiver)
    )


def decrypt_share(
    key: bytes, ciphertext: bytes, run_id: str, round_: int, sender: str, receiver: str
) -> bytes:
    """Inverse of encrypt_share; PermissionDenied if it was altered or redirected."""
    if len(ciphertext) < _NONCE_BYTES + 16:
        raise PermissionDenied(f"share from {sender} to {receiver} is truncated")
    nonce, body = ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:]
    try:
        return AESGCM(key).decrypt(nonce, body, _share_ad(run_id, round_, sender, receiver))
    except InvalidTag:
        raise PermissionDenied(
            f"share from {sender} to {receiver} fails authentication (altered or redirected)"
        ) from None
