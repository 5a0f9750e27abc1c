"""Conversations as training tensors: the tokenizer's chat template, labels on the assistant's
answers only, and truncation that keeps the answer.

A conversation is rendered to text once (the chat template, or a plain layout for a tokenizer
without one) and tokenized once with character offsets; a token is labelled when it starts
inside an assistant turn's rendered answer, so tokens that merge across a turn boundary cannot
shift the mask. Every other position carries the label -100 (ignored by the loss).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pf2lora.common.errors import DataError
from pf2lora.common.learning.batching import EncodedData

logger = logging.getLogger(__name__)

IGNORE = -100  # the label value the loss skips (torch's cross-entropy ignore_index)


@dataclass(frozen=True)
class Rendered:
    """A conversation's text and the [start, end) character span of each assistant answer."""

    text: str
    answers: tuple[tuple[int, int], ...]


def _template(tokenizer: Any, turns: Sequence[Mapping[str, str]], generation: bool) -> str:
    text = tokenizer.apply_chat_template(
        [dict(t) for t in turns], tokenize=False, add_generation_prompt=generation
    )
    assert isinstance(text, str)
    return text


def render(turns: Sequence[Mapping[str, str]], tokenizer: Any) -> Rendered:
    """The conversation's text and where each assistant answer lies in it.

    With a chat template, an answer spans from the end of the rendered history plus the
    generation prompt to the end of the history including that answer (its end-of-turn token
    included, so the model learns to stop). Without one: turns on lines of their own, each
    answer followed by the EOS token.
    """
    answers: list[tuple[int, int]] = []
    if getattr(tokenizer, "chat_template", None):
        full = _template(tokenizer, turns, False)
        for i, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            before = _template(tokenizer, turns[:i], True)
            upto = _template(tokenizer, turns[: i + 1], False)
            if not (full.startswith(upto) and upto.startswith(before)):
                raise DataError(
                    "the tokenizer's chat template does not render a conversation as a prefix "
                    "of its continuation; answers cannot be located for the loss mask"
                )
            answers.append((len(before), len(upto)))
        return Rendered(full, tuple(answers))
    eos = tokenizer.eos_token or ""
    text = ""
    for turn in turns:
        if turn["role"] == "assistant":
            start = len(text)
            text += turn["content"] + eos
            answers.append((start, len(text)))
            text += "\n"
        else:
            text += turn["content"] + "\n"
    return Rendered(text, tuple(answers))


@dataclass(frozen=True)
class Encoded:
    """One conversation's token ids and labels, and where its last answer starts and ends."""

    ids: list[int]
    labels: list[int]
    answer_start: int
    answer_end: int


def encode_one(turns: Sequence[Mapping[str, str]], tokenizer: Any) -> Encoded:
    rendered = render(turns, tokenizer)
    enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    labels = [IGNORE] * len(ids)
    spans: list[tuple[int, int]] = []
    for a, b in rendered.answers:
        inside = [j for j, (s, _) in enumerate(enc["offset_mapping"]) if a <= s < b]
        if not inside:
            raise DataError("an assistant answer rendered to no tokens")
        for j in inside:
            labels[j] = ids[j]
        spans.append((inside[0], inside[-1] + 1))
    return Encoded(ids, labels, spans[-1][0], spans[-1][1])


def truncate(e: Encoded, max_length: int) -> tuple[Encoded, str | None]:
    """At most max_length tokens, keeping the last answer: the prompt loses its start first;
    only an answer longer than half the window loses its end (the prompt keeps the other half).
    Returns the kept example and what was cut ("prompt", "answer" or None)."""
    n = len(e.ids)
    if n <= max_length:
        return e, None
    answer_len = e.answer_end - e.answer_start
    keep_prompt = min(e.answer_start, max(max_length - answer_len, max_length // 2))
    lo = e.answer_start - keep_prompt
    hi = lo + max_length
    cut = "answer" if e.answer_end > hi else ("prompt" if lo > 0 else None)
    kept = Encoded(
        e.ids[lo:hi],
        e.labels[lo:hi],
        e.answer_start - lo,
        min(e.answer_end, hi) - lo,
    )
    return kept, cut


def encode_conversations(
    conversations: Sequence[Sequence[Mapping[str, str]]],
    tokenizer: Any,
    max_length: int,
    *,
    where: str = "",
) -> EncodedData:
    """Right-padded input_ids/attention_mask/labels (answers only), answer_start/answer_end."""
    if len(conversations) == 0:
        raise DataError(f"{where or 'instruction data'}: no examples to encode")
    rows: list[Encoded] = []
    cuts = {"prompt": 0, "answer": 0}
    for turns in conversations:
        e, cut = truncate(encode_one(turns, tokenizer), max_length)
        if cut is not None:
            cuts[cut] += 1
        rows.append(e)
    if cuts["prompt"] or cuts["answer"]:
        logger.warning(
            "%s: %d of %d examples are longer than max_length=%d: %d lost the start of their "
            "prompt, %d also the end of their answer",
            where or "instruction data",
            cuts["prompt"] + cuts["answer"],
            len(rows),
            max_length,
            cuts["prompt"],
            cuts["answer"],
        )
    width = max(len(r.ids) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.ids)
        input_ids[i, :n] = torch.tensor(r.ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(r.labels)
    return EncodedData(
        {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": labels,
            "answer_start": torch.tensor([r.answer_start for r in rows], dtype=torch.long),
            "answer_end": torch.tensor([r.answer_end for r in rows], dtype=torch.long),
        },
        tokenizer=tokenizer,
    )
