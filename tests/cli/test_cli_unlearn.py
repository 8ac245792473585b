"""`fastunlearn unlearn` and `fastunlearn eval` end to end on a tiny saved model, and their user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastunlearn import cli


def test_unlearn_then_eval(workspace, capsys):
    out = workspace / "run"
    code = cli.main([
        "unlearn", "--model", str(workspace / "model"), "--forget", str(workspace / "forget.txt"),
        "--retain", str(workspace / "retain.txt"), "--heldout", str(workspace / "heldout.txt"),
        "--params", "lora", "--rank", "2", "--max-epochs", "2", "--seq-len", "12", "--out", str(out),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert code in (0, 1) and "report in" in printed
    log = json.loads((out / "log.json").read_text())
    assert log["config"]["params"] == "lora" and (out / "report.md").exists()
    code = cli.main([
        "eval", "--model", str(workspace / "model"), "--set", f"forget={workspace / 'forget.txt'}",
        "--set", f"heldout={workspace / 'heldout.txt'}", "--seq-len", "12", "--json", str(workspace / "eval.json"),
    ])  # fmt: skip
    assert code == 0
    results = json.loads((workspace / "eval.json").read_text())
    assert set(results) == {"forget", "heldout"} and set(results["forget"]) == {"ma", "el", "ppl"}
    assert 0.0 <= results["forget"]["ma"] <= 1.0 and results["forget"]["ppl"] > 1.0


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_unlearn_under_torchrun_with_two_processes_matches_one(workspace):
    """The README's multi-GPU command, on the CPU: torchrun starts 2 processes (gloo), rank 0 writes."""
    common = [
        "unlearn", "--model", str(workspace / "model"), "--forget", str(workspace / "forget.txt"),
        "--retain", str(workspace / "retain.txt"), "--heldout", str(workspace / "heldout.txt"), "--params", "fila",
        "--rank", "2", "--max-epochs", "2", "--min-epochs", "2", "--seq-len", "12", "--micro-batch-size", "2",
        "--parallel", "fsdp",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "fastunlearn",
    ]
    done = subprocess.run([*launch, *common, "--out", str(workspace / "run2")], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode in (0, 1), done.stderr[-3000:]
    assert done.stdout.count("report in") == 1  # printed by rank 0 only
    assert cli.main([*common, "--out", str(workspace / "run1")]) in (0, 1)
    two, one = (json.loads((workspace / run / "log.json").read_text()) for run in ("run2", "run1"))
    # Two processes sum in another order than one (sharded evaluation, gathered gradients): nothing here is
    # bit-equal by construction, so floats are compared with tolerances. MA and EL count argmax hits: a
    # near-tie may flip one of the 4 x 11 scored tokens, so they get one token's worth (1/44 < 0.04).
    tokens = dict(abs=0.04)
    assert two["baseline"]["retain_ppl"] == pytest.approx(one["baseline"]["retain_ppl"], rel=1e-6)
    for key in ("forget", "heldout"):
        a, b = two["baseline"][key], one["baseline"][key]
        for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b], strict=True):
            assert (x["ma"], x["el"]) == (pytest.approx(y["ma"], **tokens), pytest.approx(y["el"], **tokens))
    for a, b in zip(two["tasks"][0]["epochs"], one["tasks"][0]["epochs"], strict=True):
        assert a["forget_ma"] == pytest.approx(b["forget_ma"], **tokens)
        assert (a["forget_el"] is None) == (b["forget_el"] is None)
        assert a["forget_loss"] == pytest.approx(b["forget_loss"], rel=1e-4)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--forget", "{root}/missing.txt"], "forget set file not found"),
        (["--forget", "{root}/forget.txt", "--model", "{root}/no-model"], "could not load model"),
        (["--forget", "{root}/forget.txt", "--rank", "0"], "rank must be an int >= 1"),
    ],
)
def test_unlearn_user_errors_exit_2_without_traceback(workspace, capsys, argv, message):
    base = {"--model": "{root}/model", "--out": "{root}/bad-run", "--heldout": "{root}/heldout.txt",
            "--retain": "{root}/retain.txt", "--seq-len": "12"}  # fmt: skip
    args = dict(zip(argv[::2], argv[1::2]))
    merged = {**base, **args}
    flat = ["unlearn", *[x.format(root=workspace) for kv in merged.items() for x in kv]]
    assert cli.main(flat) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_eval_rejects_a_bad_set_spec(workspace, capsys):
    assert cli.main(["eval", "--model", str(workspace / "model"), "--set", "forget"]) == 2
    assert "--set takes NAME=FILE" in capsys.readouterr().err
