"""The coordinator side of SecAgg+: relays keys and shares, sums masked vectors, removes masks.

    receive_keys* -> close_keys -> receive_shares* -> close_shares
        -> receive_masked_input* -> close_masked_inputs -> receive_consistency*
        -> close_consistency -> receive_unmask* -> finish

The coordinator checks only structure (run, round, roster, neighbourhood, sizes): signatures are
the silos' business (a silo unmasks only given a quorum of valid consistency signatures). It
never holds an individual unmasked update: each masked vector is added to a running uint32 sum on
arrival, and the only things removed from that sum are the survivors' self masks and the pairwise
masks that dropped silos left in their neighbours' inputs. A stage closes with FailedPrecondition
when fewer than ``threshold`` silos remain (fewer than ``signature_quorum`` survivors or signers
for the masked-input and consistency stages).
"""

from __future__ import annotations

import enum
import logging
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from pf2lora.common.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from pf2lora.common.secagg import fixedpoint, shamir
from pf2lora.common.secagg.config import RoundPlan, SecAggConfig
from pf2lora.common.secagg.keys import mask_seed, x25519_public_bytes
from pf2lora.common.secagg.messages import (
    ConsistencySignature,
    EncryptedShare,
    SignedKeys,
    UnmaskProposal,
    UnmaskRequest,
    UnmaskResponse,
)
from pf2lora.common.secagg.prg import MaskExpander
from pf2lora.common.secagg.silo import SECRET_BYTES

logger = logging.getLogger(__name__)


class ServerStage(enum.Enum):
    KEYS = "keys"
    SHARES = "shares"
    MASKED_INPUTS = "masked_inputs"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    DONE = "done"


