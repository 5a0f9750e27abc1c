"""SecAgg+ configuration and the per-round plan both sides derive from it (roster, graph, t, F).

The silos and the coordinator each compute the same ``RoundPlan`` from the same public inputs
(config, run id, round, the round's silo ids), so nothing about the plan needs to be trusted from
the wire: indices are 1-based positions in the sorted roster (they are the Shamir x-coordinates
and decide the sign of each pairwise mask), and the optional k-regular neighbourhood comes from a
public seed bound to run and round.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from pf2lora.common.errors import ConfigError, InvalidArgument
from pf2lora.common.secagg.fixedpoint import MAX_FRAC_BITS, check_no_overflow, choose_frac_bits
from pf2lora.common.secagg.messages import canonical_bytes, check_silo_id

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecAggConfig:
    """Secure-aggregation parameters, validated at construction.

    clip: every coordinate of a silo's weighted update is clipped to [-clip, clip]. 1.0 by default:
        FedAvg weights (sum 1) are applied before encoding, so a weighted LoRA update is far
        smaller; the fraction clipped is logged per silo so a bad choice is visible.
    frac_bits: fixed-point fraction bits F; None picks the largest F without int32 overflow for
        the round's silo count (``fixedpoint.choose_frac_bits``).
    threshold: Shamir threshold t; None = a majority of each silo's share holders
        (floor(m/2)+1). Fewer is allowed but logs a warning (weaker against colluding silos).
        t also sets the mask floor (a silo masks only if fewer than t holders of its shares,
        itself included, are outside its mask set) and, with the roster size, the consistency
        quorum (``RoundPlan.signature_quorum``).
    neighbours: None = every silo shares with every other (SecAgg); an even k >= 2 = a random
        k-regular graph (SecAgg+, Bell et al.), each silo masking with and sharing among only its
        k neighbours (plus itself), so per-silo cost grows with k instead of N.
    graph_seed: extra public bytes mixed into the graph seed (with run id and round).
    """

    clip: float = 1.0
    frac_bits: int | None = None
    threshold: int | None = None
    neighbours: int | None = None
    graph_seed: bytes = b""

    def __post_init__(self) -> None:
        if not (isinstance(self.clip, int | float) and math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"secagg.clip must be a positive finite number, got {self.clip!r}")
        if self.frac_bits is not None and (
            not isinstance(self.frac_bits, int) or not 0 <= self.frac_bits <= MAX_FRAC_BITS
        ):
            raise ConfigError(
                f"secagg.frac_bits must be an integer in [0, {MAX_FRAC_BITS}] or None, "
                f"got {self.frac_bits!r}"
            )
        if self.threshold is not None and (
            not isinstance(self.threshold, int) or self.threshold < 2
        ):
            raise ConfigError(
                f"secagg.threshold must be an integer >= 2 or None, got {self.threshold!r}"
            )
        if self.neighbours is not None and (
            not isinstance(self.neighbours, int) or self.neighbours < 2 or self.neighbours % 2
        ):
            raise ConfigError(
                f"secagg.neighbours must be an even integer >= 2 or None, got {self.neighbours!r}"
            )
        if not isinstance(self.graph_seed, bytes):
            raise ConfigError("secagg.graph_seed must be bytes")

    def plan(self, run_id: str, round_: int, silo_ids: Sequence[str]) -> RoundPlan:
        """The round's plan for these silos (the same on every party)."""
        return RoundPlan.build(self, run_id, round_, silo_ids)


