"""Daemon configs (including every TOML under deploy/), run files and the admin CLI's error
messages.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pf2lora.cli.main import main
from pf2lora.cli.run import build_run_config
from pf2lora.common.data.files import LOCAL_FORMATS
from pf2lora.common.errors import ConfigError
from pf2lora.coordinator.config import load_coordinator_config
from pf2lora.silo.config import load_silo_config
from tests.helpers.federation import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "deploy").rglob("coordinator.toml")), ids=str)
def test_deployed_coordinator_configs_load(path: Path) -> None:
    cfg = load_coordinator_config(path)
    assert cfg.tls.configured and not cfg.server.insecure
    assert cfg.server.silo_api_listen.endswith(":8443") and cfg.server.control_api_listen.endswith(
        ":8444"
    )
    assert cfg.server.metrics_listen.endswith(":9100"), "the pods' prometheus.io/port is 9100"


@pytest.mark.parametrize("path", sorted((ROOT / "deploy").rglob("silo.toml")), ids=str)
def test_deployed_silo_configs_load(path: Path) -> None:
    cfg = load_silo_config(path)
    cfg.require_transport()
    assert cfg.data.train_files and cfg.data.eval_files and cfg.model.path
    # The daemon can read what the manifests point it at (common.data.load_local's formats).
    for f in cfg.data.train_files + cfg.data.eval_files:
        assert Path(f).suffix.lower() in LOCAL_FORMATS, (
            f"{path}: {f} is not a format load_local reads"
        )
    assert cfg.server.metrics_listen.endswith(":9100"), "the pods' prometheus.io/port is 9100"


def test_secure_by_default_and_explicit_insecure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigError, match="--insecure"):
        load_coordinator_config(None)
    cfg = load_coordinator_config(None, {"server.insecure": True})
    assert cfg.server.insecure and not cfg.tls.configured
    deployed = ROOT / "deploy" / "k8s" / "base" / "coordinator" / "coordinator.toml"
    cfg = load_coordinator_config(deployed, {"server.insecure": True})
    assert not cfg.tls.configured and "ignoring the [tls] section" in caplog.text
    with pytest.raises(ConfigError, match="--insecure"):
        load_silo_config(None).require_transport()


def test_bad_values_are_refused_by_name(tmp_path: Path) -> None:
    p = tmp_path / "silo.toml"
    p.write_text('[silo]\nid = "a"\ndevice = "tpu"\n')
    with pytest.raises(ConfigError, match="silo.device"):
        load_silo_config(p)
    p.write_text('[silo]\nid = "Not A Label"\n')
    with pytest.raises(ConfigError, match="silo.id"):
        load_silo_config(p)
    p.write_text('[silo]\nid = "a"\nidd = 1\n')
    with pytest.raises(ConfigError, match="unknown key"):
        load_silo_config(p)
    p.write_text('[coordinator]\naddress = "nohostport"\n')
    with pytest.raises(ConfigError, match="coordinator.address"):
        load_silo_config(p)
    c = tmp_path / "coordinator.toml"
    c.write_text('[federation]\nallowed_silos = ["a", "a"]\n[server]\ninsecure = true\n')
    with pytest.raises(ConfigError, match="duplicates"):
        load_coordinator_config(c)


def test_run_file_and_flag_overrides(tmp_path: Path) -> None:
    run = tmp_path / "run.toml"
    run.write_text(
        'rounds = 5\nmin_silos = 2\nseed = 3\n[algorithm]\nname = "homlora"\n'
        '[algorithm.train]\nlocal_steps = 7\n[model]\npath = "minilm"\nnum_labels = 3\n'
    )
    ns = argparse.Namespace(run_file=run, **{k: None for k in _run_flags()})
    ns.rounds = 2
    cfg = build_run_config(ns)
    assert (cfg.rounds, cfg.min_silos, cfg.seed, cfg.algorithm.name) == (2, 2, 3, "homlora")
    assert cfg.algorithm.train.local_steps == 7 and cfg.model.num_labels == 3
    # secure aggregation: on unless switched off explicitly; [secagg] from the file, flags override
    assert cfg.secure_aggregation and cfg.secagg_clip == 4.0 and cfg.round_min_silos == 2
    run.write_text(run.read_text() + "[secagg]\nclip = 2.0\nthreshold = 3\n")
    ns.secagg_clip, ns.secure_aggregation = 1.5, False
    cfg = build_run_config(ns)
    assert (cfg.secure_aggregation, cfg.secagg_clip, cfg.secagg.threshold) == (False, 1.5, 3)
    run.write_text("[secagg]\nneighbours = 3\n")  # odd: refused by name
    with pytest.raises(ConfigError, match="secagg.neighbours"):
        build_run_config(argparse.Namespace(run_file=run, **{k: None for k in _run_flags()}))
    run.write_text("roundz = 1\n")
    with pytest.raises(ConfigError, match="unknown key"):
        build_run_config(argparse.Namespace(run_file=run, **{k: None for k in _run_flags()}))


def _run_flags() -> list[str]:
    from pf2lora.cli.run import RUN_FLAGS

    return list(RUN_FLAGS)


def test_cli_errors_say_what_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()  # nothing listens there
    assert main(["run", "status", "--coordinator", f"127.0.0.1:{port}", "--insecure"]) == 2
    assert "is `pf2lora coordinator serve` running" in capsys.readouterr().err
    assert main(["silos", "--coordinator", f"127.0.0.1:{port}"]) == 2
    assert "needs an admin certificate" in capsys.readouterr().err
    assert main(["coordinator", "serve", "--insecure", "--ca-file", "x"]) == 2
    assert "conflicts" in capsys.readouterr().err
    assert main(["silo", "serve", "--insecure", "--id", "a"]) == 2
    assert "data.train_files" in capsys.readouterr().err


def test_relative_paths_resolve_against_the_file_that_names_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf, elsewhere = tmp_path / "conf", tmp_path / "elsewhere"
    conf.mkdir()
    elsewhere.mkdir()
    tls = '[tls]\nca_file = "pki/ca.pem"\ncert_file = "pki/me.pem"\nkey_file = "../keys/me.key"\n'
    (conf / "coordinator.toml").write_text(f'[storage]\nstate_dir = "state"\n{tls}')
    (conf / "silo.toml").write_text(
        '[silo]\nstate_dir = "silo-state"\naudit_log = "audit/sent.jsonl"\n'
        '[model]\npath = "minilm"\n[model.paths]\nsmollm2 = "smollm2"\nmine = "models/mine"\n'
        '[data]\ntrain_files = ["data/train.csv"]\neval_files = ["/abs/test.csv"]\n' + tls
    )
    monkeypatch.chdir(elsewhere)  # commands run from any directory behave the same
    c = load_coordinator_config(Path("../conf/coordinator.toml"))
    assert c.storage.state_dir == str(conf / "state")
    assert c.tls.ca_file == str(conf / "pki/ca.pem")
    assert c.tls.key_file == str(tmp_path / "keys/me.key")
    s = load_silo_config(Path("../conf/silo.toml"))
    assert s.silo.state_dir == str(conf / "silo-state")
    assert s.silo.audit_log == str(conf / "audit/sent.jsonl")
    assert s.data.train_files == (str(conf / "data/train.csv"),)
    assert s.data.eval_files == ("/abs/test.csv",)  # absolute paths stay as they are
    assert s.tls.cert_file == str(conf / "pki/me.pem")
    # the packaged model names are names, not paths; other model folders are paths
    assert s.model.path == "minilm"
    assert s.model.paths == {"smollm2": "smollm2", "mine": str(conf / "models/mine")}
    # a path given as a flag is relative to the directory the command runs in
    s = load_silo_config(Path("../conf/silo.toml"), {"silo.state_dir": "here"})
    assert s.silo.state_dir == "here"
    # run files: the coordinator's model folder, relative to the run file
    (conf / "run.toml").write_text('[model]\npath = "models/base"\n')
    ns = argparse.Namespace(run_file=Path("../conf/run.toml"), **{k: None for k in _run_flags()})
    assert build_run_config(ns).model.path == str(conf / "models/base")
    (conf / "run.toml").write_text('[model]\npath = "smollm2"\n')
    assert build_run_config(ns).model.path == "smollm2"
