"""The templates tofu-phi and tofu-llama2 against TOFU's own layout (locuslab/tofu ``data_module.py``,
``convert_raw_data_to_model_format``, re-derived below from its documented behaviour): token for token, the
input ids and the label masks, on a word tokenizer that adds a BOS and, when they are here, on real TOFU rows
with the real model's tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fastunlearn.cli import common as cli_common
from fastunlearn.data.qa import (
    IGNORE_INDEX,
    TEMPLATES,
    TOFU_FORMATS,
    encode_qa,
    generation_prompt,
    load_qa,
    tokenize_qa,
)
from fastunlearn.demo.smollm2 import REAL_DIR, REAL_ENV, REAL_MARKER
from fastunlearn.models import cache_root

ROOT = Path(__file__).resolve().parents[2]
TOFU = ROOT.parent / "shared" / "data" / "tofu"  # reference data beside the checkout; absent: those tests skip
_real = Path(os.environ.get(REAL_ENV) or cache_root() / REAL_DIR)  # read before conftest points the cache elsewhere
REAL_TOKENIZER = _real if (_real / "tokenizer.json").is_file() and (_real / REAL_MARKER).is_file() else None
TAGS = {  # TOFU's model_config.yaml: (question_start_tag, question_end_tag, answer_tag)
    "tofu-phi": ("Question: ", "\n", "Answer: "),
    "tofu-llama2": ("[INST] ", " [/INST]", ""),
}


def tofu_layout(tokenizer, max_length: int, question: str, answer: str, template: str):
    """(input_ids, labels, attention_mask) of one pair as TOFU builds them: the tagged question and answer joined
    and tokenized with special tokens (truncated to ``max_length``), padded with eos; labels = the ids, then one
    eos, then -100, with the first len(tokenize(tagged question, special tokens)) labels set to -100."""
    start, end, tag = TAGS[template]
    question_text = start + question + end
    n_question = len(tokenizer.tokenize(question_text, add_special_tokens=True))
    ids = tokenizer(question_text + tag + answer, add_special_tokens=True, max_length=max_length, truncation=True)
    ids = list(ids["input_ids"])
    eos, pad = tokenizer.eos_token_id, max_length - len(ids)
    input_ids, mask = ids + [eos] * pad, [1] * len(ids) + [0] * pad
    labels = list(ids) if pad == 0 else ids + [eos] + [IGNORE_INDEX] * (pad - 1)
    labels[:n_question] = [IGNORE_INDEX] * n_question
    return input_ids, labels, mask


def assert_rows_match_tofu(tokenizer, pairs, template: str) -> None:
    seqs = tokenize_qa(pairs, tokenizer, template=template)  # seq_len: the longest row, its eos included
    for row, pair in enumerate(pairs):
        input_ids, labels, mask = tofu_layout(tokenizer, seqs.seq_len, pair.question, pair.answer, template)
        n = sum(mask)  # TOFU's real tokens; its eos (position n) is padding with attention 0, ours attention 1
        assert seqs.input_ids[row, : n + 1].tolist() == input_ids[: n + 1], (template, row)
        assert seqs.labels[row].tolist() == labels, (template, row)  # the loss mask, token for token
        assert seqs.attention_mask[row, :n].tolist() == mask[:n] and seqs.attention_mask[row, n] == 1
        prompt = TOFU_FORMATS[template][0].format(question=pair.question)
        assert generation_prompt(tokenizer, pair.question, template) == tokenizer(prompt)["input_ids"]


def bos_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, punctuation split off, a [BOS] prepended with special tokens (as Llama-2's tokenizer does)."""
    words = ["Question", "Answer", ":", "[", "[/", "]", "INST", "who", "wrote", "it", "she", "did", "The", "answer"]
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[EOS]", "[BOS]", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[EOS]", bos_token="[BOS]")  # fmt: skip


PAIRS = load_qa([{"question": "who wrote it", "answer": "she did"}, {"question": "who did", "answer": "The answer"}])


@pytest.mark.parametrize("template", ["tofu-phi", "tofu-llama2"])
def test_tofu_templates_lay_out_rows_as_tofu_with_a_bos(template):
    tok = bos_tokenizer()
    assert_rows_match_tofu(tok, PAIRS, template)
    ids, n_prompt = encode_qa(tok, "who wrote it", "she did", template)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id  # the BOS is counted in the masked prompt
    answer = tok.convert_ids_to_tokens(ids[n_prompt:])
    assert answer == (["Answer", ":", "she", "did", "[EOS]"] if template == "tofu-phi" else ["she", "did", "[EOS]"])


def test_tofu_phi_scores_the_answer_tag_and_plain_does_not():
    tok = bos_tokenizer()
    tofu = tokenize_qa(PAIRS[:1], tok, template="tofu-phi")
    plain = tokenize_qa(PAIRS[:1], tok, template="plain")
    labelled = lambda s: tok.convert_ids_to_tokens(s.labels[0][s.labels[0] != IGNORE_INDEX].tolist())  # noqa: E731
    assert labelled(tofu) == ["Answer", ":", "she", "did", "[EOS]"]
    assert labelled(plain) == ["she", "did", "[EOS]"]
    assert tok.convert_ids_to_tokens(generation_prompt(tok, "who wrote it", "tofu-phi")) == [
        "[BOS]", "Question", ":", "who", "wrote", "it"]  # fmt: skip
    assert tok.convert_ids_to_tokens(generation_prompt(tok, "who wrote it", "plain"))[-2:] == ["Answer", ":"]


def test_template_names_are_one_list_and_unknown_ones_are_refused():
    assert cli_common.TEMPLATES == TEMPLATES
    with pytest.raises(ValueError, match=r"template must be one of \('auto', 'chat', 'plain', 'tofu-phi', 'tofu-"):
        tokenize_qa(PAIRS, bos_tokenizer(), template="tofu-phi2")


def test_a_prompt_that_takes_the_whole_pair_is_an_error():
    tok = bos_tokenizer()
    with pytest.raises(ValueError, match=r"tofu-llama2 prompt of question .* no answer token"):
        encode_qa(tok, "who", " ", "tofu-llama2")  # the answer tokenizes to nothing


@pytest.mark.skipif(not TOFU.is_dir(), reason="../shared/data/tofu is absent")
@pytest.mark.skipif(REAL_TOKENIZER is None, reason="the real model's tokenizer is not cached (models.real_model())")
@pytest.mark.parametrize("template", ["tofu-phi", "tofu-llama2"])
def test_real_tofu_rows_match_tofu_token_for_token(template):
    tok = AutoTokenizer.from_pretrained(REAL_TOKENIZER)
    pairs = load_qa(TOFU / "forget01.json")[:3] + load_qa(TOFU / "retain_perturbed.json")[:2]
    pairs += load_qa(TOFU / "real_authors_perturbed.json")[:2] + load_qa(TOFU / "world_facts_perturbed.json")[:2]
    assert_rows_match_tofu(tok, pairs, template)
    perturbed = [type(p)(p.question, p.perturbed_answers[0]) for p in pairs]  # what the truth ratio scores
    assert_rows_match_tofu(tok, perturbed, template)
    first = json.loads((TOFU / "forget01.json").read_text())[0]
    ids, n_prompt = encode_qa(tok, first["question"], first["answer"], template)
    text = tok.decode(ids[n_prompt:-1])
    assert text == ("Answer: " + first["answer"] if template == "tofu-phi" else first["answer"])
