"""Plain SecAgg+ protocol messages (str, int, bytes and tuples only) and their canonical bytes.

A transport (the gRPC layer) carries these field by field; the masked input itself is a uint32
numpy vector carried as raw little-endian bytes in chunks. Every message is validated at
construction, so a ``*_from_proto`` conversion that builds one gets the checks for free.
``wire_size()`` estimates the protobuf encoding (field bytes + tag and length prefixes).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from pf2lora.common.errors import InvalidArgument
from pf2lora.common.names import LABEL_RULE, is_label

logger = logging.getLogger(__name__)

PUBLIC_KEY_BYTES = 32  # X25519 raw public key

_MAX_SIGNATURE_BYTES = 80  # ECDSA P-256 DER signatures are at most 72 bytes
_MAX_CERTIFICATE_BYTES = 16384
_MAX_CIPHERTEXT_BYTES = 1024


def check_silo_id(silo_id: object, field: str = "silo_id") -> str:
    """``silo_id`` if it is a well-formed silo id, else InvalidArgument naming ``field``."""
    if not is_label(silo_id):
        raise InvalidArgument(f"{field}={silo_id!r}: {LABEL_RULE}")
    return silo_id


def _check_header(run_id: object, round_: object) -> None:
    if not isinstance(run_id, str) or not 0 < len(run_id) <= 256:
        raise InvalidArgument(
            f"run_id must be a non-empty string of <= 256 characters, got {run_id!r}"
        )
    if not isinstance(round_, int) or isinstance(round_, bool) or round_ < 0:
        raise InvalidArgument(f"round must be a non-negative integer, got {round_!r}")


def _check_bytes(value: object, field: str, exact: int | None = None, limit: int = 0) -> None:
    if not isinstance(value, bytes):
        raise InvalidArgument(f"{field} must be bytes, got {type(value).__name__}")
    if exact is not None and len(value) != exact:
        raise InvalidArgument(f"{field} must be {exact} bytes, got {len(value)}")
    if limit and not 0 < len(value) <= limit:
        raise InvalidArgument(f"{field} must be 1..{limit} bytes, got {len(value)}")


def canonical_bytes(*fields: str | int | bytes) -> bytes:
    """An unambiguous encoding of a field sequence: type tag + length prefix + value per field."""
    out = bytearray()
    for field in fields:
        if isinstance(field, bool):
            raise TypeError("booleans are not canonical fields")
        if isinstance(field, int):
            out += b"i" + struct.pack(">q", field)
        elif isinstance(field, str):
            data = field.encode("utf-8")
            out += b"s" + struct.pack(">I", len(data)) + data
        elif isinstance(field, bytes):
            out += b"b" + struct.pack(">I", len(field)) + field
        else:
            raise TypeError(f"unsupported canonical field type {type(field).__name__}")
    return bytes(out)


def _field_size(length: int) -> int:
    """Protobuf bytes of one length-delimited field: 1-byte tag + varint length + payload."""
    varint = 1
    while length >= 1 << (7 * varint):
        varint += 1
    return 1 + varint + length


def _header_size(run_id: str, round_: int) -> int:
    return _field_size(len(run_id.encode())) + 1 + max(1, (round_.bit_length() + 6) // 7)


@dataclass(frozen=True)
class SignedKeys:
    """Stage 1, silo -> coordinator -> every neighbour: a silo's two fresh X25519 public keys,
    signed with its TLS key; ``certificate`` (DER) lets peers check the signer's identity."""

    run_id: str
    round: int
    silo_id: str
    mask_public_key: bytes
    share_public_key: bytes
    signature: bytes
    certificate: bytes

    def __post_init__(self) -> None:
        _check_header(self.run_id, self.round)
        check_silo_id(self.silo_id)
        _check_bytes(self.mask_public_key, "mask_public_key", exact=PUBLIC_KEY_BYTES)
        _check_bytes(self.share_public_key, "share_public_key", exact=PUBLIC_KEY_BYTES)
        _check_bytes(self.signature, "signature", limit=_MAX_SIGNATURE_BYTES)
        _check_bytes(self.certificate, "certificate", limit=_MAX_CERTIFICATE_BYTES)

    def signed_payload(self) -> bytes:
        """The bytes the signature covers: domain tag, run, round, silo id, both keys."""
        return keys_payload(
            self.run_id, self.round, self.silo_id, self.mask_public_key, self.share_public_key
        )

    def wire_size(self) -> int:
        return (
            _header_size(self.run_id, self.round)
            + _field_size(len(self.silo_id))
            + 2 * _field_size(PUBLIC_KEY_BYTES)
            + _field_size(len(self.signature))
            + _field_size(len(self.certificate))
        )


