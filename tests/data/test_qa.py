"""fastunlearn.data.qa: question/answer pairs from JSON, JSON lines and dicts; chat and plain templates on a tiny
word-level tokenizer; labels -100 exactly on the prompt and the padding; errors that name the file and field."""

from __future__ import annotations

import json

import pytest
import torch

from fastunlearn.data.qa import (
    IGNORE_INDEX,
    PLAIN_PROMPT,
    QAPair,
    load_qa,
    load_qa_data,
    resolve_template,
    tokenize_qa,
)
from tests.helpers.qa import WORDS, make_tokenizer

PAIRS = [{"question": "who wrote it", "answer": "she did"}, {"question": "why", "answer": "he wrote a book"}]


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------------
# load_qa
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["json-list", "json-lines", "jsonl", "dicts"])
def test_load_qa_reads_every_layout(tmp_path, layout):
    records = [{**PAIRS[0], "paraphrased_answer": "it was she"}, {**PAIRS[1], "perturbed_answer": ["x y", "z"]}]
    if layout == "json-list":
        (source := tmp_path / "qa.json").write_text(json.dumps(records, indent=1))
    elif layout == "dicts":
        source = records
    else:
        source = tmp_path / ("qa.jsonl" if layout == "jsonl" else "qa.json")
        source.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    pairs = load_qa(source)
    assert pairs == [
        QAPair("who wrote it", "she did", "it was she", ()),
        QAPair("why", "he wrote a book", None, ("x y", "z")),
    ]


def test_load_qa_field_names_and_errors(tmp_path):
    assert load_qa([{"q": "why", "a": "it"}], question_field="q", answer_field="a") == [QAPair("why", "it")]
    path = tmp_path / "forget.jsonl"
    path.write_text(json.dumps({"question": "why", "text": "it"}) + "\n")
    with pytest.raises(ValueError, match=r"forget set file .*forget.jsonl line 1 has no non-empty string field "
                                         r"'answer'; fields: question, text"):  # fmt: skip
        load_qa(path, role="forget set")
    path.write_text('{"question": "why", "answer": "it"}\n{oops\n')
    with pytest.raises(ValueError, match=r"line 2 is not valid JSON"):
        load_qa(path)
    with pytest.raises(ValueError, match=r"QA set record 0 is a JSON list"):
        load_qa([["why", "it"]])
    with pytest.raises(ValueError, match=r"field 'answer'"):
        load_qa([{"question": "why", "answer": "  "}])
    with pytest.raises(ValueError, match=r"retain set file not found"):
        load_qa(tmp_path / "missing.json", role="retain set")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match=r"is empty"):
        load_qa(tmp_path / "empty.json")


# ---------------------------------------------------------------------------------------------------------
# tokenize_qa: templates, labels, lengths
# ---------------------------------------------------------------------------------------------------------
def test_plain_template_labels_are_minus_100_exactly_on_prompt_and_padding():
    tok = make_tokenizer()
    assert resolve_template(tok, "auto") == "plain"
    seqs = tokenize_qa(load_qa(PAIRS), tok, seq_len=12)
    assert seqs.input_ids.shape == (2, 12) and seqs.labels.dtype == torch.int64
    for row, pair in enumerate(PAIRS):
        prompt = ids(tok, PLAIN_PROMPT.format(question=pair["question"]))
        answer = [*ids(tok, " " + pair["answer"]), tok.eos_token_id]
        n = len(prompt) + len(answer)
        assert seqs.input_ids[row, :n].tolist() == prompt + answer
        assert seqs.attention_mask[row].tolist() == [1] * n + [0] * (12 - n)
        expected = [IGNORE_INDEX] * len(prompt) + answer + [IGNORE_INDEX] * (12 - n)
        assert seqs.labels[row].tolist() == expected
        assert seqs.input_ids[row, n:].eq(tok.pad_token_id).all()
    assert seqs.source_index.tolist() == [0, 1]


