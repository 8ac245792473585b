"""deploy_quant: the stop rule also measures the model deployed in a quantization format against the held-out set's
values on the original model deployed the same way; a run succeeds only when both meet the criterion. On a tiny
memorizer whose weights sit on the Q4_1 grid (as a model read from a Q4_1 GGUF file), plain unlearning meets the
float criterion while the deployed model still reproduces the forget set; quant_aware (straight-through
training) makes the forgetting hold."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fastunlearn.data.text import SequenceSet, UnlearningData
from fastunlearn.engine import UnlearnConfig, unlearn
from fastunlearn.engine.config import DEPLOY_QUANTS
from fastunlearn.evals.metrics import extraction_likelihood, memorization_accuracy
from fastunlearn.ops import quant
from tests.helpers.tiny_models import MemorizerConfig, memorize, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
DEMO = MemorizerConfig(vocab_size=32, seq_len=16, n_forget=4, n_retain=8, n_heldout=8, memorize_steps=150)
# full weights at a small lr: each update is below half a Q4_1 step of most weights
SLOW = {"params": "full", "lr": 3e-4, "el_n": 5, "micro_batch_size": 2, "stop": "threshold",
        "ma_threshold": 0.6, "el_threshold": 0.6, "cache_heldout_baseline": False}  # fmt: skip


def as_set(ids: torch.Tensor) -> SequenceSet:
    return SequenceSet(ids, torch.ones_like(ids), torch.arange(len(ids)))


@pytest.fixture(scope="module")
def on_grid(one_thread):
    """The memorizer with every weight matrix on the Q4_1 grid (its own Q4_1 round trip)."""
    model, sets = memorize(DEMO)
    quant.roundtrip_model(model.eval(), "q4_1", backup=False, progress=False)
    return model, UnlearningData(as_set(sets["forget"]), as_set(sets["retain"]), as_set(sets["heldout"]))


def run(on_grid, out, **overrides):
    model, data = on_grid
    return unlearn(copy.deepcopy(model), data, UnlearnConfig(**{**SLOW, **overrides}), out)


def deployed_metrics(model, ids, fmt="q4_1") -> dict:
    with quant.roundtrip_model(model, fmt, progress=False):
        return {"ma": memorization_accuracy(model, ids).mean().item(),
                "el": extraction_likelihood(model, ids, n=5).mean().item()}  # fmt: skip


@pytest.fixture(scope="module")
def float_only(on_grid, tmp_path_factory):
    return run(on_grid, tmp_path_factory.mktemp("float") / "run", max_epochs=12)


@pytest.fixture(scope="module")
def deployed(on_grid, tmp_path_factory):
    return run(on_grid, tmp_path_factory.mktemp("deployed") / "run", max_epochs=12, deploy_quant="q4_1")


def test_float_criterion_is_met_while_the_deployed_model_still_remembers(float_only, on_grid):
    """The failure deploy_quant exists for: success in float, the forget set back after a Q4_1 round trip."""
    assert float_only.success
    after = deployed_metrics(float_only.model, on_grid[1].forget.input_ids)
    assert after["ma"] > 0.8 > 0.6  # far above the criterion: the update was snapped back


def test_deploy_quant_refuses_that_success_and_logs_both_models(deployed, float_only, on_grid):
    log = deployed.log
    assert not deployed.success and log["deploy"]["format"] == "q4_1"
    assert log["deploy"]["criterion"] == log["criterion"]  # stop="threshold": the same limits
    assert log["deploy"]["forget"] == [deployed_metrics(on_grid[0], on_grid[1].forget.input_ids)]
    epochs = log["tasks"][0]["epochs"]
    float_met = [e for e in epochs if e["forget_el"] is not None and e["forget_ma"] <= 0.6 and e["forget_el"] <= 0.6]
    assert float_met and all(e["deploy"] is not None and not e["criterion_met"] for e in float_met)
    assert all(e.get("deploy") is None for e in epochs if e not in float_met)  # measured only where it decides
    assert len(epochs) == 12 and "max_epochs (12) reached" in log["tasks"][0]["stop_reason"]
    # the epochs before the float criterion are the float-only run's, bit for bit
    first = epochs.index(float_met[0])
    assert [e["forget_ma"] for e in epochs[: first + 1]] == [
        e["forget_ma"] for e in float_only.log["tasks"][0]["epochs"][: first + 1]
    ]
    after = log["tasks"][0]["after"]["deploy"]
    assert after["forget"][0] == {**deployed_metrics(deployed.model, on_grid[1].forget.input_ids), "met": False}
    report = (deployed.out_dir / "report.md").read_text()
    assert "deployed in Q4_1" in report and "| Q4_1 MA | Q4_1 EL_5 |" in report and "forget set 1, Q4_1" in report
    assert (deployed.out_dir / "metrics.png").stat().st_size > 0


def test_quant_aware_training_makes_the_forgetting_hold_where_plain_training_does_not(float_only, on_grid, tmp_path):
    """The remedy: the deployed criterion with quantization-aware training. The float-only run's model fails at
    Q4_1 by a wide margin (test above); the remedy's meets the criterion at Q4_1 (measured here, not read from the
    log), and training at the quantized weights keeps the deployed values next to the float ones."""
    aware = run(on_grid, tmp_path / "aware", max_epochs=20, deploy_quant="q4_1", quant_aware="q4_1")
    assert aware.success
    after = aware.log["tasks"][0]["after"]
    measured = deployed_metrics(aware.model, on_grid[1].forget.input_ids)
    assert after["deploy"]["forget"][0] == {**measured, "met": True} and measured["ma"] <= 0.6
    assert after["forget"][0]["met"]
    gaps = [e["deploy"]["ma"] - e["forget_ma"] for e in aware.log["tasks"][0]["epochs"] if e.get("deploy")]
    plain_stop = float_only.log["tasks"][0]["epochs"][-1]
    plain_gap = deployed_metrics(float_only.model, on_grid[1].forget.input_ids)["ma"] - plain_stop["forget_ma"]
    assert gaps and max(gaps) < 0.1 < 0.3 < plain_gap


def test_the_deployed_heldout_baseline_is_cached_like_the_float_one(on_grid, tmp_path):
    options = {"max_epochs": 1, "deploy_quant": "q8_0", "stop": "heldout", "ma_threshold": None,
               "el_threshold": None, "cache_heldout_baseline": True}  # fmt: skip
    first = run(on_grid, tmp_path / "a", **options)
    second = run(on_grid, tmp_path / "b", **options)
    assert first.log["deploy"]["baseline_cache"]["hit"] is False and second.log["deploy"]["baseline_cache"]["hit"]
    assert first.log["deploy"]["heldout"] == second.log["deploy"]["heldout"]
    assert first.log["deploy"]["criterion"] == {"stop": "heldout", **first.log["deploy"]["heldout"]}
    assert first.log["deploy"]["baseline_cache"]["file"] != first.log["baseline_cache"]["file"]  # a key of its own
    q4 = run(on_grid, tmp_path / "c", **{**options, "deploy_quant": "q4_0"})
    assert q4.log["deploy"]["baseline_cache"]["hit"] is False  # another format: another entry


class Interrupt(Exception):
    pass


def test_an_interrupted_run_with_deploy_quant_resumes_to_the_uninterrupted_result(deployed, on_grid, tmp_path):
    out = tmp_path / "run"

    def stop_at_8(k, record):
        if record["epoch"] == 8:
            raise Interrupt

    model, data = on_grid
    config = UnlearnConfig(**SLOW, max_epochs=12, deploy_quant="q4_1")
    with pytest.raises(Interrupt):
        unlearn(copy.deepcopy(model), data, config, out, on_epoch_end=stop_at_8)
    resumed = unlearn(copy.deepcopy(model), data, config, out)

    def comparable(log):
        log = json.loads(json.dumps(log))
        log["deploy"].pop("seconds")
        for task in log["tasks"]:
            for epoch in task["epochs"]:
                epoch["train_s"] = epoch["eval_s"] = 0
        return {k: v for k, v in log.items() if k not in ("timings", "resumes", "baseline_cache")}

    assert comparable(resumed.log) == comparable(deployed.log)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"deploy_quant": "q3_k"}, r"deploy_quant must be one of \('none', 'q8_0'"),
        ({"quant_aware": "int8"}, "quant_aware must be one of"),
        ({"deploy_quant": "gguf"}, "deploy_quant='gguf' takes the tensor types of the GGUF file .*: set gguf_template"),
        ({"quant_aware": "gguf"}, "quant_aware='gguf' takes"),
        ({"deploy_quant": "q4_1", "parallel": "fsdp"}, r"sharded \(parallel='fsdp'\) weights are not"),
        ({"gguf_template": ""}, "gguf_template must be a GGUF file's path or None"),
        ({"write_gguf": 1}, "write_gguf must be a bool"),
    ],
)
def test_bad_deploy_options_are_refused_naming_the_field(overrides, match):
    with pytest.raises((ValueError, TypeError), match=match):
        UnlearnConfig(**overrides)


def test_a_format_the_model_cannot_be_stored_in_is_refused_before_any_compute(on_grid, tmp_path):
    config = UnlearnConfig(**{**SLOW, "deploy_quant": "nf4"})
    with pytest.raises(ValueError, match=r"cannot be stored as nf4: its rows of 32 weights"):  # hidden 32
        unlearn(tiny_model("gpt_neo"), on_grid[1], config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert DEPLOY_QUANTS == ("none", *quant.FORMATS, "gguf")