def keys_payload(
    run_id: str, round_: int, silo_id: str, mask_public_key: bytes, share_public_key: bytes
) -> bytes:
    """Canonical bytes of (run, round, silo id, both public keys), as signed in stage 1."""
    return canonical_bytes(
        "pf2lora/secagg/v1/keys", run_id, round_, silo_id, mask_public_key, share_public_key
    )


@dataclass(frozen=True)
class EncryptedShare:
    """Stage 2, sender -> coordinator -> receiver: the receiver's Shamir shares of the sender's
    self-mask seed and mask private key, AES-GCM encrypted (nonce || ciphertext || tag) under a
    key only the two silos can derive, with (run, round, sender, receiver) as associated data."""

    run_id: str
    round: int
    sender: str
    receiver: str
    ciphertext: bytes

    def __post_init__(self) -> None:
        _check_header(self.run_id, self.round)
        check_silo_id(self.sender, "sender")
        check_silo_id(self.receiver, "receiver")
        _check_bytes(self.ciphertext, "ciphertext", limit=_MAX_CIPHERTEXT_BYTES)

    def wire_size(self) -> int:
        return (
            _header_size(self.run_id, self.round)
            + _field_size(len(self.sender))
            + _field_size(len(self.receiver))
            + _field_size(len(self.ciphertext))
        )


def _check_sorted_ids(value: object, field: str) -> None:
    """``value`` must be a tuple of silo ids in strictly increasing order (canonical: sorted, no
    repeats), so one survivor set has exactly one encoding and one signed payload."""
    if not isinstance(value, tuple):
        raise InvalidArgument(f"{field} must be a tuple of silo ids")
    for silo_id in value:
        check_silo_id(silo_id, field)
    if any(a >= b for a, b in zip(value, value[1:], strict=False)):
        raise InvalidArgument(f"{field} must be sorted and list each silo once, got {list(value)}")


def unmask_payload(
    run_id: str, round_: int, survivors: tuple[str, ...], dropped: tuple[str, ...]
) -> bytes:
    """Canonical bytes of (run, round, "unmask", survivors, dropped), as signed in the
    consistency check. The counts keep the two lists apart."""
    return canonical_bytes(
        "pf2lora/secagg/v1/unmask",
        run_id,
        round_,
        "unmask",
        len(survivors),
        *survivors,
        len(dropped),
        *dropped,
    )


@dataclass(frozen=True)
class UnmaskProposal:
    """Stage 4 (consistency check), coordinator -> each survivor: the proposed survivor set U3
    (silos that sent a masked input) and the dropped silos (shared keys, sent no masked input).
    Both tuples are sorted silo ids; the silo checks that they are disjoint before signing."""

    run_id: str
    round: int
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_header(self.run_id, self.round)
        _check_sorted_ids(self.survivors, "survivors")
        _check_sorted_ids(self.dropped, "dropped")

    def signed_payload(self) -> bytes:
        """The bytes each survivor signs: domain tag, run, round, "unmask", both sorted lists."""
        return unmask_payload(self.run_id, self.round, self.survivors, self.dropped)

    def wire_size(self) -> int:
        ids = self.survivors + self.dropped
        return _header_size(self.run_id, self.round) + sum(_field_size(len(s)) for s in ids)


