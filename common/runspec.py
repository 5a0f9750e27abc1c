"""A federated run's configuration (RunConfig) and the JSON form it travels in.

The coordinator stores it with the run, silos receive its algorithm and model parts in every
TRAIN/EVALUATE task, and `pf2lora run start` builds it from a TOML run file plus flags.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pf2lora.common.algorithms.base import AlgorithmConfig
from pf2lora.common.algorithms.compat import check_model_support
from pf2lora.common.errors import ConfigError
from pf2lora.common.learning.config import (
    PACKAGED_MODELS,
    ModelConfig,
    check_int,
    check_number,
    from_mapping,
)
from pf2lora.common.secagg.config import SecAggConfig
from pf2lora.common.secagg.fixedpoint import check_no_overflow, choose_frac_bits

T = TypeVar("T")


# Bounds on run settings: what the wire (uint32 rounds), the clock (deadline arithmetic in
# milliseconds) and a federation can carry; a value outside is refused at `run start`.
MAX_ROUNDS = 1_000_000
MAX_SILOS = 100_000
MAX_DEADLINE_S = 30 * 24 * 3600.0  # 30 days


@dataclass(frozen=True)
class SecAggSettings:
    """The run's SecAgg+ parameters (`[secagg]` in a run file); docs/security.md.

    clip: each coordinate of a silo's weighted payload is clipped to [-clip, clip] before the
        fixed-point encoding (the silo logs the fraction clipped, and sits the round out rather
        than clip a weight). None picks by algorithm (`default_clip`): payloads are p_k * shared
        state, at most p_k <= 1 in magnitude for pf2lora, homlora and perfedavg (measured: the
        weight itself, 0.25 of 4 silos, is the largest value), so 4.0; HETLoRA also multiplies by
        ||B_k A_k||_F, which grows with training (measured p_k ||B_k A_k||: 0.25, 0.45, 1.24,
        3.18 in rounds 1-4 with 20 local steps), so 256.0.
    frac_bits: fixed-point fraction bits F; None: the largest F without int32 overflow for the
        round's silo count (N * clip * 2^F < 2^31). A given F is checked against the allow-list.
    threshold: Shamir threshold t; None: a majority of each silo's share holders.
    neighbours: None: every silo masks with every other (SecAgg); an even k: a random k-regular
        graph per round (SecAgg+), per-silo cost O(k) instead of O(N).
    stage_deadline_s: how long each stage after the key advertisement waits for the silos
        (key advertisement itself is bounded by round_deadline_s, as it follows training).
    """

    clip: float | None = None
    frac_bits: int | None = None
    threshold: int | None = None
    neighbours: int | None = None
    stage_deadline_s: float = 120.0

    def __post_init__(self) -> None:
        self.library_config(
            1.0 if self.clip is None else self.clip
        )  # validates every field by name
        check_number("secagg.stage_deadline_s", self.stage_deadline_s, 0, MAX_DEADLINE_S)

    def library_config(self, clip: float, frac_bits: int | None = None) -> SecAggConfig:
        return SecAggConfig(
            clip=clip,
            frac_bits=self.frac_bits if frac_bits is None else frac_bits,
            threshold=self.threshold,
            neighbours=self.neighbours,
        )

    def check_federation(self, num_silos: int, clip: float) -> None:
        """ConfigError if a round of num_silos silos would overflow or cannot meet the threshold."""
        if self.frac_bits is None:
            choose_frac_bits(num_silos, clip)
        else:
            check_no_overflow(num_silos, clip, self.frac_bits)
        if self.threshold is not None and self.threshold > num_silos:
            raise ConfigError(
                f"secagg.threshold={self.threshold} exceeds the {num_silos} allowed silos"
            )


@dataclass(frozen=True)
class RunConfig:
    """What a run trains and how its rounds close (docs/federation.md, round lifecycle)."""

    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    # model.path is the base model as the COORDINATOR sees it (it builds the initial shared
    # adapter from it); each silo loads its own copy from its [model] path.
    model: ModelConfig = field(default_factory=ModelConfig)
    rounds: int = 3
    # A round closes at its deadline only if at least this many updates arrived; otherwise it
    # is opened again (attempt + 1) for the silos that ask for work then.
    min_silos: int = 1
    round_deadline_s: float = 600.0
    # Enrollment ends when every expected silo asked for work, or after this long once
    # min_silos did: a silo that is down costs each round at most this wait.
    enroll_window_s: float = 10.0
    # How long the final evaluation waits for the last round's silos to report.
    eval_deadline_s: float = 300.0
    seed: int = 0
    # SecAgg+ in every round: the coordinator sees only the weighted sum of the silos' payloads.
    # false sends plain payloads (the coordinator sees each silo's update): explicit only, logged
    # as a warning, and silos refuse such runs unless their [silo] require_secure_aggregation
    # is false.
    secure_aggregation: bool = True
    secagg: SecAggSettings = field(default_factory=SecAggSettings)

    def __post_init__(self) -> None:
        check_int("rounds", self.rounds, 1, MAX_ROUNDS)
        check_int("min_silos", self.min_silos, 1, MAX_SILOS)
        for name in ("round_deadline_s", "eval_deadline_s"):
            check_number(name, getattr(self, name), 0, MAX_DEADLINE_S)
        check_number("enroll_window_s", self.enroll_window_s, 0, MAX_DEADLINE_S)
        check_int("seed", self.seed, 0, 2**63 - 1)
        check_model_support(self.algorithm, self.model)
        if not isinstance(self.secure_aggregation, bool):
            raise ConfigError(
                f"secure_aggregation={self.secure_aggregation!r}: must be true or false"
            )

    @property
    def secagg_clip(self) -> float:
        """The clip bound in force: [secagg] clip, or the algorithm's default."""
        return (
            self.secagg.clip if self.secagg.clip is not None else default_clip(self.algorithm.name)
        )

    @property
    def round_min_silos(self) -> int:
        """Silos a round needs: min_silos, and with secure aggregation at least 2 and t."""
        dp = self.algorithm.dp
        need = max(self.min_silos, dp.min_silos) if dp.enabled else self.min_silos
        if not self.secure_aggregation:
            return need
        return max(need, 2, self.secagg.threshold or 2)


