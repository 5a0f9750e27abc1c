"""The SecAgg+ protocol driven in one process: a coordinator and silos with real keys and
certificates, stage by stage, with the hooks the tests use to drop or subvert a party.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection

import numpy as np

from pf2lora.common.secagg.config import SecAggConfig
from pf2lora.common.secagg.keys import (
    PeerVerifier,
)
from pf2lora.common.secagg.messages import (
    UnmaskProposal,
    UnmaskRequest,
)
from pf2lora.common.secagg.server import SecAggServer
from pf2lora.common.secagg.silo import SecAggSilo
from pf2lora.common.transport import pki


def federation_keys() -> dict:
    """A CA and 8 silo certificates (s0..s7) of FED, and a verifier of their keys."""
    ca = pki.create_ca(FED)
    silos = {f"s{i}": pki.issue_silo_cert(ca, f"s{i}") for i in range(8)}
    return {"ca": ca, "silos": silos, "verifier": PeerVerifier([ca.cert], FED)}


FED = "secagg-test"
RUN = "run-1"
LENGTH = 5000


def ids_of(n: int) -> list[str]:
    return [f"s{i}" for i in range(n)]


def updates_for(ids: Collection[str], length: int = LENGTH, scale: float = 0.2) -> dict:
    rng = np.random.default_rng(42)
    return {s: (rng.standard_normal(length) * scale).astype(np.float32) for s in ids}


@dataclasses.dataclass
class Round:
    server: SecAggServer
    silos: dict[str, SecAggSilo]


def setup_round(
    fed: dict,
    ids: list[str],
    round_: int = 1,
    config: SecAggConfig | None = None,
    length: int = LENGTH,
) -> Round:
    server = SecAggServer(RUN, round_, ids, length, config)
    silos = {
        s: SecAggSilo(
            RUN, round_, s, ids, fed["silos"][s].key, fed["silos"][s].cert, fed["verifier"], config
        )
        for s in ids
    }
    return Round(server, silos)


def through_shares(
    r: Round,
    relay: Callable[[dict], dict] = lambda relayed: relayed,
    silent_keys: Collection[str] = (),
    silent_shares: Collection[str] = (),
) -> list[str]:
    """Stages 1-2; returns the silos that completed them."""
    alive = [s for s in r.silos if s not in silent_keys]
    for s in alive:
        r.server.receive_keys(s, r.silos[s].advertise_keys())
    relayed = relay(r.server.close_keys())
    for s in alive:
        r.silos[s].receive_keys(relayed[s])
    alive = [s for s in alive if s not in silent_shares]
    for s in alive:
        r.server.receive_shares(s, r.silos[s].share_keys())
    routed = r.server.close_shares()
    for s in alive:
        r.silos[s].receive_shares(routed[s])
    return alive


def consistency(r: Round, proposal: UnmaskProposal, silent: Collection[str] = ()) -> UnmaskRequest:
    """Stage 4: every survivor not in ``silent`` signs; the coordinator builds the request."""
    for s in proposal.survivors:
        if s not in silent:
            r.server.receive_consistency(s, r.silos[s].consistency_check(proposal))
    return r.server.close_consistency()


def finish(
    r: Round,
    updates: dict,
    alive: list[str],
    dropped: Collection[str] = (),
    silent_unmask: Collection[str] = (),
    silent_consistency: Collection[str] = (),
) -> np.ndarray:
    for s in alive:
        if s not in dropped:
            r.server.receive_masked_input(s, r.silos[s].masked_input(updates[s]))
    request = consistency(r, r.server.close_masked_inputs(), silent_consistency)
    for signature in request.signatures:
        s = signature.silo_id
        if s not in silent_unmask:
            r.server.receive_unmask(s, r.silos[s].unmask(request))
    return r.server.finish()


def assert_sum(result: np.ndarray, updates: dict, members: Collection[str], r: Round) -> None:
    plain = np.sum([updates[s].astype(np.float64) for s in members], axis=0)
    bound = len(r.server.plan.silo_ids) * 2.0**-r.server.plan.frac_bits
    assert np.abs(result - plain).max() <= bound


def masked_round(fed: dict, n: int = 5) -> Round:
    """A round of n silos through the masked-input stage (keys, shares and inputs all in)."""
    ids = ids_of(n)
    r = setup_round(fed, ids)
    updates = updates_for(ids)
    for s in through_shares(r):
        r.server.receive_masked_input(s, r.silos[s].masked_input(updates[s]))
    return r
