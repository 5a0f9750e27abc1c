"""The silo side of SecAgg+: one ``SecAggSilo`` per silo and round, driven stage by stage.

    advertise_keys -> receive_keys -> share_keys -> receive_shares -> masked_input
        -> consistency_check -> unmask

Each call checks it comes in order (FailedPrecondition otherwise). The silo trusts nothing the
coordinator relays: peers' keys must carry a valid signature from that peer's certificate, shares
must decrypt under a key only the two silos share, it masks its input only if enough of its share
holders sent it shares (the mask floor), it signs at most one unmask proposal per round and only a
consistent one, and it answers an unmask request at most once, only for the proposal it signed and
only with a quorum of valid signatures on that proposal from survivors (docs/security.md).
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Sequence

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pf2lora.common.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from pf2lora.common.secagg import fixedpoint, shamir
from pf2lora.common.secagg.config import RoundPlan, SecAggConfig
from pf2lora.common.secagg.keys import (
    PeerVerifier,
    RoundKeyPairs,
    Signer,
    decrypt_share,
    encrypt_share,
    make_signer,
    mask_seed,
    share_key,
    sign_keys,
    sign_unmask,
)
from pf2lora.common.secagg.messages import (
    ConsistencySignature,
    EncryptedShare,
    OwnedShare,
    SignedKeys,
    UnmaskProposal,
    UnmaskRequest,
    UnmaskResponse,
)
from pf2lora.common.secagg.prg import SEED_BYTES, MaskExpander

logger = logging.getLogger(__name__)

SECRET_BYTES = 32  # b_i and the X25519 mask private key


class SiloStage(enum.Enum):
    NEW = "new"
    KEYS_SENT = "keys_sent"
    KEYS_RECEIVED = "keys_received"
    SHARES_SENT = "shares_sent"
    SHARES_RECEIVED = "shares_received"
    MASKED = "masked"
    SIGNED = "signed"
    DONE = "done"


class SecAggSilo:
    """One silo's state for one round of secure aggregation.

    ``silo_ids``: every silo of the round (the same list the coordinator uses). ``signing_key``:
    the silo's TLS private key (P-256) or a signer callable; ``certificate``: its TLS certificate,
    attached to the signed keys so peers can check them. ``verifier``: checks peers' certificates.
    """

    def __init__(
        self,
        run_id: str,
        round_: int,
        silo_id: str,
        silo_ids: Sequence[str],
        signing_key: ec.EllipticCurvePrivateKey | Signer,
        certificate: x509.Certificate | bytes,
        verifier: PeerVerifier,
        config: SecAggConfig | None = None,
    ) -> None:
        self.plan: RoundPlan = (config or SecAggConfig()).plan(run_id, round_, silo_ids)
        self.silo_id = silo_id
        self._index = self.plan.index(silo_id)
        self._signer = make_signer(signing_key)
        if isinstance(certificate, x509.Certificate):
            certificate = certificate.public_bytes(serialization.Encoding.DER)
        self._certificate = certificate
        self._verifier = verifier
        self._keys = RoundKeyPairs.generate()
        self._self_seed = os.urandom(SEED_BYTES)  # b_i, fresh per round
        self._stage = SiloStage.NEW
        self._own_keys: SignedKeys | None = None
        self._peer_keys: dict[str, SignedKeys] = {}  # verified neighbours (U1 ∩ N(i))
        self._held: dict[str, tuple[int, int]] = {}  # owner -> (share of b_owner, of sk_owner)
        self._maskers: tuple[str, ...] = ()  # neighbours that reached the share stage
        self._signed: UnmaskProposal | None = None  # the one proposal this silo signed
        self._own_signature: ConsistencySignature | None = None
        self.clipped_fraction: float | None = None

    @property
    def stage(self) -> SiloStage:
        return self._stage

    def _expect(self, stage: SiloStage, action: str) -> None:
        if self._stage is not stage:
            raise FailedPrecondition(
                f"silo {self.silo_id}: cannot {action} in stage {self._stage.value} "
                f"(expected {stage.value})"
            )

    def _peer(self, silo_id: str) -> tuple[int, str]:
        return (self.plan.index(silo_id), silo_id)

    # Stage 1 ----------------------------------------------------------------------------------
    def advertise_keys(self) -> SignedKeys:
        """This round's two public keys, signed with the silo's TLS key."""
        self._expect(SiloStage.NEW, "advertise keys")
        message = sign_keys(
            self._signer,
            self._certificate,
            self.plan.run_id,
            self.plan.round,
            self.silo_id,
            self._keys,
        )
        self._own_keys = message
        self._stage = SiloStage.KEYS_SENT
        return message

    def receive_keys(self, keys: Sequence[SignedKeys]) -> None:
        """Verify every relayed neighbour key (PermissionDenied on any bad one: the round is
        aborted rather than continued with a key the coordinator might control)."""
        self._expect(SiloStage.KEYS_SENT, "receive keys")
        neighbours = self.plan.neighbours[self.silo_id]
        accepted: dict[str, SignedKeys] = {}
        for message in keys:
            if message.silo_id == self.silo_id:
                if message != self._own_keys:
                    raise PermissionDenied(f"silo {self.silo_id}: its own keys came back altered")
                continue
            if message.silo_id not in neighbours:
                raise PermissionDenied(
                    f"silo {self.silo_id}: received keys of {message.silo_id!r}, not a neighbour"
                )
            if message.silo_id in accepted:
                raise PermissionDenied(
                    f"silo {self.silo_id}: received two key sets for {message.silo_id}"
                )
            self._verifier.verify_signed_keys(message, self.plan.run_id, self.plan.round)
            accepted[message.silo_id] = message
        if len(accepted) + 1 < self.plan.threshold:
            raise FailedPrecondition(
                f"silo {self.silo_id}: only {len(accepted)} neighbours advertised keys; "
                f"threshold {self.plan.threshold} needs at least {self.plan.threshold - 1}"
            )
        self._peer_keys = accepted
        self._stage = SiloStage.KEYS_RECEIVED
        logger.debug("silo %s: verified keys of %d neighbours", self.silo_id, len(accepted))

    # Stage 2 ----------------------------------------------------------------------------------
    def share_keys(self) -> list[EncryptedShare]:
        """Shamir-share b_i and the mask private key among itself and the verified neighbours;
        one AES-GCM-encrypted share pair per neighbour (its own pair stays here)."""
        self._expect(SiloStage.KEYS_RECEIVED, "share keys")
        holders = [self.silo_id, *self._peer_keys]
        xs = [self.plan.index(h) for h in holders]
        b_shares = shamir.split(self._self_seed, self.plan.threshold, xs)
        sk_shares = shamir.split(self._keys.mask_private_bytes(), self.plan.threshold, xs)
        run_id, round_ = self.plan.run_id, self.plan.round
        out: list[EncryptedShare] = []
        for holder, x in zip(holders, xs, strict=True):
            if holder == self.silo_id:
                self._held[holder] = (b_shares[x], sk_shares[x])
                continue
            key = share_key(
                self._keys.share,
                self._peer_keys[holder].share_public_key,
                run_id,
                round_,
                (self._index, self.silo_id),
                self._peer(holder),
            )
            plaintext = shamir.share_to_bytes(b_shares[x]) + shamir.share_to_bytes(sk_shares[x])
            out.append(
                EncryptedShare(
                    run_id=run_id,
                    round=round_,
                    sender=self.silo_id,
                    receiver=holder,
                    ciphertext=encrypt_share(key, plaintext, run_id, round_, self.silo_id, holder),
                )
            )
        self._stage = SiloStage.SHARES_SENT
        return out

    def receive_shares(self, shares: Sequence[EncryptedShare]) -> None:
        """Decrypt the shares neighbours sent; their senders are the peers this silo masks with.

        The mask floor: the holders of this silo's shares (itself and every neighbour whose keys
        it accepted) that it will NOT mask with, itself included, must be fewer than t.
        Otherwise a coordinator that withheld shares could declare every peer it masks with
        dropped and still collect t shares of its self-mask seed from the others (the routing
        attack; proof in docs/security.md). FailedPrecondition, and no masked input, if not.
        """
        self._expect(SiloStage.SHARES_SENT, "receive shares")
        run_id, round_ = self.plan.run_id, self.plan.round
        received: dict[str, tuple[int, int]] = {}
        for share in shares:
            if (share.run_id, share.round) != (run_id, round_):
                raise FailedPrecondition(
                    f"silo {self.silo_id}: share for run {share.run_id!r} round {share.round}"
                )
            if share.receiver != self.silo_id:
                raise PermissionDenied(f"silo {self.silo_id}: got a share for {share.receiver}")
            if share.sender not in self._peer_keys:
                raise PermissionDenied(
                    f"silo {self.silo_id}: share from {share.sender!r}, whose keys it did not "
                    "accept"
                )
            if share.sender in received:
                raise PermissionDenied(f"silo {self.silo_id}: two shares from {share.sender}")
            key = share_key(
                self._keys.share,
                self._peer_keys[share.sender].share_public_key,
                run_id,
                round_,
                (self._index, self.silo_id),
                self._peer(share.sender),
            )
            plaintext = decrypt_share(
                key, share.ciphertext, run_id, round_, share.sender, self.silo_id
            )
            if len(plaintext) != 2 * shamir.SHARE_BYTES:
                raise InvalidArgument(f"silo {self.silo_id}: malformed share from {share.sender}")
            received[share.sender] = (
                shamir.share_from_bytes(plaintext[: shamir.SHARE_BYTES]),
                shamir.share_from_bytes(plaintext[shamir.SHARE_BYTES :]),
            )
        if len(received) + 1 < self.plan.threshold:
            raise FailedPrecondition(
                f"silo {self.silo_id}: only {len(received)} neighbours sent shares; "
                f"threshold {self.plan.threshold} needs at least {self.plan.threshold - 1}"
            )
        holders = len(self._peer_keys) + 1
        unmasked_holders = holders - len(received)  # itself + holders whose shares are missing
        if unmasked_holders >= self.plan.threshold:
            raise FailedPrecondition(
                f"silo {self.silo_id}: refusing to mask with only {len(received)} of the "
                f"{len(self._peer_keys)} neighbours holding its shares: {unmasked_holders} "
                f"holders outside its mask set (itself included) reach the threshold "
                f"{self.plan.threshold}; it needs shares from at least "
                f"{holders - self.plan.threshold + 1}"
            )
        self._held.update(received)
        self._maskers = tuple(sorted(received, key=self.plan.index))
        self._stage = SiloStage.SHARES_RECEIVED

    # Stage 3 ----------------------------------------------------------------------------------
    def masked_input(self, vector: np.ndarray) -> np.ndarray:
        """y_i = x_i + PRG(b_i) + sum_{j<i} PRG(s_ij) - sum_{j>i} PRG(s_ij)  (mod 2^32).

        ``vector``: the silo's flat float32 update, already weighted. Returns uint32 (L,).
        """
        self._expect(SiloStage.SHARES_RECEIVED, "mask its input")
        masked, clipped = fixedpoint.encode(vector, self.plan.clip, self.plan.frac_bits)
        self.clipped_fraction = clipped
        log = logger.warning if clipped > 0.01 else logger.info
        log(
            "silo %s round %d: %.4f%% of coordinates clipped to +-%g",
            self.silo_id,
            self.plan.round,
            100 * clipped,
            self.plan.clip,
        )
        expander = MaskExpander()
        expander.apply(masked, self._self_seed, 1)
        for peer in self._maskers:
            seed = mask_seed(
                self._keys.mask,
                self._peer_keys[peer].mask_public_key,
                self.plan.run_id,
                self.plan.round,
                (self._index, self.silo_id),
                self._peer(peer),
            )
            expander.apply(masked, seed, 1 if self.plan.index(peer) < self._index else -1)
        self._stage = SiloStage.MASKED
        return masked

    # Stage 4 ----------------------------------------------------------------------------------
    def consistency_check(self, proposal: UnmaskProposal) -> ConsistencySignature:
        """Sign the proposed (survivors, dropped) with the TLS key; at most one proposal a round.

        Refuses (PermissionDenied) a proposal naming unknown silos, a silo both alive and
        dropped, this silo as not alive, fewer survivors than ``plan.signature_quorum`` (the
        signatures must come from survivors), or fewer than t - 1 of the peers this silo masks
        with among the survivors (the sum containing its update would then cover fewer than t
        silos; an honest round with this silo's seed recoverable always passes).
        """
        self._expect(SiloStage.MASKED, "sign an unmask proposal")
        if (proposal.run_id, proposal.round) != (self.plan.run_id, self.plan.round):
            raise FailedPrecondition(
                f"silo {self.silo_id}: unmask proposal for run {proposal.run_id!r} round "
                f"{proposal.round}"
            )
        survivors, dropped = set(proposal.survivors), set(proposal.dropped)
        unknown = (survivors | dropped) - set(self.plan.silo_ids)
        if unknown:
            raise PermissionDenied(
                f"silo {self.silo_id}: unmask proposal names unknown silos {sorted(unknown)}"
            )
        both = survivors & dropped
        if both:
            raise PermissionDenied(
                f"silo {self.silo_id}: refusing to sign, {sorted(both)} listed both alive and "
                "dropped (that would reveal their update)"
            )
        if self.silo_id not in survivors:
            raise PermissionDenied(f"silo {self.silo_id}: unmask proposal does not list it alive")
        if len(survivors) < self.plan.signature_quorum:
            raise PermissionDenied(
                f"silo {self.silo_id}: only {len(survivors)} survivors, below the quorum "
                f"{self.plan.signature_quorum} (threshold {self.plan.threshold})"
            )
        alive_maskers = len(survivors.intersection(self._maskers))
        if alive_maskers < self.plan.threshold - 1:
            raise PermissionDenied(
                f"silo {self.silo_id}: only {alive_maskers} of the peers it masks with are "
                f"survivors, fewer than threshold - 1 = {self.plan.threshold - 1}: its update "
                "would be summed with too few others"
            )
        signature = sign_unmask(self._signer, self._certificate, self.silo_id, proposal)
        self._signed, self._own_signature = proposal, signature
        self._stage = SiloStage.SIGNED
        return signature

    # Stage 5 ----------------------------------------------------------------------------------
    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Shares of b_j for surviving and of the mask key for dropped neighbours; answered once.

        Refuses (PermissionDenied) a request whose (run, round, survivors, dropped) is not the
        proposal this silo signed, or that carries fewer than ``plan.signature_quorum`` valid
        signatures over that proposal from distinct survivors (each checked against the
        signer's certificate with the PeerVerifier; invalid ones are logged and not counted).
        """
        self._expect(SiloStage.SIGNED, "unmask")
        assert self._signed is not None
        if (request.run_id, request.round) != (self.plan.run_id, self.plan.round):
            raise FailedPrecondition(
                f"silo {self.silo_id}: unmask request for run {request.run_id!r} round "
                f"{request.round}"
            )
        proposal = request.proposal
        if proposal != self._signed:
            raise PermissionDenied(
                f"silo {self.silo_id}: unmask request (survivors {list(proposal.survivors)}, "
                f"dropped {list(proposal.dropped)}) differs from the proposal it signed"
            )
        self._check_quorum(request)
        self._stage = SiloStage.DONE  # before answering: never a second answer
        survivors, dropped = set(proposal.survivors), set(proposal.dropped)
        self_mask = tuple(
            OwnedShare(owner, shamir.share_to_bytes(self._held[owner][0]))
            for owner in sorted(survivors & self._held.keys(), key=self.plan.index)
        )
        mask_keys = tuple(
            OwnedShare(owner, shamir.share_to_bytes(self._held[owner][1]))
            for owner in sorted(dropped & self._held.keys(), key=self.plan.index)
        )
        self._held.clear()
        return UnmaskResponse(
            run_id=self.plan.run_id,
            round=self.plan.round,
            silo_id=self.silo_id,
            self_mask_shares=self_mask,
            mask_key_shares=mask_keys,
        )

    def _check_quorum(self, request: UnmaskRequest) -> None:
        """PermissionDenied unless ``plan.signature_quorum`` distinct survivors validly signed
        the request's proposal (stops verifying once the quorum is reached)."""
        proposal, quorum = request.proposal, self.plan.signature_quorum
        survivors = set(proposal.survivors)
        valid: set[str] = set()
        for signature in request.signatures:
            if len(valid) >= quorum:
                break
            if signature.silo_id not in survivors:
                logger.warning(
                    "silo %s: ignoring a consistency signature of %s, not a survivor",
                    self.silo_id,
                    signature.silo_id,
                )
                continue
            if signature == self._own_signature:
                valid.add(self.silo_id)
                continue
            try:
                self._verifier.verify_consistency_signature(signature, proposal)
            except PermissionDenied as exc:
                logger.warning(
                    "silo %s: ignoring an invalid consistency signature: %s", self.silo_id, exc
                )
                continue
            valid.add(signature.silo_id)
        if len(valid) < quorum:
            raise PermissionDenied(
                f"silo {self.silo_id}: refusing to unmask, only {len(valid)} valid consistency "
                f"signatures from distinct survivors, the quorum is {quorum}"
            )
