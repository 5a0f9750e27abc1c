"""Algorithms: pure aggregation from sums, HETLoRA's rank math, client rounds on a real model."""

from __future__ import annotations

import math

import pytest
import torch

from pf2lora.common.algorithms import hetlora as het
from pf2lora.common.algorithms.aggregate import (
    WEIGHT_KEY,
    is_weight_key,
    mean_from_sum,
    sum_payloads,
    weighted_payload,
)
from pf2lora.common.algorithms.base import AlgorithmConfig
from pf2lora.common.algorithms.registry import ALGORITHMS, make_algorithm
from pf2lora.common.client_runtime import ClientRuntime, initial_global_state
from pf2lora.common.errors import ConfigError
from pf2lora.common.learning.config import AdapterConfig, TrainConfig
from pf2lora.common.state_io import load_state, save_state
from tests.helpers.tiny import MINI, source, text_data


def test_weighted_mean_is_recovered_from_the_sum_alone() -> None:
    g = torch.Generator().manual_seed(0)
    states = [
        {"a": torch.randn(3, 2, generator=g), "b": torch.randn(4, generator=g)} for _ in range(4)
    ]
    weights = [0.1, 0.2, 0.3, 0.4]
    summed = sum_payloads(weighted_payload(s, w) for s, w in zip(states, weights, strict=True))
    assert set(summed) == {"a", "b", WEIGHT_KEY}
    prev = {k: torch.zeros_like(v) for k, v in states[0].items()}
    mean = mean_from_sum(summed, prev)
    for k in ("a", "b"):
        expected = sum(w * s[k] for s, w in zip(states, weights, strict=True)) / sum(weights)
        torch.testing.assert_close(mean[k], expected)
    # survivors only: drop one payload, the mean renormalises over the rest
    summed3 = sum_payloads(
        weighted_payload(s, w) for s, w in zip(states[:3], weights[:3], strict=True)
    )
    expected3 = sum(w * s["a"] for s, w in zip(states[:3], weights[:3], strict=True)) / sum(
        weights[:3]
    )
    torch.testing.assert_close(mean_from_sum(summed3, prev)["a"], expected3)


def test_sum_refuses_mismatched_payloads_and_zero_weight_keeps_previous() -> None:
    with pytest.raises(ValueError, match="keys differ"):
        sum_payloads([{"a": torch.zeros(2)}, {"b": torch.zeros(2)}])
    with pytest.raises(ValueError, match="shape"):
        sum_payloads([{"a": torch.zeros(2)}, {"a": torch.zeros(3)}])
    prev = {"a": torch.ones(2)}
    out = mean_from_sum({"a": torch.zeros(2), WEIGHT_KEY: torch.tensor(0.0)}, prev)
    torch.testing.assert_close(out["a"], prev["a"])
    with pytest.raises(ValueError):
        weighted_payload({"a": torch.ones(1)}, float("nan"))


def test_hetlora_padding_truncation_and_norm_weighting() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 5, generator=g)
    b = torch.randn(7, 6, generator=g)
    pa, pb = het.pad_rank_a(a, 10), het.pad_rank_b(b, 10)
    assert pa.shape == (10, 5) and pb.shape == (7, 10)
    assert torch.equal(pa[:6], a) and float(pa[6:].abs().sum()) == 0
    assert torch.equal(pb[:, :6], b) and float(pb[:, 6:].abs().sum()) == 0
    torch.testing.assert_close(pb @ pa, b @ a)  # padding does not change the product
    assert torch.equal(het.truncate_rank_a(pa, 6), a) and torch.equal(het.truncate_rank_b(pb, 6), b)
    state = {"m.lora_A.weight": pa, "m.lora_B.weight": pb, "classifier.weight": torch.ones(2, 5)}
    w = het.norm_weights(state)
    assert w == {"__weight__/m": pytest.approx(float(torch.linalg.matrix_norm(b @ a)))}
    assert het.hetlora_weight_key("m.lora_A.weight") == "__weight__/m"
    assert het.hetlora_weight_key("classifier.weight") == WEIGHT_KEY


