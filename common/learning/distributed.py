"""Data parallelism inside one silo: several processes (torchrun) train one silo's model together.

Every rank holds the whole two-level model and the same private adapter. Each minibatch the
silo draws (the same on every rank: it is a function of the seed) is cut into one contiguous
shard per rank; every gradient the local step uses is averaged over the ranks before it is
used, so every rank takes the same step and the adapters stay identical. The bilevel
estimators call `torch.autograd.grad` (and, for unroll, differentiate through the lower-level
step), which the DDP wrapper does not reduce: they call `Group.mean` explicitly instead
(hypergrad.py). For unroll the lower-level gradient is averaged with a differentiable
all-reduce, so that the hypergradient flows back through every rank's part of it.

Each rank's loss is weighted by its shard's share of the batch (rows, or answer tokens of a
causal LM), so the mean over the ranks is the loss of the whole batch: two processes on halves
of a batch compute the step one process computes on the whole batch (up to float rounding).

Process groups: `training` (NCCL on CUDA, gloo on CPU) for the gradients, and a gloo `control`
group with a long timeout for rank 0's commands to the others (a silo may wait for work for
days). The silo daemon's use of them is in silo/ranks.py.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from pf2lora.common.errors import ConfigError
from pf2lora.common.learning.batching import BatchSource

logger = logging.getLogger(__name__)

SHARD_WEIGHT = "shard_weight"  # batch key: this rank's share of the batch times the world size
CONTROL_TIMEOUT = datetime.timedelta(days=365)  # rank 0 may wait for work this long
TRAINING_TIMEOUT = datetime.timedelta(minutes=30)  # one collective of a local step


@dataclass(frozen=True)
class Group:
    """This process's place among the silo's ranks, and the collectives the trainer needs."""

    rank: int
    world: int
    local_rank: int = 0  # the rank on this machine: its GPU
    training: dist.ProcessGroup | None = None
    control: dist.ProcessGroup | None = None

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def mean(
        self, named: Mapping[str, Tensor], *, differentiable: bool = False
    ) -> dict[str, Tensor]:
        """The mean over the ranks of each tensor (every rank gets it). `differentiable`: the
        result stays in the autograd graph (backward all-reduces the incoming gradient)."""
        if self.world == 1:
            return dict(named)
        if differentiable:
            from torch.distributed.nn.functional import all_reduce as all_reduce_diff

            return {
                n: all_reduce_diff(t, op=dist.ReduceOp.SUM, group=self.training) / self.world
                for n, t in named.items()
            }
        out: dict[str, Tensor] = {}
        for n, t in named.items():
            total = t.detach().clone()
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.training)
            out[n] = total / self.world
        return out

    def mean_scalars(self, *values: float) -> tuple[float, ...]:
        """The mean over the ranks of a few floats (losses: every rank decides the same)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend(self.training) == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.training)
        return tuple(float(v) for v in (t / self.world).cpu())


SINGLE = Group(rank=0, world=1)


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside it."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ConfigError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {exc}") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    return rank, world, local


def init_from_env(device: torch.device) -> Group:
    """Join the silo's ranks when started by torchrun (WORLD_SIZE > 1), else SINGLE.

    The rendezvous address comes from torchrun (MASTER_ADDR, MASTER_PORT). NCCL when the
    silo trains on CUDA, gloo on the CPU.
    """
    rank, world, local = env_world()
    if world == 1:
        return SINGLE
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=TRAINING_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    logger.info("rank %d of %d (%s for training, gloo for control)", rank, world, backend)
    return Group(rank, world, local, training=dist.group.WORLD, control=control)


def rank_device(spec: torch.device, group: Group) -> torch.device:
    """The device of this rank: with several ranks a bare "cuda" becomes cuda:LOCAL_RANK (one
    GPU per process)."""
    if group.world > 1 and spec.type == "cuda" and spec.index is None:
        return torch.device("cuda", group.local_rank)
    return spec


class ShardedSource(BatchSource):
    """A BatchSource's batches cut into the ranks' contiguous shards, each weighted by its share.

    Drawing stays the full source's (the same batch on every rank, a function of the seed); this
    rank keeps its rows of it. The caller makes sure every rank gets at least one row.
    """

    def __init__(self, full: BatchSource, group: Group) -> None:
        super().__init__(full.data, full.batch_size, full.seed, full.device)
        self.full = full
        self.group = group

    def batch(self, step: int, stream: int) -> dict[str, Tensor]:
        return shard(self.full.batch(step, stream), self.group.rank, self.group.world)


def _units(batch: Mapping[str, Tensor]) -> Tensor:
    """What the task's loss averages over, per row: answer tokens of a causal LM, else 1."""
    labels = batch.get("labels")
    if labels is not None and labels.dim() == 2:  # causal LM: shifted labels, -100 ignored
        return (labels[:, 1:] != -100).sum(dim=1)
    rows = next(iter(batch.values())).shape[0]
    return torch.ones(rows, dtype=torch.long)


def shard(batch: Mapping[str, Tensor], rank: int, world: int) -> dict[str, Tensor]:
    """Rows of `rank`'s contiguous shard, with SHARD_WEIGHT = world * (its units / all units)."""
    rows = next(iter(batch.values())).shape[0]
    bounds = [rows * i // world for i in range(world + 1)]
    start, stop = bounds[rank], bounds[rank + 1]
    units = _units(batch)
    total = int(units.sum())
    mine = int(units[start:stop].sum())
    part = {k: v[start:stop] for k, v in batch.items()}
    weight = world * mine / total if total else 0.0
    part[SHARD_WEIGHT] = torch.tensor(weight, dtype=torch.float32)
    return part
