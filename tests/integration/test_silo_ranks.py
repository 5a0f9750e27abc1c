"""Several processes per silo (gloo on loopback): two ranks on halves of every batch take the
step one process takes on the whole batch, for every estimator and algorithm objective."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from pf2lora.common.client_runtime import ClientRuntime
from pf2lora.common.errors import DataError
from pf2lora.common.learning.distributed import SHARD_WEIGHT, Group, shard
from pf2lora.common.state_io import load_state
from tests.helpers.ranks import train_silo

CASES = {
    "pf2lora-unroll": {"algorithm": "pf2lora", "train": {"hypergrad": "unroll"}},
    "pf2lora-unroll-clipped-2ll": {
        "algorithm": "pf2lora",
        "train": {"hypergrad": "unroll", "ll_max_grad_norm": 0.05, "ll_steps": 2},
    },
    "pf2lora-first-order": {"algorithm": "pf2lora", "train": {"hypergrad": "first-order"}},
    "pf2lora-implicit": {"algorithm": "pf2lora", "train": {"hypergrad": "implicit"}},
    "pf2lora-joint": {"algorithm": "pf2lora", "train": {"hypergrad": "joint"}},
    "homlora": {"algorithm": "homlora", "train": {}},
    "perfedavg": {"algorithm": "perfedavg", "train": {}},
}


def _run(tmp: Path, name: str, world: int, spec: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    out = tmp / name
    out.mkdir()
    rdv = tmp / f"{name}.rdv"
    mp.start_processes(
        train_silo,
        args=(world, str(rdv), str(out), spec),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    return [load_state(out / f"rank-{r}.safetensors")[0] for r in range(world)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_equal_one_process_on_the_whole_batch(case: str, tmp_path: Path) -> None:
    # batch 7: shards of 3 and 4 rows, so the loss weighting by share is exercised too
    spec = {**CASES[case], "rounds": 2}
    spec["train"] = {**spec["train"], "batch_size": 7, "local_steps": 3, "ul_lr": 1e-2}
    (one,) = _run(tmp_path, "one", 1, spec)
    two = _run(tmp_path, "two", 2, spec)
    assert set(two[0]) == set(one)
    for name in one:  # the ranks stay identical to each other (the private adapter included)
        assert torch.equal(two[0][name], two[1][name]), name
    # The first upper-level gradient (the hypergradient, or the plain gradient) of two ranks on
    # shards of 3 and 4 rows equals one process's on all 7, up to float rounding ...
    grads = [n for n in one if n.startswith("first_grad/")]
    assert grads
    for name in grads:
        torch.testing.assert_close(two[0][name], one[name], rtol=1e-4, atol=1e-7, msg=name)
    # ... and so do the losses of every step and the adapters after two rounds. AdamW's update
    # g / (sqrt(v) + eps) turns rounding in near-zero gradient entries into differences of up
    # to a few percent of one step (lr 1e-2), so the adapters compare at 1e-3.
    torch.testing.assert_close(two[0]["losses"], one["losses"], rtol=1e-5, atol=0)
    for name in one:
        torch.testing.assert_close(two[0][name], one[name], rtol=1e-3, atol=1e-3, msg=name)
    trained = [n for n in one if n.startswith(("shared/", "private/"))]
    moved = [n for n in trained if not torch.equal(one[n], one[f"init/{n}"])]
    assert any(n.startswith("shared/") for n in moved), "the shared adapter did not move"
    if case.startswith("pf2lora"):
        assert any(n.startswith("private/") for n in moved), "the private adapter did not move"


def test_shards_cover_the_batch_and_their_weights_average_to_one() -> None:
    batch = {"input_ids": torch.arange(14).reshape(7, 2), "labels": torch.arange(7)}
    parts = [shard(batch, r, 3) for r in range(3)]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
    assert [len(p["labels"]) for p in parts] == [2, 2, 3]
    weights = [float(p[SHARD_WEIGHT]) for p in parts]
    assert sum(weights) / 3 == pytest.approx(1.0)
    assert weights[2] == pytest.approx(3 * 3 / 7)
    # a causal LM's loss averages over answer tokens: shards weigh by their answer tokens
    labels = torch.tensor([[-100, 5, 6, 7], [-100, -100, -100, 8], [-100, 1, 2, -100]])
    lm = {"input_ids": torch.zeros(3, 4, dtype=torch.long), "labels": labels}
    w = [float(shard(lm, r, 2)[SHARD_WEIGHT]) for r in range(2)]
    assert w == pytest.approx([2 * 3 / 6, 2 * 3 / 6])  # rows [0] and [1, 2]: 3 tokens each


def test_a_batch_smaller_than_the_ranks_is_refused() -> None:
    from pf2lora.common.algorithms.base import AlgorithmConfig
    from pf2lora.common.algorithms.registry import make_algorithm
    from pf2lora.common.learning.config import TrainConfig
    from tests.helpers.tiny import MINI, text_data

    algo = make_algorithm(AlgorithmConfig(train=TrainConfig(batch_size=2)), MINI.adapters)
    data = text_data()
    with pytest.raises(DataError, match="batch_size 2 is smaller than the silo's 4 processes"):
        ClientRuntime(
            algo, MINI, client_index=0, seed=0, train=data, test=data, group=Group(rank=0, world=4)
        )
