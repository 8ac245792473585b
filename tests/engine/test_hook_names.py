"""One name per kind of hook: ``evaluate_each_epoch`` (an evaluation whose values are logged) and ``on_epoch_end``
(a callback after each epoch's checkpoint, as in ``finetune``); ``on_epoch`` still works, with a warning."""

from __future__ import annotations

import warnings

import pytest
import torch

from fastunlearn.data.text import SequenceSet
from fastunlearn.engine import UnlearnConfig, unlearn
from fastunlearn.engine.recipe import UnlearnRecipe
from tests.helpers.tiny_models import VOCAB, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = {"params": "lora", "rank": 2, "alpha": 4.0, "lr": 1e-2, "el_n": 3, "micro_batch_size": 2, "stop": "epochs",
          "max_epochs": 2, "retain_weight": 0.0}  # fmt: skip


def forget() -> list[SequenceSet]:
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    return [SequenceSet(ids, torch.ones_like(ids), torch.arange(2))]


def hook(model, epoch: int) -> dict:
    return {"epoch": float(epoch), "first_weight": float(next(model.parameters()).flatten()[0])}


def run(out, **hooks):
    return unlearn(tiny_model("gpt_neo"), forget(), UnlearnConfig(**CONFIG), out, **hooks)


def hook_values(log: dict) -> list[dict]:
    return [log["baseline"]["on_epoch"], *(e["on_epoch"] for e in log["tasks"][0]["epochs"])]


def test_the_old_keyword_warns_and_logs_what_the_new_one_logs(tmp_path):
    ends = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = run(tmp_path / "new", evaluate_each_epoch=hook, on_epoch_end=lambda k, record: ends.append(record))
    assert not [w for w in caught if "deprecated" in str(w.message) and "on_epoch" in str(w.message)]
    with pytest.warns(
        DeprecationWarning, match="on_epoch= is deprecated: pass the same hook as evaluate_each_epoch="
    ) as got:
        old = run(tmp_path / "old", on_epoch=hook)
    assert [w.filename for w in got if w.category is DeprecationWarning] == [__file__]  # points at the caller
    assert hook_values(new.log) == hook_values(old.log) and [v["epoch"] for v in hook_values(new.log)] == [0, 1, 2]
    assert [record["epoch"] for record in ends] == [1, 2] and ends[-1]["on_epoch"]["epoch"] == 2.0


def test_the_recipe_takes_both_names_and_refuses_both_at_once(tmp_path):
    with pytest.warns(DeprecationWarning) as got:
        recipe = UnlearnRecipe(tiny_model("gpt_neo"), forget(), UnlearnConfig(**CONFIG), tmp_path / "a", on_epoch=hook)
    assert recipe.evaluate_each_epoch is hook and got[0].filename == __file__
    assert UnlearnRecipe(tiny_model("gpt_neo"), forget(), UnlearnConfig(**CONFIG), tmp_path / "b",
                         evaluate_each_epoch=hook).evaluate_each_epoch is hook  # fmt: skip
    with pytest.raises(TypeError, match="pass evaluate_each_epoch .* or the deprecated on_epoch, not both"):
        run(tmp_path / "c", evaluate_each_epoch=hook, on_epoch=hook)
    with pytest.raises(TypeError, match="evaluate_each_epoch must be a callable"), pytest.warns(DeprecationWarning):
        run(tmp_path / "d", on_epoch={"a": 1.0})
    assert not any((tmp_path / name).exists() for name in "abcd")
