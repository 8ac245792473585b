"""``fastunlearn demo --real`` with ``real_model`` replaced by a tiny Llama (tied embeddings, like SmolLM2) and the
default demo's BPE tokenizer, so no test downloads anything: memorized to the target MA, cached, unlearned by the
engine, the table and completions printed; a second run reads the cache and never loads the base model."""

from __future__ import annotations

import json

import pytest

from fastunlearn import cli
from fastunlearn.demo import real as demo_real
from fastunlearn.demo import toy as demo
from fastunlearn.demo.data import train_tokenizer
from fastunlearn.demo.real import RealDemoConfig
from fastunlearn.demo.smollm2 import REAL_DIR
from tests.helpers.tiny_models import tiny_llama

SMALL = {"n_forget": 4, "n_retain": 4, "n_heldout": 4, "seq_len": 24, "memorize_steps": 400, "memorize_lr": 3e-3,
         "unlearn_epochs": 60, "unlearn_lr": 3e-3, "rank": 4, "n_examples": 2}  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fake_real_model(monkeypatch):
    """``demo_real.real_model`` -> (a tiny tied Llama sized to the demo's BPE, that tokenizer); counts calls."""
    calls = []

    def fake(cache_dir=None):
        calls.append(cache_dir)
        tokenizer = train_tokenizer(0, 256)
        return tiny_llama(vocab_size=len(tokenizer)), tokenizer

    monkeypatch.setattr(demo_real, "real_model", fake)
    return calls


def test_real_demo_memorizes_caches_and_unlearns(fake_real_model, tmp_path, capsys, monkeypatch):
    def measured_twice(*args):
        raise AssertionError("demo.scores measures again what the engine measured")

    monkeypatch.setattr(demo, "scores", measured_twice)
    cfg = RealDemoConfig(**SMALL, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache")
    code = demo_real.main(cfg)
    printed = capsys.readouterr().out
    assert fake_real_model == [tmp_path / "cache"]
    summary = json.loads((tmp_path / "out" / "demo.json").read_text())
    stats = summary["memorization"]
    assert summary["model"] == REAL_DIR and stats["train_ma"] >= 0.95 > stats["ma_before_finetune"]
    assert "fine-tuned in" in printed and "forget (4 records)" in printed and "retain perplexity" in printed
    assert "Greedy completions" in printed and (tmp_path / "out" / "report.md").is_file()
    assert code == (0 if summary["success"] else 1)
    assert summary["after"]["forget"]["ma"] < summary["before"]["forget"]["ma"]
    # the table's numbers are the engine's where it measured them, the retain records' MA and EL_10 the demo's
    log = json.loads((tmp_path / "out" / "log.json").read_text())
    final = log["tasks"][-1]["after"]
    assert summary["before"]["forget"] == log["baseline"]["forget"][0]
    assert summary["before"]["heldout"] == log["baseline"]["heldout"]
    assert summary["before"]["retain_ppl"] == log["baseline"]["retain_ppl"]
    assert summary["after"]["forget"] == {"ma": final["forget"][0]["ma"], "el": final["forget"][0]["el"]}
    assert summary["after"]["heldout"] == final["heldout"] and final["heldout"]["el"] is not None
    assert summary["after"]["retain_ppl"] == final["retain_ppl"]
    for when in ("before", "after"):
        assert set(summary[when]["retain"]) == {"ma", "el"}
        assert 0 <= summary[when]["retain"]["ma"] <= 1 and 0 <= summary[when]["retain"]["el"] <= 1
    # a second run: the memorized model from the cache, the base model never loaded
    code_again = demo_real.main(RealDemoConfig(**SMALL, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache"))
    assert fake_real_model == [tmp_path / "cache"] and code_again == code
    assert "Memorized model loaded from the cache" in capsys.readouterr().out


def test_unlearn_config_is_the_default_demos_with_the_retain_weight():
    ucfg = demo_real.unlearn_config(RealDemoConfig(retain_weight=3.0, unlearn_lr=5e-4, rank=4, unlearn_epochs=7))
    assert (ucfg.forget_loss, ucfg.params, ucfg.stop) == ("ihl", "fila", "heldout")
    assert ucfg.retain_weight == 3.0 and ucfg.lr == 5e-4 and ucfg.rank == 4 and ucfg.max_epochs == 7
    assert ucfg.eval_heldout_el_after and ucfg.eval_retain_ppl


def test_the_cache_key_differs_from_the_default_demo_and_between_settings(tmp_path):
    records = {"forget": ["a"], "retain": ["b"], "heldout": ["c"]}
    real = demo.cache_path(RealDemoConfig(cache_dir=tmp_path), records)
    assert real != demo.cache_path(demo.DemoConfig(cache_dir=tmp_path), records)
    assert real != demo.cache_path(RealDemoConfig(cache_dir=tmp_path, target_ma=0.9), records)


@pytest.mark.parametrize(
    ("bad", "message"),
    [({"target_ma": 0.0}, r"target_ma must be a number in \(0, 1\]"), ({"seq_len": 10}, "seq_len must be an int >= 11"),
     ({"n_examples": 13}, r"n_examples must be <= n_forget \(12\)"), ({"unlearn_lr": -1.0}, "unlearn_lr must be"),
     ({"retain_weight": 0.0}, "retain_weight must be")],
)  # fmt: skip
def test_real_demo_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        RealDemoConfig(**bad)


def test_cli_demo_real_flag_runs_the_real_demo(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(demo_real, "main", lambda cfg: seen.append(cfg) or 0)
    assert cli.main(["demo", "--real", "--seed", "3", "--cache-dir", str(tmp_path)]) == 0
    (cfg,) = seen
    assert isinstance(cfg, RealDemoConfig) and cfg.seed == 3 and cfg.cache_dir == tmp_path
    assert cfg.out_dir.name == "fastunlearn-demo-real"


def test_real_demo_runs_on_one_thread_and_restores_the_count(monkeypatch):
    import torch

    seen = []
    monkeypatch.setattr(demo_real, "run_demo", lambda cfg: seen.append((cfg, torch.get_num_threads())) or 0)
    torch.set_num_threads(2)
    try:
        assert demo_real.main(RealDemoConfig(unlearn_lr=5e-4)) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    ((cfg, threads),) = seen
    assert threads == 1 and cfg.unlearn_lr == 5e-4
