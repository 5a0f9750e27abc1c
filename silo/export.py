"""`pf2lora silo export`: the silo's personalised model as two PEFT adapters, `shared` and
`private`.

    OUT/shared/   adapter_config.json + adapter_model.safetensors (the global shared adapter, head)
    OUT/private/  the silo's private adapter
    OUT/pf2lora_export.json  which run, round and base model

Load it with PEFT alone:
    base = AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=..., ...)
    model = PeftModel.from_pretrained(base, OUT / "shared")          # adapter "default"
    model.load_adapter(OUT / "private", adapter_name="private")
    model.base_model.set_adapter(["default", "private"])             # both active: W0 + BA + DC
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from pf2lora.common.algorithms.base import AlgorithmConfig
from pf2lora.common.algorithms.registry import make_algorithm
from pf2lora.common.errors import ConfigError, DataError
from pf2lora.common.learning.model import PRIVATE, SHARED, TwoLevelModel, build_two_level_model
from pf2lora.common.runspec import from_json
from pf2lora.common.state_io import atomic_write_bytes, load_state
from pf2lora.common.wire.tasks import RunInfo
from pf2lora.silo.config import SiloConfig
from pf2lora.silo.runtime import model_config_for_silo
from pf2lora.silo.state import SiloState

logger = logging.getLogger(__name__)


def personalised_model(cfg: SiloConfig, run_id: str = "") -> tuple[TwoLevelModel, dict[str, Any]]:
    """The two-level model of this silo for a run: latest global shared state + latest private
    state.
    """
    state = SiloState(cfg.silo.state_dir, cfg.silo.keep_rounds)
    run_id = run_id or state.current_run() or _latest_run(state)
    rec = state.read_run_record(run_id)
    run = RunInfo(
        rec["run_id"], rec["algorithm_json"], rec["model_json"], rec["run_seed"], rec["rounds"]
    )
    base_cfg = model_config_for_silo(run, cfg)
    algorithm = make_algorithm(from_json(AlgorithmConfig, run.algorithm_json), base_cfg.adapters)
    model_cfg = dataclasses.replace(base_cfg, adapters=algorithm.model_adapters())
    model = build_two_level_model(model_cfg)
    shared, global_round = state.load_global(run_id)
    rounds = state.rounds_saved(run_id)
    if not rounds:
        raise DataError(f"run {run_id}: no private state saved yet")
    # The model as the silo's client has it: the global state it received, then everything
    # its state file keeps (private adapter, and any shared part its algorithm does not send).
    client = algorithm.make_client(model, int(rec.get("client_index", 0)), int(rec.get("seed", 0)))
    client.receive_global(shared)
    path = state.state_path(run_id, rounds[-1])
    tensors, meta = load_state(path)
    try:
        client.restore(tensors, meta)
    except (ConfigError, DataError) as exc:
        raise DataError(f"state file {path}: {exc}") from exc
    info = {
        "run_id": run_id,
        "global_round": global_round,
        "private_round": rounds[-1],
        "algorithm": algorithm.name,
        "base_model": model_cfg.path,
        "task": model_cfg.task,
        "num_labels": model_cfg.num_labels,
        "num_hidden_layers": model_cfg.num_hidden_layers,
        "adapters": {"shared": SHARED, "private": PRIVATE},
    }
    return model, info


def _latest_run(state: SiloState) -> str:
    runs = sorted(
        (p for p in (state.root / "runs").glob("*/run.json")), key=lambda p: p.stat().st_mtime
    )
    if not runs:
        raise ConfigError(f"{state.root}: this silo has not taken part in any run")
    return runs[-1].parent.name


def export(cfg: SiloConfig, out: str | Path, run_id: str = "") -> dict[str, Any]:
    """Write OUT/shared, OUT/private (PEFT adapter folders) and OUT/pf2lora_export.json."""
    out = Path(out)
    model, info = personalised_model(cfg, run_id)
    adapters = [a for a in (SHARED, PRIVATE) if a in model.adapter_names]
    out.mkdir(parents=True, exist_ok=True)
    model.peft.save_pretrained(str(out), selected_adapters=adapters)
    info["folders"] = {a: str(out / a) for a in adapters}
    atomic_write_bytes(out / "pf2lora_export.json", json.dumps(info, indent=1).encode())
    logger.info(
        "exported run %s (global round %d, private round %d) to %s",
        info["run_id"],
        info["global_round"],
        info["private_round"],
        out,
    )
    return info
