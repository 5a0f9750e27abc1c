"""Test session setup and the shared fixtures: tiny model, toy corpus, certificates, federations.

Layout: unit/ (one package at a time, no servers), integration/ (real gRPC servers in this
process), federation/ (coordinator and silo processes), project/ (docs, deploy, packaging,
layering). Helpers are the package `tests.helpers`; pytest runs with --import-mode=importlib.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pf2lora.common.learning.config import ModelConfig  # noqa: E402 - after the offline env
from tests.helpers import tiny, tls  # noqa: E402
from tests.helpers.federation import Federation  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model() -> ModelConfig:
    """The one tiny model config: MiniLM cut to one layer (real weights, fast)."""
    return tiny.MINI


@pytest.fixture(scope="session")
def toy_corpus() -> tuple[list[str], list[int]]:
    """The one toy corpus: (texts, labels) of short sentiment sentences, 1 = positive."""
    return list(tiny.TEXTS), list(tiny.LABELS)


@pytest.fixture(scope="session")
def pki_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """The one certificate fixture: `pki_factory(federation, silos, admins)` provisions a new
    federation PKI on disk (CA, coordinator for localhost, silo and admin certificates)."""

    def make(
        federation: str = "pf2lora",
        silos: Iterable[str] = ("silo-a", "silo-b", "silo-c"),
        admins: Iterable[str] = ("ops",),
    ) -> Path:
        return tls.provision(tmp_path_factory.mktemp("pki"), federation, silos, admins)

    return make


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Callable[..., Federation]]:
    """The one federation fixture: `federation(silos, **options)` makes a Federation of real
    coordinator and silo processes under this test's tmp_path; all are stopped at teardown."""
    made: list[Federation] = []

    def make(silos: dict[str, tuple[Path, Path]], **options: Any) -> Federation:
        fed = Federation(options.pop("root", tmp_path), silos, **options)
        made.append(fed)
        return fed

    yield make
    for fed in made:
        fed.close()