def test_hetlora_aggregation_is_norm_weighted_per_module() -> None:
    algo = make_algorithm(AlgorithmConfig(name="hetlora"), AdapterConfig())
    g = torch.Generator().manual_seed(2)
    raw = []
    for rank in (6, 10):
        a = torch.zeros(10, 4)
        b = torch.zeros(3, 10)
        a[:rank] = torch.randn(rank, 4, generator=g)
        b[:, :rank] = torch.randn(3, rank, generator=g)
        raw.append({"m.lora_A.weight": a, "m.lora_B.weight": b})
    payloads = []
    for s, p in zip(raw, (0.5, 0.5), strict=True):
        weights = {WEIGHT_KEY: p, **{k: p * v for k, v in het.norm_weights(s).items()}}
        payloads.append(weighted_payload(s, weights, het.hetlora_weight_key))
    out = algo.aggregate(
        sum_payloads(payloads), {k: torch.zeros_like(v) for k, v in raw[0].items()}
    )
    norms = [
        float(torch.linalg.matrix_norm(s["m.lora_B.weight"] @ s["m.lora_A.weight"])) for s in raw
    ]
    for key in raw[0]:
        expected = (norms[0] * raw[0][key] + norms[1] * raw[1][key]) / sum(norms)
        torch.testing.assert_close(out[key], expected)


