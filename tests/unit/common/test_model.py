"""The two-level model: adapters, shared-state extraction and loading, the privacy boundary."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pf2lora.common.errors import ConfigError, InvalidArgument
from pf2lora.common.learning.config import AdapterConfig
from pf2lora.common.learning.model import PRIVATE, SHARED, TwoLevelModel
from tests.helpers import tiny
from tests.helpers.tiny import linear_model, mini_model, regression_data, text_data


def _fill_private_with_sentinel(model) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    sentinels = {}
    with torch.no_grad():
        for i, (name, p) in enumerate(model.private_parameters().items()):
            p.copy_(torch.full_like(p, 1234.5 + i))
            sentinels[name] = p.detach().clone()
    return sentinels


def test_both_adapters_active_with_expected_ranks_and_init() -> None:
    m = mini_model()
    shared = m.shared_parameters()
    private = m.private_parameters()
    a = [p for n, p in shared.items() if "lora_A" in n]
    b = [p for n, p in shared.items() if "lora_B" in n]
    c = [p for n, p in private.items() if "lora_A" in n]
    d = [p for n, p in private.items() if "lora_B" in n]
    assert len(a) == len(b) == len(c) == len(d) == 2  # query and value of one layer
    assert all(t.shape[0] == 8 for t in a) and all(t.shape[1] == 8 for t in b)
    assert all(t.shape[0] == 2 for t in c) and all(t.shape[1] == 2 for t in d)
    assert all(float(t.detach().abs().sum()) == 0 for t in b + d)  # B = 0, D = 0: W_k = W0 at start
    assert all(float(t.detach().abs().sum()) > 0 for t in a + c)
    assert any("classifier" in n for n in shared)  # the head is shared by default
    assert not any("classifier" in n for n in private)
    trainable = {n for n, p in m.peft.named_parameters() if p.requires_grad}
    assert trainable == set(shared) | set(private)


def test_shared_state_holds_no_private_tensor() -> None:
    m = mini_model()
    sentinels = _fill_private_with_sentinel(m)
    state = m.shared_state()
    assert set(state) == set(m._shared_key_map())
    assert not any(PRIVATE in k for k in state)
    for t in state.values():
        for s in sentinels.values():
            assert not (t.shape == s.shape and torch.equal(t, s))
        assert not torch.any(t >= 1234.0), "a private value leaked into the shared state"
    # the shared state is a copy: changing it cannot touch the model
    for t in state.values():
        t.add_(1.0)
    assert not torch.equal(next(iter(state.values())), next(iter(m.shared_state().values())))


def test_load_shared_state_round_trip_and_refusals() -> None:
    m1, m2 = mini_model(shared_seed=1), mini_model(shared_seed=2)
    s1 = m1.shared_state()
    assert any(not torch.equal(s1[k], v) for k, v in m2.shared_state().items())
    private_before = {n: p.detach().clone() for n, p in m2.private_parameters().items()}
    m2.load_shared_state(s1)
    assert all(torch.equal(s1[k], v) for k, v in m2.shared_state().items())
    assert all(torch.equal(private_before[n], p) for n, p in m2.private_parameters().items())
    bad = dict(s1)
    key = next(k for k in bad if "lora_A" in k)
    bad[key] = torch.zeros(3, 3)
    with pytest.raises(InvalidArgument, match="shape"):
        m2.load_shared_state(bad)
    with pytest.raises(InvalidArgument, match="missing"):
        m2.load_shared_state({k: v for k, v in s1.items() if k != key})
    with pytest.raises(InvalidArgument, match="unknown"):
        m2.load_shared_state({**s1, "evil.lora_A.weight": torch.zeros(1)})


def test_same_seed_gives_same_shared_init_private_seed_differs() -> None:
    a, b = mini_model(shared_seed=7, private_seed=1), mini_model(shared_seed=7, private_seed=2)
    assert all(torch.equal(v, b.shared_state()[k]) for k, v in a.shared_state().items())
    pa, pb = a.private_parameters(), b.private_parameters()
    assert any(not torch.equal(pa[n], pb[n]) for n in pa)


def test_private_disabled_is_w0_plus_shared() -> None:
    m = linear_model()
    with torch.no_grad():
        for p in m.private_parameters().values():
            p.normal_()
        for p in m.shared_parameters().values():
            p.normal_()
    batch = regression_data(8).select(torch.arange(8))
    full = m.forward_batch(batch)[1]
    with m.private_disabled():
        shared_only = m.forward_batch(batch)[1]
    base = batch["x"] @ m.peft.base_model.model.linear.base_layer.weight.T
    ((delta_name, _),) = m.delta_weights().items()
    layer = m.peft.base_model.model.linear
    ba = layer.scaling[SHARED] * layer.lora_B[SHARED].weight @ layer.lora_A[SHARED].weight
    torch.testing.assert_close(shared_only, base + batch["x"] @ ba.T)
    assert not torch.allclose(full, shared_only)
    torch.testing.assert_close(m.forward_batch(batch)[1], full)  # scaling restored


def test_head_private_option_and_rank_zero_layouts() -> None:
    m = mini_model(AdapterConfig(head="private"))
    assert not any("classifier" in k for k in m.shared_state())
    assert any("classifier" in n for n in m.private_parameters())
    hom = mini_model(AdapterConfig(private_rank=0))
    assert hom.private_parameters() == {} and hom.shared_state()
    local = mini_model(AdapterConfig(shared_rank=0, private_rank=10, head="private"))
    assert local.shared_state() == {}
    with pytest.raises(ConfigError):
        AdapterConfig(shared_rank=0, private_rank=0)
    with pytest.raises(ConfigError):
        mini_model(AdapterConfig(shared_rank=0, private_rank=4, head="shared"))


def test_parameter_counts_and_loss_on_text() -> None:
    m = mini_model()
    counts = m.parameter_counts()
    # q and v of one 384-wide layer: shared r=8 -> 2 * 8 * (384 + 384), head 384*2 + 2
    assert counts["shared"] == 2 * 8 * 768 + 384 * 2 + 2
    assert counts["private"] == 2 * 2 * 768
    batch = text_data().select(torch.arange(6))
    loss = m.loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_causal_lm_path_targets_q_v_and_trains(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A small randomly initialised Llama (SmolLM2's architecture) through the same code path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pf2lora.common.learning.batching import encode_texts
    from pf2lora.common.learning.config import ModelConfig, TrainConfig
    from pf2lora.common.learning.evaluation import evaluate
    from pf2lora.common.learning.model import build_two_level_model
    from pf2lora.common.learning.trainer import BilevelTrainer
    from tests.helpers.tiny import TEXTS, tokenizer

    tok = tokenizer()
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    m = build_two_level_model(ModelConfig(path=str(tmp_path / "llama"), task="causal-lm"))
    names = list(m.shared_parameters())
    assert names and all(("q_proj" in n or "v_proj" in n) for n in names)
    data = encode_texts(TEXTS, None, tok, 16, "causal-lm")
    before = evaluate(m, data)["loss"]
    BilevelTrainer(m, TrainConfig(local_steps=8, batch_size=6, ul_lr=3e-2), seed=0).train_round(
        tiny.source(data, 6)
    )
    after = evaluate(m, data)
    assert after["loss"] < before and 0.0 <= after["accuracy"] <= 1.0


def test_private_alpha_sets_the_private_branch_scaling_alone() -> None:
    from peft.tuners.lora import LoraLayer

    def scalings(m: TwoLevelModel) -> set[tuple[float, float]]:
        return {
            (mod.scaling["shared"], mod.scaling["private"])
            for mod in m.peft.modules()
            if isinstance(mod, LoraLayer)
        }

    assert scalings(mini_model()) == {(16 / 8, 16 / 2)}  # the same alpha: 4x on the private side
    assert scalings(mini_model(AdapterConfig(private_alpha=4.0))) == {(16 / 8, 4 / 2)}
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ConfigError, match="private_alpha"):
            AdapterConfig(private_alpha=bad)


@pytest.mark.parametrize(
    ("path", "task", "head", "algorithm", "dtype"),
    [
        ("minilm", "seq-cls", "shared", "pf2lora", "float32"),
        ("minilm", "seq-cls", "private", "pf2lora", "float32"),
        ("minilm", "seq-cls", "shared", "fedsa", "float32"),
        ("minilm", "seq-cls", "shared", "pf2lora", "bfloat16"),
        ("smollm2", "causal-lm", "shared", "hetlora", "float32"),
    ],
)
def test_initial_state_from_config_alone_equals_the_one_from_the_loaded_model(
    path: str, task: str, head: str, algorithm: str, dtype: str
) -> None:
    """The coordinator draws round 0 over a meta-device skeleton (no weights read, no memory
    for them); every tensor is bitwise the one a loaded base model gives for the seed."""
    import dataclasses

    from pf2lora.common.algorithms.base import AlgorithmConfig
    from pf2lora.common.algorithms.registry import make_algorithm
    from pf2lora.common.client_runtime import initial_global_state
    from pf2lora.common.learning.base_model import base_model_skeleton, load_base_model
    from pf2lora.common.learning.config import ModelConfig

    adapters = AdapterConfig(head=head)
    cfg = ModelConfig(path=path, task=task, num_labels=3, adapters=adapters, dtype=dtype)
    algo = make_algorithm(AlgorithmConfig(name=algorithm), cfg.adapters)
    skeleton = base_model_skeleton(cfg)
    assert all(p.is_meta for p in skeleton.parameters())  # nothing of the weights in memory
    from_config = initial_global_state(algo, cfg, 11)
    loaded = load_base_model(dataclasses.replace(cfg, adapters=algo.model_adapters()))
    from_weights = initial_global_state(algo, cfg, 11, base=loaded)
    assert from_config.keys() == from_weights.keys() and len(from_config) > 10
    for name, t in from_config.items():
        assert not t.is_meta and torch.equal(t, from_weights[name]), name
    assert any(t.abs().sum() > 0 for t in from_config.values())  # drawn, not all zeros
    # another seed draws other values
    other = initial_global_state(algo, cfg, 12)
    assert any(not torch.equal(other[k], from_config[k]) for k in from_config)


def test_a_folder_with_config_json_alone_is_enough_for_round_0(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from pf2lora.common.algorithms.base import AlgorithmConfig
    from pf2lora.common.algorithms.registry import make_algorithm
    from pf2lora.common.client_runtime import initial_global_state
    from pf2lora.common.learning.base_model import resolve_model_path
    from pf2lora.common.learning.config import ModelConfig

    shutil.copy(Path(resolve_model_path("minilm")) / "config.json", tmp_path / "config.json")
    algo = make_algorithm(AlgorithmConfig(name="pf2lora"), AdapterConfig())
    here = initial_global_state(algo, ModelConfig(path=str(tmp_path), num_labels=2), 5)
    full = initial_global_state(algo, ModelConfig(path="minilm", num_labels=2), 5)
    assert here.keys() == full.keys()
    assert all(torch.equal(here[k], full[k]) for k in full)


@pytest.mark.parametrize(("path", "task"), [("minilm", "seq-cls"), ("smollm2", "causal-lm")])
@pytest.mark.parametrize("hypergrad", ["unroll", "first-order"])
def test_a_bfloat16_base_trains_float32_adapters_and_sends_float32(
    path: str, task: str, hypergrad: str
) -> None:
    """model.dtype = bfloat16: the frozen base is bf16, the adapters and the trained head stay
    float32 (the wire and secure aggregation are unchanged), and both hypergradient estimators
    (unroll needs double backward through the bf16 base) train: the loss falls."""
    from pf2lora.common.learning.batching import encode_texts
    from pf2lora.common.learning.config import ModelConfig, TrainConfig
    from pf2lora.common.learning.evaluation import evaluate
    from pf2lora.common.learning.model import build_two_level_model
    from pf2lora.common.learning.trainer import BilevelTrainer
    from tests.helpers.tiny import LABELS, TEXTS

    cfg = ModelConfig(path=path, task=task, num_hidden_layers=2, dtype="bfloat16", max_length=24)
    m = build_two_level_model(cfg)
    frozen = {p.dtype for p in m.peft.parameters() if not p.requires_grad and p.is_floating_point()}
    trained = {p.dtype for p in m.peft.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    assert {t.dtype for t in m.shared_state().values()} == {torch.float32}
    from pf2lora.common.learning.base_model import load_tokenizer

    labels = LABELS if task == "seq-cls" else None  # positive / negative sentences
    data = encode_texts(TEXTS, labels, load_tokenizer(cfg), 24, task)
    before = evaluate(m, data)["loss"]
    train = TrainConfig(local_steps=8, batch_size=8, ul_lr=1e-2, ll_lr=0.01, hypergrad=hypergrad)
    BilevelTrainer(m, train, seed=0).train_round(tiny.source(data, 8))
    after = evaluate(m, data)["loss"]
    assert math.isfinite(after) and after < before
    assert {t.dtype for t in m.shared_state().values()} == {torch.float32}


def test_auto_dtype_is_float32_without_a_gpu_and_bad_names_are_refused() -> None:
    from pf2lora.common.learning.base_model import base_dtype
    from pf2lora.common.learning.config import ModelConfig

    if not torch.cuda.is_available():
        assert base_dtype("auto") == torch.float32
    assert base_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype"):
        ModelConfig(dtype="bf16")
