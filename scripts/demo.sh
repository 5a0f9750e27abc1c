#!/usr/bin/env bash
# The main job, on a fresh machine: set up .venv, then run a local federation (a coordinator
# and 4 silo processes on loopback, mutual TLS) on the embedded defaults; per-silo results table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/pf2lora demo "$@"
