"""Bounded evaluation cost: retain perplexity and FILA's retain Fisher on seeded samples, the held-out baseline
cache, the held-out EL after a task only on request, and progress lines that reach the command line."""

from __future__ import annotations

import json
import logging
import math
import re

import pytest
import torch

from fastunlearn import cli
from fastunlearn.data.text import SequenceSet, UnlearningData
from fastunlearn.engine import UnlearnConfig, cache, evaluation, params, progress, unlearn
from fastunlearn.evals.metrics import perplexity
from tests.helpers.runs import as_set
from tests.helpers.tiny_models import tiny_model

SEQ_LEN = 12
# a random tiny GPT-Neo: nothing to unlearn, so a criterion no epoch meets runs exactly max_epochs
BASE = {"params": "lora", "rank": 2, "alpha": 4.0, "el_n": 5, "micro_batch_size": 2, "max_epochs": 1,
        "stop": "threshold", "ma_threshold": 0.0, "el_threshold": 0.0, "eval_batch_size": 2}  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data() -> UnlearningData:
    ids = torch.randint(0, 64, (4 + 12 + 4, SEQ_LEN), generator=torch.Generator().manual_seed(5))
    forget, retain, heldout = ids.split([4, 12, 4])
    return UnlearningData(as_set(forget), as_set(retain), as_set(heldout))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTUNLEARN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_warned", set())
    return tmp_path / "cache"


def run(data, out, model=None, **overrides):
    return unlearn(tiny_model("gpt_neo") if model is None else model, data, UnlearnConfig(**{**BASE, **overrides}), out)


# ---------------------------------------------------------------------------------------------------------
# Seeded samples: retain perplexity and FILA's retain Fisher
# ---------------------------------------------------------------------------------------------------------
def test_seeded_sample_is_a_seeded_ordered_subset_drawn_with_its_own_generator(data):
    retain = data.retain
    state = torch.get_rng_state()
    sample = evaluation.seeded_sample(retain, 5, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    rows = sample.source_index.tolist()
    assert len(rows) == 5 == len(set(rows)) and rows == sorted(rows)
    assert torch.equal(sample.input_ids, retain.input_ids[rows])
    assert evaluation.seeded_sample(retain, 5, seed=3).source_index.tolist() == rows
    assert evaluation.seeded_sample(retain, 5, seed=4).source_index.tolist() != rows
    assert (
        evaluation.seeded_sample(retain, 12, seed=3) is retain and evaluation.seeded_sample(retain, None, 3) is retain
    )


def test_retain_perplexity_on_the_sample_and_training_unchanged_by_it(data, tmp_path):
    """The same 5 of 12 sequences before and after; the run trains exactly as with the whole set
    (FILA dropout draws from the global RNG: a sample drawn from it would change every update)."""
    fila = {"params": "fila", "fila": {"dropout": 0.1}, "fisher_max_examples": None, "eval_retain_ppl": True,
            "max_epochs": 2}  # fmt: skip
    sampled = run(data, tmp_path / "sampled", eval_retain_max=5, **fila)
    whole = run(data, tmp_path / "whole", eval_retain_max=None, **fila)
    assert sampled.log["data"]["retain_ppl_sequences"] == 5 and whole.log["data"]["retain_ppl_sequences"] == 12
    rows = evaluation.seeded_sample(data.retain, 5, seed=0).input_ids
    final = sampled.log["tasks"][0]["after"]["retain_ppl"]
    assert final == pytest.approx(perplexity(sampled.model, rows, batch_size=2), rel=1e-9)
    before = perplexity(tiny_model("gpt_neo"), rows)  # FILA's W0 - s B0 A0 + s B0 A0: W0 up to rounding
    assert sampled.log["baseline"]["retain_ppl"] == pytest.approx(before, rel=1e-5)
    assert final != pytest.approx(perplexity(sampled.model, data.retain.input_ids), rel=1e-6)  # not the whole set
    for a, b in zip(sampled.log["tasks"][0]["epochs"], whole.log["tasks"][0]["epochs"], strict=True):
        for key in ("forget_loss", "retain_loss", "grad_norm", "forget_ma"):
            assert a[key] == b[key], key  # bit-equal training
    report = (sampled.out_dir / "report.md").read_text()
    assert "Retain perplexity on a seeded sample of 5 of 12 sequences (the retain set trained on)" in report
    assert "Retain perplexity on all 12 sequences" in (whole.out_dir / "report.md").read_text()


def test_fila_retain_fisher_on_a_seeded_sample_and_the_forget_set_whole(data, tmp_path, monkeypatch):
    seen = []
    real = params.fila_init

    def spy(model, forget, retain, *args, **kwargs):
        seen.append((forget["input_ids"], retain["input_ids"]))
        return real(model, forget, retain, *args, **kwargs)

    monkeypatch.setattr(params, "fila_init", spy)
    capped = run(data, tmp_path / "capped", params="fila", fisher_max_examples=5)
    run(data, tmp_path / "all", params="fila", fisher_max_examples=None)
    (forget, retain), (_, retain_all) = seen
    assert torch.equal(forget, data.forget.input_ids) and torch.equal(retain_all, data.retain.input_ids)
    assert torch.equal(retain, evaluation.seeded_sample(data.retain, 5, seed=0).input_ids)
    assert capped.log["data"]["fisher_retain_sequences"] == 5
    assert "FILA's retain Fisher on a seeded sample of 5 of 12 sequences" in (capped.out_dir / "report.md").read_text()


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"eval_retain_max": 0}, r"eval_retain_max must be an int >= 1 or None \(every sequence\), got 0"),
        ({"eval_retain_max": 2.5}, "eval_retain_max must be an int >= 1 or None"),
        ({"fisher_max_examples": True}, "fisher_max_examples must be an int >= 1 or None"),
        ({"fisher_max_examples": -1}, "fisher_max_examples must be an int >= 1 or None"),
        ({"cache_heldout_baseline": 1}, "cache_heldout_baseline must be a bool, got 1"),
        ({"eval_heldout_el_after": "yes"}, "eval_heldout_el_after must be a bool, got 'yes'"),
    ],
)
def test_new_fields_are_validated(overrides, match):
    with pytest.raises(ValueError, match=match):
        UnlearnConfig(**overrides)


