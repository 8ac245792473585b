"""`fastunlearn audit` end to end on tiny saved models: the report files, exit 1 when a probe fails and 0 when all
pass, and one-line errors (exit 2) before any model loads or any compute."""

from __future__ import annotations

import json
import random

import pytest
import torch

from fastunlearn import cli
from fastunlearn.data.text import tokenize_sequences
from fastunlearn.losses import retain_loss, shift_causal
from tests.helpers.tiny_models import tiny_model, word_tokenizer

WORDS = [f"w{i}" for i in range(60)]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A random tiny GPT-Neo and one that memorized the forget text, both saved with a word-level tokenizer, and
    forget / retain / held-out text files (4 / 8 / 4 lines of 14 words)."""
    root = tmp_path_factory.mktemp("audit-cli")
    tokenizer = word_tokenizer(WORDS)
    rng = random.Random(0)
    texts = {}
    for name, n in (("forget", 4), ("retain", 8), ("heldout", 4)):
        texts[name] = [" ".join(rng.choice(WORDS) for _ in range(14)) for _ in range(n)]
        (root / f"{name}.txt").write_text("\n".join(texts[name]) + "\n")
    for name in ("random", "memorized"):
        model = tiny_model("gpt_neo")
        if name == "memorized":
            ids = tokenize_sequences(texts["forget"], tokenizer, seq_len=12).input_ids
            optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
            for _ in range(150):
                loss = retain_loss(*shift_causal(model(ids).logits, ids))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def args(workspace, model: str, out, *extra: str) -> list[str]:
    return ["audit", "--model", str(workspace / model), "--forget", str(workspace / "forget.txt"),
            "--heldout", str(workspace / "heldout.txt"), "--seq-len", "12", "--out", str(out), *extra]  # fmt: skip


def test_a_failed_probe_exits_1_with_the_report(workspace, tmp_path, capsys):
    out = tmp_path / "audit"
    code = cli.main(args(workspace, "memorized", out, "--probes", "quantization", "--formats", "q8_0,q4_1"))
    printed = capsys.readouterr().out
    assert code == 1 and "quantization: FAILED" in printed and f"report in {out / 'audit.md'}" in printed
    report = json.loads((out / "audit.json").read_text())
    assert report["fastunlearn_audit"] == 1 and not report["passed"]
    assert [r["format"] for r in report["quantization"]["rows"]] == ["float", "q8_0", "q4_1"]
    assert report["config"]["probes"] == ["quantization"] and report["sets"] == {"forget": 4, "heldout": 4,
                                                                               "retain": None}  # fmt: skip
    assert cli.main(args(workspace, "memorized", out, "--probes", "quantization", "--formats", "q8_0")) == 1
    assert len(json.loads((out / "audit.json").read_text())["quantization"]["rows"]) == 2  # replaced: ours


def test_every_probe_passing_exits_0(workspace, tmp_path, capsys):
    # 4 forget and 4 held-out rows: the membership margin 2.5 x sqrt(9 / 192) = 0.54 exceeds any |AUC - 0.5|
    code = cli.main(args(workspace, "random", tmp_path / "a", "--probes", "membership", "--retain",
                         str(workspace / "retain.txt")))  # fmt: skip
    assert code == 0 and "membership: PASSED" in capsys.readouterr().out
    scores = json.loads((tmp_path / "a" / "audit.json").read_text())["membership"]["scores"]
    assert scores["zlib"]["auc"] is not None  # the tokenizer decodes the text zlib compresses


def test_all_probes_run_from_the_command_line(workspace, tmp_path, capsys):
    extra = ["--reference", str(workspace / "random"), "--retain", str(workspace / "retain.txt"), "--formats", "q4_0"]
    code = cli.main(args(workspace, "memorized", tmp_path / "a", *extra, "--relearn-steps", "2"))
    printed = capsys.readouterr().out
    assert code == 1 and all(f"{p}: " in printed for p in ("quantization", "relearning", "membership"))
    report = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert report["relearning"]["benign"] is not None and report["relearning"]["pre_unlearning"] is not None


@pytest.mark.parametrize("extra, message", [
    (["--probes", "quantization,fuzz"], "--probes must be distinct names of"),
    (["--probes", ","], "--probes names nothing"),
    (["--formats", "q3_k"], "--formats must be distinct names of"),
    (["--relearn-rows", "0"], "--relearn-rows must be an int >= 1"),
    (["--relearn-lr", "-1"], "--relearn-lr must be a finite number > 0"),
    (["--min-k", "0"], "--min-k must be a number in (0, 1]"),
    (["--pre-ma", "0.9", "--reference", "x"], "--pre-ma / --pre-el stand in for --reference"),
    (["--relearn-rows", "4"], "--relearn-rows 4 leaves no forget row to score"),
])  # fmt: skip
def test_bad_options_are_one_line_errors(workspace, tmp_path, capsys, extra, message):
    assert cli.main(args(workspace, "random", tmp_path / "a", *extra)) == 2
    err = capsys.readouterr().err  # (transformers' own "Loading weights" bar may come first)
    assert err.endswith("\n") and err.splitlines()[-1].startswith(f"fastunlearn audit: error: {message}")
    assert err.count("fastunlearn audit:") == 1
    assert not (tmp_path / "a").exists()


def test_input_errors_before_any_model_loads(workspace, tmp_path, capsys):
    out = tmp_path / "a"
    out.mkdir()
    (out / "audit.json").write_text('{"mine": 1}')
    assert cli.main(args(workspace, "no-such-model", out)) == 2  # the output check comes before the model
    assert "audit.json' exists and was not written by fastunlearn audit" in capsys.readouterr().err
    assert (out / "audit.json").read_text() == '{"mine": 1}'
    missing = ["audit", "--model", str(workspace / "random"), "--forget", str(workspace / "nope.txt"), "--heldout",
               str(workspace / "heldout.txt"), "--out", str(tmp_path / "b")]  # fmt: skip
    assert cli.main(missing) == 2 and "forget set" in capsys.readouterr().err
    assert cli.main(args(workspace, "random", tmp_path / "c", "--reference", str(workspace / "nope"))) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"fastunlearn audit: error: --reference {workspace / 'nope'}: could not load model")
