"""Evaluation of a decoder on instruction data: answer-token loss and perplexity, and greedy
generation scored by exact match and ROUGE-L (Google's rouge-score).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from pf2lora.common.learning.batching import EncodedData, iter_batches
from pf2lora.common.learning.conversations import IGNORE

logger = logging.getLogger(__name__)

_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lower case, whitespace collapsed, trailing full stop dropped: what exact match compares."""
    return _SPACE.sub(" ", text).strip().lower().rstrip(".").strip()


def exact_match(prediction: str, reference: str) -> float:
    return 1.0 if normalize(prediction) == normalize(reference) else 0.0


@lru_cache(maxsize=1)
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of words), in [0, 1]."""
    return float(_scorer().score(reference, prediction)["rougeL"].fmeasure)


def answer_token_loss(model: Any, data: EncodedData, batch_size: int) -> dict[str, float]:
    """Mean cross-entropy over answer tokens (every token counts once), its exp, and the share
    of answer tokens the model predicts exactly (greedy next token)."""
    total = 0.0
    tokens = 0
    correct = 0
    for batch in iter_batches(data, batch_size, model.device):
        _, logits = model.forward_batch(batch)
        target = batch["labels"][:, 1:]
        logits = logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            target.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        mask = target != IGNORE
        total += float(nll)
        tokens += int(mask.sum())
        correct += int(((logits.argmax(-1) == target) & mask).sum())
    loss = total / max(tokens, 1)
    return {
        "answer_loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "token_accuracy": correct / max(tokens, 1),
        "answer_tokens": float(tokens),
    }


def _left_padded(
    prompts: Sequence[Tensor], pad: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    width = max(int(p.numel()) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - p.numel() :] = p
        mask[i, width - p.numel() :] = 1
    return ids.to(device), mask.to(device)


def generate_answers(
    model: Any, data: EncodedData, count: int, max_new_tokens: int, batch_size: int = 8
) -> tuple[list[str], list[str]]:
    """Greedy answers to the first `count` prompts (each conversation's last answer removed)
    and the reference answers, as text."""
    tok = data.tokenizer
    if tok is None:
        raise ValueError("generation needs the tokenizer that encoded the data")
    t = data.tensors
    n = min(count, len(data))
    stop = [i for i in {tok.eos_token_id, tok.pad_token_id} if i is not None]
    predictions: list[str] = []
    references: list[str] = []
    for lo in range(0, n, batch_size):
        rows = range(lo, min(n, lo + batch_size))
        prompts = [t["input_ids"][i, : int(t["answer_start"][i])] for i in rows]
        for i in rows:
            answer = t["input_ids"][i, int(t["answer_start"][i]) : int(t["answer_end"][i])]
            references.append(tok.decode(answer, skip_special_tokens=True).strip())
        ids, mask = _left_padded(prompts, int(stop[0]) if stop else 0, model.device)
        out = model.peft.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop or None,
            pad_token_id=stop[0] if stop else None,
        )
        for row in out[:, ids.shape[1] :]:
            predictions.append(tok.decode(row, skip_special_tokens=True).strip())
    return predictions, references


def generation_metrics(
    model: Any, data: EncodedData, count: int, max_new_tokens: int
) -> dict[str, float]:
    """Exact match and ROUGE-L of greedy answers on the first `count` held-out examples."""
    if count <= 0:
        return {}
    predictions, references = generate_answers(model, data, count, max_new_tokens)
    n = len(predictions)
    return {
        "exact_match": sum(map(exact_match, predictions, references)) / n,
        "rouge_l": sum(map(rouge_l, predictions, references)) / n,
        "generated": float(n),
    }
