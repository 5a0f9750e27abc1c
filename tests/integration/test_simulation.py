"""In-process simulation: synthetic rank recovery, `pf2lora simulate` end to end on real data."""

from __future__ import annotations

import json

import torch

from pf2lora.cli.main import main
from pf2lora.common.algorithms.base import AlgorithmConfig
from pf2lora.common.learning.config import AdapterConfig, ModelConfig, TrainConfig
from pf2lora.common.simulation import DataConfig, SimulationConfig, run_simulation


# Smaller than docs/algorithm.md §6 for speed (d=16, r=4, r_hat=1, true ranks 3..5); the full-size
# experiment is benchmarks/bench_synthetic_rank.py. The lower level must be much faster than
# the upper level (ll_lr / ul_lr = 40 here), see docs/algorithm.md.
def _synthetic(name: str, rounds: int = 150) -> SimulationConfig:
    return SimulationConfig(
        algorithm=AlgorithmConfig(
            name=name,
            train=TrainConfig(
                local_steps=20, batch_size=64, ll_lr=0.2, ul_lr=0.005, max_grad_norm=None
            ),
        ),
        model=ModelConfig(
            path="", task="regression", adapters=AdapterConfig(shared_rank=4, private_rank=1)
        ),
        data=DataConfig(
            source="synthetic-rank",
            synthetic_dim=16,
            synthetic_true_ranks=(3, 4, 5),
            synthetic_train_samples=500,
            synthetic_test_samples=200,
        ),
        rounds=rounds,
        seed=0,
        eval_every=rounds,
    )


def test_pf2lora_recovers_every_true_rank_and_homlora_reports_one() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    try:
        pf = run_simulation(_synthetic("pf2lora"))
        hom = run_simulation(_synthetic("homlora", rounds=60))
    finally:
        torch.set_num_threads(threads)
    assert (
        [c["learned_rank"] for c in pf.clients] == [c["true_rank"] for c in pf.clients] == [3, 4, 5]
    )
    for c in pf.clients:
        assert c["test_mse"] < 0.05
        sv = c["singular_values"]
        assert sv[c["true_rank"] - 1] > 0.05 * sv[0] > sv[c["true_rank"]]
    ranks = {c["learned_rank"] for c in hom.clients}
    assert len(ranks) == 1
    assert max(c["test_mse"] for c in hom.clients) > max(c["test_mse"] for c in pf.clients)


def test_cli_simulate_on_vader_writes_json(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "result.json"
    code = main(
        [
            "simulate",
            "--algorithm",
            "pf2lora",
            "--data",
            "vader",
            "--clients",
            "4",
            "--rounds",
            "2",
            "--local-steps",
            "2",
            "--batch-size",
            "8",
            "--num-layers",
            "1",
            "--max-length",
            "32",
            "--max-train",
            "24",
            "--max-test",
            "16",
            "--eval-every",
            "1",
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "plots"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "personalised acc" in printed and "round 2/2" in printed
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "evaluation.png",
        "report.md",
        "round_time.png",
        "training_loss.png",
    ]
    doc = json.loads(out.read_text())
    assert [c["name"] for c in doc["clients"]] == ["amazon", "movies", "nyt", "tweets"]
    assert len(doc["rounds"]) == 2
    for c in doc["clients"]:
        assert 0.0 <= c["personal_accuracy"] <= 1.0 and 0.0 <= c["shared_accuracy"] <= 1.0
        assert c["train_size"] == 24 and c["test_size"] == 16
    p = doc["parameters"]
    assert p["communicated_per_client"] == p["shared"] > 0 and p["private"] > 0
    md = (tmp_path / "plots" / "report.md").read_text()
    for c in doc["clients"]:  # the report's table is the run's final evaluation
        assert f"| {c['name']} | {c['personal_accuracy']:.4f} | {c['shared_accuracy']:.4f} |" in md


def test_cli_simulate_plots_each_clients_spectrum_against_its_true_rank(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import matplotlib.image

    argv = ["simulate", "--data", "synthetic-rank", "--rounds", "2", "--local-steps", "2"]
    assert main([*argv, "--plot", str(tmp_path), "--json", str(tmp_path / "r.json")]) == 0
    image = matplotlib.image.imread(tmp_path / "singular_values.png")
    assert image.shape[0] > 300 and image.shape[1] > 600  # a real raster, not an empty file
    md = (tmp_path / "report.md").read_text()
    doc = json.loads((tmp_path / "r.json").read_text())
    assert "test MSE" in md and "singular_values.png" in md
    for c in doc["clients"]:
        assert f"| {c['name']} | {c['personal_mse']:.4f} |" in md


def test_cli_config_file_with_flag_override_and_clear_errors(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        'rounds = 5\n[algorithm]\nname = "homlora"\n[algorithm.train]\nlocal_steps = 1\n'
        "[model]\nnum_hidden_layers = 1\nmax_length = 16\n"
        "[data]\nnum_clients = 4\nmax_train_per_client = 8\nmax_test_per_client = 8\n"
    )
    out = tmp_path / "r.json"
    assert main(["simulate", "--config", str(cfg), "--rounds", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["rounds"] == 1 and doc["config"]["algorithm"]["name"] == "homlora"
    bad = tmp_path / "bad.toml"
    bad.write_text('[algorithm]\nnmae = "pf2lora"\n')
    assert main(["simulate", "--config", str(bad)]) == 2
    assert "nmae" in capsys.readouterr().err
    assert main(["simulate", "--config", str(tmp_path / "missing.toml")]) == 2
    assert main(["simulate", "--algorithm", "fedsgd"]) == 2


def _parsed(argv: list[str]) -> SimulationConfig:
    import argparse

    from pf2lora.cli import simulate

    parser = argparse.ArgumentParser()
    simulate.register(parser.add_subparsers())
    return simulate.build_config(parser.parse_args(["simulate", *argv]))  # type: ignore[no-any-return]


def test_a_data_source_brings_its_own_defaults_and_flags_and_files_win(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = _parsed(["--data", "synthetic-rank"])
    train = cfg.algorithm.train
    assert (cfg.rounds, train.ll_lr, train.ul_lr, train.max_grad_norm) == (600, 0.2, 0.002, None)
    assert train.ll_steps == 1  # as the rank benchmark measured (the classification default: 3)
    assert cfg.model.task == "regression" and cfg.data.num_clients == 5
    assert _parsed(["--data", "synthetic-rank", "--ll-lr", "0.1"]).algorithm.train.ll_lr == 0.1
    toml = tmp_path / "run.toml"
    toml.write_text('rounds = 7\n[data]\nsource = "synthetic-rank"\n')
    assert _parsed(["--config", str(toml)]).rounds == 7
    plain = _parsed(["--data", "vader"])  # other sources keep the built-in defaults
    assert (plain.rounds, plain.algorithm.train.ll_lr, plain.algorithm.train.ll_steps) == (
        3,
        0.1,
        3,
    )
