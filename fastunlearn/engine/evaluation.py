"""Measuring a run: MA and EL_n of a set, retain perplexity, the criterion and the stop rule.

Multi-process: each rank measures its share of the sequences and every rank gets every value.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .. import _parallel
from .. import distributed as dist_utils
from ..data import SequenceSet
from ..metrics import extraction_likelihood, memorization_accuracy, sequence_nll
from .config import UnlearnConfig


def per_sequence(fn: Callable[[SequenceSet], torch.Tensor], seqs: SequenceSet, model: nn.Module) -> torch.Tensor:
    """``fn(seqs)`` (N, ...) float64 per sequence. Multi-process: each rank computes its share of the sequences
    (under FSDP in lockstep, see ``_parallel.lockstep``) and every rank gets all rows."""
    process = dist_utils.current()
    if not process.distributed:
        return fn(seqs)
    index = torch.tensor(dist_utils.owned(len(seqs), process), dtype=torch.int64)
    with _parallel.lockstep(model):
        local = fn(seqs[index]) if len(index) else torch.zeros(0, dtype=torch.float64)
    return dist_utils.gather_rows(local, index, len(seqs))


def measure(model: nn.Module, seqs: SequenceSet, cfg: UnlearnConfig, limit: float | None = None) -> dict:
    """{"ma", "el"}: mean MA, and mean EL_n unless ``limit`` is given and MA is above it (then None)."""
    batch = cfg.eval_batch_size
    ma = per_sequence(
        lambda s: memorization_accuracy(model, s.input_ids, s.attention_mask, batch_size=batch), seqs, model
    )
    ma = ma.mean().item()
    if limit is not None and ma > limit:
        return {"ma": ma, "el": None}
    el = per_sequence(
        lambda s: extraction_likelihood(
            model, s.input_ids, cfg.el_n, attention_mask=s.attention_mask, batch_size=batch
        ),
        seqs,
        model,
    )
    return {"ma": ma, "el": el.mean().item()}


def retain_ppl(model: nn.Module, retain: SequenceSet | None, cfg: UnlearnConfig) -> float | None:
    """Token-weighted perplexity of the retain set (padding removed)."""
    if not cfg.eval_retain_ppl:
        return None

    def nll_and_count(seqs: SequenceSet) -> torch.Tensor:  # (n, 2) float64
        rows = [ids[: int(mask.sum())] for ids, mask in zip(seqs.input_ids, seqs.attention_mask)]
        nll, count = sequence_nll(model, rows, batch_size=cfg.eval_batch_size)
        return torch.stack([nll, count.double()], dim=1)

    nll, count = per_sequence(nll_and_count, retain, model).sum(0).tolist()
    return math.exp(nll / count)


def criterion_met(metrics: dict, criterion: dict) -> bool:
    return metrics["el"] is not None and metrics["ma"] <= criterion["ma"] and metrics["el"] <= criterion["el"]


def finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def baseline(model: nn.Module, cfg: UnlearnConfig, tasks, retain, heldout) -> tuple[dict, dict]:
    """(metrics before unlearning, the criterion's limits)."""
    before = {
        "forget": [measure(model, t, cfg) for t in tasks],
        "heldout": None if heldout is None else measure(model, heldout, cfg),
        "retain_ppl": retain_ppl(model, retain, cfg),
    }
    limits = before["heldout"] if cfg.stop == "heldout" else {"ma": cfg.ma_threshold, "el": cfg.el_threshold}
    return before, {"stop": cfg.stop, "ma": limits["ma"], "el": limits["el"]}


def stop_reason(record: dict, cfg: UnlearnConfig) -> str | None:
    """Why the task stops after this epoch's ``record``, or None to go on."""
    epoch = record["epoch"]
    if not record["updated"]:
        return f"non-finite loss or gradient at epoch {epoch}: stopped without that update"
    if record["criterion_met"] and epoch >= cfg.min_epochs:
        return f"criterion met at epoch {epoch}"
    if epoch == cfg.max_epochs:
        return f"max_epochs ({cfg.max_epochs}) reached without meeting the criterion"
    return None


def epoch_check(ma_of: Callable[[], float], el_of: Callable[[], float], criterion: dict) -> tuple[dict, bool]:
    """One epoch end's stop check, the engine's rule for any training loop: the forget set's mean MA
    (``ma_of()``), then its mean EL_n (``el_of()``) only when MA is within ``criterion["ma"]`` (EL is expensive;
    None otherwise). Returns ({"ma", "el"}, :func:`criterion_met` of them)."""
    ma = ma_of()
    metrics = {"ma": ma, "el": el_of() if ma <= criterion["ma"] else None}
    return metrics, criterion_met(metrics, criterion)
