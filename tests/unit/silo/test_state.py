"""A silo's state directory on its own: the state a round starts from, pruning, the private
adapter read back, refusals naming the file, run records and secure-aggregation markers."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import torch

from pf2lora.common.algorithms.base import AlgorithmConfig, ClientAlgorithm
from pf2lora.common.algorithms.registry import make_algorithm
from pf2lora.common.errors import DataError
from pf2lora.common.learning.config import TrainConfig
from pf2lora.silo.state import SiloState, private_digest
from tests.helpers.tiny import linear_model, regression_data, source

TRAIN = TrainConfig(local_steps=2, batch_size=8, ll_lr=0.05, ul_lr=0.01)


def _client(algorithm: str = "pf2lora", seed: int = 0) -> ClientAlgorithm:
    model = linear_model(seed=seed)
    algo = make_algorithm(AlgorithmConfig(name=algorithm, train=TRAIN), model.adapters)
    return algo.make_client(model, 0, seed=seed)


def _private(client: ClientAlgorithm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in client.model.private_parameters().items()}


def test_rounds_start_from_the_newest_earlier_state_and_old_ones_are_pruned(
    tmp_path: Path,
) -> None:
    state = SiloState(tmp_path / "silo", keep_rounds=2)
    assert stat.S_IMODE((tmp_path / "silo").stat().st_mode) == 0o700
    client = _client()
    assert state.prepare(client, "run-1", 1) == 0  # nothing yet: the fresh state is round 0
    data = source(regression_data())
    after: dict[int, dict[str, torch.Tensor]] = {}
    for r in (1, 2, 3):
        client.local_round(data)
        state.save_after(client, "run-1", r)
        after[r] = _private(client)
    assert state.rounds_saved("run-1") == [2, 3]  # keep_rounds newest
    assert all(torch.equal(state.private_tensors("run-1", 3)[k], after[3][k]) for k in after[3])

    fresh = _client(seed=5)  # another init: everything must come from the file
    assert state.prepare(fresh, "run-1", 3) == 2  # round 3 again starts from round 2's state
    assert private_digest(_private(fresh)) == private_digest(after[2])
    assert fresh.trainer.rounds == client.trainer.rounds - 1
    with pytest.raises(DataError, match=r"no state before round 2 \(pruned\?\)"):
        state.prepare(fresh, "run-1", 2)


def test_a_state_of_another_algorithm_or_a_damaged_file_is_refused_by_name(
    tmp_path: Path,
) -> None:
    state = SiloState(tmp_path / "silo")
    state.save_after(_client("pf2lora"), "run-1", 1)
    with pytest.raises(DataError, match=r"state-00001\.safetensors.*algorithm 'pf2lora'"):
        state.prepare(_client("homlora"), "run-1", 2)
    state.state_path("run-1", 1).write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match=r"state-00001\.safetensors"):
        state.prepare(_client("pf2lora"), "run-1", 2)


def test_run_records_and_secure_aggregation_markers(tmp_path: Path) -> None:
    state = SiloState(tmp_path / "silo")
    assert state.current_run() == ""
    state.write_run_record("run-1", {"seed": 7})
    assert state.current_run() == "run-1" and state.read_run_record("run-1") == {"seed": 7}
    with pytest.raises(DataError, match="no record of run 'run-2'"):
        state.read_run_record("run-2")
    state.clear_current_run()
    assert state.current_run() == ""

    assert not state.keys_advertised("run-1", 1, 1)
    state.mark_keys_advertised("run-1", 1, 1)
    assert state.keys_advertised("run-1", 1, 1) and not state.keys_advertised("run-1", 1, 2)
    state.record_unmask("run-1", 1, 2, ("silo-a", "silo-b"))
    assert state.unmask_record("run-1", 1) == {"attempt": 2, "survivors": ["silo-a", "silo-b"]}
    state.mark_keys_advertised("run-1", 3, 1)  # round 3 cannot re-open round 1: markers go
    assert not state.keys_advertised("run-1", 1, 1) and state.unmask_record("run-1", 1) is None
