"""Worker processes of a multi-process silo for the tests: gloo on loopback, the tiny model."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pf2lora.common.algorithms.base import AlgorithmConfig
from pf2lora.common.algorithms.registry import make_algorithm
from pf2lora.common.client_runtime import ClientRuntime, initial_global_state
from pf2lora.common.learning.config import TrainConfig
from pf2lora.common.learning.distributed import SINGLE, Group
from pf2lora.common.state_io import save_state
from tests.helpers.tiny import MINI, text_data


def train_silo(rank: int, world: int, rdv: str, out: str, spec: dict[str, Any]) -> None:
    """Train one silo for `spec["rounds"]` rounds as rank `rank` of `world` (world 1: alone) and
    save its shared and private adapters to OUT/rank-R.safetensors."""
    torch.set_num_threads(1)
    group = SINGLE
    if world > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{rdv}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=120),
        )
        group = Group(rank=rank, world=world, training=dist.group.WORLD)
    train = TrainConfig(**spec["train"])
    algo = make_algorithm(AlgorithmConfig(name=spec["algorithm"], train=train), MINI.adapters)
    data = text_data()
    rt = ClientRuntime(algo, MINI, client_index=0, seed=7, train=data, test=data, group=group)
    for m in rt.model.modules():  # no dropout: one process and two then draw the same step
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    # observe the first upper-level step's gradient (what every rank's AdamW is handed)
    trainer = rt.client.trainer
    first: dict[str, torch.Tensor] = {}
    opt = trainer.ul_opt
    assert opt is not None
    step = opt.step

    def observed_step(*args: Any, **kwargs: Any) -> Any:
        if not first:
            params = {**trainer.x, **trainer.y}
            first.update({n: params[n].grad.detach().clone() for n in trainer.ul_names})
        return step(*args, **kwargs)

    opt.step = observed_step  # type: ignore[method-assign]
    state = initial_global_state(algo, MINI, run_seed=0)
    rt.client.receive_global(state)
    init = {f"init/shared/{k}": v for k, v in rt.model.shared_state().items()}
    init.update(
        {f"init/private/{k}": p.detach().clone() for k, p in rt.model.private_parameters().items()}
    )
    losses = []
    for _ in range(spec["rounds"]):
        res = rt.run_round(state, 1.0)
        losses.append(res.metrics["train_loss"])
        state = {k: v for k, v in rt.model.shared_state().items() if k in state}
    tensors = {f"shared/{k}": v for k, v in rt.model.shared_state().items()}
    tensors.update({f"private/{k}": p.detach() for k, p in rt.model.private_parameters().items()})
    tensors.update({f"first_grad/{k}": g for k, g in first.items()})
    tensors.update(init)
    tensors["losses"] = torch.tensor(losses, dtype=torch.float64)
    save_state(Path(out) / f"rank-{rank}.safetensors", tensors, {"world": world})
    if world > 1:
        dist.destroy_process_group()
