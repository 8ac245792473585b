"""Bad input and failures on the command line: one line on stderr naming the file / flag / parameter, no
traceback, and the documented exit status (0 forgotten, 1 not forgotten, 2 usage or input error, 3 runtime
failure with the traceback in a log file, 130 interrupted). The checks behind them also guard the Python API."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import stat

import pytest
import torch

from fastunlearn import cli
from fastunlearn.data.text import SequenceSet, UnlearningData
from tests.helpers.tiny_models import tiny_model

WORDS = [f"w{i}" for i in range(60)]


def _tokenizer():
    from tests.helpers.tiny_models import word_tokenizer

    return word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Saved tiny models (fine, without a tokenizer, with a NaN weight, an empty directory) and text files."""
    root = tmp_path_factory.mktemp("cli-errors")
    tokenizer = _tokenizer()
    tiny_model("gpt_neo").save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    tiny_model("gpt_neo").save_pretrained(root / "no-tokenizer")
    broken = tiny_model("gpt_neo")
    with torch.no_grad():
        broken.transformer.h[1].mlp.c_fc.weight[3, 5] = float("nan")
    broken.save_pretrained(root / "nan-model")
    tokenizer.save_pretrained(root / "nan-model")
    (root / "empty-model").mkdir()
    rng = random.Random(0)
    for name, n in (("forget", 4), ("retain", 8), ("heldout", 4)):
        lines = [" ".join(rng.choice(WORDS) for _ in range(14)) for _ in range(n)]
        (root / f"{name}.txt").write_text("\n".join(lines) + "\n")
    (root / "latin1.txt").write_bytes("w1 w2 caf\xe9 w3\n".encode("latin-1"))
    (root / "a-file").write_text("not a directory\n")
    return root


def unlearn_argv(ws, out, **flags) -> list[str]:
    args = {"--model": ws / "model", "--forget": ws / "forget.txt", "--retain": ws / "retain.txt",
            "--heldout": ws / "heldout.txt", "--params": "lora", "--rank": "2", "--max-epochs": "1",
            "--seq-len": "12", "--out": out, **flags}  # fmt: skip
    return ["unlearn", *[str(x) for kv in args.items() for x in kv if x is not True]]


def one_line_error(capsys, *names: str) -> str:
    """stderr has one error line, no traceback, naming every one of ``names`` (besides tqdm's bars and the
    engine's timestamped progress lines, which may come before the failure)."""
    err = capsys.readouterr().err
    progress = re.compile(r"^\d\d:\d\d:\d\d ")
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line and not progress.match(line)]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


# ---- case 6: a held-out set that overlaps the forget set
@pytest.mark.parametrize("near", [False, True])
def test_heldout_overlapping_forget_is_refused_before_any_compute(ws, tmp_path, capsys, near):
    """--heldout equal to --forget, or each row with one token changed (near-identical), is refused."""
    rng = random.Random(1)
    rows = [[rng.choice(WORDS) for _ in range(30)] for _ in range(4)]
    (tmp_path / "forget.txt").write_text("\n".join(" ".join(row) for row in rows) + "\n")
    (tmp_path / "heldout.txt").write_text("\n".join(" ".join(["w0" if near else row[0], *row[1:]]) for row in rows))
    files = {"--forget": tmp_path / "forget.txt", "--heldout": tmp_path / "heldout.txt", "--seq-len": "30"}
    out = tmp_path / "run"
    assert cli.main(unlearn_argv(ws, out, **files)) == 2
    line = one_line_error(capsys, "held-out set", "forget set", "4 of 4", "--allow-heldout-overlap")
    assert f"{0 if near else 4} identical" in line and "allow_heldout_overlap" in line
    assert not out.exists()  # refused before the run wrote anything
    assert cli.main(unlearn_argv(ws, out, **files, **{"--allow-heldout-overlap": True})) in (0, 1)