# ---------------------------------------------------------------------------------------------------------
# The held-out baseline cache
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def el_calls(monkeypatch):
    """The input_ids of every EL call the engine makes."""
    calls = []
    real = evaluation.extraction_likelihood

    def spy(model, input_ids, *args, **kwargs):
        calls.append(input_ids.clone())
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(evaluation, "extraction_likelihood", spy)
    return calls


def heldout_el_calls(calls: list, heldout: SequenceSet) -> int:
    """How many of the calls measured rows of ``heldout`` (its batches: consecutive rows)."""
    ids = heldout.input_ids
    return sum(any(torch.equal(c, ids[lo : lo + len(c)]) for lo in range(len(ids) - len(c) + 1)) for c in calls)


def test_second_run_reads_the_heldout_baseline_from_the_cache(data, tmp_path, cache_dir, el_calls):
    first = run(data, tmp_path / "first")
    assert heldout_el_calls(el_calls, data.heldout) == 2  # 4 held-out sequences, EL batches of 2
    el_calls.clear()
    second = run(data, tmp_path / "second", params="full")  # a sweep over methods reuses it
    assert heldout_el_calls(el_calls, data.heldout) == 0 and el_calls  # the forget set's EL is still measured
    assert second.log["baseline"]["heldout"] == first.log["baseline"]["heldout"]
    assert second.log["criterion"] == first.log["criterion"]
    files = list((cache_dir / "heldout-baseline").iterdir())
    assert [p.suffix for p in files] == [".json"]
    assert first.log["baseline_cache"] == {"hit": False, "file": str(files[0])}
    assert second.log["baseline_cache"] == {"hit": True, "file": str(files[0])}
    assert "read from the cache" in (second.out_dir / "report.md").read_text()
    assert json.loads(files[0].read_text())["heldout"] == first.log["baseline"]["heldout"]


