"""UnlearningCallback: the engine's stop rule at every epoch end of a Hugging Face Trainer (held-out or fixed
limits, EL only once MA meets its limit), and its argument errors."""

from __future__ import annotations

import copy

import pytest

from fastunlearn.data.text import SequenceSet
from fastunlearn.evals.metrics import extraction_likelihood, memorization_accuracy
from fastunlearn.integrations.hf import ForgetRetainDataset, UnlearningCallback, UnlearningTrainer
from tests.helpers.hf import EL_N, training_args
from tests.helpers.runs import as_set

pytestmark = pytest.mark.usefixtures("one_thread")


def forget_metrics(model, seqs: SequenceSet) -> tuple[float, float]:
    ma = memorization_accuracy(model, seqs.input_ids, seqs.attention_mask).mean().item()
    return ma, extraction_likelihood(model, seqs.input_ids, EL_N, attention_mask=seqs.attention_mask).mean().item()


def test_trainer_and_callback_unlearn_until_the_heldout_criterion(memorized_sets, tmp_path):
    base, sets = memorized_sets
    callback = UnlearningCallback(sets["forget"], sets["heldout"], el_n=EL_N, eval_batch_size=3)
    model = copy.deepcopy(base)
    args = training_args(tmp_path, num_train_epochs=30)
    assert args.remove_unused_columns
    trainer = UnlearningTrainer(
        model=model, args=args, train_dataset=ForgetRetainDataset(sets["forget"], sets["retain"]), callbacks=[callback]
    )
    trainer.train()
    before_ma, before_el = forget_metrics(base, sets["forget"])
    assert before_ma > 0.95 and before_el > 0.9  # memorized_sets: forgetting is real work
    assert callback.baseline == dict(zip(("ma", "el"), forget_metrics(base, sets["heldout"])))
    assert callback.criterion == {"stop": "heldout", **callback.baseline}
    history = callback.history
    assert 1 < len(history) < 30 and trainer.state.epoch == len(history)  # stopped early, at an epoch end
    assert [r["criterion_met"] for r in history] == [False] * (len(history) - 1) + [True]
    for record in history:  # EL only once MA meets its limit
        assert (record["forget_el"] is None) == (record["forget_ma"] > callback.criterion["ma"])
    ma, el = forget_metrics(model, sets["forget"])
    assert (ma, el) == (history[-1]["forget_ma"], history[-1]["forget_el"])
    assert ma <= callback.criterion["ma"] and el <= callback.criterion["el"] and model.training
    logged = [entry for entry in trainer.state.log_history if "forget_ma" in entry]
    assert [entry["forget_ma"] for entry in logged] == [record["forget_ma"] for record in history]
    losses = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == len(history)  # one step per epoch: batch size 4 = the forget set
    assert losses[0]["forget_loss"] > 1.5 and losses[-1]["forget_loss"] < 0.5 * losses[0]["forget_loss"]
    assert all(0 <= entry["forget_loss"] <= 2 and entry["retain_loss"] >= 0 for entry in losses)  # IHL in [0, 2]


def test_callback_never_stops_when_the_thresholds_are_not_met(memorized_sets, tmp_path):
    base, sets = memorized_sets
    callback = UnlearningCallback(sets["forget"], ma_threshold=0.0, el_threshold=0.0, el_n=EL_N)
    trainer = UnlearningTrainer(
        model=copy.deepcopy(base), args=training_args(tmp_path, num_train_epochs=2, logging_steps=2),
        train_dataset=ForgetRetainDataset(sets["forget"]), retain_weight=0.0, forget_loss="ga", callbacks=[callback],
    )  # fmt: skip
    trainer.train()
    assert trainer.state.epoch == 2 and callback.baseline is None
    records = [(record["epoch"], record["forget_el"], record["criterion_met"]) for record in callback.history]
    assert records == [(1, None, False), (2, None, False)]  # MA above 0: EL never measured
    (log,) = [entry for entry in trainer.state.log_history if "loss" in entry]  # both steps, averaged like loss
    assert log["forget_loss"] == pytest.approx(log["loss"], rel=1e-5) and log["retain_loss"] == 0


def test_callback_stops_at_fixed_thresholds_once_they_become_met(memorized_sets, tmp_path):
    base, sets = memorized_sets
    callback = UnlearningCallback(sets["forget"], ma_threshold=0.5, el_threshold=0.5, el_n=EL_N)
    trainer = UnlearningTrainer(
        model=copy.deepcopy(base), args=training_args(tmp_path, num_train_epochs=30),
        train_dataset=ForgetRetainDataset(sets["forget"], sets["retain"]), callbacks=[callback],
    )  # fmt: skip
    trainer.train()
    last = callback.history[-1]
    assert 1 < len(callback.history) < 30 and last["criterion_met"] and trainer.state.epoch == len(callback.history)
    assert last["forget_ma"] <= 0.5 and last["forget_el"] <= 0.5
    assert not any(record["criterion_met"] for record in callback.history[:-1])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "ma_threshold must be a number in \\[0, 1\\] when no heldout set is given, got None"),
        ({"ma_threshold": 0.3, "el_threshold": 1.5}, ValueError, "el_threshold must be a number in \\[0, 1\\]"),
        ({"heldout": "forget", "ma_threshold": 0.3}, ValueError, "ma_threshold is only used without a heldout set"),
        ({"heldout": "forget", "el_n": 0}, ValueError, "el_n must be an int >= 1, got 0"),
        ({"heldout": "forget", "eval_batch_size": 2.0}, ValueError, "eval_batch_size must be an int >= 1, got 2.0"),
        ({"heldout": "forget", "el_n": 16}, ValueError, "forget has a sequence of 16 tokens; EL_16 .* at least 17"),
        ({"heldout": "short"}, ValueError, "heldout has a sequence of 5 tokens; EL_5 .* at least 6"),
        ({"heldout": "ids"}, TypeError, "heldout must be a fastunlearn.data.SequenceSet, got Tensor"),
    ],
)
def test_callback_rejects_bad_arguments(memorized_sets, kwargs, error, match):
    forget = memorized_sets[1]["forget"]
    heldouts = {"forget": forget, "short": as_set(forget.input_ids, [16, 5, 16, 16]), "ids": forget.input_ids}
    options = {"el_n": EL_N, **kwargs}
    if "heldout" in options:
        options["heldout"] = heldouts[options["heldout"]]
    with pytest.raises(error, match=match):
        UnlearningCallback(forget, **options)


def test_callback_uses_the_engine_epoch_check():
    """EL is measured only once MA is within its limit, and the criterion is the engine's criterion_met."""
    from fastunlearn.engine.evaluation import criterion_met, epoch_check
    from fastunlearn.integrations.hf import callback

    assert callback.epoch_check is epoch_check
    calls = []
    criterion = {"stop": "threshold", "ma": 0.5, "el": 0.1}
    measured, met = epoch_check(lambda: 0.6, lambda: calls.append("el") or 0.0, criterion)
    assert measured == {"ma": 0.6, "el": None} and not met and calls == []
    measured, met = epoch_check(lambda: 0.5, lambda: 0.1, criterion)
    assert measured == {"ma": 0.5, "el": 0.1} and met == criterion_met(measured, criterion) is True
    assert epoch_check(lambda: 0.2, lambda: 0.2, criterion) == ({"ma": 0.2, "el": 0.2}, False)
