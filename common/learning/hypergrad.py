"""Hypergradient estimators of the bilevel local problem (docs/algorithm.md §2), as pure functions.

Notation: x = shared (upper level) parameters, y = private (lower level) parameters,
g = f_k(. ; xi) the lower-level loss, f = f_k(. ; zeta) the upper-level loss.
`loss_fn(overrides, batch)` evaluates the model with some parameters substituted
(torch.func.functional_call); parameters not overridden are the model's own leaves.

`group`: the silo's ranks when several processes train it (distributed.py). Every gradient an
estimator uses is averaged over them (`group.mean`), so each rank, holding a shard of every
batch, computes the estimate the whole batch gives; with one process the mean is the identity.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from pf2lora.common.learning.distributed import SINGLE, Group

Named = dict[str, Tensor]
Params = Mapping[str, Tensor]  # inputs: a dict of Parameters is one too (dict is invariant)
LossFn = Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], Tensor]


@dataclass
class HyperStep:
    """Result of one estimator call: the UL gradient h, the new (detached) y, the losses."""

    h: Named
    y_new: Named
    ll_loss: float
    ul_loss: float


def grad_named(out: Tensor, inputs: Params, **kwargs: object) -> Named:
    names = list(inputs)
    grads = torch.autograd.grad(out, [inputs[n] for n in names], allow_unused=True, **kwargs)  # type: ignore[call-overload]
    return {
        n: (g if g is not None else torch.zeros_like(inputs[n]))
        for n, g in zip(names, grads, strict=True)
    }


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[n] * b[n]).sum() for n in a)  # type: ignore[return-value]


def clip_named(grads: Named, max_norm: float | None) -> Named:
    """grads * min(1, max_norm / ||grads||) over all tensors together (differentiable)."""
    if max_norm is None or not grads:
        return grads
    norm = torch.sqrt(sum((g * g).sum() for g in grads.values()))  # type: ignore[arg-type]
    factor = torch.clamp(max_norm / (norm + 1e-12), max=1.0)
    return {n: g * factor for n, g in grads.items()}


def lower_level_step(
    loss_fn: LossFn,
    y: Params,
    batch_ll: Mapping[str, Tensor],
    beta: float,
    *,
    create_graph: bool,
    max_norm: float | None = None,
    group: Group = SINGLE,
) -> tuple[Named, float]:
    """y_hat = y - beta * clip(grad_y g(x, y; xi)); with create_graph, y_hat stays a function
    of x (the clip factor and, across ranks, every rank's part included). `max_norm` None: no
    clipping."""
    loss = loss_fn({}, batch_ll)
    g_local = grad_named(loss, y, create_graph=create_graph)
    g_y = clip_named(group.mean(g_local, differentiable=create_graph), max_norm)
    y_hat = {n: y[n] - beta * g_y[n] for n in y}  # same shapes as y
    return y_hat, float(loss.detach())


def unroll(
    loss_fn: LossFn,
    x: Params,
    y: Params,
    batch_ll: Mapping[str, Tensor],
    batch_ul: Mapping[str, Tensor],
    beta: float,
    *,
    ll_max_norm: float | None = None,
    group: Group = SINGLE,
) -> HyperStep:
    """h = d/dx f(x, y_hat(x); zeta), differentiating through the SGD step (one HVP)."""
    y_hat, ll_loss = lower_level_step(
        loss_fn, y, batch_ll, beta, create_graph=True, max_norm=ll_max_norm, group=group
    )
    ul = loss_fn(y_hat, batch_ul)
    h = group.mean(grad_named(ul, x))
    return HyperStep(h, {n: t.detach() for n, t in y_hat.items()}, ll_loss, float(ul.detach()))


def first_order(
    loss_fn: LossFn,
    x: Params,
    y: Params,
    batch_ll: Mapping[str, Tensor],
    batch_ul: Mapping[str, Tensor],
    beta: float,
    *,
    ll_max_norm: float | None = None,
    group: Group = SINGLE,
) -> HyperStep:
    """h = grad_x f(x, y_hat; zeta) with y_hat treated as a constant."""
    y_hat, ll_loss = lower_level_step(
        loss_fn, y, batch_ll, beta, create_graph=False, max_norm=ll_max_norm, group=group
    )
    y_hat = {n: t.detach() for n, t in y_hat.items()}
    ul = loss_fn(y_hat, batch_ul)
    return HyperStep(group.mean(grad_named(ul, x)), y_hat, ll_loss, float(ul.detach()))


def implicit(
    loss_fn: LossFn,
    x: Params,
    y: Params,
    batch_ll: Mapping[str, Tensor],
    batch_ul: Mapping[str, Tensor],
    beta: float,
    *,
    terms: int = 3,
    scale: float = 0.01,
    ll_max_norm: float | None = None,
    group: Group = SINGLE,
) -> HyperStep:
    """h = grad_x f - grad2_xy g . v,  v ~ [grad2_yy g]^-1 grad_y f (Neumann series, HVPs only).

    v = scale * sum_{k=0..terms} (I - scale * H_yy)^k grad_y f, evaluated at (x, y_hat).
    """
    y_hat, ll_loss = lower_level_step(
        loss_fn, y, batch_ll, beta, create_graph=False, max_norm=ll_max_norm, group=group
    )
    y_hat = {n: t.detach().requires_grad_(True) for n, t in y_hat.items()}
    ul = loss_fn(y_hat, batch_ul)
    both = {**x, **{f"\0y:{n}": t for n, t in y_hat.items()}}
    g_both = group.mean(grad_named(ul, both))
    gx_f = {n: g_both[n] for n in x}
    gy_f = {n: g_both[f"\0y:{n}"] for n in y_hat}
    ll = loss_fn(y_hat, batch_ll)
    gy_g = grad_named(ll, y_hat, create_graph=True)  # a function of x and y_hat
    p = {n: t.clone() for n, t in gy_f.items()}
    v = {n: t.clone() for n, t in gy_f.items()}
    for _ in range(terms):
        hvp = group.mean(grad_named(_dot(gy_g, p), y_hat, retain_graph=True))  # H_yy p
        p = {n: p[n] - scale * hvp[n] for n in p}
        v = {n: v[n] + p[n] for n in v}
    v = {n: scale * t for n, t in v.items()}
    cross = group.mean(grad_named(_dot(gy_g, v), x))  # grad2_xy g . v
    h = {n: gx_f[n] - cross[n] for n in x}
    return HyperStep(h, {n: t.detach() for n, t in y_hat.items()}, ll_loss, float(ul.detach()))


def maml_hessian_free(
    loss_fn: LossFn,
    x: Params,
    batches: tuple[Mapping[str, Tensor], ...],
    alpha: float,
    group: Group = SINGLE,
) -> tuple[Named, float]:
    """Per-FedAvg (HF): (I - alpha H(x; D3)) grad f(x - alpha grad f(x; D1); D2).

    `loss_fn` here overrides x itself; returns the meta-gradient and the outer loss.
    """
    d1, d2, d3 = batches
    g1 = group.mean(grad_named(loss_fn({}, d1), x))
    # the adapted point as fresh leaves, so the gradient is taken there (first-order in D2)
    x_leaf = {n: (x[n] - alpha * g1[n]).detach().requires_grad_(True) for n in x}
    outer = loss_fn(x_leaf, d2)
    g2 = group.mean(grad_named(outer, x_leaf))
    inner = loss_fn({}, d3)
    g3 = grad_named(inner, x, create_graph=True)
    hvp = group.mean(grad_named(_dot(g3, g2), x))  # H(x; D3) g2
    return {n: g2[n] - alpha * hvp[n] for n in x}, float(outer.detach())
