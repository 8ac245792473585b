"""Utility sets: perplexity of text never trained on, measured before, after each task and (``eval_every=1``)
after every epoch on the seeded sample of ``eval_retain_max``; in log.json, the report and the plot; part of the
data fingerprint that a resume must match; ``--utility NAME=FILE`` on the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastunlearn import cli
from fastunlearn.data.text import SequenceSet, UnlearningData, load_unlearning_data
from fastunlearn.engine import UnlearnConfig, evaluation, unlearn
from fastunlearn.engine.inputs import data_fingerprint, fingerprint
from fastunlearn.evals.metrics import sequence_nll
from tests.helpers.runs import Interrupt, stop_at
from tests.helpers.tiny_models import tiny_model

SEQ_LEN = 12
BASE = {"params": "lora", "rank": 2, "alpha": 4.0, "el_n": 5, "micro_batch_size": 2, "max_epochs": 2,
        "min_epochs": 2, "stop": "threshold", "ma_threshold": 0.0, "el_threshold": 0.0, "eval_batch_size": 2,
        "eval_retain_max": 3, "lr": 1e-2}  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def masked_set(ids: torch.Tensor, pad_last: int = 0) -> SequenceSet:
    """Every row whole, or the last row's last ``pad_last`` tokens masked out (their token ids kept)."""
    mask = torch.ones_like(ids)
    if pad_last:
        mask[-1, -pad_last:] = 0  # a padded row: padding must not count in the perplexity
    return SequenceSet(ids, mask, torch.arange(len(ids)))


def sets(seed: int = 5) -> UnlearningData:
    ids = torch.randint(0, 64, (4 + 6 + 4 + 5 + 2, SEQ_LEN), generator=torch.Generator().manual_seed(seed))
    forget, retain, heldout, wiki, pile = ids.split([4, 6, 4, 5, 2])
    utility = {"wiki": masked_set(wiki, pad_last=4), "pile": masked_set(pile)}
    return UnlearningData(masked_set(forget), masked_set(retain), masked_set(heldout), utility=utility)


def direct_ppl(model, seqs: SequenceSet, limit: int, seed: int) -> float:
    """exp(sum NLL / targets) of the seeded sample, straight from metrics.sequence_nll."""
    sample = evaluation.seeded_sample(seqs, limit, seed)
    rows = [ids[: int(mask.sum())] for ids, mask in zip(sample.input_ids, sample.attention_mask)]
    nll, count = sequence_nll(model, rows)
    return math.exp(nll.sum().item() / count.sum().item())


def test_utility_perplexity_before_every_epoch_and_after_equals_sequence_nll(tmp_path):
    data = sets()
    expected_before = {name: direct_ppl(tiny_model("gpt_neo"), s, 3, 0) for name, s in data.utility.items()}
    result = unlearn(tiny_model("gpt_neo"), data, UnlearnConfig(**BASE, eval_every=1), tmp_path / "run")
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert log["baseline"]["utility_ppl"] == pytest.approx(expected_before, rel=1e-5)
    epochs = log["tasks"][0]["epochs"]
    assert len(epochs) == 2 and all(set(e["utility_ppl"]) == {"wiki", "pile"} for e in epochs)
    expected_after = {name: direct_ppl(result.model, s, 3, 0) for name, s in data.utility.items()}
    assert epochs[-1]["utility_ppl"] == pytest.approx(expected_after, rel=1e-5)
    assert log["tasks"][0]["after"]["utility_ppl"] == epochs[-1]["utility_ppl"]
    assert epochs[0]["utility_ppl"] != log["baseline"]["utility_ppl"]  # lr 1e-2: the weights moved
    assert log["data"]["utility"] == {"wiki": 5, "pile": 2}
    assert log["data"]["utility_ppl_sequences"] == {"wiki": 3, "pile": 2}  # the eval_retain_max sample
    report = (tmp_path / "run" / "report.md").read_text()
    wiki = log["baseline"]["utility_ppl"]["wiki"], expected_after["wiki"]
    row = f"| wiki | 3 of 5 | {wiki[0]:.3f} | {wiki[1]:.3f} | {wiki[1] / wiki[0]:.3f} |"
    assert "## Utility: perplexity on text never trained on" in report and row in report
    assert "retain PPL (trained on)" in report and "| wiki PPL | pile PPL |" in report
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 0


def test_the_sample_is_the_retain_rule_and_padding_is_not_scored():
    data, cfg = sets(), UnlearnConfig(**BASE)
    wiki = data.utility["wiki"]
    assert torch.equal(evaluation.ppl_sample(wiki, cfg).source_index, evaluation.seeded_sample(wiki, 3, 0).source_index)
    model = tiny_model("gpt_neo")
    whole = UnlearnConfig(**{**BASE, "eval_retain_max": None})
    padded = direct_ppl(model, wiki, 5, 0)
    assert evaluation.sample_ppl(model, wiki, whole, "") == pytest.approx(padded, rel=1e-5)
    scored_padding = evaluation.sample_ppl(model, masked_set(wiki.input_ids), whole, "")
    assert abs(scored_padding / padded - 1) > 10 * 1e-5  # the equality above tells the two apart


