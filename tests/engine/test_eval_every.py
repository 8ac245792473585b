"""What a run measures and when: the forget MA every epoch (EL once MA is met), the retain and utility
perplexities before unlearning, after each task and every ``eval_every`` epochs (0: never per epoch); all
perplexity sets scored together, one teacher-forced pass per batch; the report and the plot show what was
measured; a resume is bit-equal; ``--eval-every`` on the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastunlearn import cli
from fastunlearn.data.text import SequenceSet, UnlearningData
from fastunlearn.engine import UnlearnConfig, evaluation, unlearn
from fastunlearn.engine import report as report_mod
from fastunlearn.evals.metrics import scoring, sequence_nll
from tests.helpers.runs import Interrupt, stop_at
from tests.helpers.tiny_models import tiny_model

SEQ_LEN = 12
BASE = {"params": "lora", "rank": 2, "alpha": 4.0, "el_n": 5, "micro_batch_size": 2, "max_epochs": 3,
        "min_epochs": 3, "stop": "threshold", "ma_threshold": 0.0, "el_threshold": 0.0, "eval_batch_size": 2,
        "eval_retain_max": 3, "lr": 1e-2, "eval_retain_ppl": True}  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def whole(ids: torch.Tensor, pad_last: int = 0) -> SequenceSet:
    mask = torch.ones_like(ids)
    if pad_last:
        mask[-1, -pad_last:] = 0
    return SequenceSet(ids, mask, torch.arange(len(ids)))


def sets(seed: int = 5) -> UnlearningData:
    ids = torch.randint(0, 64, (4 + 6 + 4 + 5 + 2, SEQ_LEN), generator=torch.Generator().manual_seed(seed))
    forget, retain, heldout, wiki, pile = ids.split([4, 6, 4, 5, 2])
    short = whole(pile[:, : SEQ_LEN - 3])  # another length: the sets are padded together
    return UnlearningData(whole(forget), whole(retain), whole(heldout),
                          utility={"wiki": whole(wiki, pad_last=4), "pile": short})  # fmt: skip


def direct_ppl(model, seqs: SequenceSet, limit: int | None = 3, seed: int = 0) -> float:
    sample = evaluation.seeded_sample(seqs, limit, seed)
    rows = [ids[: int(mask.sum())] for ids, mask in zip(sample.input_ids, sample.attention_mask)]
    nll, count = sequence_nll(model, rows)
    return math.exp(nll.sum().item() / count.sum().item())


def run(tmp_path, name: str, **overrides):
    return unlearn(tiny_model("gpt_neo"), sets(), UnlearnConfig(**{**BASE, **overrides}), tmp_path / name)


@pytest.mark.parametrize("value", [-1, 1.5, True, None, "2"])
def test_eval_every_is_validated(value):
    with pytest.raises((TypeError, ValueError), match="eval_every"):
        UnlearnConfig(eval_every=value)


def test_by_default_perplexities_only_before_and_after(tmp_path):
    data = sets()
    result = run(tmp_path, "run")
    log = result.log
    assert log["config"]["eval_every"] == 0
    epochs = log["tasks"][0]["epochs"]
    assert len(epochs) == 3 and all(e["retain_ppl"] is None and e["utility_ppl"] is None for e in epochs)
    assert all(e["forget_ma"] is not None for e in epochs)  # the stop rule's number, every epoch
    after = log["tasks"][0]["after"]
    assert after["retain_ppl"] == pytest.approx(direct_ppl(result.model, data.retain), rel=1e-5)
    expected = {name: direct_ppl(result.model, s) for name, s in data.utility.items()}
    assert after["utility_ppl"] == pytest.approx(expected, rel=1e-5)
    before = {name: direct_ppl(tiny_model("gpt_neo"), s) for name, s in data.utility.items()}
    assert log["baseline"]["utility_ppl"] == pytest.approx(before, rel=1e-5)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "measured before unlearning and after each forget set (eval_every=0)" in report
    assert "| 1 | " in report and (tmp_path / "run" / "metrics.png").stat().st_size > 0


def test_every_k_epochs_and_after_the_task(tmp_path):
    data = sets()
    every2, every1 = run(tmp_path, "k2", eval_every=2), run(tmp_path, "k1", eval_every=1)
    e2, e1 = every2.log["tasks"][0]["epochs"], every1.log["tasks"][0]["epochs"]
    assert [list(e) for e in e2] == [list(e) for e in e1]  # the same keys (null where not measured)
    assert [e["retain_ppl"] is not None for e in e2] == [False, True, False]
    assert [e["utility_ppl"] is not None for e in e2] == [False, True, False]
    assert all(e["retain_ppl"] is not None and set(e["utility_ppl"]) == {"wiki", "pile"} for e in e1)
    for a, b in zip(e2, e1, strict=True):  # measuring never changes training
        assert (a["forget_loss"], a["retain_loss"], a["grad_norm"], a["forget_ma"]) == (
            b["forget_loss"], b["retain_loss"], b["grad_norm"], b["forget_ma"])  # fmt: skip
    assert e2[1]["utility_ppl"] == e1[1]["utility_ppl"] and e2[1]["retain_ppl"] == e1[1]["retain_ppl"]
    # eval_every=1: the last epoch's values are the task's; eval_every=2: measured again when the task stopped
    assert every1.log["tasks"][0]["after"]["utility_ppl"] == e1[-1]["utility_ppl"]
    assert every2.log["tasks"][0]["after"]["utility_ppl"] == pytest.approx(e1[-1]["utility_ppl"], rel=1e-9)
    expected = {name: direct_ppl(every2.model, s) for name, s in data.utility.items()}
    assert every2.log["tasks"][0]["after"]["utility_ppl"] == pytest.approx(expected, rel=1e-5)
    report = (tmp_path / "k2" / "report.md").read_text()
    assert "before unlearning, every 2 epochs and after each forget set (eval_every=2; – = not measured)" in report


def test_every_perplexity_set_is_scored_in_the_same_passes(monkeypatch):
    """retain + wiki + pile samples (3 + 3 + 2 rows) in passes of eval_batch_size rows, no separate pass per set;
    each set's value equals its own sliding-window perplexity."""
    data, model = sets(), tiny_model("gpt_neo")
    cfg = UnlearnConfig(**{**BASE, "eval_batch_size": 4})
    calls = []
    original = scoring.score_batch
    monkeypatch.setattr(scoring, "score_batch", lambda *a, **k: calls.append(a[1].shape) or original(*a, **k))
    retain, utility = evaluation.retain_and_utility_ppl(model, data.retain, data.utility, cfg, "test")
    assert [tuple(s) for s in calls] == [(4, SEQ_LEN), (4, SEQ_LEN)]  # 8 rows, two passes
    assert retain == pytest.approx(direct_ppl(model, data.retain), rel=1e-5)
    assert utility == pytest.approx({name: direct_ppl(model, s) for name, s in data.utility.items()}, rel=1e-5)
    none = UnlearnConfig(**{**BASE, "eval_retain_ppl": False})
    assert evaluation.retain_and_utility_ppl(model, data.retain, None, none, "") == (None, None)


