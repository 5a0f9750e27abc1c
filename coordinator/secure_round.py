"""One round attempt's secure aggregation on the coordinator: SecAggServer driven stage by stage.

    advertise_keys -> share_keys -> masked_input -> consistency_check -> unmask -> (sum)

The engine creates a `SecureRound` when a round's participants are fixed and calls it under its
lock. Each stage waits for the silos that completed the previous one and closes when all of
them answered, or at the stage's deadline with whoever did (the key advertisement follows local
training, so its deadline is the round's; later stages get `secagg.stage_deadline_s` each). A
stage the library cannot close (fewer than t silos, fewer than the consistency quorum, fewer
than min_silos survivors, inconsistent shares) fails the attempt; the engine then opens the
round again as a new attempt, which is a new protocol instance ("RUN/aN"): nothing of one
attempt is valid in another.

Only masked uint32 vectors ever reach this module, and it only adds them (SecAggServer keeps one
running sum); `finish` removes the masks from the SUM and decodes it, once per attempt.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pf2lora.common.errors import ConfigError, FailedPrecondition, InvalidArgument
from pf2lora.common.runspec import SecAggSettings
from pf2lora.common.secagg.fixedpoint import choose_frac_bits
from pf2lora.common.secagg.layout import unflatten
from pf2lora.common.secagg.messages import (
    ConsistencySignature,
    EncryptedShare,
    SignedKeys,
    UnmaskProposal,
    UnmaskRequest,
    UnmaskResponse,
)
from pf2lora.common.secagg.server import SecAggServer
from pf2lora.common.wire.manifest import MASKED_TENSOR, Spec, payload_layout
from pf2lora.common.wire.tasks import (
    ConsistencyCheckTask,
    MaskedInputTask,
    SecureAggregation,
    ShareKeysTask,
    StageTask,
    UnmaskTask,
)
from pf2lora.coordinator.views import ParticipantState

logger = logging.getLogger(__name__)

STAGES = ("advertise_keys", "share_keys", "masked_input", "consistency_check", "unmask")
# What a participant's status says once it completed each stage.
PROGRESS: dict[str, ParticipantState] = {
    "advertise_keys": "keys_sent",
    "share_keys": "shares_sent",
    "masked_input": "reported",
    "consistency_check": "signed",
    "unmask": "unmasked",
}


def instance_id(run_id: str, attempt: int) -> str:
    """The protocol instance of a round attempt: the library's run_id (keys, masks and
    signatures are bound to it, so a re-opened round shares nothing with the old attempt)."""
    return f"{run_id}/a{attempt}"


class Outcome(enum.Enum):
    WAITING = "waiting"
    DONE = "done"  # the sum is unmasked: complete the round
    FAILED = "failed"  # open the round again as a new attempt


@dataclass(frozen=True)
class StageTiming:
    stage: str
    started_ms: int
    ended_ms: int
    silos: tuple[str, ...]  # who completed the stage


class SecureRound:
    """The coordinator's side of one round attempt; every method runs under the engine's lock."""

    def __init__(
        self,
        *,
        run_id: str,
        round_: int,
        attempt: int,
        roster: Sequence[str],
        spec: Spec,
        settings: SecAggSettings,
        clip: float,
        keys_deadline: float,
        min_survivors: int,
        now: float,
        now_ms: int,
    ) -> None:
        roster = tuple(sorted(roster))
        frac_bits = (
            settings.frac_bits
            if settings.frac_bits is not None
            else choose_frac_bits(len(roster), clip)
        )
        self.layout = payload_layout(spec)
        self.instance = instance_id(run_id, attempt)
        self.run_id, self.round, self.attempt = run_id, round_, attempt
        # Builds the RoundPlan: refuses an overflowing F, a threshold above the roster, N < 2.
        self.server = SecAggServer(
            self.instance,
            round_,
            roster,
            self.layout.size,
            settings.library_config(clip, frac_bits),
        )
        plan = self.server.plan
        self.params = SecureAggregation(
            instance_id=self.instance,
            roster=plan.silo_ids,
            clip=plan.clip,
            frac_bits=plan.frac_bits,
            threshold=plan.threshold,
            neighbours=settings.neighbours,
            vector_length=self.layout.size,
            layout_digest=self.layout.digest(),
        )
        self.stage_deadline_s = settings.stage_deadline_s
        self.min_survivors = min_survivors
        self.stage_index = 0
        self.deadline = keys_deadline
        self._started_ms = now_ms
        self.expected: set[str] = set(roster)  # who the current stage waits for
        self.done: set[str] = set()  # who completed the current stage
        self.progress: dict[str, ParticipantState] = {}
        self.withdrawn: set[str] = set()  # restarted after advertising keys: gone for good
        self.timings: list[StageTiming] = []
        self._keys: dict[str, tuple[SignedKeys, ...]] = {}
        self._shares: dict[str, tuple[EncryptedShare, ...]] = {}
        self._proposal: UnmaskProposal | None = None
        self._request: UnmaskRequest | None = None
        self.sum: dict[str, Tensor] | None = None
        self.failure = ""
        logger.info(
            "round %d attempt %d: secure aggregation over %d silos (t=%d, quorum %d, F=%d, clip "
            "%g, "
            "%s, vector of %d)",
            round_,
            attempt,
            len(roster),
            plan.threshold,
            plan.signature_quorum,
            plan.frac_bits,
            plan.clip,
            f"k={settings.neighbours}" if settings.neighbours else "all pairs",
            self.layout.size,
        )

    # ----------------------------------------------------------------- views
    @property
    def stage(self) -> str:
        return STAGES[self.stage_index] if self.stage_index < len(STAGES) else "done"

    @property
    def survivors(self) -> tuple[str, ...]:
        return self.server.survivors

    @property
    def dropped(self) -> tuple[str, ...]:
        return self.server.dropped

    def wants_training(self, silo_id: str) -> bool:
        """A participant that has not advertised keys yet still trains (its TRAIN task)."""
        return self.stage_index == 0 and silo_id in self.expected and silo_id not in self.done

    def task_for(self, silo_id: str) -> StageTask | None:
        """The stage input relayed to this silo, or None (nothing for it now)."""
        if silo_id not in self.expected or silo_id in self.done:
            return None
        head = (self.run_id, self.round, self.attempt)
        if self.stage == "share_keys":
            return ShareKeysTask(*head, self._keys[silo_id])
        if self.stage == "masked_input":
            return MaskedInputTask(*head, self._shares[silo_id])
        if self.stage == "consistency_check":
            assert self._proposal is not None
            return ConsistencyCheckTask(*head, self._proposal)
        if self.stage == "unmask":
            assert self._request is not None
            return UnmaskTask(*head, self._request)
        return None

    # ------------------------------------------------------------- messages
    def _accepting(self, stage: str, silo_id: str) -> None:
        if self.stage != stage:
            raise FailedPrecondition(
                f"round {self.round} attempt {self.attempt}: secure aggregation is at stage "
                f"{self.stage}, not {stage}"
            )
        if silo_id not in self.expected:
            raise FailedPrecondition(
                f"silo {silo_id!r} did not complete the stage before {stage} in round {self.round} "
                f"attempt {self.attempt}"
            )
        if silo_id in self.done:
            raise FailedPrecondition(
                f"silo {silo_id!r} already completed {stage} in round {self.round}"
            )

    def _completed(self, stage: str, silo_id: str) -> tuple[int, int]:
        self.done.add(silo_id)
        self.progress[silo_id] = PROGRESS[stage]
        return len(self.done), len(self.expected)

    def receive_keys(self, silo_id: str, keys: SignedKeys) -> tuple[int, int]:
        self._accepting("advertise_keys", silo_id)
        self.server.receive_keys(silo_id, keys)
        return self._completed("advertise_keys", silo_id)

    def receive_shares(self, silo_id: str, shares: Sequence[EncryptedShare]) -> tuple[int, int]:
        self._accepting("share_keys", silo_id)
        self.server.receive_shares(silo_id, shares)
        return self._completed("share_keys", silo_id)

    def masked_spec(self, silo_id: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What this silo's masked-input stream must hold (checked before any byte is read)."""
        self._accepting("masked_input", silo_id)
        return {MASKED_TENSOR: ((self.layout.size,), torch.uint32)}

    def receive_masked(self, silo_id: str, vector: np.ndarray) -> tuple[int, int]:
        self._accepting("masked_input", silo_id)
        self.server.receive_masked_input(silo_id, vector)  # added into the sum, not kept
        return self._completed("masked_input", silo_id)

    def receive_consistency(self, silo_id: str, signature: ConsistencySignature) -> tuple[int, int]:
        self._accepting("consistency_check", silo_id)
        self.server.receive_consistency(silo_id, signature)
        return self._completed("consistency_check", silo_id)

    def receive_unmask(self, silo_id: str, response: UnmaskResponse) -> tuple[int, int]:
        self._accepting("unmask", silo_id)
        self.server.receive_unmask(silo_id, response)
        return self._completed("unmask", silo_id)

    def withdraw(self, silo_id: str) -> bool:
        """The silo restarted after advertising keys for this attempt: it will sit the attempt
        out, so no stage waits for it any more (its masks are recovered at unmask). False when
        it had not advertised keys yet (it trains again and takes part as usual)."""
        if self.stage_index == 0 and silo_id not in self.done:
            return False
        self.withdrawn.add(silo_id)
        if silo_id not in self.done:
            self.expected.discard(silo_id)
        return True

    def decline(self, silo_id: str) -> bool:
        """The silo will not take part in this attempt (it refused the run): no stage waits for
        it any more. Before its keys arrived it simply never joins the protocol; after, as
        `withdraw`. False when it had already finished the attempt's first stages."""
        if self.stage_index == 0 and silo_id not in self.done:
            self.expected.discard(silo_id)
            return True
        return self.withdraw(silo_id)

    # ----------------------------------------------------------- transitions
    def advance(self, now: float, now_ms: int, *, deadline_passed: bool = False) -> Outcome:
        """Close the current stage if everyone it waits for answered (or its deadline passed)."""
        if self.stage_index >= len(STAGES):
            return Outcome.DONE if self.sum is not None else Outcome.FAILED
        if not (deadline_passed or self.expected <= self.done):
            return Outcome.WAITING
        stage = self.stage
        missing = sorted(self.expected - self.done)
        if missing:
            logger.warning(
                "round %d attempt %d: %s closes at its deadline without %s",
                self.round,
                self.attempt,
                stage,
                missing,
            )
        self.timings.append(StageTiming(stage, self._started_ms, now_ms, tuple(sorted(self.done))))
        try:
            self._close(stage)
        except (FailedPrecondition, InvalidArgument, ConfigError) as exc:
            self.failure = f"secure aggregation failed at {stage}: {exc}"
            logger.warning("round %d attempt %d: %s", self.round, self.attempt, self.failure)
            self.stage_index = len(STAGES)
            return Outcome.FAILED
        self.expected -= self.withdrawn  # the next stage waits for none of them
        self.stage_index += 1
        self._started_ms = now_ms
        self.deadline = now + self.stage_deadline_s
        self.done = set()
        return Outcome.DONE if self.stage_index >= len(STAGES) else Outcome.WAITING

    def _close(self, stage: str) -> None:
        if (
            stage in ("advertise_keys", "share_keys", "masked_input")
            and len(self.done) < self.min_survivors
        ):
            raise FailedPrecondition(
                f"only {len(self.done)} silos completed {stage}, the round needs "
                f"{self.min_survivors}"
            )
        if stage == "advertise_keys":
            self._keys = self.server.close_keys()
            self.expected = set(self._keys)
        elif stage == "share_keys":
            self._shares = self.server.close_shares()
            self.expected = set(self._shares)
        elif stage == "masked_input":
            self._proposal = self.server.close_masked_inputs()
            self.expected = set(self._proposal.survivors)
        elif stage == "consistency_check":
            self._request = self.server.close_consistency()
            self.expected = {s.silo_id for s in self._request.signatures}
        else:
            total = self.server.finish()  # float64 (L,): the survivors' weighted sum
            arrays = unflatten(total, self.layout)
            self.sum = {name: torch.from_numpy(a.astype(np.float32)) for name, a in arrays.items()}
            logger.info(
                "round %d attempt %d: unmasked the sum of %d silos%s",
                self.round,
                self.attempt,
                len(self.survivors),
                f" (dropped after sharing keys: {list(self.dropped)})" if self.dropped else "",
            )

    def meta(self) -> Mapping[str, Any]:
        """What the round's checkpoint records about its secure aggregation."""
        p = self.params
        return {
            "secure_aggregation": {
                "instance": self.instance,
                "summed": list(self.survivors),
                "dropped": list(self.dropped),
                "threshold": p.threshold,
                "frac_bits": p.frac_bits,
                "clip": p.clip,
                "neighbours": p.neighbours,
                "layout_digest": p.layout_digest,
            }
        }
