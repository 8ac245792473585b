"""fastunlearn.data: text formats, tokenization into fixed-length rows, the three sets, tasks and batches."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fastunlearn.data.text import (
    SequenceConfig,
    SequenceSet,
    iterate_batches,
    load_texts,
    load_unlearning_data,
    split_tasks,
    tokenize_sequences,
)
from tests.helpers.paths import SHARED_DATA

TDEC = SHARED_DATA / "tdec"
UNK, EOS, PAD = 0, 1, 2
WORDS = [f"w{i}" for i in range(20)]  # "wK" has id K + 3


def make_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with known ids: [UNK]=0, </s>=1, <pad>=2, wK=K+3; no BOS."""
    vocab = {"[UNK]": UNK, "</s>": EOS, "<pad>": PAD, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>", **special)


def words(*ks: int) -> str:
    return " ".join(f"w{k}" for k in ks)


def ids(*ks: int) -> list[int]:
    return [k + 3 for k in ks]


# ---------------------------------------------------------------------------------------------------------
# load_texts
# ---------------------------------------------------------------------------------------------------------
def test_txt_one_document_per_line(tmp_path):
    path = tmp_path / "forget.txt"
    path.write_text("\nfirst doc\n  indented, trailing  \r\nlast\n\n\n", encoding="utf-8")
    assert load_texts(path) == ["first doc", "  indented, trailing  ", "last"]  # verbatim; edge blanks ignored


def test_txt_blank_line_separated_paragraphs(tmp_path):
    path = tmp_path / "retain.txt"
    path.write_text("para one\nstill one\n\n \t\n\npara two\n", encoding="utf-8")
    assert load_texts(str(path)) == ["para one\nstill one", "para two"]


def test_jsonl_default_and_custom_field(tmp_path):
    path = tmp_path / "forget.jsonl"
    path.write_text('{"text": "a \\"q\\"\\nb", "body": "x"}\n\n{"text": "c", "body": "y"}\n', encoding="utf-8")
    assert load_texts(path) == ['a "q"\nb', "c"]
    assert load_texts(path, text_field="body") == ["x", "y"]
    with pytest.raises(ValueError, match=r"line 1 has no field 'content'; available: text, body"):
        load_texts(path, text_field="content")


def test_jsonl_bad_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl line 2 field 'text' is 3, not a string"):
        load_texts(path)
    path.write_text('{"text": "ok"}\n["text"]\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 is a JSON list, not an object"):
        load_texts(path)


def test_csv_quoted_multiline_fields_as_in_tdec(tmp_path):
    path = tmp_path / "forget.csv"
    raw = 'doc_id,corpus,text\n1,github," * (the ""Software""),\n\tnext \\"" line\r\n"\r\n2,pile-cc,plain\n'
    path.write_bytes(raw.encode())  # \r\n inside a quoted field is kept, as a record terminator it is not
    assert load_texts(path) == [' * (the "Software"),\n\tnext \\" line\r\n', "plain"]
    assert load_texts(path, text_field="corpus") == ["github", "pile-cc"]
    with pytest.raises(ValueError, match="has no column 'content'; available: doc_id, corpus, text"):
        load_texts(path, text_field="content")


def test_csv_short_record_is_named(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("doc_id,text\n1,ok\n2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="short.csv record 2 field 'text' is None, not a string"):
        load_texts(path)


def test_list_source_is_checked():
    assert load_texts(("a", "")) == ["a", ""]
    with pytest.raises(ValueError, match="forget set text 1 is 3, not a string"):
        load_texts(["a", 3], role="forget set")


def test_missing_file_names_the_set(tmp_path):
    with pytest.raises(FileNotFoundError, match="forget set file not found: .*nothere.csv"):
        load_texts(tmp_path / "nothere.csv", role="forget set")
    with pytest.raises(FileNotFoundError, match="data file not found: .*typo.tsv"):
        load_texts(tmp_path / "typo.tsv")


def test_unknown_extension(tmp_path):
    path = tmp_path / "forget.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"unsupported extension '.parquet'; expected one of .txt, .jsonl, .csv"):
        load_texts(path)


@pytest.mark.parametrize(
    "name, content", [("e.txt", "\n \n"), ("e.jsonl", "\n"), ("e.csv", ""), ("h.csv", "doc_id,text\n")]
)
def test_empty_file_is_an_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=f"retain set is empty: no texts in .*{name}"):
        load_texts(path, role="retain set")


def test_datasets_saved_to_disk_and_local_folder(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # never the network
    train = datasets.Dataset.from_dict({"text": ["t0", "t1"], "doc": ["d0", "d1"]})
    train.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": train, "test": train.select([1])}).save_to_disk(str(tmp_path / "dict"))
    assert load_texts(tmp_path / "single") == ["t0", "t1"]
    assert load_texts(tmp_path / "single", text_field="doc") == ["d0", "d1"]
    assert load_texts(tmp_path / "dict", split="test") == ["t1"]
    with pytest.raises(ValueError, match="has no split 'validation'; available: train, test"):
        load_texts(tmp_path / "dict", split="validation")
    with pytest.raises(ValueError, match="has no column 'body'; available: text, doc"):
        load_texts(tmp_path / "single", text_field="body")
    folder = tmp_path / "raw"  # not a save_to_disk folder: datasets.load_dataset with its json builder
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "r0"}\n{"text": "r1"}\n', encoding="utf-8")
    assert load_texts(folder) == ["r0", "r1"]
    with pytest.raises(ConnectionError, match="someone/absent"):  # a name without extension goes to the Hub
        load_texts("someone/absent")


# ---------------------------------------------------------------------------------------------------------
# tokenize_sequences
# ---------------------------------------------------------------------------------------------------------
def test_truncate_pads_right_and_masks():
    seqs = tokenize_sequences([words(0, 1, 2, 3, 4, 5), words(6, 7), "w8 zz"], make_tokenizer(), seq_len=4)
    assert seqs.input_ids.dtype == torch.int64 and seqs.seq_len == 4 and len(seqs) == 3
    assert seqs.input_ids.tolist() == [ids(0, 1, 2, 3), [*ids(6, 7), PAD, PAD], [*ids(8), UNK, PAD, PAD]]
    assert seqs.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]
    assert seqs.source_index.tolist() == [0, 1, 2]


def test_truncate_add_eos_and_eos_padding_without_pad_token():
    texts = [words(0, 1, 2, 3), words(4)]
    seqs = tokenize_sequences(texts, make_tokenizer(pad=False), seq_len=4, add_eos=True)
    assert seqs.input_ids.tolist() == [ids(0, 1, 2, 3), [*ids(4), EOS, EOS, EOS]]  # eos cut off row 0
    assert seqs.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_too_short_text_is_an_error_naming_it():
    texts = [words(0, 1, 2), words(3)]
    with pytest.raises(ValueError, match=r"data text 1 has 1 tokens, fewer than min_len=2: 'w3'"):
        tokenize_sequences(texts, make_tokenizer(), seq_len=3, min_len=2)
    with pytest.raises(ValueError, match="text 0 has 0 tokens, fewer than min_len=1"):
        tokenize_sequences(["", words(0)], make_tokenizer(), seq_len=3)
    seqs = tokenize_sequences(["", words(0)], make_tokenizer(), seq_len=3, min_len=0)
    assert seqs.attention_mask.tolist() == [[0, 0, 0], [1, 0, 0]]


def test_pack_joins_with_eos_and_drops_the_tail():
    texts = [words(0, 1, 2), words(3), words(4, 5, 6, 7, 8)]  # stream: 0 1 2 E 3 E 4 5 6 7 8 E (12 tokens)
    seqs = tokenize_sequences(texts, make_tokenizer(), seq_len=5, mode="pack")
    assert seqs.input_ids.tolist() == [[*ids(0, 1, 2), EOS, *ids(3)], [EOS, *ids(4, 5, 6, 7)]]
    assert seqs.attention_mask.eq(1).all()
    assert seqs.source_index.tolist() == [0, 1]  # row 1 starts on text 1's eos
    with pytest.raises(ValueError, match="has 6 tokens with separators, fewer than one seq_len=7 block"):
        tokenize_sequences(texts[:2], make_tokenizer(), seq_len=7, mode="pack")


def test_missing_special_tokens_are_named():
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "w0": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bare = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(ValueError, match="forget set: the tokenizer has no pad_token_id or eos_token_id for padding"):
        tokenize_sequences(["w0"], bare, seq_len=2, role="forget set")
    with pytest.raises(ValueError, match="no eos_token_id for separating packed texts"):
        tokenize_sequences(["w0 w0"], bare, seq_len=2, mode="pack")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seq_len": 1}, "seq_len must be an int >= 2.*got 1"),
        ({"seq_len": 2.5}, "seq_len must be an int >= 2.*got 2.5"),
        ({"mode": "chunk"}, r"mode must be one of \('truncate', 'pack'\), got 'chunk'"),
        ({"min_len": -1}, "min_len must be an int >= 0, got -1"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SequenceConfig(**kwargs)
    with pytest.raises(ValueError, match=match):
        tokenize_sequences([words(0, 1)], make_tokenizer(), **kwargs)


def test_sequence_set_checks_shapes():
    with pytest.raises(ValueError, match=r"input_ids must be a 2-D int64 tensor, got torch.int32"):
        SequenceSet(torch.zeros(2, 3, dtype=torch.int32), torch.ones(2, 3), torch.arange(2))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\) but input_ids has \(2, 3\)"):
        SequenceSet(torch.zeros(2, 3, dtype=torch.int64), torch.ones(2, 4), torch.arange(2))
    with pytest.raises(ValueError, match=r"source_index has shape \(3,\) but input_ids has \(2, 3\)"):
        SequenceSet(torch.zeros(2, 3, dtype=torch.int64), torch.ones(2, 3), torch.arange(3))


# ---------------------------------------------------------------------------------------------------------
# load_unlearning_data, split_tasks, iterate_batches
# ---------------------------------------------------------------------------------------------------------
def test_load_unlearning_data_assembles_the_three_sets(tmp_path):
    forget = tmp_path / "forget.csv"
    forget.write_text(f'doc_id,text\n1,"{words(0, 1, 2, 3, 4)}"\n2,{words(5, 6)}\n', encoding="utf-8")
    retain = tmp_path / "retain.txt"
    retain.write_text(f"{words(7, 8, 9)}\n{words(10, 11, 12, 13)}\n", encoding="utf-8")
    data = load_unlearning_data(make_tokenizer(), forget, retain, [words(14, 15, 16)], seq_len=4)
    assert data.forget.input_ids.tolist() == [ids(0, 1, 2, 3), [*ids(5, 6), PAD, PAD]]
    assert data.retain.input_ids.tolist() == [[*ids(7, 8, 9), EOS], ids(10, 11, 12, 13)]
    assert data.heldout.input_ids.tolist() == [[*ids(14, 15, 16), PAD]]
    only_forget = load_unlearning_data(make_tokenizer(), forget, seq_len=4)
    assert only_forget.retain is None and only_forget.heldout is None


def test_load_unlearning_data_errors_name_the_set(tmp_path):
    forget = tmp_path / "forget.txt"
    forget.write_text(f"{words(0, 1, 2)}\n{words(3)}\n", encoding="utf-8")
    tok = make_tokenizer()
    with pytest.raises(FileNotFoundError, match="retain set file not found: .*wiki.csv"):
        load_unlearning_data(tok, forget, tmp_path / "wiki.csv")
    with pytest.raises(ValueError, match="heldout set is empty"):
        load_unlearning_data(tok, forget, heldout=[])
    with pytest.raises(ValueError, match="forget set text 1 has 1 tokens, fewer than min_len=3"):
        load_unlearning_data(tok, forget, seq_len=4, min_len=3)
    with pytest.raises(ValueError, match="mode must be one of"):
        load_unlearning_data(tok, tmp_path / "never_read.csv", retain_mode="stream")


def make_set(n: int) -> SequenceSet:
    input_ids = torch.arange(n * 3).view(n, 3)
    return SequenceSet(input_ids, torch.ones_like(input_ids), torch.arange(n))


def test_split_tasks_into_consecutive_equal_parts():
    tasks = split_tasks(make_set(128), 4)
    assert [len(t) for t in tasks] == [32] * 4
    assert [t.source_index.tolist() for t in tasks] == [list(range(32 * k, 32 * (k + 1))) for k in range(4)]
    assert torch.equal(torch.cat([t.input_ids for t in tasks]), make_set(128).input_ids)
    with pytest.raises(ValueError, match="10 sequences cannot be split into n_tasks=3 equal tasks"):
        split_tasks(make_set(10), 3)
    with pytest.raises(ValueError, match="n_tasks must be an int >= 1, got 0"):
        split_tasks(make_set(10), 0)


def test_iterate_batches_order_drop_last_and_seeded_shuffle():
    seqs = make_set(10)
    rows = lambda batches: [b["input_ids"][:, 0].div(3, rounding_mode="floor").tolist() for b in batches]
    assert rows(iterate_batches(seqs, 4)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert rows(iterate_batches(seqs, 4, drop_last=True)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    first = rows(iterate_batches(seqs, 4, shuffle=True, generator=torch.Generator().manual_seed(7)))
    again = rows(iterate_batches(seqs, 4, shuffle=True, generator=torch.Generator().manual_seed(7)))
    other = rows(iterate_batches(seqs, 4, shuffle=True, generator=torch.Generator().manual_seed(8)))
    assert first == again and first != other
    assert [len(b) for b in first] == [4, 4, 2] and sorted(sum(first, [])) == list(range(10))
    batch = next(iterate_batches(seqs, 3))
    assert set(batch) == {"input_ids", "attention_mask"} and batch["attention_mask"].shape == (3, 3)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        iterate_batches(seqs, 0)


# ---------------------------------------------------------------------------------------------------------
# Real TDEC files (skipped where ../shared/data/tdec is absent)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not TDEC.is_dir(), reason="TDEC data not available at ../shared/data/tdec")
def test_tdec_forget_csv_parses_as_is():
    texts = load_texts(TDEC / "forget" / "lm_extraction_32_0.csv", role="forget set")
    assert len(texts) == 32 and all(t.strip() for t in texts)
    assert any("\n" in t for t in texts) and any('(the "Software")' in t for t in texts)  # quoting undone
    tasks = split_tasks(load_unlearning_data(make_tokenizer(), TDEC / "forget" / "lm_extraction_128_0.csv").forget, 4)
    assert [len(t) for t in tasks] == [32] * 4 and tasks[3].source_index[0] == 96
