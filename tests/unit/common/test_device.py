"""Device selection: CPU always; the CUDA path runs where torch sees a GPU."""

from __future__ import annotations

import pytest
import torch

from pf2lora.common.algorithms.base import AlgorithmConfig
from pf2lora.common.algorithms.registry import make_algorithm
from pf2lora.common.client_runtime import ClientRuntime, initial_global_state
from pf2lora.common.errors import DataError
from pf2lora.common.learning.batching import resolve_device
from pf2lora.common.learning.config import TrainConfig
from tests.helpers.tiny import MINI, text_data


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(DataError, match="device='tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DataError, match="no CUDA GPU"):
            resolve_device("cuda")


def _round(device: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    algo = make_algorithm(
        AlgorithmConfig(train=TrainConfig(local_steps=2, batch_size=6)), MINI.adapters
    )
    g = initial_global_state(algo, MINI, run_seed=0)
    data = text_data()
    rt = ClientRuntime(algo, MINI, client_index=0, seed=3, train=data, test=data, device=device)
    res = rt.run_round(g, 1.0)
    return res.payload, rt.evaluate(algo.aggregate(res.payload, g))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")
def test_cuda_round_matches_cpu_round() -> None:
    cpu_payload, cpu_eval = _round("cpu")
    gpu_payload, gpu_eval = _round("cuda")
    assert all(t.device.type == "cpu" for t in gpu_payload.values())  # the wire gets CPU tensors
    for k, v in cpu_payload.items():
        torch.testing.assert_close(gpu_payload[k], v, atol=1e-4, rtol=1e-3)
    assert abs(gpu_eval["personal_loss"] - cpu_eval["personal_loss"]) < 1e-3