def test_hetlora_tail_norm_and_pruning_rule() -> None:
    a = torch.ones(10, 3)
    b = torch.ones(4, 10)
    # gamma = 0.99, rank 10: the tail is rank index 9 only
    assert float(het.tail_norm(a, b, 10, 0.99)) == pytest.approx(math.sqrt(4) * math.sqrt(3))
    assert het.prune_rank(10, 0.99, tail_now=0.5, tail_before=None) == 10  # first round: no history
    assert het.prune_rank(10, 0.99, tail_now=0.5, tail_before=0.6) == 9  # shrank: prune
    assert het.prune_rank(10, 0.99, tail_now=0.7, tail_before=0.6) == 10  # grew: keep
    assert het.prune_rank(1, 0.5, tail_now=0.1, tail_before=0.6) == 1  # never below 1
    ranks = {het.assigned_rank(k, (6, 10), 0) for k in range(5)}
    assert ranks == {6, 7, 8, 9, 10}


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="algorithm='fedsgd'"):
        make_algorithm(AlgorithmConfig(name="fedsgd"), AdapterConfig())
    with pytest.raises(ConfigError, match="hetlora_gamma"):
        AlgorithmConfig(hetlora_gamma=1.5)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_runs_rounds_and_never_sends_private_state(name: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = AlgorithmConfig(name=name, train=TrainConfig(local_steps=2, batch_size=6))
    algo = make_algorithm(cfg, MINI.adapters)
    global_state = initial_global_state(algo, MINI, run_seed=0)
    data = text_data()
    rts = [
        ClientRuntime(algo, MINI, client_index=k, seed=10 + k, train=data, test=data)
        for k in range(2)
    ]
    for rt in rts:  # mark every private value so a leak would be visible
        with torch.no_grad():
            for p in rt.model.private_parameters().values():
                p.add_(1000.0)
    results = [rt.run_round(global_state, 0.5) for rt in rts]
    spec = algo.payload_spec({k: (tuple(v.shape), v.dtype) for k, v in global_state.items()})
    for res in results:
        assert set(res.payload) == set(spec)
        for t in res.payload.values():
            assert not torch.any(t.abs() > 500.0)
        assert math.isfinite(res.metrics["train_loss"])
    if algo.communicates:
        new = algo.aggregate(sum_payloads(r.payload for r in results), global_state)
        assert set(new) == set(global_state)
        assert any(not torch.equal(new[k], global_state[k]) for k in new)
    else:
        assert global_state == {} and all(r.payload == {} for r in results)
        new = global_state
    metrics = rts[0].evaluate(new)
    assert 0.0 <= metrics["personal_accuracy"] <= 1.0
    assert ("shared_accuracy" in metrics) == algo.communicates
    # durable client state: save, load into a fresh runtime, identical private state
    save_state(tmp_path / "c0.safetensors", *rts[0].client.state())
    fresh = ClientRuntime(algo, MINI, client_index=0, seed=10, train=data, test=data)
    fresh.client.restore(*load_state(tmp_path / "c0.safetensors"))
    for (n, p), (_, q) in zip(
        rts[0].model.private_parameters().items(),
        fresh.model.private_parameters().items(),
        strict=True,
    ):
        assert torch.equal(p, q), n
    if name == "hetlora":
        assert fresh.client.rank == rts[0].client.rank  # type: ignore[attr-defined]
    # the personalised evaluation of Per-FedAvg restores the shared adapter afterwards
    before = rts[0].model.shared_state()
    rts[0].client.evaluate(data, rts[0].source)
    after = rts[0].model.shared_state()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_algorithm_layouts_match_the_specification() -> None:
    base = AdapterConfig(shared_rank=8, private_rank=2)
    layouts = {
        n: make_algorithm(AlgorithmConfig(name=n), base).model_adapters() for n in ALGORITHMS
    }
    assert (layouts["pf2lora"].shared_rank, layouts["pf2lora"].private_rank) == (8, 2)
    assert (layouts["homlora"].shared_rank, layouts["homlora"].private_rank) == (8, 0)
    assert (layouts["perfedavg"].shared_rank, layouts["perfedavg"].private_rank) == (8, 0)
    assert (layouts["hetlora"].shared_rank, layouts["hetlora"].private_rank) == (10, 0)
    local = layouts["local"]
    assert (local.shared_rank, local.private_rank, local.head) == (0, 10, "private")
    src = source(text_data())
    assert src.batch(3, 0)["input_ids"].shape[0] == 8
    assert torch.equal(src.batch(3, 0)["input_ids"], src.batch(3, 0)["input_ids"])
    # the lower- and upper-level minibatches of one step are drawn independently
    assert not torch.equal(src.batch(3, 0)["input_ids"], src.batch(3, 1)["input_ids"])


def test_fedsa_sends_only_a_and_the_head_and_keeps_b_on_the_silo(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = AlgorithmConfig(name="fedsa", train=TrainConfig(local_steps=2, batch_size=6, ul_lr=0.05))
    algo = make_algorithm(cfg, MINI.adapters)
    global_state = initial_global_state(algo, MINI, run_seed=0)
    assert global_state and all(".lora_B." not in k for k in global_state)
    assert any(".lora_A." in k for k in global_state) and any(
        "classifier" in k for k in global_state
    )
    data = text_data()
    rts = [
        ClientRuntime(algo, MINI, client_index=k, seed=10 + k, train=data, test=data)
        for k in range(2)
    ]
    results = [rt.run_round(global_state, w) for rt, w in zip(rts, (0.25, 0.75), strict=True)]
    for res in results:  # only A (and the shared head), each multiplied by its weight
        names = {k for k in res.payload if not is_weight_key(k)}
        assert names == set(global_state)
    # the server step is the plain weighted mean of what was sent
    new = algo.aggregate(sum_payloads([r.payload for r in results]), global_state)
    sent = [rt.model.shared_state() for rt in rts]
    for k in global_state:
        torch.testing.assert_close(new[k], 0.25 * sent[0][k] + 0.75 * sent[1][k])
    # B trained locally, differs between the silos, survives receive_global and a restart
    b = [k for k in sent[0] if ".lora_B." in k]
    assert b and all(not torch.equal(sent[0][k], sent[1][k]) for k in b)
    rts[0].client.receive_global(new)
    assert all(torch.equal(rts[0].model.shared_state()[k], sent[0][k]) for k in b)
    save_state(tmp_path / "s.safetensors", *rts[0].client.state())
    fresh = ClientRuntime(algo, MINI, client_index=0, seed=10, train=data, test=data)
    fresh.client.receive_global(new)
    fresh.client.restore(*load_state(tmp_path / "s.safetensors"))
    assert all(torch.equal(fresh.model.shared_state()[k], sent[0][k]) for k in b)


def test_fedsa_with_a_private_head_keeps_the_head_too() -> None:
    algo = make_algorithm(AlgorithmConfig(name="fedsa"), AdapterConfig(head="private"))
    global_state = initial_global_state(algo, MINI, run_seed=0)
    assert global_state and all(".lora_A." in k for k in global_state)