def test_heldout_overlap_rule_in_the_python_api():
    from fastunlearn.engine import UnlearnConfig
    from fastunlearn.engine.inputs import OVERLAP_FRACTION, OVERLAP_N, check_data

    def seqs(ids):
        return SequenceSet(ids, torch.ones_like(ids), torch.arange(len(ids)))

    g = torch.Generator().manual_seed(0)
    forget = torch.randint(3, 60, (3, 24), generator=g)
    fresh = torch.randint(3, 60, (3, 24), generator=g)
    # held-out row 0 shares a stretch of forget row 1 just below the threshold, row 1 just at it
    n_grams = 24 - OVERLAP_N + 1  # 17 n-grams per row
    below = int(OVERLAP_FRACTION * n_grams)  # shared n-grams: 11 < 0.7 * 17
    heldout = fresh.clone()
    for row, shared in ((0, below), (1, below + 1)):
        heldout[row, : shared + OVERLAP_N - 1] = forget[1, : shared + OVERLAP_N - 1]
        heldout[row, shared + OVERLAP_N - 1] = 2  # a token no random row has: the next n-gram differs
    data = UnlearningData(seqs(forget), seqs(fresh), seqs(heldout))
    with pytest.raises(ValueError, match=r"the forget set: 1 of 3 held-out rows .*held-out row 1 ~ forget set row 1"):
        check_data(data, UnlearnConfig())
    check_data(data, UnlearnConfig(allow_heldout_overlap=True))
    check_data(UnlearningData(seqs(forget), seqs(fresh), seqs(fresh)), UnlearnConfig())
    two_tasks = UnlearningData([seqs(fresh[:1]), seqs(forget)], seqs(fresh), seqs(forget[2:]))
    with pytest.raises(ValueError, match=r"forget set 2 of 2"):
        check_data(two_tasks, UnlearnConfig())
    with pytest.raises(ValueError, match="allow_heldout_overlap must be a bool"):
        UnlearnConfig(allow_heldout_overlap=1)


# ---- NaN / inf weights, and token ids the model has no embedding for
@pytest.mark.parametrize("params", ["lora", "fila"])
def test_nan_weight_is_named_before_any_compute(ws, tmp_path, capsys, params):
    out = tmp_path / "run"
    assert cli.main(unlearn_argv(ws, out, **{"--model": ws / "nan-model", "--params": params})) == 2
    one_line_error(capsys, "transformer.h.1.mlp.c_fc.weight", "NaN")
    assert not out.exists()  # no checkpoint left behind


def test_token_ids_beyond_the_embedding_are_named(tmp_path):
    from fastunlearn.engine import UnlearnConfig, unlearn

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[1, 4] = 70
    forget = SequenceSet(ids, torch.ones_like(ids), torch.arange(2))
    cfg = UnlearnConfig(params="lora", retain_weight=0.0, stop="threshold", ma_threshold=0.1, el_threshold=0.1)
    with pytest.raises(ValueError, match=r"forget set has token id 70, .* 64 rows"):
        unlearn(tiny_model("gpt_neo"), [forget], cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argument", ["forget_data", "retain_data"])
def test_fila_init_names_an_out_of_vocabulary_id(argument):
    from fastunlearn import fila_init

    good = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    bad = good.clone()
    bad[0, 3] = 64
    data = {"forget_data": good, "retain_data": good, argument: {"input_ids": bad}}
    with pytest.raises(ValueError, match=rf"{argument} has token id 64, .* 64 rows"):
        fila_init(tiny_model("gpt_neo"), data["forget_data"], data["retain_data"], rank=2)
    with pytest.raises(ValueError, match=rf"{argument} has token id -1"):
        fila_init(tiny_model("gpt_neo"), *[[{"input_ids": -bad.clamp(max=1)}] if k == argument else good
                                           for k in ("forget_data", "retain_data")], rank=2)  # fmt: skip


# ---- case 8, item 6: exit statuses
def test_runtime_failure_exits_3_with_the_traceback_in_a_log(ws, tmp_path, capsys, monkeypatch):
    from fastunlearn.engine import recipe

    def broken(self):
        raise RuntimeError("the training step broke")

    monkeypatch.setattr(recipe.UnlearnRecipe, "train", broken)
    out = tmp_path / "run"
    assert cli.main(unlearn_argv(ws, out)) == 3
    log = out / ".fastunlearn" / "error.log"
    one_line_error(capsys, "the training step broke", log)
    text = log.read_text()
    assert text.startswith("fastunlearn unlearn --model") and "Traceback" in text and "raise RuntimeError" in text


def test_runtime_failure_without_an_out_dir_logs_to_a_temporary_file(ws, tmp_path, capsys, monkeypatch):
    import tempfile

    from fastunlearn.evals import metrics

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(metrics, "evaluate", lambda *a, **k: 1 / 0)
    argv = ["eval", "--model", str(ws / "model"), "--set", f"f={ws / 'forget.txt'}", "--seq-len", "12"]
    assert cli.main(argv) == 3
    line = one_line_error(capsys, "ZeroDivisionError")
    logs = list(tmp_path.glob("fastunlearn-error-*.log"))
    assert len(logs) == 1 and str(logs[0]) in line and "Traceback" in logs[0].read_text()


def test_interrupt_exits_130(ws, tmp_path, capsys, monkeypatch):
    from fastunlearn.engine import recipe

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe.UnlearnRecipe, "train", interrupted)
    assert cli.main(unlearn_argv(ws, tmp_path / "run")) == 130
    one_line_error(capsys, "interrupted", "resumes")