def _graph(roster: tuple[str, ...], k: int | None, seed: bytes) -> dict[str, frozenset[str]]:
    """Neighbours of each silo (excluding itself): complete, or a permuted Harary ring H(k, n)."""
    n = len(roster)
    if k is None or k >= n - 1:
        return {s: frozenset(roster) - {s} for s in roster}
    # A public random order (sort by keyed hash), then k/2 neighbours on each side of the ring.
    ring = sorted(roster, key=lambda s: hashlib.sha256(seed + s.encode()).digest())
    neighbours: dict[str, set[str]] = {s: set() for s in roster}
    for pos, silo in enumerate(ring):
        for step in range(1, k // 2 + 1):
            other = ring[(pos + step) % n]
            neighbours[silo].add(other)
            neighbours[other].add(silo)
    return {s: frozenset(v) for s, v in neighbours.items()}


@dataclass(frozen=True)
class RoundPlan:
    """What one round of secure aggregation looks like; build with ``SecAggConfig.plan``."""

    run_id: str
    round: int
    silo_ids: tuple[str, ...]  # sorted; the index of silo_ids[p] is p + 1
    threshold: int
    signature_quorum: int  # consistency signatures an unmask request needs: > N/2 and >= t
    frac_bits: int
    clip: float
    neighbours: Mapping[str, frozenset[str]]  # excluding the silo itself
    positions: Mapping[str, int]  # silo id -> 1-based index

    @classmethod
    def build(
        cls, config: SecAggConfig, run_id: str, round_: int, silo_ids: Sequence[str]
    ) -> RoundPlan:
        if not isinstance(run_id, str) or not run_id:
            raise InvalidArgument(f"run_id must be a non-empty string, got {run_id!r}")
        if not isinstance(round_, int) or round_ < 0:
            raise InvalidArgument(f"round must be a non-negative integer, got {round_!r}")
        roster = tuple(sorted(check_silo_id(s) for s in silo_ids))
        if len(set(roster)) != len(roster):
            raise InvalidArgument(f"the round's silo ids contain duplicates: {list(roster)}")
        n = len(roster)
        if n < 2:
            raise ConfigError(f"secure aggregation needs at least 2 silos, got {n}")
        holders = n if config.neighbours is None else min(n, config.neighbours + 1)
        threshold = config.threshold if config.threshold is not None else holders // 2 + 1
        if threshold > holders:
            raise ConfigError(
                f"secagg.threshold={threshold} exceeds the {holders} share holders per silo "
                f"({n} silos, neighbours={config.neighbours})"
            )
        if 2 * threshold <= holders:
            logger.warning(
                "secagg threshold %d is not a majority of %d share holders: fewer colluding "
                "silos suffice to obtain both shares of one silo (docs/security.md)",
                threshold,
                holders,
            )
        if config.frac_bits is None:
            frac_bits = choose_frac_bits(n, config.clip)
        else:
            frac_bits = config.frac_bits
            check_no_overflow(n, config.clip, frac_bits)
        if n == 2:
            logger.warning("secure aggregation over 2 silos: each can subtract its own update")
        seed = hashlib.sha256(
            canonical_bytes("pf2lora/secagg/v1/graph", run_id, round_, config.graph_seed)
        ).digest()
        return cls(
            run_id=run_id,
            round=round_,
            silo_ids=roster,
            threshold=threshold,
            # A strict majority of the roster, so two different proposals can never both gather
            # a quorum from honest silos (each signs once); and at least t.
            signature_quorum=max(threshold, n // 2 + 1),
            frac_bits=frac_bits,
            clip=float(config.clip),
            neighbours=MappingProxyType(_graph(roster, config.neighbours, seed)),
            positions=MappingProxyType({s: p + 1 for p, s in enumerate(roster)}),
        )

    def index(self, silo_id: str) -> int:
        """The silo's 1-based index: its Shamir x-coordinate and its rank for mask signs."""
        try:
            return self.positions[silo_id]
        except KeyError:
            raise InvalidArgument(f"silo {silo_id!r} is not in this round") from None

    def holders(self, silo_id: str) -> tuple[str, ...]:
        """Who holds shares of ``silo_id``'s secrets: itself and its neighbours, by index."""
        return tuple(s for s in self.silo_ids if s == silo_id or s in self.neighbours[silo_id])