@dataclass(frozen=True)
class ConsistencySignature:
    """Stage 4, survivor -> coordinator: the silo's TLS-key signature (ECDSA P-256, SHA-256,
    DER) over ``UnmaskProposal.signed_payload()``; ``certificate`` (DER) lets every other
    survivor check it, neighbour or not."""

    run_id: str
    round: int
    silo_id: str
    signature: bytes
    certificate: bytes

    def __post_init__(self) -> None:
        _check_header(self.run_id, self.round)
        check_silo_id(self.silo_id)
        _check_bytes(self.signature, "signature", limit=_MAX_SIGNATURE_BYTES)
        _check_bytes(self.certificate, "certificate", limit=_MAX_CERTIFICATE_BYTES)

    def wire_size(self) -> int:
        return (
            _header_size(self.run_id, self.round)
            + _field_size(len(self.silo_id))
            + _field_size(len(self.signature))
            + _field_size(len(self.certificate))
        )


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 5, coordinator -> each survivor that signed: the proposal it signed (run, round,
    survivors, dropped) and the consistency signatures the coordinator collected, at most one
    per silo. A silo answers only the proposal it signed, and only with enough valid signatures
    from survivors (``RoundPlan.signature_quorum``)."""

    run_id: str
    round: int
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    signatures: tuple[ConsistencySignature, ...]

    def __post_init__(self) -> None:
        _check_header(self.run_id, self.round)
        _check_sorted_ids(self.survivors, "survivors")
        _check_sorted_ids(self.dropped, "dropped")
        if not isinstance(self.signatures, tuple) or not all(
            isinstance(s, ConsistencySignature) for s in self.signatures
        ):
            raise InvalidArgument("signatures must be a tuple of ConsistencySignature")
        for signature in self.signatures:
            if (signature.run_id, signature.round) != (self.run_id, self.round):
                raise InvalidArgument(
                    f"signature of {signature.silo_id} is for run {signature.run_id!r} round "
                    f"{signature.round}, the request for run {self.run_id!r} round {self.round}"
                )
        signers = [s.silo_id for s in self.signatures]
        if len(set(signers)) != len(signers):
            raise InvalidArgument(f"signatures list a silo twice: {sorted(signers)}")

    @property
    def proposal(self) -> UnmaskProposal:
        """The proposal this request answers (what its signatures must cover)."""
        return UnmaskProposal(self.run_id, self.round, self.survivors, self.dropped)

    def wire_size(self) -> int:
        return self.proposal.wire_size() + sum(_field_size(s.wire_size()) for s in self.signatures)


@dataclass(frozen=True)
class OwnedShare:
    """One Shamir share value (66 bytes) of a secret belonging to silo ``owner``."""

    owner: str
    share: bytes

    def __post_init__(self) -> None:
        check_silo_id(self.owner, "owner")
        _check_bytes(self.share, "share", exact=66)

    def wire_size(self) -> int:
        return _field_size(_field_size(len(self.owner)) + _field_size(len(self.share)))


@dataclass(frozen=True)
class UnmaskResponse:
    """Stage 5, survivor -> coordinator: its shares of b_j for surviving neighbours j
    (``self_mask_shares``) and of the mask private key for dropped ones (``mask_key_shares``)."""

    run_id: str
    round: int
    silo_id: str
    self_mask_shares: tuple[OwnedShare, ...]
    mask_key_shares: tuple[OwnedShare, ...]

    def __post_init__(self) -> None:
        _check_header(self.run_id, self.round)
        check_silo_id(self.silo_id)
        for field in ("self_mask_shares", "mask_key_shares"):
            value = getattr(self, field)
            if not isinstance(value, tuple) or not all(isinstance(s, OwnedShare) for s in value):
                raise InvalidArgument(f"{field} must be a tuple of OwnedShare")
        owners = [s.owner for s in self.self_mask_shares + self.mask_key_shares]
        if len(set(owners)) != len(owners):
            raise InvalidArgument("an unmask response must not carry two shares of one owner")

    def wire_size(self) -> int:
        shares = self.self_mask_shares + self.mask_key_shares
        return (
            _header_size(self.run_id, self.round)
            + _field_size(len(self.silo_id))
            + sum(s.wire_size() for s in shares)
        )
