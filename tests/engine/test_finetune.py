"""Supervised fine-tuning (``fastunlearn.finetune``, ``fastunlearn finetune``): the loss is the answer tokens'
mean cross-entropy, the update does not depend on the micro-batch size, an interrupted run resumes to the same
weights, bad inputs are named, and the command line writes a loadable transformers model."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fastunlearn import cli
from fastunlearn.data.text import SequenceSet
from fastunlearn.engine import finetune as ft
from fastunlearn.engine.finetune import FinetuneConfig, finetune, learning_rate, sft_step
from fastunlearn.engine.outdir import OutDirError
from tests.helpers.tiny_models import VOCAB, tiny_model, word_tokenizer

PROMPT = 5  # tokens of "prompt" per row: labels -100 there


def qa_rows(n: int = 10, seq_len: int = 12, seed: int = 0, pad: bool = True) -> SequenceSet:
    """Random rows; labels -100 on the first PROMPT tokens; rows 1, 4, 7 padded after 9 tokens if ``pad``."""
    ids = torch.randint(1, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1::3, 9:] = 0 if pad else 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :PROMPT] = -100
    return SequenceSet(ids, mask, torch.arange(n), labels)


def hand_loss(model, data: SequenceSet, answers_only: bool = True) -> torch.Tensor:
    """Mean -log p(next token) over the answer targets (or every real next token), written out in float64."""
    logp = torch.log_softmax(model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits.double(), -1)
    target = data.input_ids[:, 1:]
    keep = (data.attention_mask[:, 1:] == 1) & (data.attention_mask[:, :-1] == 1)
    if answers_only:
        keep &= torch.arange(1, data.seq_len)[None, :] >= PROMPT
    picked = logp[:, :-1].gather(-1, target[..., None])[..., 0]
    return -(picked * keep).sum() / keep.sum()


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_the_update_is_the_gradient_of_the_answer_only_loss():
    """SGD with lr 1 moves the weights by minus the gradient: it equals the float64 hand loss's gradient over the
    answer tokens, and differs from the all-token loss's (so prompt labels would show)."""
    data = qa_rows()
    model = tiny_model("gpt_neo").double()
    expected = {}
    for answers_only in (True, False):
        model.zero_grad()
        hand_loss(model, data, answers_only).backward()
        expected[answers_only] = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    before = params(model)
    loss = hand_loss(model, data).item()
    record = sft_step(model, torch.optim.SGD(model.parameters(), lr=1.0), data.batch(), 3, "cpu")
    assert record["loss"] == pytest.approx(loss, rel=1e-12)
    assert record["targets"] == int((data.labels[:, 1:] != -100).sum())
    gaps = []
    for name, p in model.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), expected[True][name], rtol=1e-9, atol=1e-12)
        gaps.append((expected[True][name] - expected[False][name]).abs().max().item())
    assert max(gaps) > 1e-3


def test_loss_falls_and_the_log_starts_at_the_hand_computed_loss(tmp_path):
    data = qa_rows()
    model = tiny_model("gpt_neo").double()
    first = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:5]  # the seeded data order
    start = hand_loss(model, data[first]).item()
    cfg = FinetuneConfig(epochs=6, lr=1e-2, batch_size=5, micro_batch_size=4, warmup_epochs=0.5, dtype="float32")
    result = finetune(model.float(), data, cfg, tmp_path / "out")
    log = result.log
    assert log["steps"][0]["loss"] == pytest.approx(start, rel=1e-5)  # float32 training, float64 reference
    assert [e["epoch"] for e in log["epochs"]] == list(range(1, 7)) and log["warmup_steps"] == 1
    assert log["epochs"][-1]["loss"] < 0.85 * log["epochs"][0]["loss"]
    assert json.loads((tmp_path / "out" / "log.json").read_text())["status"] == "finished"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["log.json", "model"]


def test_the_gradient_does_not_depend_on_the_micro_batch_size():
    """SGD with lr 1: the weights move by minus the batch's gradient, padded rows included (each micro-batch is cut
    after its last real token; the eager GPT-Neo's logits move by ~1e-10 in float64 when trailing padding is there,
    so not bit-equal; a wrong weighting of the micro-batches would move them by ~1e-2)."""
    data = qa_rows()
    deltas = {}
    for micro in (1, 3, 10):
        model = tiny_model("gpt_neo").double()
        before = params(model)
        sft_step(model, torch.optim.SGD(model.parameters(), lr=1.0), data.batch(), micro, "cpu")
        deltas[micro] = {n: before[n] - p.detach() for n, p in model.named_parameters()}
    for micro in (3, 10):
        for name, value in deltas[1].items():
            torch.testing.assert_close(deltas[micro][name], value, rtol=1e-6, atol=1e-9)


