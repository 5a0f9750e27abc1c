"""Instruction data end to end on a tiny Llama with SmolLM2's chat template: files of
prompt/completion pairs or chat messages, answer-only labels, truncation that keeps the
answer, answer loss, and generation scored by exact match and ROUGE-L."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from pf2lora.common.client_runtime import encode_dataset
from pf2lora.common.data.instructions import (
    INSTRUCTION_TASKS,
    instruction_task,
    load_instructions,
)
from pf2lora.common.errors import DataError
from pf2lora.common.learning.base_model import load_tokenizer
from pf2lora.common.learning.config import ModelConfig, TrainConfig
from pf2lora.common.learning.conversations import IGNORE, Encoded, encode_conversations, truncate
from pf2lora.common.learning.evaluation import evaluate
from pf2lora.common.learning.generation import exact_match, generation_metrics, rouge_l
from pf2lora.common.learning.model import TwoLevelModel, build_two_level_model
from pf2lora.common.learning.trainer import BilevelTrainer
from tests.helpers import tiny

PAIRS = [
    ("Is this review positive or negative? I loved every minute.", "positive"),
    ("Is this review positive or negative? Dull and lifeless.", "negative"),
    ("What kind of answer does this ask for? Who wrote Hamlet?", "a person"),
    ("What kind of answer does this ask for? How far is the moon?", "a number"),
]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> ModelConfig:
    folder = tiny.tiny_llama_folder(tmp_path_factory.mktemp("llama") / "model")
    return ModelConfig(path=str(folder), task="causal-lm", max_length=64)


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _messages(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def test_chat_file_and_prompt_completion_file_give_the_same_tokens(
    tmp_path: Path, llama: ModelConfig
) -> None:
    csv = tmp_path / "pairs.csv"
    import csv as csv_mod

    with csv.open("w", newline="") as fh:
        w = csv_mod.writer(fh)
        w.writerow(["prompt", "completion"])
        w.writerows(PAIRS)
    chat = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": _messages(p, a)} for p, a in PAIRS])
    tok = load_tokenizer(llama)
    a = encode_dataset(load_instructions(csv), tok, llama)
    b = encode_dataset(load_instructions(chat), tok, llama)
    for name in ("input_ids", "attention_mask", "labels", "answer_start", "answer_end"):
        assert torch.equal(a.tensors[name], b.tensors[name]), name
    # and they are the tokens of the chat template itself
    ids = tok.apply_chat_template(_messages(*PAIRS[0]), tokenize=True, return_dict=True)[
        "input_ids"
    ]
    n = int(a.tensors["attention_mask"][0].sum())
    assert a.tensors["input_ids"][0, :n].tolist() == list(ids)


def test_only_the_answer_is_labelled(llama: ModelConfig) -> None:
    tok = load_tokenizer(llama)
    data = encode_conversations([_messages(p, a) for p, a in PAIRS], tok, 64)
    t = data.tensors
    for i, (prompt, answer) in enumerate(PAIRS):
        before = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        n_prompt = len(tok(before, add_special_tokens=False)["input_ids"])
        labelled = (t["labels"][i] != IGNORE).nonzero().flatten().tolist()
        assert labelled[0] == n_prompt == int(t["answer_start"][i])
        text = tok.decode(t["input_ids"][i, labelled])
        assert text.startswith(answer) and tok.eos_token in text  # the answer and its end


def test_a_multi_turn_conversation_labels_every_assistant_turn(llama: ModelConfig) -> None:
    tok = load_tokenizer(llama)
    turns = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Colour of the sky?"},
        {"role": "assistant", "content": "blue"},
        {"role": "user", "content": "And of grass?"},
        {"role": "assistant", "content": "green"},
    ]
    t = encode_conversations([turns], tok, 128).tensors
    ids, labels = t["input_ids"][0], t["labels"][0]
    spans = tok.decode(ids[labels != IGNORE])
    assert "blue" in spans and "green" in spans and "sky" not in spans and "grass" not in spans
    assert tok.decode(ids[int(t["answer_start"][0]) : int(t["answer_end"][0])]).startswith("green")


def test_completion_only_loss_equals_a_hand_computed_one(llama: ModelConfig) -> None:
    tok = load_tokenizer(llama)
    model = build_two_level_model(llama)
    data = encode_conversations([_messages(p, a) for p, a in PAIRS], tok, 64)
    batch = data.select(torch.arange(len(PAIRS)))
    with torch.no_grad():
        loss = model.loss(batch)
        logits = model.peft(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    terms = []
    for i in range(len(PAIRS)):
        lo, hi = int(batch["answer_start"][i]), int(batch["answer_end"][i])
        logp = torch.log_softmax(logits[i].double(), dim=-1)
        for pos in range(lo, hi):  # token at pos is predicted from position pos - 1
            terms.append(-logp[pos - 1, batch["input_ids"][i, pos]])
    by_hand = torch.stack(terms).mean()
    assert math.isclose(float(loss), float(by_hand), rel_tol=1e-5)
    # the prompt does not count: changing a prompt token leaves the labels' count unchanged
    assert int((batch["labels"] != IGNORE).sum()) == len(terms)


def test_truncation_keeps_the_answer_and_says_how_many_were_cut(
    llama: ModelConfig, caplog: pytest.LogCaptureFixture
) -> None:
    tok = load_tokenizer(llama)
    long_prompt = "Please read all of this. " * 40 + "Is it positive?"
    conversations = [_messages(long_prompt, "positive"), _messages(*PAIRS[1])]
    with caplog.at_level(logging.WARNING):
        t = encode_conversations(conversations, tok, 48, where="train.jsonl").tensors
    assert "train.jsonl: 1 of 2 examples are longer than max_length=48" in caplog.text
    assert t["input_ids"].shape[1] == 48
    answer = tok.decode(t["input_ids"][0, int(t["answer_start"][0]) : int(t["answer_end"][0])])
    assert answer.startswith("positive")
    assert "Is it positive?" in tok.decode(t["input_ids"][0])  # the end of the prompt stays
    # an answer longer than the window keeps its start and half a window of prompt
    e = Encoded(list(range(100)), [IGNORE] * 20 + list(range(20, 100)), 20, 100)
    kept, cut = truncate(e, 40)
    assert cut == "answer" and kept.answer_start == 20 and kept.ids[:1] == [0]
    assert len(kept.ids) == 40


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"prompt": "hi"}, "column 'completion' row 1: empty or missing text"),
        ({"prompt": "hi", "completion": ""}, "column 'completion' row 1: empty or missing text"),
        (
            {"messages": [{"role": "robot", "content": "x"}]},
            "column 'messages' row 1 turn 0: role 'robot'",
        ),
        (
            {"messages": [{"role": "user", "content": "only a question"}]},
            "column 'messages' row 1: no assistant turn",
        ),
    ],
)
def test_bad_files_are_refused_naming_file_row_and_column(
    tmp_path: Path, content: dict[str, object], message: str
) -> None:
    good = (
        {"prompt": "q", "completion": "a"}
        if "prompt" in content
        else {"messages": _messages("q", "a")}
    )
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, content])
    with pytest.raises(DataError) as err:
        load_instructions(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_a_file_without_the_columns_is_refused_with_the_columns_it_has(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"columns found \['question', 'answer'\]"):
        load_instructions(path)


def test_messages_in_a_csv_file_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "chat.csv"
    path.write_text('messages\n"[{""role"": ""user""}]"\n')
    with pytest.raises(DataError, match="needs JSONL or Parquet"):
        load_instructions(path)


def test_instruction_data_needs_the_causal_lm_task(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError, match="needs task causal-lm"):
        encode_dataset(load_instructions(path), tiny.tokenizer(), tiny.MINI, where=str(path))


def test_exact_match_and_rouge_l_on_known_strings() -> None:
    assert exact_match(" Positive. ", "positive") == 1.0
    assert exact_match("a person", "a number") == 0.0
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    # LCS "the cat sat" (3 words): precision 3/3, recall 3/6, F = 2/3
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert rouge_l("dog", "the cat") == 0.0


def test_training_on_answers_lowers_answer_loss_and_generation_is_scored(
    llama: ModelConfig,
) -> None:
    tok = load_tokenizer(llama)
    data = encode_conversations([_messages(p, a) for p, a in PAIRS] * 3, tok, 64)
    model: TwoLevelModel = build_two_level_model(llama)
    before = evaluate(model, data, generate=4, max_new_tokens=4)
    assert {"answer_loss", "perplexity", "exact_match", "rouge_l"} <= set(before)
    assert before["perplexity"] == pytest.approx(math.exp(before["answer_loss"]), rel=1e-6)
    cfg = TrainConfig(local_steps=10, batch_size=6, ul_lr=5e-2)
    BilevelTrainer(model, cfg, seed=0, objective="plain").train_round(tiny.source(data, 6))
    after = evaluate(model, data, generate=4, max_new_tokens=4)
    # a random 2-layer model with LoRA on q and v only: the answer loss falls, slowly
    assert after["answer_loss"] < before["answer_loss"] - 0.1
    gen = generation_metrics(model, data, 4, 4)
    assert gen["generated"] == 4 and 0.0 <= gen["exact_match"] <= 1.0
    assert 0.0 <= gen["rouge_l"] <= 1.0


def test_packaged_instruction_tasks_are_distinct_and_seeded() -> None:
    a = instruction_task("question-type", 20, seed=3)
    b = instruction_task("question-type", 20, seed=3)
    assert a["messages"] == b["messages"] and len(a) == 20
    answers = {m[-1]["content"] for m in a["messages"]}
    assert answers <= set(INSTRUCTION_TASKS["question-type"].answers)
    prompts = {INSTRUCTION_TASKS[n].prompt for n in INSTRUCTION_TASKS}
    assert len(prompts) == len(INSTRUCTION_TASKS) == 4


def test_a_tokenizer_without_a_chat_template_gets_the_plain_layout() -> None:
    """Each turn on its own line, the answer followed by the EOS token (here BERT's, which has
    none: the answer alone), and still only the answer labelled."""
    tok = tiny.tokenizer()  # MiniLM's (BERT) tokenizer
    assert not getattr(tok, "chat_template", None)
    data = encode_conversations([_messages("Who wrote Hamlet?", "a person")], tok, 32)
    t = data.tensors
    labelled = t["input_ids"][0][t["labels"][0] != IGNORE]
    assert tok.decode(labelled) == "a person"
    prompt = tok.decode(t["input_ids"][0, : int(t["answer_start"][0])])
    assert prompt == "who wrote hamlet?"  # the uncased tokenizer lower-cases
