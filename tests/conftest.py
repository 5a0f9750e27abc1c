"""Test session setup: offline model loading, and test helper modules importable by name."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Helper modules next to the tests (core_fixtures, tlsutil) import as plain modules; the
# package itself is always imported as pf2lora.* (pytest runs with --import-mode=importlib).
sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