def test_another_model_setting_or_heldout_set_misses_the_cache(data, tmp_path, cache_dir, el_calls):
    run(data, tmp_path / "first")
    other_model = tiny_model("gpt_neo")
    with torch.no_grad():
        other_model.lm_head.weight[0, 0] += 1.0  # one weight: another fingerprint
    other_heldout = UnlearningData(data.forget, data.retain, data.retain[:4])
    cases = [({"model": other_model}, data.heldout), ({"el_n": 4}, data.heldout), ({"dtype": "bfloat16"}, data.heldout),
             ({"data": other_heldout}, other_heldout.heldout)]  # fmt: skip
    for k, (change, heldout) in enumerate(cases):
        el_calls.clear()
        change = dict(change)
        result = run(change.pop("data", data), tmp_path / f"run{k}", **change)
        assert result.log["baseline_cache"]["hit"] is False and heldout_el_calls(el_calls, heldout) == 2, change
    assert len(list((cache_dir / "heldout-baseline").iterdir())) == 1 + len(cases)


def test_cache_off_unwritable_or_corrupt(data, tmp_path, cache_dir, el_calls, monkeypatch, caplog):
    off = run(data, tmp_path / "off", cache_heldout_baseline=False)
    assert off.log["baseline_cache"] is None and not cache_dir.exists()
    assert "the cache (" not in (off.out_dir / "report.md").read_text()
    first = run(data, tmp_path / "first")
    entry = next((cache_dir / "heldout-baseline").iterdir())
    entry.write_text("{not json")  # a corrupt entry is a miss, then replaced
    el_calls.clear()
    again = run(data, tmp_path / "again")
    assert again.log["baseline_cache"]["hit"] is False and heldout_el_calls(el_calls, data.heldout) == 2
    assert json.loads(entry.read_text())["heldout"] == first.log["baseline"]["heldout"]
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("FASTUNLEARN_CACHE_DIR", str(blocker))
    caplog.set_level("WARNING", logger="fastunlearn.engine")
    for k in range(2):
        result = run(data, tmp_path / f"unwritable{k}")
        assert result.log["baseline_cache"]["hit"] is False and result.log["status"] == "finished"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot write the held-out baseline cache" in warnings[0]  # once


# ---------------------------------------------------------------------------------------------------------
# The held-out set after a task; progress lines
# ---------------------------------------------------------------------------------------------------------
def test_heldout_el_after_a_task_only_on_request(data, tmp_path, el_calls):
    default = run(data, tmp_path / "default", cache_heldout_baseline=False)
    after = default.log["tasks"][0]["after"]["heldout"]
    assert after["el"] is None and 0.0 <= after["ma"] <= 1.0
    assert heldout_el_calls(el_calls, data.heldout) == 2  # the baseline's only
    report = (default.out_dir / "report.md").read_text()
    assert re.search(r"\| held-out \| [\d.]+ \| [\d.]+ \| [\d.]+ \| – \|", report)
    assert "EL_5 after unlearning was not measured (–)" in report
    assert (default.out_dir / "metrics.png").read_bytes().startswith(b"\x89PNG")
    el_calls.clear()
    asked = run(data, tmp_path / "asked", cache_heldout_baseline=False, eval_heldout_el_after=True)
    assert heldout_el_calls(el_calls, data.heldout) == 4 and asked.log["tasks"][0]["after"]["heldout"]["el"] is not None
    assert "after unlearning was not measured" not in (asked.out_dir / "report.md").read_text()


def test_progress_lines_with_elapsed_time_and_eta(data, tmp_path, caplog, monkeypatch):
    caplog.set_level("INFO", logger="fastunlearn.engine")
    monkeypatch.setattr(progress, "EVERY_S", 1e9)  # fast phases: no progress line
    run(data, tmp_path / "quiet", eval_retain_ppl=True)
    assert not [r for r in caplog.records if " batches, " in r.getMessage()]
    caplog.clear()
    monkeypatch.setattr(progress, "EVERY_S", 0.0)  # a line after every batch
    run(data, tmp_path / "every", eval_retain_ppl=True, eval_retain_max=6, cache_heldout_baseline=False)
    lines = [r.getMessage() for r in caplog.records]
    steps = r" (\d)/(\d) batches, \d+ s elapsed, ETA \d+ s"
    for phase, total in (("baseline: forget set MA", 2), ("baseline: held-out set EL_5", 2),
                         ("baseline: retain perplexity", 3), ("forget set epoch 1/1 evaluation: MA", 2),
                         ("after forget set: retain perplexity", 3),
                         ("after forget set: held-out set MA", 2)):  # fmt: skip
        done = [re.fullmatch(re.escape(phase) + steps, line) for line in lines]
        assert [(int(m[1]), int(m[2])) for m in done if m] == [(i, total) for i in range(1, total + 1)], phase
    assert "baseline: MA and EL_5 of forget set (4 sequences), held-out set (4 sequences), retain perplexity on 6 of " \
           "12 sequences" in lines  # fmt: skip
    assert "forget set epoch 1/1 training: 4 forget sequences in micro-batches of 2" in lines


