"""The unlearning run on a tiny memorizer: the paper's criterion is reached, the stop rule, gradient
accumulation, continual unlearning, checkpoint/resume, outputs that reload, and the errors."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from fastunlearn.data.text import SequenceSet, UnlearningData, split_tasks
from fastunlearn.engine import UnlearnConfig, unlearn
from fastunlearn.evals.metrics import extraction_likelihood, memorization_accuracy
from fastunlearn.lora.layer import lora_layers
from fastunlearn.losses import shift_causal
from fastunlearn.ops.ihl import ihl_loss
from tests.helpers.runs import DEMO, FAST, NEVER, Interrupt, stop_at

TIMING_KEYS = ("timings", "resumes", "baseline_cache")  # how this session ran, not what it found


pytestmark = pytest.mark.usefixtures("one_thread")


def run(memorized, out_dir, data=None, model=None, **overrides):
    base, default_data = memorized
    config = UnlearnConfig(**{**FAST, **overrides.pop("config", {}), **overrides})
    model = copy.deepcopy(base) if model is None else model
    return unlearn(model, default_data if data is None else data, config, out_dir)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def without_timings(log: dict) -> dict:
    log = {k: v for k, v in log.items() if k not in TIMING_KEYS}
    log["tasks"] = [{**t, "epochs": [{k: v for k, v in e.items() if not k.endswith("_s")} for e in t["epochs"]]}
                    for t in log["tasks"]]  # fmt: skip
    return log


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(DEMO.vocab_size)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))


@pytest.fixture(scope="module")
def fila_run(memorized, tmp_path_factory):
    base, data = memorized
    out = tmp_path_factory.mktemp("fila") / "run"
    config = UnlearnConfig(**FAST, params="fila", max_epochs=30, eval_retain_ppl=True)
    return unlearn(copy.deepcopy(base), data, config, out, tokenizer=tiny_tokenizer())


# ---------------------------------------------------------------------------------------------------------
# The paper's setting: FILA + IHL until the held-out criterion
# ---------------------------------------------------------------------------------------------------------
def test_fila_ihl_reaches_the_heldout_criterion_and_stops_at_the_first_epoch_meeting_it(fila_run, memorized):
    data = memorized[1]
    log, crit = fila_run.log, fila_run.log["criterion"]
    task = log["tasks"][0]
    epochs = task["epochs"]
    assert log["baseline"]["forget"][0]["ma"] > 0.95  # memorized, so forgetting is real work
    assert (crit["ma"], crit["el"]) == (log["baseline"]["heldout"]["ma"], log["baseline"]["heldout"]["el"])
    assert fila_run.success and task["success"] and log["success"] and log["status"] == "finished"
    assert [e["criterion_met"] for e in epochs] == [False] * (len(epochs) - 1) + [True]
    assert task["stop_reason"] == f"criterion met at epoch {len(epochs)}" and len(epochs) > 1
    for e in epochs:  # EL only once MA meets its limit; the criterion recomputed from the recorded values
        assert (e["forget_el"] is None) == (e["forget_ma"] > crit["ma"])
        assert e["criterion_met"] == (e["forget_el"] is not None and e["forget_el"] <= crit["el"])
        assert e["retain_ppl"] is None and e["updated"]  # eval_every=0: perplexities before and after only
    assert task["after"]["retain_ppl"] is not None and log["baseline"]["retain_ppl"] is not None
    model = fila_run.model
    ma = memorization_accuracy(model, data.forget.input_ids).mean().item()
    el = extraction_likelihood(model, data.forget.input_ids, n=5).mean().item()
    assert ma <= crit["ma"] and el <= crit["el"]
    assert task["after"]["forget"] == [{"ma": ma, "el": el, "met": True}]
    assert 0 < log["model"]["trainable_percent"] < 10


def test_ihl_stays_in_its_bounds_on_every_micro_batch(fila_run, memorized):
    base, data = memorized
    epochs = fila_run.log["tasks"][0]["epochs"]
    for e in epochs:
        low, high = e["forget_loss_range"]
        assert 0.0 <= low <= e["forget_loss"] <= high <= 2.0
    ids = data.forget.input_ids  # FILA leaves the model unchanged at init: epoch 1's loss is the base model's
    assert epochs[0]["forget_loss"] == pytest.approx(ihl_loss(*shift_causal(logits(base, ids), ids)).item(), abs=1e-4)
    assert epochs[0]["forget_loss"] > 1.5 and epochs[-1]["forget_loss"] < 1.0


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft on transformers 5
def test_outputs_exist_and_reload(fila_run, memorized):
    peft = pytest.importorskip("peft")
    base, data = memorized
    out = fila_run.out_dir
    assert json.loads((out / "log.json").read_text()) == fila_run.log
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "log.json", "merged", "metrics.png", "report.md"]
    assert (out / "metrics.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    report = (out / "report.md").read_text()
    assert "**Result: SUCCESS.** " in report and "Outcome: every forget set met the criterion." in report
    assert "Retain perplexity" in report
    verdicts = [line.rsplit("|", 2)[1].strip() for line in report.splitlines() if re.match(r"\| \d+ \|", line)]
    assert verdicts == ["not met"] * (len(fila_run.log["tasks"][0]["epochs"]) - 1) + ["met"]  # the epoch table
    probe = torch.cat([data.forget.input_ids, data.heldout.input_ids])
    expected = logits(fila_run.model, probe)
    assert (expected - logits(base, probe)).abs().max() > 1e-2  # else reproducing it proves nothing
    adapter = peft.PeftModel.from_pretrained(copy.deepcopy(base), out / "adapter").eval()
    torch.testing.assert_close(logits(adapter, probe), expected, atol=1e-4, rtol=1e-4)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    torch.testing.assert_close(logits(merged, probe), expected, atol=1e-4, rtol=1e-4)
    assert AutoTokenizer.from_pretrained(out / "merged").convert_tokens_to_ids("t7") == 7


# ---------------------------------------------------------------------------------------------------------
# Objective, stop rule, accumulation
# ---------------------------------------------------------------------------------------------------------
def test_gradient_ascent_alone_on_all_parameters_from_a_plain_list_of_forget_sets(memorized, tmp_path):
    result = run(memorized, tmp_path / "ga", [memorized[1].forget], forget_loss="ga", retain_weight=0.0,
                 params="full", lr=1e-3, max_epochs=3, config=NEVER)  # fmt: skip
    assert result.log["baseline"]["heldout"] is None and result.log["data"]["retain"] is None
    epochs = result.log["tasks"][0]["epochs"]
    losses = [e["forget_loss"] for e in epochs]
    assert all(e["retain_loss"] is None for e in epochs) and losses == sorted(losses, reverse=True) and losses[0] < 0
    assert all(e["forget_loss_range"][1] < 0 for e in epochs)  # negated cross-entropy
    assert result.log["model"]["trainable_percent"] == 100.0 and not (result.out_dir / "adapter").exists()
    merged = AutoModelForCausalLM.from_pretrained(result.out_dir / "merged").eval()
    ids = memorized[1].forget.input_ids
    torch.testing.assert_close(logits(merged, ids), logits(result.model, ids))


def test_stop_rule_respects_min_epochs(memorized, tmp_path, caplog):
    caplog.set_level("INFO", logger="fastunlearn.engine")
    always = {"stop": "threshold", "ma_threshold": 1.0, "el_threshold": 1.0}
    result = run(memorized, tmp_path / "min", params="lora", min_epochs=3, max_epochs=5, config=always)
    epochs = result.log["tasks"][0]["epochs"]
    assert [e["criterion_met"] for e in epochs] == [True] * 3 and result.success
    assert result.log["tasks"][0]["stop_reason"] == "criterion met at epoch 3"
    assert len([r for r in caplog.records if re.search(r" epoch \d+/5:", r.getMessage())]) == 3  # one line each


def test_max_epochs_without_the_criterion_is_a_failure(memorized, tmp_path):
    result = run(memorized, tmp_path / "fail", params="lora", max_epochs=2, config=NEVER)
    task = result.log["tasks"][0]
    assert not result.success and not task["success"] and len(task["epochs"]) == 2
    assert task["stop_reason"] == "max_epochs (2) reached without meeting the criterion"
    assert json.loads((result.out_dir / "log.json").read_text())["success"] is False
    assert "**Result: FAILURE.**" in (result.out_dir / "report.md").read_text()


def test_accumulated_gradient_is_the_full_batch_gradient(memorized, tmp_path):
    base, data = memorized
    mask = torch.ones_like(data.forget.input_ids)
    mask[0, -5:], mask[2, -2:] = 0, 0  # unequal micro-batch shares
    padded = UnlearningData(
        SequenceSet(data.forget.input_ids, mask, data.forget.source_index), data.retain, data.heldout
    )
    first = {}
    for retain_weight, sizes in ((0.0, (1, 3, 4)), (1.0, (1, 4))):  # 1 and 4 pair the same 4 retain sequences
        for size in sizes:
            out = tmp_path / f"w{retain_weight}-mb{size}"
            result = run(memorized, out, padded, params="lora", retain_weight=retain_weight, micro_batch_size=size,
                         max_epochs=1, config=NEVER)  # fmt: skip
            first[retain_weight, size] = result.log["tasks"][0]["epochs"][0]
    ids = data.forget.input_ids
    full_batch = ihl_loss(*shift_causal(base(ids, attention_mask=mask).logits, ids, mask)).item()
    for (retain_weight, _size), epoch in first.items():
        reference = first[retain_weight, 1]
        assert epoch["forget_loss"] == pytest.approx(full_batch, rel=1e-5)
        assert epoch["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
        if retain_weight:
            assert epoch["retain_loss"] == pytest.approx(reference["retain_loss"], rel=1e-5)
    assert first[0.0, 1]["grad_norm"] != pytest.approx(first[1.0, 1]["grad_norm"], rel=1e-3)  # retain term counts


def test_fused_run_equals_the_unfused_one_without_calling_the_lm_head(memorized, tmp_path):
    runs, head_calls = {}, []
    for fused in (False, True):
        model = copy.deepcopy(memorized[0])
        model.lm_head.register_forward_hook(
            lambda module, args, out, fused=fused: head_calls.append(fused) if module.training else None
        )
        runs[fused] = run(memorized, tmp_path / f"fused{fused}", model=model, params="lora", fused_ihl=fused,
                          max_epochs=3, config=NEVER)  # fmt: skip
        assert "forward" not in vars(model)  # unpatched at the end
    assert head_calls.count(False) > 0 and head_calls.count(True) == 0  # fused: no training forward calls the head
    # the same sums in another order: epoch 1 (before any update) agrees to float rounding; AdamW's normalized
    # steps then amplify the rounding a little each epoch
    for a, b in zip(runs[False].log["tasks"][0]["epochs"], runs[True].log["tasks"][0]["epochs"], strict=True):
        for key in ("forget_loss", "retain_loss", "grad_norm", "forget_ma"):
            assert a[key] == pytest.approx(b[key], rel=1e-5 if a["epoch"] == 1 else 1e-3), (key, a["epoch"])


def test_non_finite_loss_stops_without_an_update(memorized, tmp_path):
    model = copy.deepcopy(memorized[0])
    model.lm_head.register_forward_hook(lambda module, args, out: out * float("nan") if module.training else out)
    result = run(memorized, tmp_path / "nan", model=model, params="lora", forget_loss="ga", max_epochs=5)
    task = result.log["tasks"][0]
    assert not result.success and len(task["epochs"]) == 1 and not task["epochs"][0]["updated"]
    assert task["stop_reason"].startswith("non-finite loss or gradient at epoch 1")
    assert task["epochs"][0]["forget_loss"] is None
    assert all(torch.equal(layer.lora_b, torch.zeros_like(layer.lora_b)) for layer in lora_layers(model).values())


def test_gradient_checkpointing_and_bfloat16(memorized, tmp_path):
    plain = run(memorized, tmp_path / "plain", params="lora", max_epochs=2, config=NEVER)
    checkpointed = run(
        memorized, tmp_path / "gc", params="lora", max_epochs=2, gradient_checkpointing=True, config=NEVER
    )
    for a, b in zip(lora_layers(plain.model).values(), lora_layers(checkpointed.model).values()):
        torch.testing.assert_close(a.lora_b, b.lora_b, atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(next(iter(lora_layers(plain.model).values())).lora_b) > 0
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.model.modules())
    bf16 = run(memorized, tmp_path / "bf16", params="lora", max_epochs=1, dtype="bfloat16", config=NEVER)
    assert bf16.model.transformer.wte.weight.dtype == torch.bfloat16
    assert all(layer.lora_a.dtype == torch.float32 for layer in lora_layers(bf16.model).values())
    assert bf16.log["tasks"][0]["epochs"][0]["updated"]


# ---------------------------------------------------------------------------------------------------------
# Continual unlearning and resume
# ---------------------------------------------------------------------------------------------------------
# adapter dropout draws from the global RNG, which a resume must restore too
CONTINUAL = {**FAST, "params": "fila", "min_epochs": 3, "max_epochs": 30, "fila": {"dropout": 0.1}}


@pytest.fixture(scope="module")
def continual(memorized, tmp_path_factory):
    base, data = memorized
    tasks = UnlearningData(split_tasks(data.forget, 2), data.retain, data.heldout)
    out = tmp_path_factory.mktemp("continual") / "run"
    return tasks, unlearn(copy.deepcopy(base), tasks, UnlearnConfig(**CONTINUAL), out)


def test_continual_unlearning_measures_every_earlier_set_again(continual):
    tasks, result = continual
    log = result.log
    assert [len(t["after"]["forget"]) for t in log["tasks"]] == [1, 2] and len(log["baseline"]["forget"]) == 2
    crit = log["criterion"]
    for seqs, measured in zip(tasks.forget, log["tasks"][1]["after"]["forget"]):
        ma = memorization_accuracy(result.model, seqs.input_ids).mean().item()
        el = extraction_likelihood(result.model, seqs.input_ids, n=5).mean().item()
        assert measured == {"ma": ma, "el": el, "met": ma <= crit["ma"] and el <= crit["el"]}
    still_met = all(m["met"] for m in log["tasks"][1]["after"]["forget"])
    assert all(t["success"] for t in log["tasks"]) and result.success == still_met  # a later task may undo one
    assert all(len(t["epochs"]) >= 3 for t in log["tasks"])
    report = (result.out_dir / "report.md").read_text()
    assert ("not after the later tasks" in report) == (not still_met)


def test_interrupted_run_resumes_to_the_uninterrupted_result(continual, memorized, tmp_path):
    tasks, reference = continual
    base = memorized[0]
    out = tmp_path / "run"
    task0_epochs = len(reference.log["tasks"][0]["epochs"])

    with pytest.raises(Interrupt):  # in the middle of the first task
        unlearn(copy.deepcopy(base), tasks, UnlearnConfig(**CONTINUAL), out, on_epoch_end=stop_at(2, task=0))
    assert sorted(p.name for p in out.iterdir()) == [".fastunlearn", "log.json"]  # no final output yet
    (version,) = (out / ".fastunlearn").glob("checkpoint-*")  # the pointer's, the older ones removed
    assert sorted(p.suffix for p in version.iterdir()) == [".json", ".json", ".safetensors"]  # no pickle
    assert len(json.loads((out / "log.json").read_text())["tasks"][0]["epochs"]) == 2
    with pytest.raises(FileExistsError, match="pass resume=True"):
        unlearn(copy.deepcopy(base), tasks, UnlearnConfig(**CONTINUAL), out, resume=False)
    with pytest.raises(ValueError, match=r"different config \(fields \['lr'\]\)"):
        unlearn(copy.deepcopy(base), tasks, UnlearnConfig(**{**CONTINUAL, "lr": 1e-3}), out)
    with pytest.raises(Interrupt):  # at the first task's last epoch, before its after-task measurement
        unlearn(copy.deepcopy(base), tasks, UnlearnConfig(**CONTINUAL), out, on_epoch_end=stop_at(task0_epochs, task=0))
    resumed = unlearn(copy.deepcopy(base), tasks, UnlearnConfig(**CONTINUAL), out)
    assert resumed.log["resumes"] == 2
    assert without_timings(resumed.log) == without_timings(reference.log)
    expected = reference.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert not (out / ".fastunlearn").exists()  # the run's folder (the checkpoint) goes when it finishes


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"forget_loss": "kl"}, r"forget_loss must be one of \('ihl', 'ga', 'npo', 'simnpo'\), got 'kl'"),
        ({"params": "adapters"}, "params must be one of"),
        ({"retain_weight": -1.0}, "retain_weight must be a finite number >= 0, got -1.0"),
        ({"rank": 0}, "rank must be an int >= 1, got 0"),
        ({"lr": 0.0}, "lr must be a finite number > 0 or None, got 0.0"),
        ({"betas": (0.9, 1.0)}, r"betas must be two numbers in \[0, 1\)"),
        ({"min_epochs": 5, "max_epochs": 4}, r"min_epochs must be <= max_epochs \(4\), got 5"),
        ({"micro_batch_size": 2.5}, "micro_batch_size must be an int >= 1, got 2.5"),
        ({"stop": "threshold", "ma_threshold": 0.3}, "el_threshold must be a number in"),
        ({"ma_threshold": 0.3}, "ma_threshold is only used with stop='threshold'"),
        ({"dtype": "float16"}, "dtype must be one of"),
        ({"fila": {"fisher_mode": "diag"}}, "fisher_mode must be one of"),
        ({"fila": {"rank": 8}}, r"fila has unknown options \['rank'\]"),
        ({"params": "lora", "fila": {"eps": 1e-3}}, "given only with params='fila'"),
        ({"gradient_checkpointing": 1}, "gradient_checkpointing must be a bool"),
        ({"parallel": "zero3"}, r"parallel must be one of \('ddp', 'fsdp'\), got 'zero3'"),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        UnlearnConfig(**overrides)


def test_config_round_trips_through_json():
    config = UnlearnConfig(
        params="lora", targets=["q_proj"], stop="threshold", ma_threshold=0.2994, el_threshold=0.0499
    )
    assert UnlearnConfig(**json.loads(json.dumps(config.to_dict()))) == config
    assert config.learning_rate == 2e-4 and UnlearnConfig(params="full").learning_rate == 5e-5


def test_bad_data_is_rejected_before_anything_changes(memorized, tmp_path):
    base, data = memorized
    empty = SequenceSet(
        torch.zeros(0, 16, dtype=torch.long), torch.zeros(0, 16, dtype=torch.long), torch.zeros(0).long()
    )
    padding = SequenceSet(data.forget.input_ids, torch.zeros_like(data.forget.input_ids), data.forget.source_index)
    short_mask = torch.ones_like(data.forget.attention_mask)
    short_mask[0, 5:] = 0  # 5 real tokens, right-padded: too short for EL_5 once the padding is dropped
    short = SequenceSet(data.forget.input_ids, short_mask, data.forget.source_index)
    cases = [
        (UnlearningData(empty, data.retain, data.heldout), {}, "forget set is empty"),
        (UnlearningData([data.forget, padding], data.retain, data.heldout), {}, "forget set 2 of 2 is empty"),
        (UnlearningData(data.forget, None, data.heldout), {"retain_weight": 0.0}, "params='fila'.*needs a retain set"),
        (UnlearningData(data.forget, None, data.heldout), {"params": "lora"}, "retain_weight=1.0.*needs a retain set"),
        (UnlearningData(data.forget, data.retain), {}, "stop='heldout' needs a held-out set"),
        (data, {"el_n": 16}, r"EL_16 \(el_n=16\) needs at least 17"),
        (UnlearningData(short, data.retain, data.heldout), {}, r"a sequence of 5 tokens; EL_5 \(el_n=5\)"),
        ([data.forget.input_ids], {}, "forget set must be a SequenceSet, got Tensor"),
    ]
    model = copy.deepcopy(base)
    for bad, overrides, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            unlearn(model, bad, UnlearnConfig(**{**FAST, **overrides}), tmp_path / "never")
    assert not lora_layers(model) and not (tmp_path / "never").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty and holds no checkpoint"):
        unlearn(model, data, UnlearnConfig(**FAST), tmp_path / "used")
