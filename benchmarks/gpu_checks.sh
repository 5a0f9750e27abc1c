#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one go (run from the repository root on a GPU machine,
# after the README's set-up): the CUDA-path tests, then the GPU timings of one local round.
#   bash benchmarks/gpu_checks.sh
# For bitsandbytes' quantized bases: pip install -c requirements/constraints.txt bitsandbytes
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU')"
.venv/bin/python -m pytest -q -rs tests/unit/common/test_device.py \
    tests/unit/common/test_model_placement.py tests/unit/common/test_model.py
cd benchmarks
../.venv/bin/python bench_precision.py --device cuda --repeats 5 --mem-repeats 2 \
    --note "GPU run: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
