"""Per-silo splits: a corpus or one file per silo becomes each silo's train and held-out data."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset

from pf2lora.common.data.corpora import load_rotten_tomatoes, load_trec, load_vader
from pf2lora.common.data.dataset import (
    COLUMNS,
    column_values,
    labels_of,
    make_dataset,
    num_labels_of,
)
from pf2lora.common.data.files import (
    check_label_names,
    encode_labels,
    infer_label_names,
    read_table,
)
from pf2lora.common.data.instructions import (
    INSTRUCTION_TASKS,
    instruction_task,
    is_instruction_dataset,
    load_instructions,
)
from pf2lora.common.data.partition import (
    partition_dirichlet,
    partition_iid,
    partition_natural,
    partition_similarity,
    stratified_subsample,
    train_test_split_indices,
)
from pf2lora.common.errors import ConfigError

logger = logging.getLogger(__name__)

SOURCES: tuple[str, ...] = ("vader", "rotten-tomatoes", "trec")

PARTITIONS: tuple[str, ...] = ("natural", "similarity", "dirichlet", "iid")


@dataclass(frozen=True, eq=False)
class ClientData:
    """One silo's data: a training split and a held-out split from the same distribution."""

    name: str
    train: Dataset
    test: Dataset
    num_labels: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"name must be a non-empty str, got {self.name!r}")
        if (
            isinstance(self.num_labels, bool)
            or not isinstance(self.num_labels, int)
            or self.num_labels < 1
        ):
            raise ConfigError(f"num_labels must be an int >= 1, got {self.num_labels!r}")
        for field in ("train", "test"):
            ds = getattr(self, field)
            if not isinstance(ds, Dataset):
                raise ConfigError(f"{field} must be a datasets.Dataset, got {type(ds).__name__}")
            if is_instruction_dataset(ds):
                if len(ds) == 0:
                    raise ConfigError(f"{field} of client {self.name!r} is empty")
                continue
            missing = [c for c in COLUMNS if c not in ds.column_names]
            if missing:
                raise ConfigError(f"{field} of client {self.name!r} lacks columns {missing}")
            if len(ds) == 0:
                raise ConfigError(f"{field} of client {self.name!r} is empty")
            y = labels_of(ds)
            if y.min() < 0 or y.max() >= self.num_labels:
                raise ConfigError(
                    f"{field} of client {self.name!r} has labels outside [0, {self.num_labels})"
                )


def _check_cap(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} must be None or an int >= 1, got {value!r}")


def _client_splits(
    pooled: Dataset,
    parts: Sequence[np.ndarray],
    names: Sequence[str],
    *,
    seed: int,
    test_fraction: float,
    max_train: int | None,
    max_test: int | None,
    first_client: int = 0,
) -> list[ClientData]:
    """Stratified train/test split of each client's indices, then optional stratified caps."""
    labels = labels_of(pooled)
    num_labels = num_labels_of(pooled)
    clients: list[ClientData] = []
    for j, (idx, name) in enumerate(zip(parts, names, strict=True), start=first_client):
        rng = np.random.default_rng([seed, 1, j])
        y = labels[idx]
        tr, te = train_test_split_indices(y, test_fraction, rng)
        if max_train is not None and tr.size > max_train:
            tr = tr[stratified_subsample(y[tr], max_train, rng)]
        if max_test is not None and te.size > max_test:
            te = te[stratified_subsample(y[te], max_test, rng)]
        clients.append(ClientData(name, pooled.select(idx[tr]), pooled.select(idx[te]), num_labels))
        logger.info(
            "client %s: %d train, %d test, label counts %s",
            name,
            tr.size,
            te.size,
            np.bincount(y, minlength=num_labels).tolist(),
        )
    return clients