def test_the_update_does_not_depend_on_the_micro_batch_size(tmp_path):
    """Whole runs (AdamW, warmup, decay, clipping, two epochs) in float64 on rows of one length: equal to 1e-10."""
    data = qa_rows(pad=False)
    cfg = dict(epochs=2, lr=1e-3, batch_size=4, warmup_epochs=1.0, weight_decay=0.1, max_grad_norm=0.5)
    runs = {}
    for micro in (1, 3, 4):
        model = tiny_model("gpt_neo").double()
        log = finetune(model, data, FinetuneConfig(micro_batch_size=micro, **cfg), tmp_path / f"m{micro}").log
        runs[micro] = (params(model), [s["loss"] for s in log["steps"]])
    assert len(runs[1][1]) == 2 * 3  # ceil(10 / 4) updates per epoch
    for micro in (3, 4):
        assert runs[micro][1] == pytest.approx(runs[1][1], rel=1e-12)
        for name, value in runs[1][0].items():
            torch.testing.assert_close(runs[micro][0][name], value, rtol=1e-10, atol=1e-12)
    assert any(not torch.equal(runs[1][0][n], p) for n, p in tiny_model("gpt_neo").double().named_parameters())


def test_an_interrupted_run_resumes_to_the_uninterrupted_weights(tmp_path):
    data = qa_rows()
    cfg = FinetuneConfig(epochs=3, lr=1e-3, batch_size=4, micro_batch_size=2)
    base = tiny_model("gpt_neo")
    whole = copy.deepcopy(base)
    full_log = finetune(whole, data, cfg, tmp_path / "whole").log

    def stop(epoch, record):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(copy.deepcopy(base), data, cfg, tmp_path / "cut", on_epoch_end=stop)
    assert json.loads((tmp_path / "cut" / "log.json").read_text())["status"] == "running"
    with pytest.raises(OutDirError, match="interrupted run"):
        finetune(copy.deepcopy(base), data, cfg, tmp_path / "cut", resume=False)
    with pytest.raises(ValueError, match="different config"):
        finetune(copy.deepcopy(base), data, FinetuneConfig(epochs=3, lr=2e-3, batch_size=4), tmp_path / "cut")
    with pytest.raises(ValueError, match="another model"):
        finetune(tiny_model("gpt_neo", seed=1), data, cfg, tmp_path / "cut")
    resumed = copy.deepcopy(base)
    log = finetune(resumed, data, cfg, tmp_path / "cut").log
    assert log["resumes"] == 1
    assert [(s["step"], s["loss"], s["lr"]) for s in log["steps"]] == [
        (s["step"], s["loss"], s["lr"]) for s in full_log["steps"]
    ]
    for (name, p), q in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_learning_rate_schedule():
    cfg = FinetuneConfig(epochs=5, lr=1e-5)
    lrs = [learning_rate(step, 50, 10, cfg) for step in range(1, 51)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[9] == pytest.approx(1e-5) and lrs[10] == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(1e-5 / 40)
    constant = FinetuneConfig(epochs=5, lr=1e-5, schedule="constant")
    assert learning_rate(50, 50, 10, constant) == 1e-5


@pytest.mark.parametrize(
    ("fields", "name"),
    [({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"), ({"lr": float("nan")}, "lr"), ({"batch_size": 0}, "batch_size"),
     ({"micro_batch_size": 1.5}, "micro_batch_size"), ({"betas": (1.0, 0.9)}, "betas"), ({"betas": 0.9}, "betas"),
     ({"weight_decay": -0.1}, "weight_decay"), ({"warmup_epochs": 6.0}, "warmup_epochs"),
     ({"schedule": "cosine"}, "schedule"), ({"dtype": "float16"}, "dtype"), ({"max_grad_norm": 0.0}, "max_grad_norm"),
     ({"seed": "0"}, "seed"), ({"gradient_checkpointing": 1}, "gradient_checkpointing")],
)  # fmt: skip
def test_bad_config_names_the_field(fields, name):
    with pytest.raises(ValueError, match=name) as info:
        FinetuneConfig(**fields)
    assert "\n" not in str(info.value)


def test_bad_data_and_out_dir_are_refused_before_training(tmp_path):
    model = tiny_model("gpt_neo")
    before = params(model)
    data = qa_rows()
    no_answers = SequenceSet(data.input_ids, data.attention_mask, data.source_index, torch.full_like(data.labels, -100))
    with pytest.raises(ValueError, match="no next-token targets"):
        finetune(model, no_answers, FinetuneConfig(), tmp_path / "a")
    with pytest.raises(ValueError, match="must be a SequenceSet"):
        finetune(model, data.input_ids, FinetuneConfig(), tmp_path / "a")
    big = SequenceSet(data.input_ids + VOCAB, data.attention_mask, data.source_index)
    with pytest.raises(ValueError, match="vocabulary"):
        finetune(model, big, FinetuneConfig(), tmp_path / "a")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(OutDirError, match="not empty"):
        finetune(model, data, FinetuneConfig(), mine)
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "a").exists()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# ---- the command line --------------------------------------------------------------------------------------
WORDS = [f"w{i}" for i in range(58)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny GPT-Neo with a word-level tokenizer; a QA file and a text file."""
    import random

    root = tmp_path_factory.mktemp("finetune")
    tokenizer = word_tokenizer(WORDS, extra=("Question", "Answer", ":"))
    tiny_model("gpt_neo").save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = random.Random(0)
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    pairs = [{"question": words(4), "answer": words(6)} for _ in range(6)]
    (root / "qa.json").write_text(json.dumps(pairs))
    (root / "text.txt").write_text("\n".join(words(10) for _ in range(8)) + "\n")
    return root


def run_cli(workspace, out, *extra):
    return cli.main(["finetune", "--model", str(workspace / "model"), "--epochs", "2", "--lr", "1e-3",
                     "--batch-size", "4", "--micro-batch-size", "2", "--out", str(out), *extra])  # fmt: skip


def test_cli_finetunes_qa_and_writes_a_loadable_model(workspace, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = workspace / "qa-run"
    assert run_cli(workspace, out, "--data", str(workspace / "qa.json"), "--qa", "--template", "plain") == 0
    assert "fine-tuned: 4 steps" in capsys.readouterr().out  # 6 pairs, batch 4: 2 updates per epoch
    log = json.loads((out / "log.json").read_text())
    assert log["data"]["labels"] and log["data"]["rows"] == 6 and log["warmup_steps"] == 2
    assert log["data"]["targets"] == 6 * 7  # each answer's 6 words and eos
    assert sorted(p.name for p in out.iterdir()) == ["log.json", "model"]
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert AutoTokenizer.from_pretrained(out / "model")("w1 w2")["input_ids"] == [7, 8]
    trained = dict(model.named_parameters())
    assert any(not torch.equal(trained[n], p) for n, p in tiny_model("gpt_neo").named_parameters())
    assert run_cli(workspace, out, "--data", str(workspace / "qa.json"), "--qa") == 0  # the same run, finished
    assert capsys.readouterr().out.startswith("already finished: model in ")
    assert run_cli(workspace, out, "--data", str(workspace / "qa.json"), "--qa", "--epochs", "3") == 2  # another
    assert "holds a finished run with another config (fields ['epochs'])" in capsys.readouterr().err


def test_cli_text_interrupt_resume_and_errors(workspace, capsys, monkeypatch):
    out = workspace / "text-run"
    args = ("--data", str(workspace / "text.txt"), "--seq-len", "8")
    real_step, calls = ft.sft_step, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 4:  # in the second epoch (88 tokens -> 11 blocks of 8, batch 4: 3 updates per epoch)
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(ft, "sft_step", interrupted)
    assert run_cli(workspace, out, *args) == 130
    assert "resumes from the last finished epoch" in capsys.readouterr().err
    monkeypatch.setattr(ft, "sft_step", real_step)
    assert run_cli(workspace, out, *args) == 0
    log = json.loads((out / "log.json").read_text())
    assert log["resumes"] == 1 and [s["step"] for s in log["steps"]] == [1, 2, 3, 4, 5, 6] and not log["data"]["labels"]
    capsys.readouterr()
    assert run_cli(workspace, workspace / "x", "--data", str(workspace / "missing.json"), "--qa") == 2
    assert "--data file not found" in capsys.readouterr().err
    assert run_cli(workspace, workspace / "x", *args, "--micro-batch-size", "0") == 2
    assert "micro_batch_size" in capsys.readouterr().err
    assert not (workspace / "x").exists()


def test_a_non_finite_loss_skips_the_update_and_the_log_stays_json(tmp_path):
    model = tiny_model("gpt_neo")
    with torch.no_grad():
        model.transformer.wte.weight[5:] = float("nan")  # every row has a token >= 5 before its answer
    log = finetune(model, qa_rows(), FinetuneConfig(epochs=1, batch_size=5), tmp_path / "out").log
    assert [s["updated"] for s in log["steps"]] == [False, False] and log["steps"][0]["loss"] is None
    assert log["epochs"][0]["loss"] is None and json.loads((tmp_path / "out" / "log.json").read_text())["epochs"]