def test_without_utility_sets_nothing_changes(tmp_path):
    data = sets()
    plain = UnlearningData(data.forget, data.retain, data.heldout)
    log = unlearn(tiny_model("gpt_neo"), plain, UnlearnConfig(**{**BASE, "max_epochs": 1, "min_epochs": 1}),
                  tmp_path / "run").log  # fmt: skip
    assert log["baseline"]["utility_ppl"] is None and log["tasks"][0]["epochs"][0]["utility_ppl"] is None
    assert log["data"]["fingerprint"] == fingerprint([data.forget, data.retain, data.heldout])
    assert "## Utility" not in (tmp_path / "run" / "report.md").read_text()


def test_the_data_fingerprint_covers_utility_names_and_contents():
    data = sets()
    base = data_fingerprint([data.forget], data.retain, data.heldout, data.utility)
    renamed = {"wiki2" if k == "wiki" else k: v for k, v in data.utility.items()}
    other = {**data.utility, "pile": sets(seed=6).utility["pile"]}
    for utility in (renamed, other, {"wiki": data.utility["wiki"]}, None):
        assert data_fingerprint([data.forget], data.retain, data.heldout, utility) != base
    reordered = dict(reversed(list(data.utility.items())))
    assert data_fingerprint([data.forget], data.retain, data.heldout, reordered) == base


def test_a_resume_with_other_utility_sets_is_refused(tmp_path):
    data, out = sets(), tmp_path / "run"

    with pytest.raises(Interrupt):
        unlearn(tiny_model("gpt_neo"), data, UnlearnConfig(**BASE), out, on_epoch_end=stop_at())
    other = UnlearningData(data.forget, data.retain, data.heldout, utility={"wiki": sets(seed=6).utility["wiki"]})
    with pytest.raises(ValueError, match="different data"):
        unlearn(tiny_model("gpt_neo"), other, UnlearnConfig(**BASE), out)
    resumed = unlearn(tiny_model("gpt_neo"), data, UnlearnConfig(**BASE), out)
    assert resumed.log["resumes"] == 1 and len(resumed.log["tasks"][0]["epochs"]) == 2


@pytest.mark.parametrize(
    ("utility", "message"),
    [({"wiki": "not a set"}, "utility set wiki must be a SequenceSet"), ({"": None}, "utility set names"),
     ([1], "data.utility must be a dict")],
)  # fmt: skip
def test_bad_utility_sets_are_named(tmp_path, utility, message):
    data = sets()
    bad = UnlearningData(data.forget, data.retain, data.heldout, utility=utility)
    with pytest.raises((TypeError, ValueError), match=message):
        unlearn(tiny_model("gpt_neo"), bad, UnlearnConfig(**BASE), tmp_path / "run")


def test_load_unlearning_data_packs_utility_files(workspace):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
    data = load_unlearning_data(tokenizer, workspace / "forget.txt", utility={"w": workspace / "retain.txt"},
                                seq_len=SEQ_LEN)  # fmt: skip
    assert list(data.utility) == ["w"] and data.utility["w"].attention_mask.all()  # packed: full blocks
    with pytest.raises(FileNotFoundError, match="utility set w file not found"):
        load_unlearning_data(tokenizer, workspace / "forget.txt", utility={"w": workspace / "missing.txt"})


def unlearn_argv(ws, out, *extra):
    return ["unlearn", "--model", str(ws / "model"), "--forget", str(ws / "forget.txt"), "--retain",
            str(ws / "retain.txt"), "--heldout", str(ws / "heldout.txt"), "--params", "lora", "--rank", "2",
            "--max-epochs", "1", "--seq-len", "12", "--out", str(out), *extra]  # fmt: skip


def test_cli_utility_flags_reach_the_log(workspace, tmp_path, capsys):  # noqa: F811
    argv = unlearn_argv(workspace, tmp_path / "run", "--utility", f"wiki={workspace / 'retain.txt'}", "--utility",
                        f"held={workspace / 'heldout.txt'}")  # fmt: skip
    assert cli.main(argv) in (0, 1)
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert list(log["baseline"]["utility_ppl"]) == ["wiki", "held"]
    assert all(value > 1.0 for value in log["tasks"][0]["after"]["utility_ppl"].values())


@pytest.mark.parametrize(
    ("spec", "message"),
    [(["wiki"], "--utility takes NAME=FILE, got 'wiki'"), (["=x.txt"], "--utility takes NAME=FILE"),
     (["a=FORGET", "a=FORGET"], "--utility name 'a' is given twice"),
     (["w=MISSING"], "utility set w file not found")],
)  # fmt: skip
def test_cli_bad_utility_flags_are_one_line_errors(workspace, tmp_path, capsys, spec, message):  # noqa: F811
    paths = {"FORGET": str(workspace / "forget.txt"), "MISSING": str(workspace / "missing.txt")}
    flags = [part for s in spec for part in ("--utility", s.replace("FORGET", paths["FORGET"]).replace(
        "MISSING", paths["MISSING"]))]  # fmt: skip
    assert cli.main(unlearn_argv(workspace, tmp_path / "run", *flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastunlearn unlearn: error:") and message in err[-1]
    assert not (tmp_path / "run").exists()
