"""The bilevel local trainer: LL SGD on the private adapter, UL AdamW on the shared one.

The trainer owns the format of a silo's private state: `state_tensors()` gives everything that
stays on the silo (private adapter under `private/`, UL optimizer moments under `ul_opt/`,
step counters in the metadata) and `load_state_tensors()` takes it back, so a silo can stop
between any two rounds and continue bit-identically. Where the state lives on disk, and how it
is written atomically, is the silo's (silo/state.py). Randomness (minibatches, dropout) is
derived from (seed, step), so no RNG state is needed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pf2lora.common.errors import DataError
from pf2lora.common.learning import hypergrad as hg
from pf2lora.common.learning.batching import (
    STREAM_AUX,
    STREAM_LL,
    STREAM_LL_EXTRA,
    STREAM_UL,
    BatchSource,
    derive_seed,
)
from pf2lora.common.learning.config import TrainConfig
from pf2lora.common.learning.distributed import SHARD_WEIGHT, SINGLE, Group
from pf2lora.common.learning.model import TwoLevelModel

logger = logging.getLogger(__name__)

Objective = Literal["bilevel", "plain", "maml"]
STATE_VERSION = 1
PRIVATE_PREFIX = "private/"  # state tensor names of the private adapter: private/<parameter>
UL_OPT_PREFIX = "ul_opt/"  # the UL optimizer's state: ul_opt/<parameter>/<moment>


# A step whose loss is this many times the round's first (and at least DIVERGED_MARGIN above
# it) ends the round as diverged, as does a non-finite loss: nothing of it is sent.
DIVERGED_RATIO = 10.0
DIVERGED_MARGIN = 5.0


class Diverged(DataError):
    """Local training diverged (a non-finite or exploding loss); the round must not be sent."""


def private_tensors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The private adapter held in a state's tensors (as `state_tensors` writes them)."""
    n = len(PRIVATE_PREFIX)
    return {k[n:]: v for k, v in state.items() if k.startswith(PRIVATE_PREFIX)}


