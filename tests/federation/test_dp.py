"""A real federation with differential privacy: mutual TLS, secure aggregation, each silo's
clipped update carrying its share of the noise; the run reports epsilon for every round and the
silos withhold their per-silo metrics."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pf2lora.common.algorithms.base import AlgorithmConfig
from pf2lora.common.learning.config import TrainConfig
from pf2lora.common.privacy import accountant
from pf2lora.common.privacy.config import DPConfig
from pf2lora.v1 import control_pb2 as cpb
from tests.helpers.federation import Federation, run_config
from tests.helpers.tiny import write_silo_data

pytestmark = pytest.mark.slow


def test_dp_run_over_mtls_and_secure_aggregation_reports_epsilon_per_round(
    tmp_path: Path, federation: Callable[..., Federation]
) -> None:
    silos = {f"silo-{k}": write_silo_data(tmp_path / "data" / f"silo-{k}", k, 24) for k in range(3)}
    fed = federation(silos, tls=True)
    fed.start()
    fed.wait_for_silos()
    dp = DPConfig(enabled=True, clip=0.5, noise_multiplier=1.1, min_silos=3, delta=1e-5)
    algorithm = AlgorithmConfig(train=TrainConfig(local_steps=3, batch_size=8), dp=dp)
    run_id = fed.start_run(run_config(rounds=3, min_silos=3, algorithm=algorithm))
    final = fed.wait_run_done(run_id, 300)
    assert final.state == cpb.RUN_STATE_COMPLETED and final.completed_rounds == 3
    expected = [accountant.epsilon(1.1, r, 1e-5) for r in (1, 2, 3)]
    assert [h.epsilon for h in final.history] == pytest.approx(expected)
    assert expected[0] < expected[1] < expected[2]
    for h in final.history:
        assert h.secure_aggregation and sorted(h.reported) == sorted(silos)
        assert not h.mean_metrics  # per-silo training metrics stay on the silos under DP
    assert {e.silo_id for e in final.evaluation} == set(silos)
    assert all(dict(e.metrics) == {"metrics_withheld": 1.0} for e in final.evaluation)
    log = fed.procs.tail("coordinator", 400)
    assert f"epsilon {expected[-1]:.3f} at delta 1e-05" in log
