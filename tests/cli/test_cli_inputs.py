"""Inputs the command line checks before any compute, each a one-line exit 2 naming the flag or file: --seq-len
beyond the model's positions (unlearn, finetune, eval), a folder of mixed data files, a .txt file given as
question/answer pairs, a JSON that is not a TOFU retain reference; and a finished run, rerun: reported, not redone."""

from __future__ import annotations

import json
import re

import pytest

from fastunlearn import cli
from tests.helpers.tofu import make_pairs

PROGRESS = re.compile(r"^\d\d:\d\d:\d\d ")


def one_line_error(capsys, *names) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines()
             if line.strip() and "%|" not in line and "/s]" not in line and not PROGRESS.match(line)]  # fmt: skip
    assert len(lines) == 1 and "Traceback" not in err, err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def unlearn_argv(ws, out, **flags) -> list[str]:
    args = {"--model": ws / "model", "--forget": ws / "forget.txt", "--retain": ws / "retain.txt",
            "--heldout": ws / "heldout.txt", "--params": "lora", "--rank": "2", "--max-epochs": "1",
            "--seq-len": "12", "--out": out, **flags}  # fmt: skip
    return ["unlearn", *[str(x) for kv in args.items() if kv[1] is not None for x in kv if x is not True]]


@pytest.fixture
def no_data(monkeypatch):
    """Fail if a data set is read: the check comes before."""
    from fastunlearn.cli import finetune, unlearn

    def fail(*args, **kwargs):
        raise AssertionError("data was read before --seq-len was checked")

    monkeypatch.setattr(unlearn, "unlearning_data", fail)
    monkeypatch.setattr(finetune, "load_data", fail)


# ---- case 7: --seq-len longer than the model's positions (the workspace model has 32)
@pytest.mark.parametrize("seq_len, named", [("100", "--seq-len 100"), (None, "--seq-len (default 200)")])
def test_unlearn_seq_len_beyond_the_models_positions(workspace, tmp_path, capsys, no_data, seq_len, named):
    out = tmp_path / "run"
    assert cli.main(unlearn_argv(workspace, out, **{"--seq-len": seq_len})) == 2
    one_line_error(capsys, named, "32 positions", "--seq-len 32")
    assert not out.exists()


def test_finetune_seq_len_beyond_the_models_positions(workspace, tmp_path, capsys, no_data):
    out = tmp_path / "ft"
    argv = ["finetune", "--model", str(workspace / "model"), "--data", str(workspace / "forget.txt"),
            "--seq-len", "100", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 2
    one_line_error(capsys, "--seq-len 100", "32 positions")
    assert not out.exists()


def test_eval_seq_len_beyond_the_models_positions(workspace, capsys):
    argv = ["eval", "--model", str(workspace / "model"), "--set", f"f={workspace / 'forget.txt'}", "--seq-len", "64"]
    assert cli.main(argv) == 2
    one_line_error(capsys, "--seq-len 64", "32 positions")


# ---- case 7: a folder of mixed data files
def test_a_forget_folder_of_mixed_files_names_them(workspace, tmp_path, capsys):
    folder = tmp_path / "forget"
    folder.mkdir()
    (folder / "a.txt").write_text("w1 w2 w3\n")
    (folder / "b.csv").write_text("text\nw4 w5 w6\n")
    assert cli.main(unlearn_argv(workspace, tmp_path / "run", **{"--forget": folder})) == 2
    one_line_error(capsys, "forget set folder", folder / "a.txt", folder / "b.csv", "one format")
    assert not (tmp_path / "run").exists()


def test_a_forget_folder_that_datasets_cannot_read_is_named(workspace, tmp_path, capsys):
    folder = tmp_path / "forget"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "w1 w2 w3"}\n')
    (folder / "b.jsonl").write_text('{"other": 1}\n')  # another schema
    assert cli.main(unlearn_argv(workspace, tmp_path / "run", **{"--forget": folder})) == 2
    one_line_error(capsys, f"forget set folder {folder} cannot be read as a dataset")


def test_a_folder_of_one_format_is_read(workspace, tmp_path, capsys):
    folder = tmp_path / "forget"
    folder.mkdir()
    lines = (workspace / "forget.txt").read_text().splitlines()
    (folder / "a.txt").write_text("\n".join(lines[:2]) + "\n")
    (folder / "b.txt").write_text("\n".join(lines[2:]) + "\n")
    (folder / ".hidden.csv").write_text("not read\n")
    assert cli.main(unlearn_argv(workspace, tmp_path / "run", **{"--forget": folder})) in (0, 1)


# ---- case 8: --qa with a text file
@pytest.mark.parametrize("command", ["unlearn", "finetune"])
def test_qa_with_a_txt_file_names_it_and_the_formats(workspace, tmp_path, capsys, command):
    if command == "unlearn":
        argv = unlearn_argv(workspace, tmp_path / "run", **{"--qa": True, "--seq-len": None})
    else:
        argv = ["finetune", "--model", str(workspace / "model"), "--data", str(workspace / "forget.txt"), "--qa",
                "--out", str(tmp_path / "run")]  # fmt: skip
    assert cli.main(argv) == 2
    one_line_error(capsys, workspace / "forget.txt", "is .txt, not a question/answer format", ".json", ".jsonl")


# ---- case 9: eval --tofu --retain-model with a JSON that is not a reference
@pytest.mark.parametrize("content", [[{"question": "q", "answer": "a"}], {"forget": 1}, "text"])
def test_a_json_that_is_not_a_retain_reference(workspace, tmp_path, capsys, content):
    pytest.importorskip("scipy")
    pytest.importorskip("rouge_score")
    tofu = tmp_path / "tofu"
    tofu.mkdir()
    for name, seed in (("forget01", 1), ("retain_perturbed", 2), ("real_authors_perturbed", 3),
                       ("world_facts_perturbed", 4)):  # fmt: skip
        records = [{"question": p.question, "answer": p.answer, "paraphrased_answer": p.paraphrased_answer,
                    "perturbed_answer": list(p.perturbed_answers)} for p in make_pairs(3, seed)]  # fmt: skip
        (tofu / f"{name}.json").write_text(json.dumps(records))
    reference = tmp_path / "not-a-reference.json"
    reference.write_text(json.dumps(content))
    argv = ["eval", "--model", str(workspace / "model"), "--tofu", str(tofu), "--retain-model", str(reference)]
    assert cli.main(argv) == 2
    line = one_line_error(capsys, reference)
    assert "is not a retain reference" in line or "holds no forget set values" in line, line
    assert "float()" not in line


# ---- case 6: a finished run, rerun with the same command
def test_a_finished_run_rerun_says_so_and_exits_with_its_outcome(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(unlearn_argv(workspace, out))
    assert code in (0, 1)
    capsys.readouterr()
    report = (out / "report.md").read_bytes()
    assert cli.main(unlearn_argv(workspace, out)) == code
    printed = capsys.readouterr().out
    assert printed.startswith("already finished: ") and f"remove {out} or choose another --out" in printed
    assert (out / "report.md").read_bytes() == report
    assert cli.main(unlearn_argv(workspace, out, **{"--lr": "1e-3"})) == 2
    one_line_error(capsys, "holds a finished run with another config", "lr")


def test_a_finished_finetune_rerun_says_so(workspace, tmp_path, capsys):
    out = tmp_path / "ft"
    argv = ["finetune", "--model", str(workspace / "model"), "--data", str(workspace / "forget.txt"),
            "--seq-len", "16", "--epochs", "1", "--batch-size", "4", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.startswith("already finished: model in ")
