"""The two-level LoRA model: a base model with `shared` and `private` PEFT adapters, both active."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from pf2lora.common.errors import ConfigError, InvalidArgument
from pf2lora.common.learning.base_model import default_targets, head_modules, load_base_model
from pf2lora.common.learning.config import AdapterConfig, ModelConfig

logger = logging.getLogger(__name__)

SHARED = "shared"
PRIVATE = "private"
# Seed offsets so the shared and private branches never draw the same numbers.
_PRIVATE_SEED_SALT = 0x5EED_0001


@dataclass(frozen=True)
class ParamGroups:
    """Full parameter names of each level, in a fixed order."""

    shared: tuple[str, ...]
    private: tuple[str, ...]


class TwoLevelModel(nn.Module):
    """W_k = W0 + (alpha/r) B A + (alpha/r_hat) D_k C_k on every target module.

    Level 1 (`shared`: A, B and a shared head) is what the federation averages. Level 2
    (`private`: C_k, D_k) stays on the silo. `shared_state()` returns level 1 only; there is
    deliberately no method that returns private tensors in the wire format.
    """

    def __init__(
        self,
        base: nn.Module,
        adapters: AdapterConfig,
        task: str,
        *,
        shared_seed: int = 0,
        private_seed: int = 1,
    ) -> None:
        super().__init__()
        for p in base.parameters():
            p.requires_grad_(False)
        self.task = task
        self.adapters = adapters
        targets = list(adapters.target_modules or default_targets(base))
        heads = head_modules(base, task)
        shared_heads = heads if adapters.head == SHARED else []
        private_heads = heads if adapters.head == PRIVATE else []
        self.has_shared = adapters.shared_rank > 0
        self.has_private = adapters.private_rank > 0
        configs: list[tuple[str, LoraConfig]] = []
        if self.has_shared:
            configs.append((SHARED, self._lora(adapters.shared_rank, targets, shared_heads)))
        elif shared_heads:
            raise ConfigError("head='shared' needs shared_rank > 0")
        if self.has_private:
            private_alpha = adapters.private_alpha or adapters.alpha
            configs.append(
                (PRIVATE, self._lora(adapters.private_rank, targets, private_heads, private_alpha))
            )
        elif private_heads:
            raise ConfigError("head='private' needs private_rank > 0")
        first_name, first_cfg = configs[0]
        with warnings.catch_warnings():
            # PEFT asks transformers 5 through a deprecated name; nothing for our users to do.
            warnings.filterwarnings(
                "ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning
            )
            self.peft: PeftModel = get_peft_model(base, first_cfg, adapter_name=first_name)
        for name, cfg in configs[1:]:
            self.peft.add_adapter(name, cfg)
        self.adapter_names = tuple(n for n, _ in configs)
        self.peft.base_model.set_adapter(list(self.adapter_names))  # type: ignore[operator]  # torch stubs: Module attrs read as Tensor
        self._fix_requires_grad()
        self._float32_trained_heads()
        if self.has_shared:
            self.reinit_adapter(SHARED, shared_seed)
        if self.has_private:
            self.reinit_adapter(PRIVATE, private_seed ^ _PRIVATE_SEED_SALT)
        self.groups = self._param_groups()
        self._check_groups()

    def _float32_trained_heads(self) -> None:
        """Trained head copies (modules_to_save) in float32 over a bfloat16/float16 base, as PEFT
        keeps the LoRA matrices: their input is cast up, so the logits, the loss and the shared
        state (the wire) stay float32 whatever the base's precision."""
        for module in self.peft.modules():
            copies = getattr(module, "modules_to_save", None)
            if not isinstance(copies, nn.ModuleDict):
                continue
            for head in copies.values():
                low = [p for p in head.parameters() if p.is_floating_point() and not p.is_meta]
                if any(p.dtype != torch.float32 for p in low):
                    head.float()
                    head.register_forward_pre_hook(_inputs_to_float32)

    def _lora(
        self, rank: int, targets: list[str], heads: list[str], alpha: float | None = None
    ) -> LoraConfig:
        return LoraConfig(
            r=rank,
            lora_alpha=alpha or self.adapters.alpha,  # type: ignore[arg-type]  # PEFT annotates int; it computes alpha / r in float
            target_modules=targets,
            lora_dropout=self.adapters.dropout,
            modules_to_save=heads or None,
            init_lora_weights=True,
        )

    # ----------------------------------------------------------------- parameters
    def _fix_requires_grad(self) -> None:
        for name, p in self.peft.named_parameters():
            p.requires_grad_(self._level_of(name) is not None)

    @staticmethod
    def _level_of(name: str) -> str | None:
        for level in (SHARED, PRIVATE):
            if f".{level}." in name or name.endswith(f".{level}"):
                if "lora_" in name or "modules_to_save" in name:
                    return level
        return None

    def _param_groups(self) -> ParamGroups:
        shared: list[str] = []
        private: list[str] = []
        for name, _ in self.peft.named_parameters():
            level = self._level_of(name)
            if level == SHARED:
                shared.append(name)
            elif level == PRIVATE:
                private.append(name)
        return ParamGroups(tuple(shared), tuple(private))

    def _check_groups(self) -> None:
        trainable = {n for n, p in self.peft.named_parameters() if p.requires_grad}
        assert trainable == set(self.groups.shared) | set(self.groups.private), trainable
        assert not set(self.groups.shared) & set(self.groups.private)
        if self.has_shared:
            assert self.groups.shared, "shared adapter has no parameters: check target_modules"

    @property
    def device(self) -> torch.device:
        return next(self.peft.parameters()).device

    def named_level_parameters(self, level: str) -> dict[str, nn.Parameter]:
        names = self.groups.shared if level == SHARED else self.groups.private
        params = dict(self.peft.named_parameters())
        return {n: params[n] for n in names}

    def shared_parameters(self) -> dict[str, nn.Parameter]:
        return self.named_level_parameters(SHARED)

    def private_parameters(self) -> dict[str, nn.Parameter]:
        return self.named_level_parameters(PRIVATE)

    def parameter_counts(self) -> dict[str, int]:
        return {
            "shared": sum(p.numel() for p in self.shared_parameters().values()),
            "private": sum(p.numel() for p in self.private_parameters().values()),
            "frozen": sum(p.numel() for p in self.peft.parameters() if not p.requires_grad),
        }

    def log_trainable(self) -> None:
        c = self.parameter_counts()
        logger.info(
            "trainable: shared %d tensors / %d params, private %d tensors / %d params; frozen %d",
            len(self.groups.shared),
            c["shared"],
            len(self.groups.private),
            c["private"],
            c["frozen"],
        )

    def materialize_adapter(self, adapter: str, seed: int) -> None:
        """Give an adapter built over a meta-device base (`base_model_skeleton`) real CPU
        tensors and draw them from `seed`: the same values `reinit_adapter` draws on a loaded
        base, since they depend only on the shapes and the seed."""
        for module in self.peft.modules():
            for name in ("lora_A", "lora_B", "modules_to_save"):
                parts = getattr(module, name, None)
                if isinstance(parts, nn.ModuleDict) and adapter in parts:
                    part = parts[adapter]
                    if any(p.is_meta for p in part.parameters()):
                        part.to_empty(device="cpu")
        self.reinit_adapter(adapter, seed)

    def reinit_adapter(self, adapter: str, seed: int) -> None:
        """Re-draw an adapter from `seed` (A Kaiming-uniform, B zero; head as nn.Linear)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _, module in sorted(self.peft.named_modules(), key=lambda kv: kv[0]):
                if isinstance(module, LoraLayer) and adapter in module.lora_A:
                    module.reset_lora_parameters(adapter, True)  # type: ignore[operator]  # torch stubs
                copies = getattr(module, "modules_to_save", None)
                if isinstance(copies, nn.ModuleDict) and adapter in copies:
                    head = copies[adapter]
                    if hasattr(head, "reset_parameters"):
                        head.reset_parameters()  # type: ignore[operator]  # torch stubs

    # -------------------------------------------------------------------- shared state
    def shared_state(self) -> dict[str, Tensor]:
        """The shared adapter (and shared head) as PEFT names it on disk: detached CPU copies."""
        if not self.has_shared:
            return {}
        state = get_peft_model_state_dict(self.peft, adapter_name=SHARED)
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}

    def shared_state_keys(self) -> set[str]:
        """The keys of shared_state(), without copying any tensor."""
        return set(self._shared_key_map()) if self.has_shared else set()

    def shared_state_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {k: (tuple(v.shape), v.dtype) for k, v in self.shared_state().items()}

    def load_shared_state(
        self, state: Mapping[str, Tensor], keys: Collection[str] | None = None
    ) -> None:
        """Load a shared state; refuses missing, unknown or mis-shaped tensors with their names.

        keys: the part of the shared state this state holds (an algorithm that communicates
        only some shared tensors); None: all of it.
        """
        expected = self._shared_key_map()
        if keys is not None:
            expected = {k: v for k, v in expected.items() if k in keys}
        missing = sorted(set(expected) - set(state))
        unknown = sorted(set(state) - set(expected))
        if missing or unknown:
            raise InvalidArgument(
                f"shared state mismatch: missing {missing[:5]}, unknown {unknown[:5]}"
            )
        params = dict(self.peft.named_parameters())
        with torch.no_grad():
            for key, full in expected.items():
                p = params[full]
                t = state[key]
                if tuple(t.shape) != tuple(p.shape):
                    raise InvalidArgument(
                        f"tensor {key!r}: shape {tuple(t.shape)} != expected {tuple(p.shape)}"
                    )
                if not t.dtype.is_floating_point:
                    raise InvalidArgument(f"tensor {key!r}: dtype {t.dtype} is not floating point")
                p.copy_(t.to(p.dtype))

    def _shared_key_map(self) -> dict[str, str]:
        """PEFT state-dict key -> full parameter name, for the shared adapter."""
        out: dict[str, str] = {}
        for full in self.groups.shared:
            key = full.replace(f".{SHARED}.", ".")
            if key.endswith(f".{SHARED}"):
                key = key[: -len(SHARED) - 1]
            key = key.replace(".modules_to_save", "")
            out[key] = full
        peft_keys = (
            set(get_peft_model_state_dict(self.peft, adapter_name=SHARED))
            if self.has_shared
            else set()
        )
        assert set(out) == peft_keys, (sorted(out)[:3], sorted(peft_keys)[:3])
        return out

    # ------------------------------------------------------------------ forward/loss
    def loss(
        self, batch: Mapping[str, Tensor], overrides: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        """Task loss on a batch; `overrides` substitutes parameters (functional_call)."""
        out = self.forward_batch(batch, overrides)
        return out[0]

    def forward_batch(
        self, batch: Mapping[str, Tensor], overrides: Mapping[str, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """(loss, logits or predictions) for a batch with the task's labels."""
        if self.task == "regression":
            x, y = batch["x"], batch["y"]
            pred = self._call(overrides, x)
            return torch.mean((pred - y) ** 2), pred
        kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        out = self._call(overrides, **kwargs)
        return out.loss, out.logits

    def _call(self, overrides: Mapping[str, Tensor] | None, *args: Any, **kwargs: Any) -> Any:
        if not overrides:
            return self.peft(*args, **kwargs)
        return torch.func.functional_call(self.peft, dict(overrides), args, kwargs, strict=False)

    @contextlib.contextmanager
    def private_disabled(self) -> Iterator[None]:
        """Evaluate W0 + shared only: temporarily zero the private branch's scaling."""
        layers = [
            m for m in self.peft.modules() if isinstance(m, LoraLayer) and PRIVATE in m.scaling
        ]
        saved = [m.scaling[PRIVATE] for m in layers]
        try:
            for m in layers:
                m.scaling[PRIVATE] = 0.0
            yield
        finally:
            for m, s in zip(layers, saved, strict=True):
                m.scaling[PRIVATE] = s

    def delta_weights(self) -> dict[str, Tensor]:
        """Per target module: the learned update (alpha/r) B A + (alpha/r_hat) D C (dense)."""
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            for name, m in self.peft.named_modules():
                if not isinstance(m, LoraLayer):
                    continue
                delta = None
                for adapter in self.adapter_names:
                    if adapter not in m.lora_A:
                        continue
                    b, a = m.lora_B[adapter].weight, m.lora_A[adapter].weight
                    assert isinstance(b, Tensor) and isinstance(a, Tensor)
                    d = m.scaling[adapter] * (b @ a)
                    delta = d if delta is None else delta + d
                if delta is not None:
                    out[name] = delta
        return out


def _inputs_to_float32(module: nn.Module, args: tuple[object, ...]) -> tuple[object, ...]:
    return tuple(a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)


def build_two_level_model(
    cfg: ModelConfig, *, shared_seed: int = 0, private_seed: int = 1, base: nn.Module | None = None
) -> TwoLevelModel:
    """Load the base model from its local path (or take `base`) and add both adapters."""
    if base is None:
        base = load_base_model(cfg)
    return TwoLevelModel(
        base, cfg.adapters, cfg.task, shared_seed=shared_seed, private_seed=private_seed
    )
