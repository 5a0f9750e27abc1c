"""Evaluation of a two-level model on a held-out split: loss and accuracy (or MSE); for a
decoder on instruction data, answer loss, perplexity and generation metrics."""

from __future__ import annotations

import logging

import torch

from pf2lora.common.learning.batching import EncodedData, iter_batches
from pf2lora.common.learning.generation import answer_token_loss, generation_metrics
from pf2lora.common.learning.model import TwoLevelModel

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(
    model: TwoLevelModel,
    data: EncodedData,
    batch_size: int = 64,
    *,
    generate: int = 0,
    max_new_tokens: int = 32,
) -> dict[str, float]:
    """Mean loss and accuracy (classification, next-token for plain-text LM) or MSE
    (regression). Instruction data (answer spans): answer-token loss, perplexity and token
    accuracy, and with generate > 0 exact match and ROUGE-L of greedy answers to that many
    held-out prompts."""
    was_training = model.training
    model.eval()
    if "answer_start" in data.tensors:
        try:
            metrics = answer_token_loss(model, data, batch_size)
            metrics.update(generation_metrics(model, data, generate, max_new_tokens))
            metrics["n"] = float(len(data))
            return metrics
        finally:
            model.train(was_training)
    total_loss = 0.0
    correct = 0
    counted = 0
    n = 0
    try:
        for batch in iter_batches(data, batch_size, model.device):
            loss, out = model.forward_batch(batch)
            size = next(iter(batch.values())).shape[0]
            total_loss += float(loss) * size
            n += size
            if model.task == "seq-cls":
                correct += int((out.argmax(-1) == batch["labels"]).sum())
                counted += size
            elif model.task == "causal-lm":
                pred = out[:, :-1].argmax(-1)
                target = batch["labels"][:, 1:]
                mask = target != -100
                correct += int(((pred == target) & mask).sum())
                counted += int(mask.sum())
    finally:
        model.train(was_training)
    metrics = {"loss": total_loss / max(n, 1), "n": float(n)}
    if model.task == "regression":
        metrics["mse"] = metrics["loss"]
    else:
        metrics["accuracy"] = correct / max(counted, 1)
    return metrics
