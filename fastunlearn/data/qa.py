"""Question/answer data: load pairs, format them as prompt + answer, tokenize with the loss after the prompt only.

- ``load_qa``: ``QAPair`` records from a ``.json`` file (a list of objects, or one object per line), a ``.jsonl``
  file, a ``datasets`` dataset (``save_to_disk`` directory or Hub name), or a list of dicts.
- ``prompt_and_answer``: the two strings of one pair, by template (``TEMPLATES``):

  - ``chat``: the tokenizer's chat template of the user turn with its generation prompt; then ``{answer}``.
  - ``plain``: ``Question: {question}\nAnswer:``; then `` {answer}``.
  - ``tofu-phi``: ``Question: {question}\n``; then ``Answer: {answer}`` (the ``Answer:`` tag in the loss).
  - ``tofu-llama2``: ``[INST] {question} [/INST]``; then ``{answer}`` with no space.

  The first part is the prompt (masked: no loss; greedy answers continue it), the second and an eos the loss.
  ``"auto"`` (the default) is ``chat`` when the tokenizer has a chat template, else ``plain``. The two ``tofu-*``
  templates are TOFU's own formats (locuslab/tofu ``config/model_config.yaml``, ``data_module.py``): for Phi-1.5
  only ``Question: {question}\n`` is masked, so the ``Answer:`` tag is in every loss and answer NLL, and the model
  writes ``Answer: ...`` itself when generating; for Llama-2 the answer follows ``[/INST]`` with no space.
  ``plain`` is this project's format: the same words as TOFU's Phi-1.5 format, the loss on the answer alone.
- ``load_qa_data``: both steps for the forget, retain and held-out sets (``fastunlearn unlearn --qa``).
- ``tokenize_qa``: a ``SequenceSet`` whose ``labels`` are -100 on the prompt and the padding, so every loss (IHL,
  GA, NPO, the retain LM loss), the Fisher of FILA and the metrics (MA, EL, answer NLL) cover the tokens after the
  prompt only.

Token layout (``encode_qa``): ``chat`` and ``plain`` tokenize prompt and answer apart and join them
(``prompt_ids + answer_ids + [eos]``): the boundary is exact, whatever the tokenizer would merge across it. The
``tofu-*`` templates tokenize as TOFU does (``convert_raw_data_to_model_format``): the whole text
``prompt + answer`` with the tokenizer's special tokens, then eos; the first ``len(tokenize(prompt))`` tokens
(special tokens counted) are masked. Their generation prompt (``generation_prompt``) is the prompt tokenized alone
with special tokens, as TOFU's ``run_generation`` encodes it.
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
TEMPLATES = ("auto", "chat", "plain", "tofu-phi", "tofu-llama2")
PLAIN_PROMPT = "Question: {question}\nAnswer:"  # the answer follows after one space; loss on the answer alone
TOFU_FORMATS = {  # template: (prompt, answer); TOFU's question_start_tag + question + question_end_tag, answer_tag
    "tofu-phi": ("Question: {question}\n", "Answer: {answer}"),
    "tofu-llama2": ("[INST] {question} [/INST]", "{answer}"),
}


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
        if path.suffix not in (".json", ".jsonl") and (path.is_file() or path.suffix.lower() in (".txt", ".csv")):
            what = "" if path.exists() else " (not found)"
            raise ValueError(f"{role} file {path}{what} is {path.suffix}, not a question/answer format: give .json "
                             "(a list of objects, or one per line) or .jsonl records with question and answer fields, "
                             "or a datasets folder")  # fmt: skip
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
    """The template to use (``TEMPLATES`` but "auto"): ``"auto"`` is ``"chat"`` when the tokenizer has a chat
    template, else ``"plain"``; the others are returned as given."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_chat:
        raise ValueError("template='chat' but the tokenizer has no chat template; use template='plain'")
    return ("chat" if has_chat else "plain") if template == "auto" else template


def prompt_and_answer(tokenizer: PreTrainedTokenizerBase, question: str, answer: str, template: str) -> tuple[str, str]:
    """The prompt text (no loss) and the text after it (the loss), for ``resolve_template``'s choice."""
    if template == "chat":
        messages = [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), answer
    if template in TOFU_FORMATS:
        prompt, after = TOFU_FORMATS[template]
        return prompt.format(question=question), after.format(answer=answer)
    return PLAIN_PROMPT.format(question=question), " " + answer


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])


def encode_qa(tokenizer: PreTrainedTokenizerBase, question: str, answer: str, template: str) -> tuple[list, int]:
    """(token ids of prompt + answer + eos, number of prompt tokens: the masked ones). ``chat`` / ``plain``: prompt
    and answer tokenized apart (the chat prompt already holds the template's special tokens; the plain prompt gets
    the tokenizer's own, e.g. a BOS); ``tofu-*``: TOFU's layout (the module docstring)."""
    prompt, answer = prompt_and_answer(tokenizer, question, answer, template)
    eos = special_id(tokenizer, ("eos_token_id",), "QA set", "ending answers")
    if template in TOFU_FORMATS:
        ids, n_prompt = _ids(tokenizer, prompt + answer, True), len(_ids(tokenizer, prompt, True))
        if n_prompt >= len(ids):
            raise ValueError(f"{template} prompt of question {question!r:.60} takes all {len(ids)} tokens of the "
                             "pair: no answer token to learn or score")  # fmt: skip
        return [*ids, eos], n_prompt
    prompt_ids = _ids(tokenizer, prompt, template == "plain")
    return [*prompt_ids, *_ids(tokenizer, answer, False), eos], len(prompt_ids)


def generation_prompt(tokenizer: PreTrainedTokenizerBase, question: str, template: str) -> list[int]:
    """The token ids a greedy answer to ``question`` continues: the prompt of :func:`encode_qa` (``tofu-*``: the
    prompt tokenized alone with special tokens, TOFU's ``run_generation``; the same ids unless the tokenizer
    merges tokens across the prompt's end)."""
    if template in TOFU_FORMATS:
        return _ids(tokenizer, TOFU_FORMATS[template][0].format(question=question), True)
    ids, n_prompt = encode_qa(tokenizer, question, "x", template)  # the prompt does not depend on the answer
    return ids[:n_prompt]


def tokenize_qa(
    pairs: Sequence[QAPair | tuple[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    seq_len: int | None = None,
    template: str = "auto",
    role: str = "QA set",
) -> SequenceSet:
    """One row per pair: prompt + answer + eos (:func:`encode_qa`), padded on the right to ``seq_len`` (None: the
    longest row), with ``labels`` = the ids after the prompt (the answer and eos; ``tofu-phi``: the ``Answer:`` tag
    too), -100 on the prompt and padding. A pair longer than ``seq_len``
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