def test_progress_eta(monkeypatch, caplog):
    caplog.set_level("INFO", logger="fastunlearn.engine")
    clock = iter([100.0, 104.0, 108.0, 112.0])  # start, then 4 s per batch
    monkeypatch.setattr(progress, "clock", lambda: next(clock))
    monkeypatch.setattr(progress, "EVERY_S", 5.0)
    bar = progress.Progress("baseline: held-out set EL_10", 3)
    for _ in range(3):
        bar.step()
    assert [r.getMessage() for r in caplog.records] == [
        "baseline: held-out set EL_10 2/3 batches, 8 s elapsed, ETA 4 s",  # 4 s after start: not yet
        "baseline: held-out set EL_10 3/3 batches, 12 s elapsed, ETA 0 s",  # the end of a phase of >= 5 s
    ]


# ---------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def restore_logging():
    package = logging.getLogger("fastunlearn")
    handlers, level = list(package.handlers), package.level
    yield
    package.handlers[:], package.level = handlers, level


def test_cli_flags_and_engine_lines_on_stderr(workspace, tmp_path, capsys, restore_logging):
    out = tmp_path / "run"
    argv = [
        "unlearn", "--model", str(workspace / "model"), "--forget", str(workspace / "forget.txt"),
        "--retain", str(workspace / "retain.txt"), "--heldout", str(workspace / "heldout.txt"),
        "--rank", "2", "--max-epochs", "1", "--seq-len", "12", "--out", str(out),
        "--eval-retain-max", "0", "--fisher-max-examples", "3", "--no-baseline-cache", "--heldout-el-after",
    ]  # fmt: skip
    assert cli.main(argv) in (0, 1)
    err = capsys.readouterr().err
    assert re.search(r"^\d\d:\d\d:\d\d baseline: MA and EL_10 of forget set", err, re.M)
    assert re.search(r"^\d\d:\d\d:\d\d forget set epoch 1/1: loss forget", err, re.M)
    log = json.loads((out / "log.json").read_text())
    assert (log["config"]["eval_retain_max"], log["config"]["fisher_max_examples"]) == (None, 3)
    assert log["data"]["retain_ppl_sequences"] == log["data"]["retain"] and log["data"]["fisher_retain_sequences"] == 3
    assert log["baseline_cache"] is None and log["tasks"][0]["after"]["heldout"]["el"] is not None
    defaults = cli.build_parser().parse_args(["unlearn", "--model", "m", "--forget", "f", "--out", "o"])
    assert (defaults.eval_retain_max, defaults.fisher_max_examples) == (128, 32) == (
        UnlearnConfig().eval_retain_max, UnlearnConfig().fisher_max_examples)  # fmt: skip
    assert not defaults.no_baseline_cache and not defaults.heldout_el_after
    assert math.isfinite(log["baseline"]["retain_ppl"])


def test_the_demo_and_the_engine_share_one_cache_root(monkeypatch, tmp_path):
    from fastunlearn.demo import toy as demo

    monkeypatch.setenv("FASTUNLEARN_CACHE_DIR", str(tmp_path / "root"))
    assert cache.cache_root() == tmp_path / "root"
    assert demo.cache_path(demo.DemoConfig(), {"forget": []}).parent == tmp_path / "root"
    key = cache.HeldoutCache("fp", as_set(torch.zeros(2, 3, dtype=torch.long)), UnlearnConfig(), torch.device("cpu"))
    assert key.path.parent == tmp_path / "root" / "heldout-baseline"
    assert (key.key["el_n"], key.key["dtype"], key.key["device"], key.key["model"]) == (10, "float32", "cpu", "fp")