class BilevelTrainer:
    """Runs local steps on one silo's two-level model.

    objective:
      - "bilevel": PF2LoRA with cfg.hypergrad (`joint` = one AdamW over x and y on one batch);
      - "plain": AdamW on every trainable parameter on one batch per step (HOMLoRA, HETLoRA,
        local-only);
      - "maml": Per-FedAvg's Hessian-free meta-gradient on the shared parameters.
    """

    def __init__(
        self,
        model: TwoLevelModel,
        cfg: TrainConfig,
        seed: int,
        *,
        objective: Objective = "bilevel",
        maml_alpha: float = 0.01,
        extra_loss: Callable[[], Tensor] | None = None,
        grad_mask: Callable[[dict[str, Tensor]], None] | None = None,
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.seed = seed
        self.objective = objective
        self.maml_alpha = maml_alpha
        self.extra_loss = extra_loss
        self.grad_mask = grad_mask
        self.group: Group = SINGLE  # several processes per silo: distribute()
        self._per_example: Any = None  # DP-SGD: Opacus hooks on the model (learning/per_example)
        self._dp_noise: torch.Generator | None = None
        self._last_loss = float("nan")
        self.x = model.shared_parameters()
        self.y = model.private_parameters()
        self.step = 0  # local steps taken over the silo's lifetime
        self.rounds = 0  # local rounds completed
        if objective == "bilevel" and cfg.hypergrad != "joint" and not self.y:
            raise DataError("a bilevel objective needs a private adapter (private_rank > 0)")
        joint = objective == "plain" or (objective == "bilevel" and cfg.hypergrad == "joint")
        ul_params = {**self.x, **self.y} if joint else dict(self.x)
        self.ul_names = tuple(ul_params)
        self.ul_opt = self._adamw(ul_params) if ul_params else None

    def _adamw(self, params: Mapping[str, nn.Parameter]) -> torch.optim.AdamW:
        return torch.optim.AdamW(
            list(params.values()),
            lr=self.cfg.ul_lr,
            weight_decay=self.cfg.weight_decay,
            foreach=False,  # the same kernel on every run: bit-identical resume
        )

    def distribute(self, group: Group) -> None:
        """Train as one of `group`'s ranks: the source gives this rank's shard of each batch
        (distributed.ShardedSource) and every gradient is averaged over the ranks."""
        self.group = group

    # ------------------------------------------------------------------ training
    def _loss_fn(self) -> hg.LossFn:
        model = self.model

        def loss_fn(overrides: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
            loss = model.loss(batch, overrides)
            if SHARD_WEIGHT in batch:  # a rank's shard: its share of the whole batch's loss
                loss = loss * batch[SHARD_WEIGHT].to(loss.device)
            if self.extra_loss is not None:
                loss = loss + self.extra_loss()
            return loss

        return loss_fn

    def train_round(self, source: BatchSource, steps: int | None = None) -> dict[str, float]:
        """Run `steps` (default cfg.local_steps) local steps; returns mean losses and timing."""
        steps = steps or self.cfg.local_steps
        if self.cfg.reset_ul_optimizer and self.ul_opt is not None:
            self.ul_opt.state.clear()
        self.model.train()
        t0 = time.perf_counter()
        ll_losses: list[float] = []
        ul_losses: list[float] = []
        bar = tqdm(range(steps), desc="local steps", leave=False, disable=not self.cfg.progress)
        for _ in bar:
            torch.manual_seed(self._dropout_seed())
            ll, ul = self._one_step(source)
            ll, ul = self.group.mean_scalars(ll, ul)  # every rank sees (and judges) the same
            self._check_diverged(ll, ul, ul_losses[0] if ul_losses else ul)
            ll_losses.append(ll)
            ul_losses.append(ul)
            self.step += 1
            bar.set_postfix(loss=f"{ul:.4f}")
        self.rounds += 1
        return {
            "train_loss": sum(ul_losses) / len(ul_losses),
            "ll_loss": sum(ll_losses) / len(ll_losses),
            "train_seconds": time.perf_counter() - t0,
            "local_steps": float(steps),
        }

    def _dropout_seed(self) -> int:
        if self.group.world == 1:
            return derive_seed(self.seed, self.step, "dropout")
        return derive_seed(self.seed, self.step, "dropout", self.group.rank)  # own masks per rank

    def _check_diverged(self, ll: float, ul: float, first: float) -> None:
        exploding = ul > DIVERGED_RATIO * first and ul > first + DIVERGED_MARGIN
        if math.isfinite(ll) and math.isfinite(ul) and not exploding:
            return
        raise Diverged(
            f"local training diverged at step {self.step} (round {self.rounds + 1}): loss "
            f"{ul:.4g} (lower level {ll:.4g}, first step of the round {first:.4g}); nothing of "
            "this round is sent. Lower the learning rates (ul_lr, ll_lr) or clip the lower "
            "level (ll_max_grad_norm)"
        )

    def _one_step(self, source: BatchSource) -> tuple[float, float]:
        loss_fn = self._loss_fn()
        cfg = self.cfg
        if self.objective == "maml":
            batches = tuple(source.batch(self.step, s) for s in (STREAM_LL, STREAM_UL, STREAM_AUX))
            h, outer = hg.maml_hessian_free(
                loss_fn, dict(self.x), batches, self.maml_alpha, self.group
            )
            self._apply_ul(h)
            return outer, outer
        if self.objective == "plain" or cfg.hypergrad == "joint":
            batch = source.batch(self.step, STREAM_UL)
            params = {n: p for n, p in {**self.x, **self.y}.items() if n in self.ul_names}
            if cfg.dp_sgd_clip is not None:
                grads, value = self._dp_grads(lambda: loss_fn({}, batch), batch, params, source)
                self._apply_ul(grads)
                return value, value
            loss = loss_fn({}, batch)
            grads = self.group.mean(hg.grad_named(loss, params))
            self._apply_ul(grads)
            value = float(loss.detach())
            return value, value
        if cfg.dp_sgd_clip is not None:  # first-order only (algorithms/dp.py refuses the rest)
            return self._dp_first_order(loss_fn, source)
        beta = cfg.ll_lr
        clip = cfg.ll_max_grad_norm
        group = self.group
        for i in range(cfg.ll_steps - 1):  # lower-level steps the hypergradient does not see
            batch = source.batch(self.step, STREAM_LL_EXTRA + i)
            y_hat, _ = hg.lower_level_step(
                loss_fn, dict(self.y), batch, beta, create_graph=False, max_norm=clip, group=group
            )
            with torch.no_grad():
                for n, p in self.y.items():
                    p.copy_(y_hat[n])
        ll_batch = source.batch(self.step, STREAM_LL)
        ul_batch = source.batch(self.step, STREAM_UL)
        x, y = dict(self.x), dict(self.y)
        if cfg.hypergrad == "unroll":
            res = hg.unroll(loss_fn, x, y, ll_batch, ul_batch, beta, ll_max_norm=clip, group=group)
        elif cfg.hypergrad == "implicit":
            res = hg.implicit(
                loss_fn,
                x,
                y,
                ll_batch,
                ul_batch,
                beta,
                terms=cfg.neumann_terms,
                scale=cfg.neumann_scale,
                ll_max_norm=clip,
                group=group,
            )
        else:
            res = hg.first_order(
                loss_fn, x, y, ll_batch, ul_batch, beta, ll_max_norm=clip, group=group
            )
        with torch.no_grad():
            for n, p in self.y.items():
                p.copy_(res.y_new[n])  # y <- y_hat (detached)
        self._apply_ul(res.h)
        return res.ll_loss, res.ul_loss

    def dp_sgd_queries(self) -> int:
        """DP-SGD gradient queries so far (each on its own Poisson batch): one per step, or
        ll_steps + 1 for the first-order estimator (every lower-level step and the upper)."""
        first_order = self.objective == "bilevel" and self.cfg.hypergrad == "first-order"
        return self.step * (self.cfg.ll_steps + 1 if first_order else 1)

    def _dp_first_order(self, loss_fn: hg.LossFn, source: BatchSource) -> tuple[float, float]:
        """First-order step under DP-SGD: every lower-level SGD step on y and the upper-level
        gradient at (x, y_hat) are DP-SGD queries, so nothing that shapes x sees an example
        unclipped and un-noised. y is updated in place, so the upper-level loss at y_hat needs
        no substitution."""
        cfg = self.cfg
        ll = float("nan")
        for i in range(cfg.ll_steps):
            stream = STREAM_LL_EXTRA + i if i < cfg.ll_steps - 1 else STREAM_LL
            batch = source.batch(self.step, stream)
            g, ll = self._dp_grads(partial(loss_fn, {}, batch), batch, dict(self.y), source)
            g = hg.clip_named(g, cfg.ll_max_grad_norm)  # after the noise: post-processing
            with torch.no_grad():
                for n, p in self.y.items():
                    p.sub_(cfg.ll_lr * g[n])
        ul_batch = source.batch(self.step, STREAM_UL)
        h, ul = self._dp_grads(lambda: loss_fn({}, ul_batch), ul_batch, dict(self.x), source)
        self._apply_ul(h)
        return ll, ul

    def _dp_grads(
        self,
        loss: Callable[[], Tensor],
        batch: Mapping[str, Tensor],
        params: dict[str, nn.Parameter],
        source: BatchSource,
    ) -> tuple[dict[str, Tensor], float]:
        """One DP-SGD query: per-example gradients of `params`, each clipped, summed, noised,
        over the expected batch size (per_example.py); and the batch's loss."""
        from pf2lora.common.learning.per_example import PerExampleGrads, clip_and_noise

        cfg = self.cfg
        assert cfg.dp_sgd_clip is not None
        if self._per_example is None:
            import secrets

            self._per_example = PerExampleGrads(self.model.peft)
            self._dp_noise = torch.Generator().manual_seed(secrets.randbits(63))
        assert self._dp_noise is not None
        rows = next(iter(batch.values())).shape[0]
        if rows:
            per_example, value = self._per_example(loss, params)
            self._last_loss = value
        else:  # Poisson sampling drew nobody: the query is noise alone
            per_example = {n: p.detach()[None][:0] for n, p in params.items()}
            value = self._last_loss
        sigma = cfg.dp_sgd_noise_multiplier
        expected = source.batch_size
        grads = clip_and_noise(per_example, cfg.dp_sgd_clip, sigma, expected, self._dp_noise)
        return grads, value

    def _apply_ul(self, grads: dict[str, Tensor]) -> None:
        if self.ul_opt is None:
            return
        if self.grad_mask is not None:
            self.grad_mask(grads)
        params = {**self.x, **self.y}
        for n in self.ul_names:
            params[n].grad = grads[n].detach().clone()
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(
                [params[n] for n in self.ul_names], self.cfg.max_grad_norm
            )
        self.ul_opt.step()
        self.ul_opt.zero_grad(set_to_none=True)

    # --------------------------------------------------------------------- state
    def state_tensors(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Everything that stays on the silo, as (tensors, JSON-able metadata): private adapter,
        UL optimizer state, counters. The format of a silo's state file."""
        tensors: dict[str, Tensor] = {
            f"{PRIVATE_PREFIX}{n}": p.detach().clone() for n, p in self.y.items()
        }
        if self.ul_opt is not None:
            params = {**self.x, **self.y}
            for n in self.ul_names:
                st = self.ul_opt.state.get(params[n], {})
                for key, value in st.items():
                    if isinstance(value, Tensor):
                        tensors[f"{UL_OPT_PREFIX}{n}/{key}"] = value.detach().clone()
        meta = {
            "version": STATE_VERSION,
            "step": self.step,
            "rounds": self.rounds,
            "seed": self.seed,
            "objective": self.objective,
        }
        return tensors, meta

    def load_state_tensors(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Take back what `state_tensors` gave; DataError if it belongs to another trainer."""
        if meta.get("version") != STATE_VERSION:
            raise DataError(f"trainer state version {meta.get('version')} != {STATE_VERSION}")
        if meta.get("objective") != self.objective:
            raise DataError(
                f"trainer state is for objective {meta.get('objective')!r}, not {self.objective!r}"
            )
        missing = [n for n in self.y if f"{PRIVATE_PREFIX}{n}" not in tensors]
        if missing:
            raise DataError(f"trainer state lacks private tensors {missing[:3]}")
        with torch.no_grad():
            for n, p in self.y.items():
                p.copy_(tensors[f"{PRIVATE_PREFIX}{n}"])
        if self.ul_opt is not None:
            params = {**self.x, **self.y}
            self.ul_opt.state.clear()
            for n in self.ul_names:
                st = {
                    key.rsplit("/", 1)[1]: _opt_tensor(key, t, params[n].device)
                    for key, t in tensors.items()
                    if key.startswith(f"{UL_OPT_PREFIX}{n}/")
                }
                if st:
                    self.ul_opt.state[params[n]] = st
        self.step = int(meta["step"])
        self.rounds = int(meta["rounds"])
        self.seed = int(meta["seed"])


def _opt_tensor(key: str, t: Tensor, device: torch.device) -> Tensor:
    """AdamW keeps `step` on the CPU (unless capturable) and moments next to the parameter."""
    return t.clone() if key.endswith("/step") else t.to(device, copy=True)
