"""A run's configuration: validation naming field and value, the canonical JSON it travels in,
TOML files and flag overrides."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from pf2lora.common.algorithms.base import AlgorithmConfig
from pf2lora.common.errors import ConfigError
from pf2lora.common.learning.config import ModelConfig, TrainConfig, from_mapping
from pf2lora.common.privacy.config import DPConfig
from pf2lora.common.runspec import (
    RunConfig,
    SecAggSettings,
    apply_overrides,
    from_json,
    load_toml,
    set_path,
    to_json,
)


def test_json_round_trip_is_canonical() -> None:
    cfg = RunConfig(
        algorithm=AlgorithmConfig(name="homlora", train=TrainConfig(local_steps=4)),
        model=ModelConfig(path="minilm", num_hidden_layers=1),
        rounds=5,
        min_silos=2,
        secagg=SecAggSettings(clip=2.0),
    )
    text = to_json(cfg)
    assert from_json(RunConfig, text) == cfg
    assert to_json(from_json(RunConfig, text)) == text  # equal configs, equal strings


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rounds", 0, "rounds=0: must be an integer in [1, 1000000]"),
        ("rounds", 2**32, "rounds=4294967296: must be an integer in"),  # wire: uint32
        ("round_deadline_s", 1e300, "round_deadline_s=1e+300: must be a number in"),
        ("min_silos", 10**9, "min_silos=1000000000"),
        ("rounds", True, "rounds=True"),
        ("min_silos", 0, "min_silos=0"),
        ("round_deadline_s", math.inf, "round_deadline_s=inf"),
        ("enroll_window_s", -1.0, "enroll_window_s=-1.0"),
        ("seed", -1, "seed=-1"),
        ("secure_aggregation", "yes", "secure_aggregation='yes'"),
    ],
)
def test_bad_values_are_refused_naming_field_and_value(
    field: str, value: object, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        RunConfig(**{field: value})  # type: ignore[arg-type]


def test_unknown_keys_and_bad_json_are_refused_with_where() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['round'\] in run"):
        from_mapping(RunConfig, {"round": 3}, "run")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lr'\] in run\.algorithm\.train"):
        from_mapping(RunConfig, {"algorithm": {"train": {"lr": 1.0}}}, "run")
    with pytest.raises(ConfigError, match="stored run: not valid JSON"):
        from_json(RunConfig, "{", "stored run")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        from_json(RunConfig, "[]", "stored run")


def test_toml_files_and_flag_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('rounds = 4\n[algorithm]\nname = "hetlora"\n[algorithm.train]\nll_lr = 0.5\n')
    tree = apply_overrides(load_toml(path), {"rounds": 6, "model.path": "minilm", "seed": None})
    cfg = from_mapping(RunConfig, tree)
    assert (cfg.rounds, cfg.algorithm.name, cfg.algorithm.train.ll_lr) == (6, "hetlora", 0.5)
    assert cfg.model.path == "minilm" and cfg.seed == 0  # a flag not given changes nothing
    with pytest.raises(ConfigError, match=r"rounds\.x: 'rounds' is not a section"):
        set_path(tree, ("rounds", "x"), 1)
    with pytest.raises(ConfigError, match="not found"):
        load_toml(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("rounds = = 3\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_toml(tmp_path / "bad.toml")


def test_secure_aggregation_needs_two_silos_and_its_threshold() -> None:
    assert RunConfig(min_silos=1).round_min_silos == 2
    assert RunConfig(min_silos=1, secure_aggregation=False).round_min_silos == 1
    assert RunConfig(secagg=SecAggSettings(threshold=3)).round_min_silos == 3
    dp = DPConfig(enabled=True, clip=1.0, noise_multiplier=1.0, min_silos=4)
    assert RunConfig(min_silos=1, algorithm=AlgorithmConfig(dp=dp)).round_min_silos == 4
    assert RunConfig(algorithm=AlgorithmConfig(name="hetlora")).secagg_clip == 256.0
    assert RunConfig().secagg_clip == 4.0