def test_chat_template_puts_the_generation_prompt_in_the_prompt():
    tok = make_tokenizer(chat=True)
    assert resolve_template(tok, "auto") == "chat"
    seqs = tokenize_qa([("why", "he did")], tok)  # seq_len None: the longest pair, no padding
    prompt = ids(tok, "<user> why <bot>")
    assert seqs.input_ids[0].tolist() == [*prompt, *ids(tok, "he did"), tok.eos_token_id]
    assert seqs.labels[0].tolist() == [IGNORE_INDEX] * len(prompt) + seqs.input_ids[0, len(prompt) :].tolist()
    plain = tokenize_qa([("why", "he did")], tok, template="plain")  # a chat tokenizer can still use the plain one
    assert plain.input_ids[0, :3].tolist() == ids(tok, "Question: why Answer:")
    with pytest.raises(ValueError, match=r"template='chat' but the tokenizer has no chat template"):
        tokenize_qa([("why", "it")], make_tokenizer(), template="chat")
    with pytest.raises(ValueError, match=r"template must be one of"):
        tokenize_qa([("why", "it")], tok, template="alpaca")


def test_a_pair_longer_than_seq_len_is_an_error_naming_it():
    tok = make_tokenizer()
    with pytest.raises(ValueError, match=r"forget set pair 0 has 8 tokens with its prompt, more than seq_len=7"):
        tokenize_qa(load_qa(PAIRS), tok, seq_len=7, role="forget set")
    with pytest.raises(ValueError, match=r"seq_len must be an int >= 2"):
        tokenize_qa(load_qa(PAIRS), tok, seq_len=1)
    with pytest.raises(ValueError, match=r"is empty"):
        tokenize_qa([], tok)


def test_load_qa_data_names_each_set_and_keeps_utility_text(tmp_path):
    tok = make_tokenizer()
    (tmp_path / "forget.json").write_text(json.dumps(PAIRS))
    (tmp_path / "retain.jsonl").write_text("\n".join(json.dumps(p) for p in PAIRS[::-1]))
    (tmp_path / "wiki.txt").write_text("he wrote a book\nshe did it\n")
    data = load_qa_data(
        tok, tmp_path / "forget.json", tmp_path / "retain.jsonl", utility={"wiki": tmp_path / "wiki.txt"},
        utility_seq_len=4,
    )  # fmt: skip
    assert data.forget.labels is not None and data.retain.labels is not None and data.heldout is None
    assert torch.equal(data.retain.input_ids[1, : data.forget.seq_len], data.forget.input_ids[0])
    assert data.utility["wiki"].labels is None and data.utility["wiki"].seq_len == 4
    (tmp_path / "bad.json").write_text(json.dumps([{"question": "why"}]))
    with pytest.raises(ValueError, match=r"heldout set file .*bad.json record 0 has no non-empty string field"):
        load_qa_data(tok, tmp_path / "forget.json", heldout=tmp_path / "bad.json")


# ---------------------------------------------------------------------------------------------------------
# fastunlearn unlearn --qa
# ---------------------------------------------------------------------------------------------------------
def test_cli_unlearn_qa(tmp_path, capsys):
    from fastunlearn import cli
    from tests.helpers.tiny_models import tiny_model

    tok = make_tokenizer()
    tiny_model("gpt_neo").save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    words = WORDS[2:10]
    for name, n, seed in (("forget", 4, 1), ("retain", 6, 2), ("heldout", 4, 3)):
        rng = torch.Generator().manual_seed(seed)

        def text(k: int, rng=rng) -> str:
            return " ".join(words[int(i)] for i in torch.randint(0, len(words), (k,), generator=rng))

        rows = [{"question": text(3), "answer": text(12)} for _ in range(n)]  # EL_10 needs 10-token answers
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    files = [f"--{name}={tmp_path / name}.jsonl" for name in ("forget", "retain", "heldout")]
    common = ["unlearn", "--model", str(tmp_path / "model"), *files, "--params", "lora", "--rank", "2"]
    code = cli.main([*common, "--qa", "--template", "plain", "--max-epochs", "1", "--out", str(tmp_path / "run")])
    assert code in (0, 1), capsys.readouterr().err
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert log["data"]["seq_len"] == 3 + 2 + 12 + 1  # the longest pair: prompt (no BOS), answer, eos
    expected = load_qa_data(tok, *(tmp_path / f"{n}.jsonl" for n in ("forget", "retain", "heldout")), template="plain")
    from fastunlearn.engine.inputs import data_fingerprint

    assert log["data"]["fingerprint"] == data_fingerprint([expected.forget], expected.retain, expected.heldout)
    for args, message in (
        ([*common, "--template", "plain"], "--template formats question/answer pairs: it needs --qa"),
        ([*common, "--qa", "--template", "chat"], "template='chat' but the tokenizer has no chat template"),
    ):
        assert cli.main([*args, "--out", str(tmp_path / "refused")]) == 2
        assert message in capsys.readouterr().err