def test_labels_of_a_set_are_kept_when_sets_are_joined():
    data, model = sets(), tiny_model("gpt_neo")
    labels = data.retain.input_ids.clone()
    labels[:, :5] = -100  # a prompt
    qa = SequenceSet(data.retain.input_ids, data.retain.attention_mask, data.retain.source_index, labels)
    cfg = UnlearnConfig(**{**BASE, "eval_retain_max": None})
    together = evaluation.perplexities(model, {"qa": qa, "wiki": data.utility["wiki"]}, cfg, "")
    apart = {"qa": evaluation.sample_ppl(model, qa, cfg, ""), "wiki": evaluation.sample_ppl(model, data.utility["wiki"],
                                                                                       cfg, "")}  # fmt: skip
    assert together == pytest.approx(apart, rel=1e-6)
    rows = [ids for ids in qa.input_ids]
    nll, count = sequence_nll(model, rows, labels=list(labels))
    assert together["qa"] == pytest.approx(math.exp(nll.sum().item() / count.sum().item()), rel=1e-5)


def untimed(tasks: list[dict]) -> list[dict]:
    return [{**t, "epochs": [{k: v for k, v in e.items() if not k.endswith("_s")} for e in t["epochs"]]} for t in tasks]


@pytest.mark.parametrize("epoch", [1, 3])  # 3: interrupted after the last epoch, before the task's measurements
def test_a_resumed_run_is_bit_equal_with_eval_every(tmp_path, epoch):
    config = UnlearnConfig(**{**BASE, "eval_every": 2})
    straight = unlearn(tiny_model("gpt_neo"), sets(), config, tmp_path / "straight").log
    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        unlearn(tiny_model("gpt_neo"), sets(), config, out, on_epoch_end=stop_at(epoch=epoch))
    resumed = unlearn(tiny_model("gpt_neo"), sets(), config, out).log
    assert resumed["resumes"] == 1
    assert json.dumps(untimed(resumed["tasks"])) == json.dumps(untimed(straight["tasks"]))
    assert json.dumps(resumed["baseline"]) == json.dumps(straight["baseline"])


def test_the_plot_leaves_out_what_was_not_measured(tmp_path, monkeypatch):
    log = run(tmp_path, "run", eval_every=2).log
    drawn = []
    original = report_mod.measured
    monkeypatch.setattr(report_mod, "measured", lambda x, ys: drawn.append(original(x, ys)) or drawn[-1])
    report_mod.write_plot(tmp_path / "again.png", log)
    retain_x, retain_y = drawn[0]
    assert retain_x == [0, 2, 3] and None not in retain_y  # before, epoch 2, the task's end
    assert retain_y[-1] == log["tasks"][0]["after"]["retain_ppl"]


def test_cli_eval_every(workspace, tmp_path):
    argv = ["unlearn", "--model", str(workspace / "model"), "--forget", str(workspace / "forget.txt"), "--retain",
            str(workspace / "retain.txt"), "--heldout", str(workspace / "heldout.txt"), "--params", "lora", "--rank",
            "2", "--max-epochs", "2", "--min-epochs", "2", "--seq-len", "12"]  # fmt: skip
    assert cli.main([*argv, "--out", str(tmp_path / "a"), "--eval-every", "1"]) in (0, 1)
    log = json.loads((tmp_path / "a" / "log.json").read_text())
    assert log["config"]["eval_every"] == 1 and all(e["retain_ppl"] for e in log["tasks"][0]["epochs"])
    assert cli.main([*argv, "--out", str(tmp_path / "b"), "--eval-every", "-1"]) == 2


def test_sequences_longer_than_the_context_go_through_sliding_windows():
    data, model = sets(), tiny_model("gpt_neo")
    model.config.max_position_embeddings = 8  # shorter than SEQ_LEN: windows of 8 tokens, stride 4
    cfg = UnlearnConfig(**{**BASE, "eval_retain_max": None})
    value = evaluation.perplexities(model, {"retain": data.retain}, cfg, "")["retain"]
    nll, count = sequence_nll(model, list(data.retain.input_ids))
    assert value == pytest.approx(math.exp(nll.sum().item() / count.sum().item()), rel=1e-6)
    model.config.max_position_embeddings = 2048
    assert abs(evaluation.perplexities(model, {"retain": data.retain}, cfg, "")["retain"] / value - 1) > 1e-4