class SecAggServer:
    """The coordinator's state for one round; ``vector_length`` is the flat update length."""

    def __init__(
        self,
        run_id: str,
        round_: int,
        silo_ids: Sequence[str],
        vector_length: int,
        config: SecAggConfig | None = None,
    ) -> None:
        if not isinstance(vector_length, int) or vector_length < 1:
            raise InvalidArgument(
                f"vector_length must be a positive integer, got {vector_length!r}"
            )
        self.plan: RoundPlan = (config or SecAggConfig()).plan(run_id, round_, silo_ids)
        self.vector_length = vector_length
        self._stage = ServerStage.KEYS
        self._keys: dict[str, SignedKeys] = {}  # U1
        self._shares: dict[str, tuple[EncryptedShare, ...]] = {}  # U2: sender -> its shares
        self._sum = np.zeros(vector_length, dtype=np.uint32)  # sum of masked inputs mod 2^32
        self._masked: set[str] = set()  # U3
        self._proposal: UnmaskProposal | None = None
        self._signatures: dict[str, ConsistencySignature] = {}  # U4: signers of the proposal
        self._responses: dict[str, UnmaskResponse] = {}  # U5
        self._request: UnmaskRequest | None = None

    @property
    def stage(self) -> ServerStage:
        return self._stage

    def _expect(self, stage: ServerStage, action: str) -> None:
        if self._stage is not stage:
            raise FailedPrecondition(
                f"secagg round {self.plan.round}: cannot {action} in stage {self._stage.value}"
            )

    def _check_header(self, run_id: str, round_: int, what: str) -> None:
        if (run_id, round_) != (self.plan.run_id, self.plan.round):
            raise FailedPrecondition(
                f"{what} is for run {run_id!r} round {round_}, this is run "
                f"{self.plan.run_id!r} round {self.plan.round}"
            )

    def _enough(self, alive: int, stage: str, quorum: bool = False) -> None:
        need = self.plan.signature_quorum if quorum else self.plan.threshold
        if alive < need:
            raise FailedPrecondition(
                f"secagg round {self.plan.round}: only {alive} of {len(self.plan.silo_ids)} silos "
                f"completed {stage}, {'quorum' if quorum else 'threshold'} is {need}"
            )

    # Stage 1 ----------------------------------------------------------------------------------
    def receive_keys(self, silo_id: str, message: SignedKeys) -> None:
        """``silo_id`` is the authenticated silo id (the transport checked its certificate)."""
        self._expect(ServerStage.KEYS, "receive keys")
        self._check_header(message.run_id, message.round, "signed keys")
        if message.silo_id != silo_id:
            raise PermissionDenied(f"silo {silo_id!r} sent keys claiming to be {message.silo_id!r}")
        if message.silo_id not in self.plan.neighbours:
            raise PermissionDenied(f"silo {message.silo_id!r} is not in this round")
        if message.silo_id in self._keys:
            raise FailedPrecondition(f"silo {message.silo_id} already advertised keys")
        self._keys[message.silo_id] = message

    def close_keys(self) -> dict[str, tuple[SignedKeys, ...]]:
        """Per silo that advertised: its neighbours' signed keys, to relay."""
        self._expect(ServerStage.KEYS, "close the key stage")
        self._enough(len(self._keys), "key advertisement")
        self._stage = ServerStage.SHARES
        return {
            silo: tuple(self._keys[p] for p in self.plan.holders(silo) if p in self._keys)
            for silo in self._keys
        }

    # Stage 2 ----------------------------------------------------------------------------------
    def receive_shares(self, sender: str, shares: Sequence[EncryptedShare]) -> None:
        """``sender`` is the authenticated silo id (the transport checked its certificate)."""
        self._expect(ServerStage.SHARES, "receive shares")
        if sender not in self._keys:
            raise FailedPrecondition(f"silo {sender!r} did not advertise keys this round")
        if sender in self._shares:
            raise FailedPrecondition(f"silo {sender} already sent its shares")
        allowed = self.plan.neighbours[sender] & self._keys.keys()
        receivers: set[str] = set()
        for share in shares:
            self._check_header(share.run_id, share.round, "a share")
            if share.sender != sender:
                raise PermissionDenied(f"silo {sender} sent a share claiming sender {share.sender}")
            if share.receiver not in allowed or share.receiver in receivers:
                raise InvalidArgument(f"silo {sender}: unexpected share for {share.receiver}")
            receivers.add(share.receiver)
        self._shares[sender] = tuple(shares)

    def close_shares(self) -> dict[str, tuple[EncryptedShare, ...]]:
        """Per silo that sent shares: the shares addressed to it by other such silos."""
        self._expect(ServerStage.SHARES, "close the share stage")
        self._enough(len(self._shares), "key sharing")
        routed: dict[str, list[EncryptedShare]] = {silo: [] for silo in self._shares}
        for shares in self._shares.values():
            for share in shares:
                if share.receiver in routed:
                    routed[share.receiver].append(share)
        self._stage = ServerStage.MASKED_INPUTS
        return {silo: tuple(v) for silo, v in routed.items()}

    # Stage 3 ----------------------------------------------------------------------------------
    def receive_masked_input(self, silo_id: str, masked: np.ndarray) -> None:
        """Add one masked uint32 vector into the running sum (mod 2^32); nothing else is kept."""
        self._expect(ServerStage.MASKED_INPUTS, "receive a masked input")
        if silo_id not in self._shares:
            raise FailedPrecondition(f"silo {silo_id!r} did not share its keys this round")
        if silo_id in self._masked:
            raise FailedPrecondition(f"silo {silo_id} already sent its masked input")
        if masked.dtype != np.uint32 or masked.shape != (self.vector_length,):
            raise InvalidArgument(
                f"silo {silo_id}: masked input must be uint32 ({self.vector_length},), got "
                f"{masked.dtype} {masked.shape}"
            )
        np.add(self._sum, masked, out=self._sum)
        self._masked.add(silo_id)

    def close_masked_inputs(self) -> UnmaskProposal:
        """The unmask proposal for every survivor: who sent a masked input and who did not.

        Fails (FailedPrecondition) with fewer survivors than the consistency quorum: no honest
        silo would sign such a proposal."""
        self._expect(ServerStage.MASKED_INPUTS, "close the masked-input stage")
        self._enough(len(self._masked), "masked input")
        self._enough(len(self._masked), "masked input", quorum=True)
        survivors = tuple(s for s in self.plan.silo_ids if s in self._masked)
        dropped = tuple(
            s for s in self.plan.silo_ids if s in self._shares and s not in self._masked
        )
        if dropped:
            logger.info(
                "secagg round %d: %d silos dropped after sharing keys: %s",
                self.plan.round,
                len(dropped),
                ", ".join(dropped),
            )
        self._proposal = UnmaskProposal(
            run_id=self.plan.run_id, round=self.plan.round, survivors=survivors, dropped=dropped
        )
        self._stage = ServerStage.CONSISTENCY
        return self._proposal

    # Stage 4 ----------------------------------------------------------------------------------
    def receive_consistency(self, silo_id: str, signature: ConsistencySignature) -> None:
        """A survivor's signature over the proposal; ``silo_id`` is the authenticated silo id.

        Structure only: the silos verify the signatures (the coordinator has no CA store)."""
        self._expect(ServerStage.CONSISTENCY, "receive a consistency signature")
        assert self._proposal is not None
        self._check_header(signature.run_id, signature.round, "a consistency signature")
        if signature.silo_id != silo_id:
            raise PermissionDenied(
                f"silo {silo_id!r} sent a consistency signature claiming {signature.silo_id!r}"
            )
        if silo_id not in self._masked:
            raise PermissionDenied(f"consistency signature from {silo_id!r}, not a survivor")
        if silo_id in self._signatures:
            raise FailedPrecondition(f"silo {silo_id} already signed the unmask proposal")
        self._signatures[silo_id] = signature

    def close_consistency(self) -> UnmaskRequest:
        """The unmask request for every signer: the proposal and all collected signatures.

        FailedPrecondition with fewer signers than ``plan.signature_quorum``."""
        self._expect(ServerStage.CONSISTENCY, "close the consistency check")
        assert self._proposal is not None
        self._enough(len(self._signatures), "the consistency check", quorum=True)
        self._request = UnmaskRequest(
            run_id=self._proposal.run_id,
            round=self._proposal.round,
            survivors=self._proposal.survivors,
            dropped=self._proposal.dropped,
            signatures=tuple(
                self._signatures[s] for s in self.plan.silo_ids if s in self._signatures
            ),
        )
        self._stage = ServerStage.UNMASK
        return self._request

    # Stage 5 ----------------------------------------------------------------------------------
    def receive_unmask(self, silo_id: str, response: UnmaskResponse) -> None:
        """A signer's shares; ``silo_id`` is the authenticated silo id."""
        self._expect(ServerStage.UNMASK, "receive an unmask response")
        assert self._request is not None
        self._check_header(response.run_id, response.round, "an unmask response")
        if response.silo_id != silo_id or silo_id not in self._signatures:
            raise PermissionDenied(
                f"unmask response from {silo_id!r}, not a survivor that signed the proposal"
            )
        if silo_id in self._responses:
            raise FailedPrecondition(f"silo {silo_id} already answered the unmask request")
        for shares, owners in (
            (response.self_mask_shares, self._request.survivors),
            (response.mask_key_shares, self._request.dropped),
        ):
            for share in shares:
                if share.owner not in owners or silo_id not in self.plan.holders(share.owner):
                    raise InvalidArgument(f"silo {silo_id}: unexpected share of {share.owner}")
        self._responses[silo_id] = response

    def _collect(self) -> tuple[dict[str, dict[int, int]], dict[str, dict[int, int]]]:
        """Shares by owner, {x: y}: of self-mask seeds (survivors) and mask keys (dropped)."""
        seeds: dict[str, dict[int, int]] = defaultdict(dict)
        mask_keys: dict[str, dict[int, int]] = defaultdict(dict)
        for responder, response in self._responses.items():
            x = self.plan.index(responder)
            for share in response.self_mask_shares:
                seeds[share.owner][x] = shamir.share_from_bytes(share.share)
            for share in response.mask_key_shares:
                mask_keys[share.owner][x] = shamir.share_from_bytes(share.share)
        return seeds, mask_keys

    def _reconstruct(self, owner: str, points: dict[int, int], what: str) -> bytes:
        if len(points) < self.plan.threshold:
            raise FailedPrecondition(
                f"only {len(points)} shares of the {what} of {owner}, threshold is "
                f"{self.plan.threshold}"
            )
        return shamir.reconstruct(points, self.plan.threshold, SECRET_BYTES)

    def finish(self) -> np.ndarray:
        """Remove the masks and decode: the float64 sum of the survivors' updates (L,)."""
        self._expect(ServerStage.UNMASK, "finish")
        assert self._request is not None
        self._enough(len(self._responses), "unmasking")
        expander = MaskExpander()
        total = self._sum
        seeds, mask_keys = self._collect()
        for owner in self._request.survivors:
            expander.apply(total, self._reconstruct(owner, seeds[owner], "self-mask seed"), -1)
        survivors = set(self._request.survivors)
        for owner in self._request.dropped:
            secret = self._reconstruct(owner, mask_keys[owner], "mask key")
            private = X25519PrivateKey.from_private_bytes(secret)
            if x25519_public_bytes(private) != self._keys[owner].mask_public_key:
                raise InvalidArgument(f"reconstructed mask key of {owner} does not match its key")
            me = (self.plan.index(owner), owner)
            for peer in sorted(self.plan.neighbours[owner] & survivors, key=self.plan.index):
                seed = mask_seed(
                    private,
                    self._keys[peer].mask_public_key,
                    self.plan.run_id,
                    self.plan.round,
                    me,
                    (self.plan.index(peer), peer),
                )
                # The survivor added +PRG(s) if the dropped silo ranks below it, else -PRG(s).
                expander.apply(total, seed, -1 if me[0] < self.plan.index(peer) else 1)
        self._stage = ServerStage.DONE
        return fixedpoint.decode(total, self.plan.frac_bits)

    @property
    def survivors(self) -> tuple[str, ...]:
        return self._proposal.survivors if self._proposal else ()

    @property
    def dropped(self) -> tuple[str, ...]:
        return self._proposal.dropped if self._proposal else ()
