"""A silo of several processes (`torchrun --nproc-per-node N pf2lora silo serve`): rank 0 is the
daemon, the other ranks follow it.

Rank 0 alone talks to the coordinator, reads and writes the silo's state, evaluates, reports and
sends. Before each step that needs the other ranks it broadcasts a command on the control group
(common/learning/distributed.py):

  context  (run, client index)   build the run's model and data, as rank 0 just did
  sync     (private state)       take rank 0's private adapter, optimizer state and counters
                                 (after it loaded them from disk: a restart, a resume)
  round    (global state, weight) train one local round on this rank's shard of every batch
  stop                           exit 0

Every rank then trains the same round together (gradients averaged before every step), so the
private adapter stays identical on every rank. A follower that fails exits non-zero, which makes
torchrun stop the whole silo: its round is not sent, and the silo resumes from its last saved
state when it is started again, as after any crash.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from pf2lora.common.errors import Pf2LoraError
from pf2lora.common.learning.distributed import Group
from pf2lora.common.learning.trainer import Diverged
from pf2lora.common.wire.tasks import RunInfo
from pf2lora.silo.config import SiloConfig
from pf2lora.silo.runtime import RunContext, build_context

logger = logging.getLogger(__name__)

CONTEXT, SYNC, ROUND, STOP = "context", "sync", "round", "stop"


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in tensors.items()}


class RankFailed(Pf2LoraError):
    """Another rank died or failed: the silo's processes are out of step and must all restart."""


class Leader:
    """Rank 0's side: the commands the daemon sends its followers (RankFailed when they cannot
    be reached)."""

    def __init__(self, group: Group) -> None:
        if not group.leader or group.world < 2:
            raise ValueError("Leader is rank 0 of a group of several processes")
        self.group = group

    def _send(self, *command: Any) -> None:
        try:
            dist.broadcast_object_list([command], src=0, group=self.group.control)
        except RuntimeError as exc:  # gloo: a peer closed its connection
            raise RankFailed(f"another rank of this silo is gone ({exc})") from exc

    def context(self, run: RunInfo, client_index: int) -> None:
        self._send(CONTEXT, run, client_index)

    def sync(self, ctx: RunContext) -> None:
        tensors, meta = ctx.runtime.client.state()
        self._send(SYNC, _cpu(tensors), meta)

    def round(self, global_state: dict[str, torch.Tensor], weight: float) -> None:
        self._send(ROUND, _cpu(global_state), weight)

    def stop(self) -> None:
        self._send(STOP)


def follow(cfg: SiloConfig, group: Group) -> int:
    """A follower rank's life: carry out rank 0's commands until it says stop."""
    if cfg.silo.threads:
        torch.set_num_threads(cfg.silo.threads)
    ctx: RunContext | None = None
    logger.info("rank %d of %d: following rank 0", group.rank, group.world)
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=group.control)
        kind, *args = box[0]
        if kind == STOP:
            logger.info("rank %d: stopped by rank 0", group.rank)
            return 0
        if kind == CONTEXT:
            run, client_index = args
            ctx = None
            ctx = build_context(run, client_index, cfg, group)
            continue
        if ctx is None:
            raise RuntimeError(f"rank {group.rank}: {kind!r} before any run context")
        if kind == SYNC:
            tensors, meta = args
            ctx.runtime.client.restore(tensors, meta)
        elif kind == ROUND:
            global_state, weight = args
            try:
                ctx.runtime.run_round(global_state, weight)
            except Diverged as exc:  # every rank saw the same losses: rank 0 refuses the run
                logger.warning("rank %d: %s", group.rank, exc)
                ctx = None
        else:
            raise RuntimeError(f"rank {group.rank}: unknown command {kind!r}")