@pytest.mark.parametrize("argv", [["--help"], ["unlearn", "--help"]])
def test_help_documents_the_exit_statuses(capsys, argv):
    with pytest.raises(SystemExit):
        cli.main(argv)
    text = capsys.readouterr().out
    assert "exit status:" in text
    for code, meaning in (("0", "forgotten"), ("1", "not forgotten"), ("2", "usage or input error"),
                          ("3", "runtime failure"), ("130", "interrupted")):  # fmt: skip
        assert any(line.split()[:1] == [code] and meaning in line for line in text.splitlines()), (code, text)


# ---- case 9: files and directories that cannot be written
def test_eval_json_that_is_a_directory(ws, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        "fastunlearn.cli.eval.load_model", lambda *a, **k: pytest.fail("checked after loading the model")
    )
    argv = ["eval", "--model", str(ws / "model"), "--set", f"f={ws / 'forget.txt'}", "--json", str(tmp_path)]
    assert cli.main(argv) == 2
    one_line_error(capsys, "--json", tmp_path, "directory")


def test_demo_cache_dir_that_cannot_be_created(ws, capsys, monkeypatch):
    from fastunlearn.demo import toy as demo

    monkeypatch.setattr(demo, "memorize", lambda *a, **k: pytest.fail("checked after training"))
    cache = ws / "a-file" / "cache"  # under a regular file: cannot be created, even by root
    code = cli.main(["demo", "--out", str(ws / "demo-out"), "--cache-dir", str(cache)])
    assert code == 2
    one_line_error(capsys, "--cache-dir", cache)


def test_disk_full_during_export_names_the_output(ws, tmp_path, capsys, monkeypatch):
    from fastunlearn.lora import export

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(export, "save_file", full)
    out = tmp_path / "run"
    assert cli.main(unlearn_argv(ws, out)) == 3
    one_line_error(capsys, "No space left on device", out, "error.log")
    from fastunlearn.engine.checkpoint import has_checkpoint

    assert has_checkpoint(out)  # freeing space and running the same command resumes


# ---- case 10: the model directory, the text files
@pytest.mark.parametrize(
    "model, names",
    [("no-tokenizer", ["no tokenizer", "tokenizer.save_pretrained"]), ("empty-model", ["empty", "config.json"])],
)
def test_a_model_directory_without_tokenizer_or_files(ws, tmp_path, capsys, model, names):
    assert cli.main(unlearn_argv(ws, tmp_path / "run", **{"--model": ws / model})) == 2
    line = one_line_error(capsys, "--model", ws / model, *names)
    assert "forget set" not in line


def test_non_utf8_text_file_is_named(ws, tmp_path, capsys):
    assert cli.main(unlearn_argv(ws, tmp_path / "run", **{"--forget": ws / "latin1.txt"})) == 2
    one_line_error(capsys, "forget set", ws / "latin1.txt", "UTF-8")


# ---- case 11: exported files are readable like transformers' own
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_respect_the_umask(tmp_path, umask):
    from fastunlearn import inject_lora, save_merged_model, save_peft_adapter
    from fastunlearn.engine import UnlearnConfig
    from fastunlearn.engine.outputs import export_models

    old = os.umask(umask)
    try:
        model = tiny_model("gpt_neo")
        export_models(model, UnlearnConfig(params="full"), tmp_path / "full", _tokenizer())
        inject_lora(model, ["q_proj"], rank=2, alpha=4.0)
        save_peft_adapter(model, tmp_path / "adapter")
        save_merged_model(model, tmp_path / "merged")
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"adapter_model.safetensors", "model.safetensors"} <= {p.name for p in files}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


# ---- JSON: a non-finite number is named by its key path
def test_write_json_names_a_non_finite_value(tmp_path):
    from fastunlearn.engine.report import write_json

    log = {"tasks": [{"epochs": [{"forget_loss": 1.0}, {"forget_loss": float("nan")}]}]}
    with pytest.raises(RuntimeError, match=r"log\.json: tasks\[0\]\.epochs\[1\]\.forget_loss is nan"):
        write_json(tmp_path / "log.json", log)
    assert not (tmp_path / "log.json").exists()
    write_json(tmp_path / "log.json", {"ok": [1.5, None]})
    assert json.loads((tmp_path / "log.json").read_text()) == {"ok": [1.5, None]}
