"""stop="epochs" (exactly max_epochs epochs, no criterion, no held-out set needed) and the ``on_epoch`` evaluation
hook (before unlearning and after every epoch, into log.json, the report and the plot)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from fastunlearn.cli.app import build_parser
from fastunlearn.data.text import SequenceSet, UnlearningData
from fastunlearn.engine import STOPS, UnlearnConfig, unlearn
from fastunlearn.evals.metrics import memorization_accuracy
from tests.helpers import runs

FAST = {"params": "lora", **runs.FAST}

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder:
    """An on_epoch hook: the forget MA it measures itself, the mode it was called in, a constant and a NaN."""

    def __init__(self, forget: SequenceSet) -> None:
        self.forget, self.calls = forget, []

    def __call__(self, model, epoch: int) -> dict:
        self.calls.append((epoch, model.training, torch.is_grad_enabled()))
        ma = memorization_accuracy(model, self.forget.input_ids, self.forget.attention_mask).mean()
        return {"my_ma": ma, "epoch_twice": 2 * epoch, "undefined": math.nan}


@pytest.fixture(scope="module")
def epochs_run(memorized_sets, tmp_path_factory):
    base, sets = memorized_sets
    hook = Recorder(sets["forget"])
    data = UnlearningData(sets["forget"], sets["retain"])  # no held-out set: stop="epochs" needs none
    config = UnlearnConfig(**FAST, stop="epochs", max_epochs=3)
    out = tmp_path_factory.mktemp("epochs") / "run"
    result = unlearn(copy.deepcopy(base), data, config, out, evaluate_each_epoch=hook)
    return result, hook


def test_stop_epochs_runs_exactly_max_epochs_without_a_criterion(epochs_run):
    result, _ = epochs_run
    log = result.log
    task = log["tasks"][0]
    assert [e["epoch"] for e in task["epochs"]] == [1, 2, 3]
    assert task["stop_reason"] == "ran the 3 epochs of stop='epochs'" and task["success"] and result.success
    assert log["criterion"] == {"stop": "epochs", "ma": None, "el": None}
    assert all(e["criterion_met"] is None and e["forget_el"] is None for e in task["epochs"])  # EL: never
    assert log["baseline"]["forget"][0]["el"] is None and 0 < log["baseline"]["forget"][0]["ma"] <= 1
    after = task["after"]["forget"][0]
    assert after == {"ma": task["epochs"][-1]["forget_ma"], "el": None, "met": None}
    assert task["after"]["heldout"] is None and log["data"]["heldout"] is None


def test_stop_epochs_keeps_going_after_the_forget_set_is_forgotten(memorized_sets, tmp_path):
    """A criterion met early stops a threshold run there; stop="epochs" runs every epoch, the same ones first."""
    base, sets = memorized_sets
    data = UnlearningData(sets["forget"], sets["retain"], sets["heldout"])
    fast = {**FAST, "lr": 0.2}
    criterion = UnlearnConfig(**fast, max_epochs=4, stop="threshold", ma_threshold=0.5, el_threshold=1.0)
    heldout = unlearn(copy.deepcopy(base), data, criterion, tmp_path / "h")
    stopped_at = len(heldout.log["tasks"][0]["epochs"])
    assert heldout.success and stopped_at < 4
    epochs = unlearn(copy.deepcopy(base), data, UnlearnConfig(**fast, stop="epochs", max_epochs=4), tmp_path / "e")
    assert len(epochs.log["tasks"][0]["epochs"]) == 4 and epochs.success
    first = [e["forget_ma"] for e in epochs.log["tasks"][0]["epochs"][:stopped_at]]
    assert first == pytest.approx([e["forget_ma"] for e in heldout.log["tasks"][0]["epochs"]], abs=1e-9)


def test_on_epoch_runs_before_and_after_every_epoch_in_eval_mode_without_gradients(epochs_run):
    result, hook = epochs_run
    assert hook.calls == [(epoch, False, False) for epoch in range(4)]
    log = json.loads((result.out_dir / "log.json").read_text())
    values = [log["baseline"]["on_epoch"], *(e["on_epoch"] for e in log["tasks"][0]["epochs"])]
    assert [v["epoch_twice"] for v in values] == [0.0, 2.0, 4.0, 6.0]
    assert all(v["undefined"] is None for v in values)  # NaN is recorded as None (JSON has no NaN)
    assert values[0]["my_ma"] == pytest.approx(log["baseline"]["forget"][0]["ma"], abs=1e-6)
    assert [v["my_ma"] for v in values[1:]] == pytest.approx([e["forget_ma"] for e in log["tasks"][0]["epochs"]])
    assert values[-1]["my_ma"] < values[0]["my_ma"]  # the hook sees the model being unlearned


def test_on_epoch_values_in_the_report_and_the_plot(epochs_run):
    result, _ = epochs_run
    report = (result.out_dir / "report.md").read_text()
    assert "Criterion: none: stop='epochs' runs exactly 3 epochs per forget set" in report
    assert "every forget set ran its 3 epochs" in report
    header = next(line for line in report.splitlines() if line.startswith("| epoch |"))
    assert header.endswith("| my_ma | epoch_twice | undefined | criterion |")
    last = [line for line in report.splitlines() if line.startswith("| 3 |")][0]
    assert last.endswith("| 6.0000 | – | – |")
    assert "## on_epoch values before unlearning" in report
    assert (result.out_dir / "metrics.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "returned, message",
    [
        ([1.0], "evaluate_each_epoch must return a dict"),
        ({"a": "x"}, "evaluate_each_epoch value 'a' must be a number or None"),
        ({"a": True}, "evaluate_each_epoch value 'a' must be a number or None"),
        ({"": 1.0}, "evaluate_each_epoch must return non-empty string keys"),
    ],
)
def test_on_epoch_bad_values_are_one_line_errors(memorized_sets, tmp_path, returned, message):
    base, sets = memorized_sets
    config = UnlearnConfig(**FAST, stop="epochs", max_epochs=1, retain_weight=0.0)
    with pytest.raises((TypeError, ValueError), match=message):
        unlearn(copy.deepcopy(base), [sets["forget"]], config, tmp_path / "run",
                evaluate_each_epoch=lambda m, e: returned)  # fmt: skip


def test_on_epoch_must_be_callable(memorized_sets, tmp_path):
    base, sets = memorized_sets
    config = UnlearnConfig(**FAST, stop="epochs", max_epochs=1, retain_weight=0.0)
    with pytest.raises(TypeError, match="evaluate_each_epoch must be a callable"):
        unlearn(copy.deepcopy(base), [sets["forget"]], config, tmp_path / "run", evaluate_each_epoch={"a": 1.0})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"ma_threshold": 0.3}, r"ma_threshold is only used with stop='threshold' \(stop='epochs' has no criterion\)"),
        ({"el_threshold": 0.1}, "el_threshold is only used with stop='threshold'"),
        ({"min_epochs": 2, "max_epochs": 5}, "min_epochs is not used with stop='epochs'"),
        ({"stop": "epoch"}, "stop must be one of"),
    ],
)
def test_stop_epochs_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        UnlearnConfig(**{"stop": "epochs", **overrides})


def test_cli_stop_choices_are_the_engine_stops():
    parser = build_parser()
    unlearn_parser = next(a for a in parser._actions if a.dest == "command").choices["unlearn"]
    stop = next(a for a in unlearn_parser._actions if a.dest == "stop")
    assert tuple(stop.choices) == STOPS and stop.default is None
    args = parser.parse_args(["unlearn", "--model", "m", "--forget", "f", "--out", "o", "--stop", "epochs"])
    assert args.stop == "epochs"


def test_cli_unlearn_qa_stop_epochs_without_a_heldout_set(tmp_path, capsys):
    """TOFU's command: question/answer sets, no held-out set, exactly --max-epochs epochs (exit 0)."""
    from fastunlearn import cli
    from tests.helpers.qa import WORDS, make_tokenizer
    from tests.helpers.tiny_models import tiny_model

    tok = make_tokenizer()
    tiny_model("gpt_neo").save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rng = torch.Generator().manual_seed(0)
    for name, n in (("forget", 4), ("retain", 6)):
        rows = [{"question": " ".join(WORDS[2 + int(i)] for i in torch.randint(0, 8, (3,), generator=rng)),
                 "answer": " ".join(WORDS[2 + int(i)] for i in torch.randint(0, 8, (6,), generator=rng))}
                for _ in range(n)]  # fmt: skip
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    common = ["unlearn", "--model", str(tmp_path / "model"), "--forget", str(tmp_path / "forget.jsonl"), "--retain",
              str(tmp_path / "retain.jsonl"), "--qa", "--template", "plain", "--params", "lora", "--rank", "2",
              "--stop", "epochs", "--max-epochs", "2"]  # fmt: skip
    assert cli.main([*common, "--out", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert log["criterion"]["stop"] == "epochs" and len(log["tasks"][0]["epochs"]) == 2 and log["success"]
    assert cli.main([*common, "--ma-threshold", "0.1", "--out", str(tmp_path / "refused")]) == 2
    assert "ma_threshold is only used with stop='threshold'" in capsys.readouterr().err
