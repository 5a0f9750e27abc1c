"""Instruction data: local files of prompt/completion pairs or chat `messages`, and the packaged
instruction tasks built from labelled corpora (one task per silo in the decoder demo).

Every loader returns a dataset with a `messages` column (a list of {role, content} turns that
ends with an assistant turn) and a `domain` column. How a conversation becomes tokens (chat
template, answer-only labels) is the model's business: common/learning/conversations.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, Features, List, Value

from pf2lora.common.data.dataset import column_values
from pf2lora.common.data.files import LOCAL_FORMATS, read_local
from pf2lora.common.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("system", "user", "assistant")

Message = dict[str, str]

FEATURES = Features(
    {
        "messages": List({"role": Value("string"), "content": Value("string")}),
        "domain": Value("string"),
    }
)


def is_instruction_dataset(ds: Dataset) -> bool:
    """True for a dataset made here (a `messages` column), False for text/label data."""
    return "messages" in ds.column_names


def is_instruction_file(path: str | os.PathLike[str], cache_dir: Path | None = None) -> bool:
    """True when a local data file has a `messages` column or `prompt` and `completion`
    columns (read through the datasets cache; False for anything it cannot read, so the
    text/label reader reports that file's problem)."""
    try:
        names = read_local(Path(path), "", cache_dir).column_names
    except DataError:
        return False
    return "messages" in names or {"prompt", "completion"} <= set(names)


def make_instruction_dataset(
    conversations: Sequence[list[Message]], domains: Sequence[str]
) -> Dataset:
    data = {"messages": [list(c) for c in conversations], "domain": list(domains)}
    return Dataset.from_dict(data, features=FEATURES)


def check_conversation(turns: Any, where: str) -> list[Message]:
    """A validated list of {role, content} turns that ends with an assistant answer."""
    if not isinstance(turns, list) or not turns:
        raise DataError(
            f"{where}: expected a non-empty list of {{role, content}} turns, got {turns!r:.80}"
        )
    out: list[Message] = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where} turn {j}: expected {{role, content}}, got {turn!r:.80}")
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise DataError(f"{where} turn {j}: role {role!r} is not one of {list(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{where} turn {j}: empty or missing content ({content!r:.80})")
        if role == "system" and j != 0:
            raise DataError(f"{where} turn {j}: a system turn may only come first")
        out.append({"role": role, "content": content})
    if not any(t["role"] == "assistant" for t in out):
        raise DataError(f"{where}: no assistant turn (nothing to learn from)")
    while out[-1]["role"] != "assistant":  # turns after the last answer teach nothing
        out.pop()
    return out


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: empty or missing text ({value!r:.80})")
    return value


def load_instructions(
    path: str | os.PathLike[str],
    *,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    messages_column: str = "messages",
    domain: str | None = None,
    cache_dir: Path | None = None,
) -> Dataset:
    """A .jsonl/.json/.csv/.tsv/.parquet file of instruction examples as messages/domain.

    A file holds either a `messages` column (a list of {role, content} turns, roles system,
    user, assistant) or `prompt` and `completion` columns (one user turn, one assistant
    answer). Errors name the file, the row and the column.
    """
    p = Path(path)
    expected = (
        f"(a {messages_column!r} column, or {prompt_column!r} and {completion_column!r} columns "
        "expected)"
    )
    ds = read_local(p, expected, cache_dir)
    csv = LOCAL_FORMATS.get(p.suffix.lower()) == "csv"
    conversations: list[list[Message]] = []
    if messages_column in ds.column_names:
        if csv:
            raise DataError(
                f"{p}: column {messages_column!r}: a list of turns needs JSONL or Parquet, not CSV"
            )
        for i, turns in enumerate(column_values(ds, messages_column)):
            conversations.append(
                check_conversation(turns, f"{p}: column {messages_column!r} row {i}")
            )
    elif prompt_column in ds.column_names and completion_column in ds.column_names:
        prompts = column_values(ds, prompt_column)
        answers = column_values(ds, completion_column)
        for i, (q, a) in enumerate(zip(prompts, answers, strict=True)):
            conversations.append(
                [
                    {"role": "user", "content": _text(q, f"{p}: column {prompt_column!r} row {i}")},
                    {
                        "role": "assistant",
                        "content": _text(a, f"{p}: column {completion_column!r} row {i}"),
                    },
                ]
            )
    else:
        raise DataError(f"{p}: columns found {ds.column_names} {expected}")
    return make_instruction_dataset(conversations, [domain or p.stem] * len(conversations))


# ------------------------------------------------------------------ packaged instruction tasks


@dataclass(frozen=True)
class InstructionTask:
    """A labelled corpus asked as a question whose answer is the label's name."""

    name: str
    load: Callable[[], Dataset]
    prompt: str  # formatted with {text}
    answers: tuple[str, ...]  # the answer for each label index


def _vader(domain: str) -> Callable[[], Dataset]:
    def load() -> Dataset:
        from pf2lora.common.data.corpora import load_vader

        return load_vader([domain])

    return load


def _rotten_tomatoes() -> Dataset:
    from pf2lora.common.data.corpora import load_rotten_tomatoes

    return load_rotten_tomatoes()


def _trec() -> Dataset:
    from pf2lora.common.data.corpora import load_trec

    return load_trec()


INSTRUCTION_TASKS: dict[str, InstructionTask] = {
    t.name: t
    for t in (
        InstructionTask(
            "tweet-sentiment",
            _vader("tweets"),
            "Is the feeling of this tweet positive or negative?\n\n{text}",
            ("negative", "positive"),
        ),
        InstructionTask(
            "question-type",
            _trec,
            "What kind of answer does this question ask for: an abbreviation, a description, "
            "an entity, a person, a location or a number?\n\n{text}",
            ("an abbreviation", "a description", "an entity", "a person", "a location", "a number"),
        ),
        InstructionTask(
            "critic-verdict",
            _rotten_tomatoes,
            "A film critic wrote this. Did they rate the film fresh or rotten?\n\n{text}",
            ("rotten", "fresh"),
        ),
        InstructionTask(
            "editorial-tone",
            _vader("nyt"),
            "Is this newspaper editorial sentence approving or critical?\n\n{text}",
            ("critical", "approving"),
        ),
    )
}


def instruction_task(name: str, size: int, seed: int) -> Dataset:
    """`size` examples (seeded draw) of a packaged instruction task, domain = the task name."""
    task = INSTRUCTION_TASKS.get(name)
    if task is None:
        raise ConfigError(f"unknown instruction task {name!r}; known: {sorted(INSTRUCTION_TASKS)}")
    src = task.load()
    rng = np.random.default_rng([seed, 0x1A5, sorted(INSTRUCTION_TASKS).index(name)])
    index = rng.permutation(len(src))[: min(size, len(src))]
    picked = src.select(index)
    texts = column_values(picked, "text")
    labels = column_values(picked, "label")
    conversations = [
        [
            {"role": "user", "content": task.prompt.format(text=t)},
            {"role": "assistant", "content": task.answers[int(y)]},
        ]
        for t, y in zip(texts, labels, strict=True)
    ]
    return make_instruction_dataset(conversations, [name] * len(conversations))
