"""Unlearning runs on the tiny memorizer: its size (``DEMO``), settings under which it unlearns in a few updates
(``FAST``), a criterion no epoch meets (``NEVER``), token ids as a ``SequenceSet`` (``as_set``, ``ragged``), and
a hook that interrupts a run after an epoch's checkpoint (``stop_at``, raising ``Interrupt``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fastunlearn.data.text import SequenceSet, UnlearningData
from tests.helpers.tiny_models import VOCAB, MemorizerConfig

DEMO = MemorizerConfig(vocab_size=32, seq_len=16, n_forget=4, n_retain=8, n_heldout=8, memorize_steps=150)
# a tiny model unlearns in a few updates at a larger learning rate than the paper's; EL_5 fits 16 tokens
FAST = {"rank": 4, "alpha": 8.0, "lr": 2e-2, "el_n": 5, "micro_batch_size": 2}
NEVER = {"stop": "threshold", "ma_threshold": 0.0, "el_threshold": 0.0}  # a criterion no epoch meets here


def as_set(ids: torch.Tensor, lengths: Sequence[int] | None = None) -> SequenceSet:
    """Every row whole, or right padded to ``lengths``; padding positions hold token 0."""
    mask = torch.ones_like(ids)
    if lengths is not None:
        mask = (torch.arange(ids.shape[1]) < torch.tensor(lengths)[:, None]).long()
    return SequenceSet(ids * mask, mask, torch.arange(len(ids)))


def ragged(lengths: list[int], seed: int, vocab: int = 64, seq_len: int = 9) -> SequenceSet:
    """Seeded random ids right padded to ``lengths``."""
    ids = torch.randint(0, vocab, (len(lengths), seq_len), generator=torch.Generator().manual_seed(seed))
    return as_set(ids, lengths)


class Interrupt(Exception):
    """Raised by ``stop_at``'s hook: the run stops as an interrupted process would, after a checkpoint."""


def stop_at(epoch: int | None = None, task: int | None = None) -> Callable[[int, dict], None]:
    """An ``on_epoch_end`` hook raising ``Interrupt`` at the end of ``epoch`` (of ``task``; any epoch when None)."""

    def hook(k: int, record: dict) -> None:
        if epoch in (None, record["epoch"]) and task in (None, k):
            raise Interrupt

    return hook


# The fault tests' run: a tiny GPT-Neo (tiny_model) with LoRA adapters; min_epochs = max_epochs, so every run
# trains exactly FAULT_EPOCHS updates, then exports.
FAULT_EPOCHS = 2
FAULT_CONFIG = {"params": "lora", "rank": 2, "alpha": 4.0, "lr": 1e-2, "el_n": 3, "micro_batch_size": 2,
                "min_epochs": FAULT_EPOCHS, "max_epochs": FAULT_EPOCHS, "stop": "threshold", "ma_threshold": 0.0,
                "el_threshold": 0.0}  # fmt: skip


def token_set(n: int, seed: int) -> SequenceSet:
    """n random sequences of 8 tokens of the tiny models' vocabulary, unpadded."""
    ids = torch.randint(0, VOCAB, (n, 8), generator=torch.Generator().manual_seed(seed))
    return SequenceSet(ids, torch.ones_like(ids), torch.arange(n))


FAULT_DATA = UnlearningData(token_set(2, 1), token_set(2, 2), None)
