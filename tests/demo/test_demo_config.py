"""The demos' configurations: one base (``fastunlearn.demo.config.BaseDemoConfig``) validated in __post_init__,
extended by the default demo's and the real-model demo's."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from fastunlearn.demo.config import EL_N, BaseDemoConfig
from fastunlearn.demo.real import RealDemoConfig
from fastunlearn.demo.toy import MAX_SEQ_LEN, DemoConfig

CONFIGS = (DemoConfig, RealDemoConfig)


def test_both_demos_extend_the_base_and_keep_their_own_defaults():
    base = {f.name for f in fields(BaseDemoConfig)}
    assert base < {f.name for f in fields(DemoConfig)} and base < {f.name for f in fields(RealDemoConfig)}
    toy, real = DemoConfig(), RealDemoConfig()
    assert (toy.n_retain, toy.rank, toy.unlearn_epochs, toy.out_dir) == (36, 16, 100, Path("fastunlearn-demo"))
    assert (real.n_retain, real.rank, real.unlearn_epochs, real.out_dir) == (12, 8, 20, Path("fastunlearn-demo-real"))
    assert toy.sizes == {"forget": 12, "retain": 36, "heldout": 12} and real.sizes["retain"] == 12


@pytest.mark.parametrize("cls", CONFIGS)
@pytest.mark.parametrize(
    "options, match",
    [
        ({"seed": 1.0}, "seed must be an int, got 1.0"),
        ({"n_forget": 0}, "n_forget must be an int >= 1, got 0"),
        ({"seq_len": EL_N}, f"seq_len must be an int >= {EL_N + 1}, got {EL_N}"),
        ({"n_examples": 13}, r"n_examples must be <= n_forget \(12\), got 13"),
        ({"n_forget": 70, "n_heldout": 20}, "n_forget \\+ n_retain \\+ n_heldout must be <= 80"),
        ({"unlearn_lr": 0.0}, "unlearn_lr must be a finite number > 0, got 0.0"),
    ],
)
def test_the_shared_fields_are_checked_alike(cls, options, match):
    with pytest.raises(ValueError, match=match):
        cls(**options)


def test_each_demo_checks_its_own_fields():
    with pytest.raises(ValueError, match=f"seq_len must be <= {MAX_SEQ_LEN}"):
        DemoConfig(seq_len=MAX_SEQ_LEN + 1)
    with pytest.raises(ValueError, match="hidden_size must be a multiple of 4"):
        DemoConfig(hidden_size=6)
    with pytest.raises(ValueError, match=r"target_ma must be a number in \(0, 1\], got 1.5"):
        RealDemoConfig(target_ma=1.5)
    with pytest.raises(ValueError, match="retain_weight must be a finite number > 0"):
        RealDemoConfig(retain_weight=0.0)
    assert RealDemoConfig(seq_len=MAX_SEQ_LEN + 8).seq_len == 40  # SmolLM2's records are longer


def test_the_cache_key_holds_the_settings_the_memorized_model_depends_on():
    toy = DemoConfig().memorization_settings()
    assert set(toy) == {"format", "vocab_size", "memorized_ma", "check_every", "seed", "n_forget", "n_retain",
                        "n_heldout", "seq_len", "hidden_size", "num_layers", "memorize_steps",
                        "memorize_lr"}  # fmt: skip
    real = RealDemoConfig().memorization_settings()
    assert set(real) == {"format", "model", "check_every", "seed", "n_forget", "n_retain", "n_heldout", "seq_len",
                         "memorize_steps", "memorize_lr", "target_ma"}  # fmt: skip
    assert DemoConfig(unlearn_lr=1e-3).memorization_settings() == toy  # unlearning settings reuse the cache
    assert DemoConfig(num_layers=3).memorization_settings() != toy
    with pytest.raises(NotImplementedError):
        BaseDemoConfig().memorization_settings()
