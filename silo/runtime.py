"""A silo's machinery for one run: its data from local files, its base model, a ClientRuntime."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from pf2lora.common.algorithms.base import Algorithm, AlgorithmConfig
from pf2lora.common.algorithms.registry import make_algorithm
from pf2lora.common.client_runtime import ClientRuntime, client_seed, encode_dataset
from pf2lora.common.errors import DataError
from pf2lora.common.learning.base_model import load_tokenizer, resolve_model_path
from pf2lora.common.learning.batching import resolve_device
from pf2lora.common.learning.config import ModelConfig
from pf2lora.common.learning.distributed import SINGLE, Group, rank_device
from pf2lora.common.learning.fingerprint import check_model
from pf2lora.common.runspec import from_json
from pf2lora.common.wire.tasks import RunInfo
from pf2lora.silo.config import DataSection, SiloConfig

logger = logging.getLogger(__name__)


def _load_files(files: tuple[str, ...], data: DataSection, labels: list[str] | None) -> Any:
    """The silo's files as one dataset: instruction files (messages, or prompt and completion)
    or text/label files; the two kinds do not mix."""
    from datasets import concatenate_datasets

    from pf2lora.common.data.files import load_local
    from pf2lora.common.data.instructions import is_instruction_file, load_instructions

    kinds = {f: is_instruction_file(f) for f in files}
    if len(set(kinds.values())) > 1:
        raise DataError(
            "data files mix instruction files (messages, or prompt and completion: "
            f"{[f for f, k in kinds.items() if k]}) with text/label files "
            f"({[f for f, k in kinds.items() if not k]}): use one kind"
        )
    parts = [
        load_instructions(f)
        if kinds[f]
        else load_local(f, data.text_column, data.label_column, labels)
        for f in files
    ]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def count_train_examples(data: DataSection) -> int:
    """n_k, the silo's public FedAvg weight: rows of its training files."""
    return sum(len(_load_files((f,), data, None)) for f in data.train_files)


@dataclass
class RunContext:
    """What a silo keeps in memory for the run it works on."""

    run: RunInfo
    algorithm: Algorithm
    model_cfg: ModelConfig
    client_index: int
    seed: int
    runtime: ClientRuntime
    loaded_from_disk: bool = False  # the first prepare() after a (re)start writes resume.json


def model_config_for_silo(run: RunInfo, cfg: SiloConfig) -> ModelConfig:
    """The run's model config with this silo's own folder for the run's model id
    ([model.paths], else [model] path, else the run's path as is)."""
    model = from_json(ModelConfig, run.model_json, "run model config")
    path = cfg.model.paths.get(model.id) or cfg.model.path
    if path:
        model = dataclasses.replace(model, path=path)
    return model


def check_run_model(model: ModelConfig) -> None:
    """ModelMismatch (naming the files that differ) unless this silo's folder for the run's
    model has the run's fingerprint; cheap (about 1 MiB read per weights file)."""
    if model.fingerprint:
        check_model(model.fingerprint, resolve_model_path(model.path), model.id or model.path)


def build_context(
    run: RunInfo, client_index: int, cfg: SiloConfig, group: Group = SINGLE
) -> RunContext:
    """Load this silo's data and base model for a run and build its ClientRuntime (as one of
    `group`'s ranks when the silo runs several processes: silo/ranks.py)."""
    algo_cfg = from_json(AlgorithmConfig, run.algorithm_json, "run algorithm config")
    model_cfg = model_config_for_silo(run, cfg)
    check_run_model(model_cfg)  # before anything is loaded: refuse another model at once
    algorithm = make_algorithm(algo_cfg, model_cfg.adapters)
    seed = cfg.silo.seed if cfg.silo.seed is not None else client_seed(run.seed, client_index)
    labels = (
        list(cfg.data.labels) if cfg.data.labels else [str(i) for i in range(model_cfg.num_labels)]
    )
    if model_cfg.task == "seq-cls" and len(labels) != model_cfg.num_labels:
        raise DataError(
            f"data.labels has {len(labels)} names but the run's model has {model_cfg.num_labels} "
            "labels"
        )
    train = _load_files(cfg.data.train_files, cfg.data, labels)
    test = _load_files(cfg.data.eval_files, cfg.data, labels)
    tok = load_tokenizer(model_cfg)
    runtime = ClientRuntime(
        algorithm,
        model_cfg,
        client_index=client_index,
        seed=seed,
        train=encode_dataset(train, tok, model_cfg, where="data.train_files"),
        test=encode_dataset(test, tok, model_cfg, where="data.eval_files"),
        name=cfg.silo.id,
        device=rank_device(resolve_device(cfg.silo.device), group),
        group=group,
    )
    runtime.model.log_trainable()
    logger.info(
        "run %s: %s on %d train / %d eval examples, client index %d, seed %d",
        run.run_id,
        algo_cfg.name,
        len(train),
        len(test),
        client_index,
        seed,
    )
    return RunContext(run, algorithm, model_cfg, client_index, seed, runtime)
