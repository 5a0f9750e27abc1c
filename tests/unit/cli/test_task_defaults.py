"""A task brings its settings where the run file and flags say nothing: a causal-lm run (or
simulation) gets the decoder's learning rates and one lower-level step per upper step;
anything given explicitly wins."""

from __future__ import annotations

from pathlib import Path

from pf2lora.cli.main import build_parser
from pf2lora.cli.run import build_run_config
from pf2lora.cli.simulate import build_config
from pf2lora.common.learning.config import TrainConfig
from pf2lora.common.learning.task_defaults import CAUSAL_LM_DEFAULTS


def _run(*argv: str):  # type: ignore[no-untyped-def]
    return build_run_config(build_parser().parse_args(["run", "start", *argv]))


def test_causal_lm_runs_get_the_decoder_rates_and_explicit_values_win(tmp_path: Path) -> None:
    cls = _run()
    assert (cls.model.task, cls.algorithm.train.ul_lr) == ("seq-cls", TrainConfig.ul_lr)
    assert (TrainConfig.ul_lr, TrainConfig.ll_steps) == (1e-2, 3)  # the validation's choice
    assert cls.algorithm.train.ll_steps == 3
    lm = _run("--task", "causal-lm")
    assert lm.algorithm.train.ul_lr == CAUSAL_LM_DEFAULTS["ul_lr"]
    assert lm.algorithm.train.ll_lr == CAUSAL_LM_DEFAULTS["ll_lr"]
    assert lm.algorithm.train.ll_steps == CAUSAL_LM_DEFAULTS["ll_steps"] == 1
    assert _run("--task", "causal-lm", "--ll-steps", "2").algorithm.train.ll_steps == 2
    assert _run("--task", "causal-lm", "--ll-lr", "0.3").algorithm.train.ll_lr == 0.3
    run_file = tmp_path / "run.toml"
    run_file.write_text('[model]\ntask = "causal-lm"\n[algorithm.train]\nul_lr = 0.004\n')
    from_file = _run("--run-file", str(run_file))
    assert from_file.algorithm.train.ul_lr == 0.004
    assert from_file.algorithm.train.ll_lr == CAUSAL_LM_DEFAULTS["ll_lr"]


def test_the_instructions_source_is_a_decoder_simulation() -> None:
    cfg = build_config(build_parser().parse_args(["simulate", "--data", "instructions"]))
    assert (cfg.model.path, cfg.model.task, cfg.data.num_clients) == ("smollm2", "causal-lm", 4)
    assert cfg.algorithm.train.ul_lr == CAUSAL_LM_DEFAULTS["ul_lr"]
    assert cfg.algorithm.train.ll_steps == 1
