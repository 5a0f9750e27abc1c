"""A decoder on instruction data through the real system: two silo processes, mutual TLS and
secure aggregation, a tiny Llama with SmolLM2's chat template, prompt/completion files on one
silo and chat-message files on the other. The final shared adapter equals the in-process
simulation's, and the final evaluation reports answer loss, exact match and ROUGE-L."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pf2lora.common.learning.config import ModelConfig
from pf2lora.common.simulation import DataConfig, SimulationConfig
from pf2lora.coordinator.checkpoints import CheckpointStore
from pf2lora.v1 import control_pb2 as cpb
from tests.helpers.federation import Federation, run_config, secure_simulation
from tests.helpers.tiny import tiny_llama_folder

pytestmark = pytest.mark.slow

SENTIMENT = [("I loved every minute", "positive"), ("dull and lifeless", "negative")]
QUESTIONS = [("Who wrote Hamlet?", "a person"), ("How far is the moon?", "a number")]


def _files(d: Path, pairs: list[tuple[str, str]], chat: bool) -> tuple[Path, Path]:
    d.mkdir(parents=True)
    out = []
    for split, n in (("train", 12), ("test", 6)):
        p = d / f"{split}.jsonl"
        with p.open("w") as fh:
            for i in range(n):
                q, a = pairs[i % len(pairs)]
                q = f"{q} (example {i})"
                row: dict[str, object] = (
                    {
                        "messages": [
                            {"role": "user", "content": q},
                            {"role": "assistant", "content": a},
                        ]
                    }
                    if chat
                    else {"prompt": q, "completion": a}
                )
                fh.write(json.dumps(row) + "\n")
        out.append(p)
    return out[0], out[1]


def test_two_silo_decoder_federation_equals_the_simulation(
    tmp_path: Path, federation: Callable[..., Federation]
) -> None:
    model_dir = tiny_llama_folder(tmp_path / "tiny-llama")
    silos = {
        "silo-a": _files(tmp_path / "data" / "a", SENTIMENT, chat=False),
        "silo-b": _files(tmp_path / "data" / "b", QUESTIONS, chat=True),
    }
    extra = {s: {"model_path": str(model_dir)} for s in silos}
    fed = federation(silos, tls=True, silo_extra=extra)
    fed.start()
    fed.wait_for_silos(180)
    model = ModelConfig(
        path=str(model_dir), task="causal-lm", max_length=48, generate_examples=3, max_new_tokens=3
    )
    cfg = run_config(rounds=2, min_silos=2, local_steps=2, model=model)
    run_id = fed.start_run(cfg, "decoder")
    status = fed.wait_run_done(run_id, 400)
    assert status.state == cpb.RUN_STATE_COMPLETED, fed.procs.tails()
    run_model = json.loads(status.config_json)["model"]
    assert run_model["id"] == "tiny-llama" and run_model["fingerprint"]
    for e in status.evaluation:
        m = dict(e.metrics)
        for key in ("personal_answer_loss", "shared_exact_match", "personal_rouge_l"):
            assert key in m, (e.silo_id, sorted(m))
        assert m["personal_generated"] == 3 and m["personal_n"] == 6
        assert m["personal_answer_loss"] < m["base_answer_loss"]  # training lowered it

    sim_cfg = SimulationConfig(
        algorithm=cfg.algorithm,
        model=model,
        rounds=cfg.rounds,
        seed=cfg.seed,
        data=DataConfig(
            source="files",
            num_clients=2,
            train_files=tuple(str(silos[s][0]) for s in sorted(silos)),
            test_files=tuple(str(silos[s][1]) for s in sorted(silos)),
        ),
    )
    sim = secure_simulation(sim_cfg, roster_size=2)
    fed_global = CheckpointStore(fed.state_dir).read(run_id, cfg.rounds)
    assert set(fed_global) == set(sim.final_global)
    for name, value in fed_global.items():
        torch.testing.assert_close(value, sim.final_global[name], rtol=1e-5, atol=1e-6)
    by_silo = {e.silo_id: dict(e.metrics) for e in status.evaluation}
    for name, c in zip(sorted(silos), sim.clients, strict=True):
        assert by_silo[name]["personal_answer_loss"] == pytest.approx(
            c["personal_answer_loss"], rel=1e-4
        )
