"""A silo's state directory on its own: the state a round starts from, pruning, the private
adapter read back, refusals naming the file, run records and secure-aggregation markers."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch

from pf2lora.common.algorithms.base import AlgorithmConfig, ClientAlgorithm
from pf2lora.common.algorithms.registry import make_algorithm
from pf2lora.common.errors import DataError
from pf2lora.common.learning.config import TrainConfig
from pf2lora.common.state_io import save_state
from pf2lora.silo.state import SiloState, StateDamaged, private_digest
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


def _flip_a_private_byte(path: Path) -> None:
    """Flip one bit inside a private tensor's bytes of a safetensors file."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k.startswith("private/"))
    start, end = header[name]["data_offsets"]
    raw[8 + n + (start + end) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def _saved(tmp_path: Path, rounds: int) -> tuple[SiloState, ClientAlgorithm]:
    state = SiloState(tmp_path / "silo", keep_rounds=3)
    client = _client()
    state.prepare(client, "run-1", 1)
    data = source(regression_data())
    for r in range(1, rounds + 1):
        client.local_round(data)
        state.save_after(client, "run-1", r)
    return state, client


@pytest.mark.parametrize("damage", ["bit flip", "truncated", "deleted"])
def test_a_damaged_or_missing_latest_state_is_refused_naming_the_file_and_the_choices(
    tmp_path: Path, damage: str
) -> None:
    state, _ = _saved(tmp_path, 2)
    latest = state.state_path("run-1", 2)
    if damage == "bit flip":
        _flip_a_private_byte(latest)
    elif damage == "truncated":
        latest.write_bytes(latest.read_bytes()[:100])
    else:
        latest.unlink()  # round 1's state is still there: it must not be taken instead
    with pytest.raises(StateDamaged, match=r"state-00002\.safetensors.*--start-over"):
        state.prepare(_client(seed=3), "run-1", 3)
    assert state.prepare(_client(seed=3), "run-1", 2) == 1  # round 2 again needs round 1 only


def test_a_state_newer_than_the_record_is_used_and_start_over_sets_state_aside(
    tmp_path: Path,
) -> None:
    state, client = _saved(tmp_path, 2)
    client.local_round(source(regression_data()))
    save_state(state.state_path("run-1", 3), *client.state())  # killed before saved.json
    assert state.prepare(_client(seed=3), "run-1", 4) == 3
    _flip_a_private_byte(state.state_path("run-1", 3))
    aside = state.start_over("run-1")
    assert {p.name for p in aside.iterdir()} == {"saved.json"} | {
        f"state-0000{r}.safetensors" for r in range(4)
    }
    assert state.prepare(_client(seed=3), "run-1", 4) == 0  # a fresh private adapter


def test_a_garbage_current_run_is_one_clear_error(tmp_path: Path) -> None:
    state = SiloState(tmp_path / "silo")
    (tmp_path / "silo" / "current_run").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(StateDamaged, match=r"current_run is damaged"):
        state.current_run()
