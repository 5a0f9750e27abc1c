"""Hypergradient estimators against finite differences on tiny problems (float64)."""

from __future__ import annotations

import torch

from pf2lora.common.learning import hypergrad as hg
from tests.helpers.tiny import linear_model, regression_data


def _toy(seed: int = 0, n: int = 40, d: int = 5, h: int = 4, mu: float = 0.5):  # type: ignore[no-untyped-def]
    """x = W (features tanh(X W)), y = V (linear readout); loss = MSE + mu/2 ||V||^2.

    Strongly convex in V, so y*(x) has a closed form (ridge regression)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, h, generator=g, dtype=torch.float64).requires_grad_(True)
    V = torch.randn(h, 1, generator=g, dtype=torch.float64).requires_grad_(True)
    X = torch.randn(2 * n, d, generator=g, dtype=torch.float64)
    Y = torch.randn(2 * n, 1, generator=g, dtype=torch.float64)
    xi = {"X": X[:n], "Y": Y[:n]}
    zeta = {"X": X[n:], "Y": Y[n:]}

    def loss(w, v, batch):  # type: ignore[no-untyped-def]
        phi = torch.tanh(batch["X"] @ w)
        return ((phi @ v - batch["Y"]) ** 2).mean() + 0.5 * mu * (v**2).sum()

    def loss_fn(overrides, batch):  # type: ignore[no-untyped-def]
        return loss(overrides.get("w", W), overrides.get("v", V), batch)

    def y_star(w):  # type: ignore[no-untyped-def]
        phi = torch.tanh(xi["X"] @ w)
        a = 2 * phi.T @ phi / n + mu * torch.eye(h, dtype=torch.float64)
        return torch.linalg.solve(a, 2 * phi.T @ xi["Y"] / n)

    return W, V, xi, zeta, loss, loss_fn, y_star


def _fd(f, w: torch.Tensor, direction: torch.Tensor, eps: float = 1e-6) -> float:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return float((f(w + eps * direction) - f(w - eps * direction)) / (2 * eps))


def test_unroll_matches_finite_differences_of_the_unrolled_objective() -> None:
    W, V, xi, zeta, loss, loss_fn, _ = _toy()
    beta = 0.3

    def unrolled(w):  # type: ignore[no-untyped-def]
        with torch.enable_grad():
            v = V.detach().clone().requires_grad_(True)
            gv = torch.autograd.grad(loss(w, v, xi), v)[0]
        return loss(w, V - beta * gv, zeta)

    res = hg.unroll(loss_fn, {"w": W}, {"v": V}, xi, zeta, beta)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        d = torch.randn(W.shape, generator=g, dtype=torch.float64)
        analytic = float((res.h["w"] * d).sum())
        numeric = _fd(unrolled, W.detach(), d)
        assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)
    # the second-order term matters: first-order differs
    fo = hg.first_order(loss_fn, {"w": W}, {"v": V}, xi, zeta, beta)
    assert not torch.allclose(fo.h["w"], res.h["w"], atol=1e-6)
    torch.testing.assert_close(res.y_new["v"], fo.y_new["v"])


def test_implicit_matches_finite_differences_of_the_true_hyperobjective() -> None:
    W, _, xi, zeta, loss, loss_fn, y_star = _toy()
    v_opt = y_star(W.detach()).requires_grad_(True)  # at the lower-level optimum

    def hyper(w):  # type: ignore[no-untyped-def]
        return loss(w, y_star(w), zeta)

    res = hg.implicit(loss_fn, {"w": W}, {"v": v_opt}, xi, zeta, beta=1e-12, terms=400, scale=0.2)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        d = torch.randn(W.shape, generator=g, dtype=torch.float64)
        analytic = float((res.h["w"] * d).sum())
        numeric = _fd(hyper, W.detach(), d)
        assert abs(analytic - numeric) <= 1e-5 * max(1.0, abs(numeric)), (analytic, numeric)
    # with the default short series it is an approximation, but a different one than none
    short = hg.implicit(loss_fn, {"w": W}, {"v": v_opt}, xi, zeta, beta=1e-12)
    direct = hg.first_order(loss_fn, {"w": W}, {"v": v_opt}, xi, zeta, beta=1e-12)
    assert not torch.allclose(short.h["w"], direct.h["w"])


def test_unroll_through_peft_functional_call_matches_finite_differences() -> None:
    """The same check on the real two-level LoRA model (functional_call substitution)."""
    m = linear_model(d=5, r=3, r_hat=2)
    m.peft.double()
    with torch.no_grad():
        for p in list(m.shared_parameters().values()) + list(m.private_parameters().values()):
            p.normal_(0, 0.3)
    data = regression_data(32, d=5)
    data = type(data)({k: v.double() for k, v in data.tensors.items()})
    xi, zeta = data.select(torch.arange(16)), data.select(torch.arange(16, 32))
    x, y = m.shared_parameters(), m.private_parameters()
    beta = 0.05
    res = hg.unroll(lambda o, b: m.loss(b, o), dict(x), dict(y), xi, zeta, beta)
    name = next(n for n in x if "lora_B" in n)
    p = x[name]

    def unrolled(value):  # type: ignore[no-untyped-def]
        saved = p.detach().clone()
        with torch.no_grad():
            p.copy_(value)
        with torch.enable_grad():
            gy = hg.grad_named(m.loss(xi), dict(y))
        out = m.loss(zeta, {n: y[n] - beta * gy[n] for n in y})
        with torch.no_grad():
            p.copy_(saved)
        return out

    d = torch.randn(p.shape, dtype=torch.float64)
    analytic = float((res.h[name] * d).sum())
    numeric = _fd(unrolled, p.detach().clone(), d)
    assert abs(analytic - numeric) <= 1e-5 * max(1.0, abs(numeric)), (analytic, numeric)


def test_maml_hessian_free_equals_exact_meta_gradient_on_quadratic() -> None:
    """On a quadratic, HF Per-FedAvg is the exact gradient of f(x - a grad f(x))."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(4, 4, generator=g, dtype=torch.float64)
    H = A @ A.T + torch.eye(4, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    x = torch.randn(4, generator=g, dtype=torch.float64).requires_grad_(True)

    def loss_fn(overrides, batch):  # type: ignore[no-untyped-def]
        z = overrides.get("x", x)
        return 0.5 * z @ H @ z - b @ z

    alpha = 0.05
    meta, _ = hg.maml_hessian_free(loss_fn, {"x": x}, ({}, {}, {}), alpha)
    xd = x.detach()
    grad = H @ xd - b
    exact = (torch.eye(4, dtype=torch.float64) - alpha * H) @ (H @ (xd - alpha * grad) - b)
    torch.testing.assert_close(meta["x"], exact)


def test_clipped_lower_level_step_unroll_matches_finite_differences() -> None:
    """With ll_max_norm active, unroll differentiates through the clip factor too."""
    W, V, xi, zeta, loss, loss_fn, _ = _toy()
    beta = 0.3
    with torch.enable_grad():
        raw = torch.autograd.grad(loss(W, V, xi), V)[0]
    max_norm = 0.25 * float(raw.norm())  # the clip is active at W
    assert max_norm > 0

    def unrolled(w):  # type: ignore[no-untyped-def]
        with torch.enable_grad():
            v = V.detach().clone().requires_grad_(True)
            gv = torch.autograd.grad(loss(w, v, xi), v)[0]
        gv = gv * min(1.0, max_norm / float(gv.norm()))
        return loss(w, V - beta * gv, zeta)

    res = hg.unroll(loss_fn, {"w": W}, {"v": V}, xi, zeta, beta, ll_max_norm=max_norm)
    # the LL step has exactly the clipped length
    step = (V.detach() - res.y_new["v"]).norm() / beta
    assert abs(float(step) - max_norm) <= 1e-9 * max_norm
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        d = torch.randn(W.shape, generator=g, dtype=torch.float64)
        analytic = float((res.h["w"] * d).sum())
        numeric = _fd(unrolled, W.detach(), d)
        assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)
    # a bound above the gradient's norm changes nothing
    loose = hg.unroll(loss_fn, {"w": W}, {"v": V}, xi, zeta, beta, ll_max_norm=1e6)
    plain = hg.unroll(loss_fn, {"w": W}, {"v": V}, xi, zeta, beta)
    torch.testing.assert_close(loose.h["w"], plain.h["w"])
    torch.testing.assert_close(loose.y_new["v"], plain.y_new["v"])


def test_unroll_on_a_real_encoder_batch_without_padding() -> None:
    """Regression: a batch whose sentences fill every column has no attention mask to apply, so
    the encoder took the fused SDPA kernel, which has no double backward: unroll raised
    "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented". Base models load with eager attention now."""
    from pf2lora.common.learning.batching import encode_texts
    from tests.helpers.tiny import mini_model, tokenizer

    m = mini_model()
    same = ["a wonderful film", "a dreadful film", "a charming film", "a boring film"]
    data = encode_texts(same, [1, 0, 1, 0], tokenizer(), 16, "seq-cls")
    assert bool(data.tensors["attention_mask"].all())  # no padding anywhere
    x, y = m.shared_parameters(), m.private_parameters()
    res = hg.unroll(lambda o, b: m.loss(b, o), dict(x), dict(y), data.tensors, data.tensors, 0.1)
    assert all(torch.isfinite(h).all() for h in res.h.values())
    assert any(h.abs().sum() > 0 for h in res.h.values())