def build_client_data(
    source: str,
    partition: str,
    num_clients: int,
    seed: int,
    *,
    test_fraction: float = 0.2,
    similarity: float = 0.0,
    dirichlet_alpha: float = 0.5,
    max_train_per_client: int | None = None,
    max_test_per_client: int | None = None,
    domains: Sequence[str] | None = None,
    num_classes: int = 2,
    min_per_movie: int = 20,
    cache_dir: Path | None = None,
) -> list[ClientData]:
    """Split a shipped corpus across num_clients silos (deterministic given seed).

    `domains`: VADER domain names, or Rotten Tomatoes movie names, to draw from (default all).
    With partition="natural" on Rotten Tomatoes and fewer clients than movies, num_clients
    movies are drawn at random (seeded). `num_classes` applies to VADER only; TREC (6 question
    classes) has no natural split.
    """
    if source not in SOURCES:
        raise ConfigError(f"source must be one of {list(SOURCES)}, got {source!r}")
    if partition not in PARTITIONS:
        raise ConfigError(f"partition must be one of {list(PARTITIONS)}, got {partition!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an int >= 0, got {seed!r}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError(f"num_clients must be an int >= 1, got {num_clients!r}")
    _check_cap("max_train_per_client", max_train_per_client)
    _check_cap("max_test_per_client", max_test_per_client)
    # Cheap checks before the corpus is read (the partitioners check again).
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if partition == "similarity" and not 0.0 <= similarity <= 1.0:
        raise ConfigError(f"similarity must be in [0, 1], got {similarity!r}")
    if partition == "dirichlet" and not 0.0 < dirichlet_alpha < float("inf"):
        raise ConfigError(f"dirichlet alpha must be a finite number > 0, got {dirichlet_alpha!r}")
    rng = np.random.default_rng([seed, 0])
    if source == "trec":
        if partition == "natural" or domains is not None:
            raise ConfigError(
                "source='trec' has no natural domains: use partition similarity, dirichlet or iid"
            )
        pooled = load_trec()
    elif source == "vader":
        pooled = load_vader(domains, num_classes, cache_dir=cache_dir)
    else:
        pooled = load_rotten_tomatoes(min_per_movie, cache_dir=cache_dir)
        if domains is not None:
            wanted = set(domains)
            unknown = sorted(wanted - set(pooled.unique("domain")))
            if unknown:
                raise ConfigError(f"domains: unknown movies (or < min_per_movie) {unknown[:5]}")
            pooled = _select_domains(pooled, wanted)
        groups = sorted(pooled.unique("domain"))
        if partition == "natural" and num_clients < len(groups):
            picked = sorted(rng.choice(groups, size=num_clients, replace=False).tolist())
            logger.info(
                "rotten tomatoes: %d of %d movies drawn: %s", num_clients, len(groups), picked
            )
            pooled = _select_domains(pooled, set(picked))
    labels = labels_of(pooled)
    if partition == "natural":
        groups_col = column_values(pooled, "domain")
        parts = partition_natural(groups_col, num_clients, rng)
        group_names = sorted(set(groups_col))
        per = num_clients // len(group_names)
        names = [g if per == 1 else f"{g}-{i}" for g in group_names for i in range(per)]
    else:
        if partition == "similarity":
            parts = partition_similarity(labels, num_clients, similarity, rng)
        elif partition == "dirichlet":
            parts = partition_dirichlet(labels, num_clients, dirichlet_alpha, rng)
        else:
            parts = partition_iid(labels, num_clients, rng)
        names = [f"client-{j}" for j in range(num_clients)]
    return _client_splits(
        pooled,
        parts,
        names,
        seed=seed,
        test_fraction=test_fraction,
        max_train=max_train_per_client,
        max_test=max_test_per_client,
    )


def _select_domains(ds: Dataset, keep: set[str]) -> Dataset:
    mask = [d in keep for d in column_values(ds, "domain")]
    return ds.select(np.flatnonzero(mask))


def client_data_from_files(
    train_paths: Sequence[str | os.PathLike[str]],
    test_paths: Sequence[str | os.PathLike[str]] | None = None,
    *,
    text_column: str = "text",
    label_column: str = "label",
    labels: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_train_per_client: int | None = None,
    max_test_per_client: int | None = None,
    cache_dir: Path | None = None,
) -> list[ClientData]:
    """One client per local train file, with its test file (or a stratified split of the train
    file).

    The label mapping is shared by all clients: `labels`, or the sorted union over all files.
    Client names default to the train files' stems.
    """
    if not train_paths:
        raise ConfigError("train_paths must name at least one file")
    if test_paths is not None and len(test_paths) != len(train_paths):
        raise ConfigError(
            f"test_paths has {len(test_paths)} files, train_paths {len(train_paths)}: one each"
        )
    if names is not None and (len(names) != len(train_paths) or len(set(names)) != len(names)):
        raise ConfigError(f"names must be {len(train_paths)} distinct names, got {list(names)}")
    _check_cap("max_train_per_client", max_train_per_client)
    _check_cap("max_test_per_client", max_test_per_client)
    all_paths = list(train_paths) + list(test_paths or [])
    tables = [read_table(p, text_column, label_column, cache_dir) for p in all_paths]
    label_names = (
        check_label_names(labels)
        if labels is not None
        else infer_label_names([(p, raw) for p, _, raw in tables], label_column)
    )
    datasets_ = [
        make_dataset(
            t, encode_labels(raw, label_names, p, label_column), [p.stem] * len(t), label_names
        )
        for p, t, raw in tables
    ]
    k = len(train_paths)
    client_names = list(names) if names is not None else [Path(p).stem for p in train_paths]
    if names is None and len(set(client_names)) != k:
        client_names = [f"{n}-{j}" for j, n in enumerate(client_names)]
    if test_paths is None:
        out: list[ClientData] = []
        for j, (ds, name) in enumerate(zip(datasets_, client_names, strict=True)):
            out.extend(
                _client_splits(
                    ds,
                    [np.arange(len(ds))],
                    [name],
                    seed=seed,
                    test_fraction=test_fraction,
                    max_train=max_train_per_client,
                    max_test=max_test_per_client,
                    first_client=j,
                )
            )
        return out
    clients: list[ClientData] = []
    for j, name in enumerate(client_names):
        rng = np.random.default_rng([seed, 2, j])
        train = _cap(datasets_[j], max_train_per_client, rng)
        test = _cap(datasets_[k + j], max_test_per_client, rng)
        clients.append(ClientData(name, train, test, len(label_names)))
    return clients


def _cap(ds: Dataset, cap: int | None, rng: np.random.Generator) -> Dataset:
    """At most `cap` rows, drawn with the dataset's label shares."""
    if cap is None or len(ds) <= cap:
        return ds
    return ds.select(stratified_subsample(labels_of(ds), cap, rng))


def instruction_client_data(
    num_clients: int,
    seed: int,
    *,
    tasks: Sequence[str] | None = None,
    train_per_client: int = 200,
    test_per_client: int = 100,
) -> list[ClientData]:
    """The packaged instruction tasks, one per client in turn (client j asks task j mod T):
    each client draws its own train and held-out examples of its task (seeded, disjoint)."""
    chosen = list(tasks) if tasks is not None else sorted(INSTRUCTION_TASKS)
    unknown = [t for t in chosen if t not in INSTRUCTION_TASKS]
    if unknown or not chosen:
        raise ConfigError(f"instruction tasks {unknown or chosen}: use {sorted(INSTRUCTION_TASKS)}")
    _check_cap("max_train_per_client", train_per_client)
    _check_cap("max_test_per_client", test_per_client)
    per_task: dict[str, int] = {}
    for j in range(num_clients):
        per_task[chosen[j % len(chosen)]] = per_task.get(chosen[j % len(chosen)], 0) + 1
    size = train_per_client + test_per_client
    pools = {t: instruction_task(t, size * n, seed) for t, n in per_task.items()}
    clients: list[ClientData] = []
    used: dict[str, int] = {}
    for j in range(num_clients):
        task = chosen[j % len(chosen)]
        lo = used.get(task, 0) * size
        used[task] = used.get(task, 0) + 1
        pool = pools[task]
        if len(pool) < lo + size:
            raise ConfigError(
                f"instruction task {task!r} has too few examples for {num_clients} clients"
            )
        name = task if per_task[task] == 1 else f"{task}-{used[task] - 1}"
        train = pool.select(range(lo, lo + train_per_client))
        test = pool.select(range(lo + train_per_client, lo + size))
        clients.append(ClientData(name, train, test, 1))
    return clients


def instruction_data_from_files(
    train_paths: Sequence[str | os.PathLike[str]],
    test_paths: Sequence[str | os.PathLike[str]],
    *,
    names: Sequence[str] | None = None,
    cache_dir: Path | None = None,
) -> list[ClientData]:
    """One client per local instruction file (messages, or prompt and completion) with its
    held-out file."""
    if not train_paths or len(test_paths) != len(train_paths):
        raise ConfigError(
            f"instruction data needs one held-out file per training file "
            f"({len(train_paths)} train, {len(test_paths)} held-out)"
        )
    client_names = list(names) if names is not None else [Path(p).stem for p in train_paths]
    if len(set(client_names)) != len(client_names):
        client_names = [f"{n}-{j}" for j, n in enumerate(client_names)]
    return [
        ClientData(
            name,
            load_instructions(tr, cache_dir=cache_dir),
            load_instructions(te, cache_dir=cache_dir),
            1,
        )
        for name, tr, te in zip(client_names, train_paths, test_paths, strict=True)
    ]
