"""A base model folder's fingerprint: one digest per file that decides what the model computes
(config.json, the tokenizer files, each weights file), cheap enough to take at every run start.

A weights file is digested by its size, its safetensors header (names, dtypes, shapes,
offsets) and 16 evenly spaced 64 KiB samples of its data: about 1 MiB read per file, and two
checkpoints of one architecture (same header) still differ in their sampled bytes. The
fingerprint travels in the run's model config; a silo compares it with its own folder's
before it loads anything, and names the files that differ.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from pf2lora.common.errors import ConfigError
from pf2lora.common.learning.config import ModelConfig

logger = logging.getLogger(__name__)

CONFIG_FILES: tuple[str, ...] = ("config.json",)
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)
WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".bin")
SAMPLES = 16
SAMPLE_BYTES = 64 * 1024
DIGEST_CHARS = 16  # hex characters kept per file (64 bits)


class ModelMismatch(ConfigError):
    """This silo's base model is not the run's (the message names the files that differ)."""


def _whole(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:DIGEST_CHARS]


def _weights(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256(f"size={size};".encode())
    with path.open("rb") as fh:
        data_start = 0
        if path.suffix == ".safetensors" and size >= 8:
            n = int.from_bytes(fh.read(8), "little")
            if 0 < n <= size - 8:
                h.update(fh.read(n))  # the header: every tensor's name, dtype, shape, offsets
                data_start = 8 + n
        span = max(0, size - data_start)
        for i in range(SAMPLES):
            fh.seek(data_start + (span * i) // SAMPLES)
            h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()[:DIGEST_CHARS]


def fingerprint(folder: str | os.PathLike[str]) -> tuple[str, ...]:
    """`file=digest` for config.json, each tokenizer file and each weights file (sorted)."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"model folder {root} does not exist")
    out = []
    for name in (*CONFIG_FILES, *TOKENIZER_FILES):
        p = root / name
        if p.is_file():
            out.append(f"{name}={_whole(p)}")
    weights = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    for p in weights:
        out.append(f"{p.name}={_weights(p)}")
    if not any(x.startswith("config.json=") for x in out):
        raise ConfigError(f"model folder {root} has no config.json")
    return tuple(sorted(out))


def differences(expected: Sequence[str], actual: Sequence[str]) -> list[str]:
    """What differs between two fingerprints: files with other contents, missing or extra."""
    want = dict(x.split("=", 1) for x in expected)
    have = dict(x.split("=", 1) for x in actual)
    out = [f"{n} differs" for n in sorted(want) if n in have and have[n] != want[n]]
    out += [f"{n} is missing" for n in sorted(set(want) - set(have))]
    out += [f"{n} is not in the run's model" for n in sorted(set(have) - set(want))]
    return out


def check_model(expected: Sequence[str], folder: str | os.PathLike[str], model_id: str) -> None:
    """ModelMismatch naming the files of `folder` that differ from the run's fingerprint."""
    if not expected:
        return  # a run started without a fingerprint (no model folder on the coordinator)
    diff = differences(expected, fingerprint(folder))
    if diff:
        raise ModelMismatch(
            f"this silo's model {model_id!r} at {folder} is not the run's: {'; '.join(diff)} "
            "(give this silo the run's model: [model] path, or [model.paths] "
            f"{model_id} = FOLDER in silo.toml)"
        )


def model_id_of(path: str) -> str:
    """The name a run gives its base model by default: the packaged name, or the folder's."""
    return Path(path).name or path


def with_identity(model: ModelConfig) -> ModelConfig:
    """The model config with its id (default: from the path) and its fingerprint; unchanged for
    a model without a path (a plain torch module).

    The fingerprint is the folder's the path resolves to here, or the one the run gives
    (`[model] fingerprint`, from `pf2lora run fingerprint FOLDER`): a coordinator needs only
    config.json (round 0 is drawn on a meta-device skeleton), so its folder may hold no
    weights. A given fingerprint must agree with every file the folder here has; a folder
    without weights files and no given fingerprint is refused (a fingerprint without the
    weights would make every silo refuse the run).
    """
    import dataclasses

    from pf2lora.common.learning.base_model import resolve_model_path

    if not model.path:
        return model
    folder = resolve_model_path(model.path)
    local = fingerprint(folder)
    model_id = model.id or model_id_of(model.path)
    if model.fingerprint:
        have = dict(x.split("=", 1) for x in local)
        want = dict(x.split("=", 1) for x in model.fingerprint)
        diff = [f"{n} differs" for n in sorted(have) if n in want and want[n] != have[n]]
        diff += [f"{n} is not in the given fingerprint" for n in sorted(set(have) - set(want))]
        if diff:
            raise ConfigError(
                f"model {model_id!r} at {folder} does not match the run's model.fingerprint: "
                f"{'; '.join(diff)}"
            )
        return dataclasses.replace(model, id=model_id)
    if not any(x.split("=", 1)[0].endswith(WEIGHT_SUFFIXES) for x in local):
        raise ConfigError(
            f"model folder {folder} has no weights files ({', '.join(WEIGHT_SUFFIXES)}): give "
            "the run the full model's fingerprint, printed by `pf2lora run fingerprint FOLDER` "
            "on a machine with the model, as [model] fingerprint in the run file"
        )
    return dataclasses.replace(model, id=model_id, fingerprint=local)
