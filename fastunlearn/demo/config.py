"""What the demos' configurations share: :class:`BaseDemoConfig`, extended by ``toy.DemoConfig`` (``fastunlearn
demo``) and ``real.RealDemoConfig`` (``fastunlearn demo --real``).

Both demos make the same synthetic records, memorize the forget and retain records, cache the memorized model
under a key of :meth:`BaseDemoConfig.memorization_settings`, unlearn the forget records with FILA + IHL and
write to ``out_dir``. The defaults are the default demo's; the real demo overrides some and adds its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from fastunlearn.demo.data import FIRST_NAMES
from fastunlearn.utils.validate import check_int, check_number

EL_N = 10  # EL_10: the paper's extraction likelihood; a record needs more tokens than this


@dataclass
class BaseDemoConfig:
    seed: int = 0  # records, tokenizer corpus, model initialization, memorization order, unlearning
    n_forget: int = 12  # records to forget
    n_retain: int = 36  # records to keep (trained on, and the retain loss's data)
    n_heldout: int = 12  # records never trained on: what "forgotten" looks like
    seq_len: int = 32  # tokens per record (its first seq_len tokens)
    memorize_steps: int = 300  # at most; memorization stops once the records it checks are memorized
    memorize_lr: float = 3e-3
    unlearn_epochs: int = 100  # max_epochs of the engine (one update each)
    unlearn_lr: float = 2e-4  # the paper's FILA learning rate
    rank: int = 16  # FILA adapter rank (alpha = 2 x rank)
    n_examples: int = 3  # forget records whose greedy completions are shown
    out_dir: str | os.PathLike = "fastunlearn-demo"  # replaced if it holds a previous demo output
    cache_dir: str | os.PathLike | None = None  # cache root; None: $FASTUNLEARN_CACHE_DIR or ~/.cache/fastunlearn

    # The fields the memorized model depends on (a subclass adds its own), and those that must be > 0.
    MEMORIZATION_FIELDS: ClassVar[tuple[str, ...]] = (
        "seed", "n_forget", "n_retain", "n_heldout", "seq_len", "memorize_steps", "memorize_lr",
    )  # fmt: skip
    POSITIVE_FIELDS: ClassVar[tuple[str, ...]] = ("memorize_lr", "unlearn_lr")

    def __post_init__(self) -> None:
        check_int("seed", self.seed)
        for name, low in self.minimums().items():
            check_int(name, getattr(self, name), low)
        if sum(self.sizes.values()) > len(FIRST_NAMES):
            raise ValueError(
                f"n_forget + n_retain + n_heldout must be <= {len(FIRST_NAMES)} (one first name per record), got "
                f"{sum(self.sizes.values())}"
            )
        if self.n_examples > self.n_forget:
            raise ValueError(f"n_examples must be <= n_forget ({self.n_forget}), got {self.n_examples}")
        for name in self.POSITIVE_FIELDS:
            check_number(name, getattr(self, name), 0, strict=True)
        self.out_dir = Path(self.out_dir)
        self.cache_dir = None if self.cache_dir is None else Path(self.cache_dir)

    def minimums(self) -> dict[str, int]:
        """{field: its smallest value} of the int fields (``seed`` aside: any int)."""
        return {"n_forget": 1, "n_retain": 1, "n_heldout": 1, "seq_len": EL_N + 1, "memorize_steps": 1,
                "unlearn_epochs": 1, "rank": 1, "n_examples": 0}  # fmt: skip

    @property
    def sizes(self) -> dict[str, int]:
        return {"forget": self.n_forget, "retain": self.n_retain, "heldout": self.n_heldout}

    def fixed_settings(self) -> dict:
        """What else the memorized model depends on: the demo's constants (cache format, model, tokenizer)."""
        raise NotImplementedError

    def memorization_settings(self) -> dict:
        """What the memorized model depends on (the cache key, with the records themselves)."""
        return {**self.fixed_settings(), **{name: getattr(self, name) for name in self.MEMORIZATION_FIELDS}}
