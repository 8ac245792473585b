"""Question/answer data: load pairs, format them as prompt + answer, tokenize with the loss on the answer only.

- ``load_qa``: ``QAPair`` records from a ``.json`` file (a list of objects, or one object per line), a ``.jsonl``
  file, a ``datasets`` dataset (``save_to_disk`` directory or Hub name), or a list of dicts.
- ``prompt_and_answer``: the two strings of one pair. With ``template="chat"`` (the default ``"auto"`` picks it
  when the tokenizer has a chat template) the prompt is the tokenizer's chat template of the user turn with the
  generation prompt, and the answer is the assistant text; with ``"plain"`` it is ``PLAIN_PROMPT``.
- ``load_qa_data``: both steps for the forget, retain and held-out sets (``fastunlearn unlearn --qa``).
- ``tokenize_qa``: a ``SequenceSet`` whose ``labels`` are -100 on the prompt and the padding, so every loss (IHL,
  GA, NPO, the retain LM loss), the Fisher of FILA and the metrics (MA, EL, answer NLL) cover answer tokens only.

Prompt and answer are tokenized apart and joined (``prompt_ids + answer_ids + [eos]``): the boundary is exact,
whatever the tokenizer would merge across it. TOFU's own code does the same (locuslab/tofu ``data_module.py``:
question and answer formatted, the question's token count masked with -100, eos appended).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fastunlearn.data.text import SequenceSet, UnlearningData, load_texts, special_id, tokenize_sequences

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
TEMPLATES = ("auto", "chat", "plain")
PLAIN_PROMPT = "Question: {question}\nAnswer:"  # the answer follows after one space (TOFU's Phi-1.5 format)


@dataclass(frozen=True)
class QAPair:
    """One question with its answer; TOFU's evaluation sets also give a paraphrased answer and wrong
    ("perturbed") answers, which the truth ratio compares against."""

    question: str
    answer: str
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        for name in ("question", "answer"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r:.60}")


def _pair(record, where: str, question_field: str, answer_field: str) -> QAPair:
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a JSON {type(record).__name__}, not an object with {question_field!r}")
    for name in (question_field, answer_field):
        if not isinstance(record.get(name), str) or not record[name].strip():
            have = ", ".join(map(str, record)) or "none"
            raise ValueError(f"{where} has no non-empty string field {name!r}; fields: {have}")
    perturbed = record.get("perturbed_answer", ())
    perturbed = (perturbed,) if isinstance(perturbed, str) else tuple(perturbed or ())
    if not all(isinstance(p, str) and p.strip() for p in perturbed):
        raise ValueError(f"{where} field 'perturbed_answer' must be a string or a list of non-empty strings")
    paraphrased = record.get("paraphrased_answer")
    if paraphrased is not None and not (isinstance(paraphrased, str) and paraphrased.strip()):
        raise ValueError(f"{where} field 'paraphrased_answer' must be a non-empty string")
    return QAPair(record[question_field], record[answer_field], paraphrased, perturbed)


def _read_json_records(path: Path, role: str) -> list[tuple[str, object]]:
    """(where, record) from a JSON list, a single JSON object per line (JSON lines), or a .jsonl file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{role} file {path} is not valid JSON: {err}") from None
        return [(f"{role} file {path} record {i}", r) for i, r in enumerate(records)]
    out = []
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                out.append((f"{role} file {path} line {number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{role} file {path} line {number} is not valid JSON: {err}") from None
    return out


def load_qa(
    source: str | os.PathLike | Sequence[dict],
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    split: str = "train",
    role: str = "QA set",
) -> list[QAPair]:
    """Question/answer pairs from ``source`` (see the module docstring); ``paraphrased_answer`` and
    ``perturbed_answer`` (a string or a list) are read when present. Errors name the file and record."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.suffix in (".json", ".jsonl"):
            if not path.is_file():
                raise ValueError(f"{role} file not found: {path}")
            try:
                records = _read_json_records(path, role)
            except UnicodeDecodeError as err:
                raise ValueError(f"{role} file {path} is not UTF-8 text: {err.reason} at byte {err.start}") from None
        else:
            from fastunlearn.data.text import read_dataset_records

            records = read_dataset_records(str(source), split, role)
    else:
        records = [(f"{role} record {i}", r) for i, r in enumerate(source)]
    pairs = [_pair(r, where, question_field, answer_field) for where, r in records]
    if not pairs:
        raise ValueError(f"{role} is empty: no question/answer pairs")
    return pairs


def resolve_template(tokenizer: PreTrainedTokenizerBase, template: str = "auto") -> str:
    """``"chat"`` or ``"plain"``: ``"auto"`` is ``"chat"`` when the tokenizer has a chat template."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_chat:
        raise ValueError("template='chat' but the tokenizer has no chat template; use template='plain'")
    return ("chat" if has_chat else "plain") if template == "auto" else template


def prompt_and_answer(tokenizer: PreTrainedTokenizerBase, question: str, answer: str, template: str) -> tuple[str, str]:
    """The prompt text (ends where the answer starts) and the answer text, for ``resolve_template``'s choice."""
    if template == "chat":
        messages = [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), answer
    return PLAIN_PROMPT.format(question=question), " " + answer


def encode_qa(tokenizer: PreTrainedTokenizerBase, question: str, answer: str, template: str) -> tuple[list, int]:
    """(token ids of prompt + answer + eos, number of prompt tokens). The chat prompt already holds the
    template's special tokens; the plain prompt gets the tokenizer's own (e.g. a BOS)."""
    prompt, answer = prompt_and_answer(tokenizer, question, answer, template)
    prompt_ids = tokenizer(prompt, add_special_tokens=template == "plain", verbose=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False, verbose=False)["input_ids"]
    eos = special_id(tokenizer, ("eos_token_id",), "QA set", "ending answers")
    return [*prompt_ids, *answer_ids, eos], len(prompt_ids)


def tokenize_qa(
    pairs: Sequence[QAPair | tuple[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    seq_len: int | None = None,
    template: str = "auto",
    role: str = "QA set",
) -> SequenceSet:
    """One row per pair: prompt + answer + eos, padded on the right to ``seq_len`` (None: the longest row), with
    ``labels`` = the ids on the answer and eos, -100 on the prompt and padding. A pair longer than ``seq_len``
    is an error naming it (a truncated answer would silently change what is learned or forgotten)."""
    if not pairs:
        raise ValueError(f"{role} is empty: no question/answer pairs")
    template = resolve_template(tokenizer, template)
    rows = []
    for pair in pairs:
        question, answer = (pair.question, pair.answer) if isinstance(pair, QAPair) else pair
        rows.append(encode_qa(tokenizer, question, answer, template))
    longest = max(len(ids) for ids, _ in rows)
    if seq_len is None:
        seq_len = longest
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2 or None (the longest pair), got {seq_len!r}")
    pad = special_id(tokenizer, ("pad_token_id", "eos_token_id"), role, "padding")
    input_ids = torch.full((len(rows), seq_len), pad, dtype=torch.int64)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, (ids, n_prompt) in enumerate(rows):
        if len(ids) > seq_len:
            raise ValueError(f"{role} pair {row} has {len(ids)} tokens with its prompt, more than seq_len={seq_len}; "
                             "raise seq_len (None: the longest pair)")  # fmt: skip
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        attention_mask[row, : len(ids)] = 1
        labels[row, n_prompt : len(ids)] = input_ids[row, n_prompt : len(ids)]
    return SequenceSet(input_ids, attention_mask, torch.arange(len(rows)), labels)


def load_qa_data(
    tokenizer: PreTrainedTokenizerBase,
    forget: str | os.PathLike | Sequence[dict],
    retain: str | os.PathLike | Sequence[dict] | None = None,
    heldout: str | os.PathLike | Sequence[dict] | None = None,
    *,
    seq_len: int | None = None,
    template: str = "auto",
    question_field: str = "question",
    answer_field: str = "answer",
    split: str = "train",
    utility: Mapping[str, str | os.PathLike | Sequence[str]] | None = None,
    utility_seq_len: int = 200,
    text_field: str = "text",
) -> UnlearningData:
    """The question/answer form of ``data.load_unlearning_data``: each given set read with :func:`load_qa` and
    tokenized with :func:`tokenize_qa` (``seq_len`` None: each set padded to its longest pair), errors naming
    the set. ``utility`` sets ({name: source}) are plain text (``data.load_texts``), packed into
    ``utility_seq_len``-token blocks: their perplexity is what unlearning costs the model on text."""
    template = resolve_template(tokenizer, template)  # checked before any file is read
    fields = {"question_field": question_field, "answer_field": answer_field, "split": split}
    sets = {}
    for name, source in (("forget", forget), ("retain", retain), ("heldout", heldout)):
        if source is not None:
            role = f"{name} set"
            pairs = load_qa(source, **fields, role=role)
            sets[name] = tokenize_qa(pairs, tokenizer, seq_len=seq_len, template=template, role=role)
    if utility:
        sets["utility"] = {}
        for name, source in utility.items():
            role = f"utility set {name}"
            texts = load_texts(source, text_field=text_field, split=split, role=role)
            sets["utility"][name] = tokenize_sequences(texts, tokenizer, seq_len=utility_seq_len, mode="pack",
                                                       role=role)  # fmt: skip
    return UnlearningData(**sets)
