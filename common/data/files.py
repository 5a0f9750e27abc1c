"""Local data files (JSONL, CSV, TSV, Parquet) read with `datasets`: texts and labels, errors naming
file, row and column.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset

from pf2lora.common.data.dataset import column, make_dataset, read_file
from pf2lora.common.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

_INTEGER = re.compile(r"[+-]?\d+")

LOCAL_FORMATS: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",  # read with delimiter="\t"
    ".parquet": "parquet",
}


def read_local(p: Path, expected: str, cache_dir: Path | None) -> Dataset:
    """A local data file by its extension, with at least one row; every problem a DataError
    naming the file and what it should hold (`expected`)."""
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
    ds = read_file(builder, p, cache_dir, context=expected, **kwargs)
    if len(ds) == 0:
        raise DataError(f"{p}: no rows {expected}")
    return ds


def read_table(
    path: str | os.PathLike[str], text_column: str, label_column: str, cache_dir: Path | None
) -> tuple[Path, list[str], list[Any]]:
    """Texts (validated) and raw label values of one local file."""
    p = Path(path)
    expected = f"(columns {text_column!r}, {label_column!r} expected)"
    ds = read_local(p, expected, cache_dir)
    texts = column(ds, p, text_column)
    raw = column(ds, p, label_column)
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise DataError(f"{p}: column {text_column!r} row {i}: empty or missing text ({t!r})")
    return p, texts, raw


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, float) and v != v)


def _is_number(v: Any) -> bool:
    """An integer label, also as CSV text ("1")."""
    if isinstance(v, str):
        return _INTEGER.fullmatch(v.strip()) is not None
    return isinstance(v, int | float) and not isinstance(v, bool)


def _rows(rows: list[int]) -> str:
    return ", ".join(map(str, rows[:3])) + (f" and {len(rows) - 3} more" if len(rows) > 3 else "")


def infer_label_names(tables: Sequence[tuple[Path, list[Any]]], column: str) -> list[str]:
    """Sorted unique string labels over all files, or '0'..'max' for integer labels.

    A column must mean one thing: numbers (class indices) or words (class names). A file that
    mixes them (`1` and `positive`) is refused with the rows of each; give `labels` (the class
    names, in index order) to read numbers as indices beside names.
    """
    strings: set[str] = set()
    top = -1
    for path, raw in tables:
        numbers = [i for i, v in enumerate(raw) if not _missing(v) and _is_number(v)]
        words = [i for i, v in enumerate(raw) if isinstance(v, str) and not _is_number(v)]
        if numbers and words:
            raise DataError(
                f"{path}: column {column!r} mixes numbers (rows {_rows(numbers)}) and words "
                f"(rows {_rows(words)}): use one kind, or give the label names (labels=...) to "
                "read numbers as indices into them"
            )
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


def check_label_names(labels: Sequence[str]) -> list[str]:
    names = list(labels)
    if not names or len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"labels must be a non-empty list of distinct str, got {labels!r}")
    return names


def encode_labels(raw: Sequence[Any], names: Sequence[str], path: Path, column: str) -> list[int]:
    index = {name: i for i, name in enumerate(names)}
    out: list[int] = []
    for i, v in enumerate(raw):
        where = f"{path}: column {column!r} row {i}"
        if _missing(v):
            raise DataError(f"{where}: missing label")
        if isinstance(v, str) and v not in index and _INTEGER.fullmatch(v.strip()):
            v = int(v)  # a number written as text (CSV): an index into the names
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
    """A .jsonl/.json/.csv/.tsv/.parquet file as text/label/domain (domain defaults to the file
    stem).

    String labels map to their index in `labels` (default: sorted unique values, logged);
    integer labels must lie in [0, len(labels)) (default: [0, max]).
    """
    p, texts, raw = read_table(path, text_column, label_column, cache_dir)
    names = (
        check_label_names(labels)
        if labels is not None
        else infer_label_names([(p, raw)], label_column)
    )
    encoded = encode_labels(raw, names, p, label_column)
    return make_dataset(texts, encoded, [domain or p.stem] * len(texts), names)
