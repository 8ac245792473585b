"""``fastunlearn demo --real`` with ``real_model`` replaced by a tiny Llama (tied embeddings, like SmolLM2) and the
default demo's BPE tokenizer, so no test downloads anything: memorized to the target MA, cached, unlearned by the
engine, the table and completions printed; a second run reads the cache and never loads the base model."""

from __future__ import annotations

import json

import pytest
from test_tied_embeddings import tiny_llama

from fastunlearn import cli, demo_real
from fastunlearn.demo_data import train_tokenizer
from fastunlearn.demo_real import RealDemoConfig
from fastunlearn.models import REAL_DIR

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


def test_real_demo_memorizes_caches_and_unlearns(fake_real_model, tmp_path, capsys):
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
    # a second run: the memorized model from the cache, the base model never loaded
    code_again = demo_real.main(RealDemoConfig(**SMALL, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache"))
    assert fake_real_model == [tmp_path / "cache"] and code_again == code
    assert "Memorized model loaded from the cache" in capsys.readouterr().out


def test_the_cache_key_differs_from_the_default_demo_and_between_settings(tmp_path):
    from fastunlearn import demo

    records = {"forget": ["a"], "retain": ["b"], "heldout": ["c"]}
    real = demo.cache_path(RealDemoConfig(cache_dir=tmp_path), records)
    assert real != demo.cache_path(demo.DemoConfig(cache_dir=tmp_path), records)
    assert real != demo.cache_path(RealDemoConfig(cache_dir=tmp_path, target_ma=0.9), records)


@pytest.mark.parametrize(
    ("bad", "message"),
    [({"target_ma": 0.0}, r"target_ma must be a number in \(0, 1\]"), ({"seq_len": 10}, "seq_len must be an int >= 11"),
     ({"n_examples": 13}, r"n_examples must be <= n_forget \(12\)"), ({"unlearn_lr": -1.0}, "unlearn_lr must be")],
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
