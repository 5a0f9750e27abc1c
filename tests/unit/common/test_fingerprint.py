"""A model folder's fingerprint: equal for copies, and a changed config, tokenizer file or
weight value is named."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from pf2lora.common.errors import ConfigError
from pf2lora.common.learning.base_model import resolve_model_path
from pf2lora.common.learning.config import ModelConfig
from pf2lora.common.learning.fingerprint import (
    ModelMismatch,
    check_model,
    differences,
    fingerprint,
    with_identity,
)


@pytest.fixture(scope="module")
def minilm_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("m") / "minilm"
    shutil.copytree(resolve_model_path("minilm"), dst)
    return dst


def test_a_copy_has_the_same_fingerprint_and_files_are_named(minilm_copy: Path) -> None:
    fp = fingerprint(minilm_copy)
    assert fp == fingerprint(resolve_model_path("minilm"))
    names = {x.split("=")[0] for x in fp}
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= names
    check_model(fp, minilm_copy, "minilm")  # no error


def test_one_changed_weight_value_is_found(tmp_path: Path, minilm_copy: Path) -> None:
    dst = tmp_path / "tuned"
    shutil.copytree(minilm_copy, dst)
    tensors = load_file(dst / "model.safetensors")
    # the same names, shapes and dtypes (an identical header): only values change
    tensors = {k: v + 1e-3 if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    diff = differences(fingerprint(minilm_copy), fingerprint(dst))
    assert diff == ["model.safetensors differs"]


def test_the_mismatch_names_each_file_and_the_fix(tmp_path: Path, minilm_copy: Path) -> None:
    dst = tmp_path / "other"
    shutil.copytree(minilm_copy, dst)
    (dst / "config.json").write_text((dst / "config.json").read_text().replace("384", "385", 1))
    (dst / "vocab.txt").unlink()
    with pytest.raises(ModelMismatch) as err:
        check_model(fingerprint(minilm_copy), dst, "minilm")
    msg = str(err.value)
    assert "config.json differs" in msg and "vocab.txt is missing" in msg
    assert "[model.paths] minilm = FOLDER" in msg


def test_a_run_names_its_model() -> None:
    named = with_identity(ModelConfig(path="minilm"))
    assert named.id == "minilm" and named.fingerprint == fingerprint(resolve_model_path("minilm"))
    assert with_identity(ModelConfig(path="", task="regression")).fingerprint == ()
    with pytest.raises(Exception, match="fingerprint"):
        ModelConfig(fingerprint=("no-equals-sign",))


def test_a_coordinator_with_config_json_only_takes_the_run_files_fingerprint(
    tmp_path: Path, minilm_copy: Path
) -> None:
    """The coordinator needs config.json alone (it draws round 0 on a meta-device skeleton),
    so the run file carries the fingerprint of the full folder; the coordinator checks what it
    has against it, and refuses to guess one without weights."""
    config_only = tmp_path / "base"
    config_only.mkdir()
    shutil.copy(minilm_copy / "config.json", config_only / "config.json")
    full = fingerprint(minilm_copy)
    with pytest.raises(ConfigError, match="no weights files.*pf2lora run fingerprint"):
        with_identity(ModelConfig(path=str(config_only)))
    named = with_identity(ModelConfig(path=str(config_only), fingerprint=full))
    assert named.fingerprint == full and named.id == "base"
    check_model(named.fingerprint, minilm_copy, "base")  # a silo with the full folder agrees
    # a coordinator file that disagrees with the given fingerprint is named
    (config_only / "config.json").write_text(
        (config_only / "config.json").read_text().replace("384", "385", 1)
    )
    with pytest.raises(ConfigError, match="config.json differs"):
        with_identity(ModelConfig(path=str(config_only), fingerprint=full))


def test_run_fingerprint_prints_the_run_file_line(
    minilm_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import tomllib

    from pf2lora.cli.main import main

    assert main(["run", "fingerprint", str(minilm_copy)]) == 0
    printed = capsys.readouterr().out
    assert tomllib.loads(printed)["model"]["fingerprint"] == list(fingerprint(minilm_copy))
