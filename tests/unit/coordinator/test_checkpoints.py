"""Global-state checkpoints on their own: canonical order and digests, damage refused by name,
the read cache, and clean-up of rounds the database never committed."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import torch

from pf2lora.common.errors import DataError
from pf2lora.coordinator.checkpoints import CheckpointStore, canonical, state_digest

STATE = {"b.lora_B.weight": torch.zeros(4, 2), "a.lora_A.weight": torch.arange(8.0).reshape(2, 4)}


def test_write_then_read_in_canonical_order_with_the_recorded_digest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    path, digest = store.write("r1", 3, STATE, {"attempt": 1})
    assert path == tmp_path / "runs" / "r1" / "global-00003.safetensors"
    assert digest == state_digest(STATE) == state_digest(canonical(STATE))
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0  # owner-only
    back = store.read("r1", 3, digest)
    assert list(back) == sorted(STATE)
    assert all(torch.equal(back[k], STATE[k]) for k in STATE)
    assert store.rounds_on_disk("r1") == [3]


def test_a_changed_or_missing_checkpoint_is_refused_naming_the_file(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    path, digest = store.write("r1", 1, STATE, {})
    other = {k: v + 1 for k, v in STATE.items()}
    store.write("r1", 1, other, {})  # the file changes under the recorded digest
    with pytest.raises(DataError, match=r"global-00001\.safetensors does not match"):
        store.read("r1", 1, digest)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="global-00001.safetensors"):
        store.read("r1", 1, digest)
    with pytest.raises(DataError, match=r"global-00002\.safetensors is missing"):
        store.read("r1", 2, digest)


def test_the_read_cache_serves_one_checkpoint_and_checks_what_it_keeps(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    _, d1 = store.write("r1", 1, STATE, {})
    _, d2 = store.write("r1", 2, {k: v * 2 for k, v in STATE.items()}, {})
    first = store.read_cached("r1", 1, d1)
    assert store.read_cached("r1", 1, d1) is first  # no second read
    second = store.read_cached("r1", 2, d2)
    assert torch.equal(second["a.lora_A.weight"], 2 * STATE["a.lora_A.weight"])
    with pytest.raises(DataError, match="does not match"):
        store.read_cached("r1", 2, d1)  # a digest the cached copy was not checked against


def test_remove_after_drops_uncommitted_rounds_and_temp_files(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for r in range(4):
        store.write("r1", r, STATE, {})
    stray = tmp_path / "runs" / "r1" / ".global-00004.safetensors.abc.tmp"
    stray.write_bytes(b"half")
    removed = store.remove_after("r1", completed_rounds=1)
    assert sorted(p.name for p in removed) == [
        stray.name,
        "global-00002.safetensors",
        "global-00003.safetensors",
    ]
    assert store.rounds_on_disk("r1") == [0, 1]