DEFAULT_CLIP = 4.0
ALGORITHM_CLIP = {"hetlora": 256.0}  # norm-weighted payloads (SecAggSettings.clip)


def default_clip(algorithm: str) -> float:
    return ALGORITHM_CLIP.get(algorithm, DEFAULT_CLIP)


def to_dict(cfg: Any) -> Any:
    """A config dataclass as plain JSON-able values (tuples become lists)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple | list):
        return [to_dict(v) for v in cfg]
    return cfg


def to_json(cfg: Any) -> str:
    """Canonical JSON of a config dataclass (sorted keys: equal configs give equal strings)."""
    return json.dumps(to_dict(cfg), sort_keys=True, allow_nan=False)


def from_json(cls: type[T], text: str, where: str = "") -> T:
    """The inverse of to_json; ConfigError naming `where` on bad JSON or bad fields."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where or cls.__name__}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ConfigError(f"{where or cls.__name__}: JSON nested too deeply") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a JSON object")
    return from_mapping(cls, data, where)


# Keys holding file or folder paths, per kind of file: a relative path in a file is taken
# relative to that file's folder (flags stay relative to the working directory).
RUN_FILE_PATHS = ("model.path",)


def load_toml(path: str | Path, path_keys: Sequence[str] = ()) -> dict[str, Any]:
    """A TOML file as a dict; ConfigError naming the file when it is missing or malformed.

    The values of `path_keys` (dotted; a string, a list of strings or a table of strings) that
    are relative paths are made absolute against the file's folder, so that a command run from
    any directory reads the same files. The packaged model names stay names.
    """
    p = Path(path)
    try:
        tree = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {p} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {p}: cannot read it ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p}: {exc}") from None
    base = os.path.abspath(p.parent)
    for dotted in path_keys:
        *sections, name = dotted.split(".")
        node: Any = tree
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict) and name in node:
            node[name] = _relative_to(base, node[name])
    return tree


def _relative_to(base: str, value: Any) -> Any:
    """value with its relative paths joined to base (anything else left to validation)."""
    if isinstance(value, list):
        return [_relative_to(base, v) for v in value]
    if isinstance(value, dict):
        return {k: _relative_to(base, v) for k, v in value.items()}
    if not isinstance(value, str) or not value or value in PACKAGED_MODELS:
        return value
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """tree[path[0]][path[1]]... = value, creating sections on the way (flag overrides)."""
    node = tree
    for key in path[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {key!r} is not a section")
        node = child
    node[path[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Set dotted keys ("server.insecure") from flags; None values are flags not given."""
    for dotted, value in (overrides or {}).items():
        if value is not None:
            set_path(tree, tuple(dotted.split(".")), value)
    return tree
