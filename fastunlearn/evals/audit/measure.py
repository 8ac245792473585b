"""What the probes share: the sets as ``SequenceSet``, their bounded samples, per-sequence MA and EL_n, the
criterion, and the progress lines of an audit."""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor, nn

from fastunlearn.data.labels import answer_start
from fastunlearn.data.text import SequenceSet
from fastunlearn.evals.metrics import extraction_likelihood, memorization_accuracy
from fastunlearn.utils.validate import check_token_ids

logger = logging.getLogger("fastunlearn.evals.audit")
clock = time.monotonic  # seconds (a test replaces it)


def as_set(name: str, data: object) -> SequenceSet:
    """``data`` as a SequenceSet: one already, or (N, T) int token ids (every token real). TypeError / ValueError
    naming ``name``."""
    if isinstance(data, SequenceSet):
        seqs = data
    elif isinstance(data, Tensor):
        if data.dim() != 2 or data.dtype.is_floating_point or data.dtype == torch.bool:
            raise ValueError(f"{name} must be (N, T) integer token ids, got {data.dtype} of shape {tuple(data.shape)}")
        ids = data.detach().long().cpu()
        seqs = SequenceSet(ids, torch.ones_like(ids), torch.arange(len(ids)))
    else:
        raise TypeError(f"{name} must be a SequenceSet or (N, T) token ids, got {type(data).__name__}")
    if len(seqs) == 0:
        raise ValueError(f"{name} is empty")
    return seqs


def check_tokens(name: str, seqs: SequenceSet, model: nn.Module) -> None:
    """Every token id (and scored label) of ``seqs`` has a row in ``model``'s input embeddings."""
    check_token_ids(name, seqs.input_ids, model)
    if seqs.labels is not None and bool((seqs.labels != -100).any()):
        check_token_ids(f"{name} labels", seqs.labels[seqs.labels != -100], model)


def sample(seqs: SequenceSet, limit: int | None, seed: int) -> SequenceSet:
    """At most ``limit`` rows, drawn without replacement by a generator of their own seeded with ``seed`` and kept
    in the set's order (the engine's rule for its retain perplexity sample); the whole set when it is smaller."""
    if limit is None or len(seqs) <= limit:
        return seqs
    index = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed))[:limit]
    return seqs[index.sort().values]


def ma_el(model: nn.Module, seqs: SequenceSet, el_n: int, batch_size: int) -> dict[str, Tensor]:
    """{"ma", "el"}: (N,) float64 MA and EL_n of each sequence (a set with ``labels``: on its answers, as the
    engine measures question/answer sets)."""
    ma = memorization_accuracy(model, seqs.input_ids, seqs.attention_mask, labels=seqs.labels, batch_size=batch_size)
    el = extraction_likelihood(
        model, seqs.input_ids, el_n, attention_mask=seqs.attention_mask, batch_size=batch_size,
        answer_start=None if seqs.labels is None else answer_start(seqs.labels),
    )  # fmt: skip
    return {"ma": ma, "el": el}


def means(values: dict[str, Tensor], rows: Tensor | None = None) -> dict[str, float]:
    """{"ma", "el"}: the means of per-sequence values (over ``rows`` when given)."""
    return {k: float((v if rows is None else v[rows]).mean()) for k, v in values.items()}


def meets(forget: dict[str, float], limit: dict[str, float]) -> bool:
    """The engine's criterion: forget MA and EL_n each at or below its limit."""
    return forget["ma"] <= limit["ma"] and forget["el"] <= limit["el"]


def higher(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """The larger of two {"ma", "el"} values, metric by metric."""
    return {k: max(a[k], b[k]) for k in a}


class Steps:
    """Progress of an audit as log lines (logger ``fastunlearn.evals.audit``, INFO): ``start(what)`` before a step,
    ``done()`` after it: "audit: quantization q4_1 done, step 4/11, 42 s elapsed, ETA 74 s" (ETA = elapsed / steps
    done x steps left). The metrics show their own bars on a terminal within a step."""

    def __init__(self, total: int) -> None:
        self.total, self.done_steps, self.what = total, 0, ""
        self.start_time = clock()

    def start(self, what: str) -> None:
        self.what = what
        logger.info("audit: %s ...", what)

    def done(self) -> None:
        self.done_steps += 1
        elapsed = clock() - self.start_time
        eta = elapsed / self.done_steps * max(self.total - self.done_steps, 0)
        logger.info("audit: %s done, step %d/%d, %.0f s elapsed, ETA %.0f s", self.what, self.done_steps, self.total,
                    elapsed, eta)  # fmt: skip
