"""Measuring a run: MA and EL_n of a set, retain and utility perplexity, the criterion and the stop rule.

Multi-process: each rank measures its share of the sequences and every rank gets every value.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import nn

from fastunlearn.data.labels import answer_start
from fastunlearn.data.text import SequenceSet
from fastunlearn.engine import parallel
from fastunlearn.engine.cache import HeldoutCache
from fastunlearn.engine.config import UnlearnConfig
from fastunlearn.engine.inputs import set_name
from fastunlearn.engine.progress import Progress, info
from fastunlearn.engine.runlog import EpochRecord
from fastunlearn.evals.metrics import extraction_likelihood, memorization_accuracy, sequence_nll
from fastunlearn.evals.metrics.common import inference
from fastunlearn.utils import distributed as dist_utils


def seeded_sample(seqs: SequenceSet, limit: int | None, seed: int) -> SequenceSet:
    """``limit`` of the sequences, drawn without replacement by a generator of their own seeded with ``seed`` (the
    run's data order is untouched) and kept in the set's order; the whole set when ``limit`` is None or >= N."""
    if limit is None or len(seqs) <= limit:
        return seqs
    index = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed))[:limit]
    return seqs[index.sort().values]


def ppl_sample(seqs: SequenceSet, cfg: UnlearnConfig) -> SequenceSet:
    """The sequences of a retain or utility set whose perplexity is measured: one seeded sample of at most
    ``cfg.eval_retain_max``, the same before, every epoch and after."""
    return seeded_sample(seqs, cfg.eval_retain_max, cfg.seed)


def in_batches(fn: Callable[[SequenceSet], torch.Tensor], seqs: SequenceSet, size: int, phase: str) -> torch.Tensor:
    """``fn`` on ``size`` sequences at a time, rows concatenated (N, ...), a progress line as it goes."""
    progress = Progress(phase, -(-len(seqs) // size))
    parts = []
    for lo in range(0, len(seqs), size):
        parts.append(fn(seqs[lo : lo + size]))
        progress.step()
    return torch.cat(parts)


def per_sequence(fn: Callable[[SequenceSet], torch.Tensor], seqs: SequenceSet, model: nn.Module, cfg: UnlearnConfig,
                 phase: str) -> torch.Tensor:  # fmt: skip
    """``fn`` (N, ...) float64 per sequence, ``cfg.eval_batch_size`` sequences per call (progress lines of
    ``phase``). Multi-process: each rank computes its share of the sequences (under FSDP in lockstep, see
    ``parallel.lockstep``) and every rank gets all rows."""
    size = cfg.eval_batch_size
    process = dist_utils.current()
    if not process.distributed:
        return in_batches(fn, seqs, size, phase)
    index = torch.tensor(dist_utils.owned(len(seqs), process), dtype=torch.int64)
    with parallel.lockstep(model):
        local = in_batches(fn, seqs[index], size, phase) if len(index) else torch.zeros(0, dtype=torch.float64)
    return dist_utils.gather_rows(local, index, len(seqs))


def measure(model: nn.Module, seqs: SequenceSet, cfg: UnlearnConfig, limit: float | None = None, *, el: bool = True,
            phase: str = "") -> dict:  # fmt: skip
    """{"ma", "el"}: mean MA, and mean EL_n unless ``el`` is False, ``cfg.stop`` is "epochs" (no criterion needs
    it; EL costs most), or ``limit`` is given and MA is above it (then None). ``phase`` names the set in progress
    lines ("baseline: held-out set" -> "... MA 3/8 batches"). A set with ``labels`` (question/answer pairs) is
    measured on its answers: MA over the labelled positions, EL_n over the prefixes prompt + answer[:k]
    (``fastunlearn.evals.metrics``)."""
    batch = cfg.eval_batch_size
    ma = per_sequence(
        lambda s: memorization_accuracy(model, s.input_ids, s.attention_mask, labels=s.labels, batch_size=batch),
        seqs, model, cfg, f"{phase} MA",
    )  # fmt: skip
    ma = ma.mean().item()
    if not el or cfg.stop == "epochs" or (limit is not None and ma > limit):
        return {"ma": ma, "el": None}
    el = per_sequence(
        lambda s: extraction_likelihood(
            model, s.input_ids, cfg.el_n, attention_mask=s.attention_mask, batch_size=batch,
            answer_start=None if s.labels is None else answer_start(s.labels),
        ),
        seqs, model, cfg, f"{phase} EL_{cfg.el_n}",
    )  # fmt: skip
    return {"ma": ma, "el": el.mean().item()}


def sample_ppl(model: nn.Module, seqs: SequenceSet, cfg: UnlearnConfig, phase: str) -> float:
    """exp(sum of next-token NLL / number of targets) over the ``ppl_sample`` of ``seqs``, padding removed
    (token-weighted, as ``metrics.sequence_nll`` counts; only the labelled targets of a set with ``labels``);
    progress lines of ``phase``."""

    def nll_and_count(part: SequenceSet) -> torch.Tensor:  # (n, 2) float64
        lengths = [int(mask.sum()) for mask in part.attention_mask]
        rows = [ids[:n] for ids, n in zip(part.input_ids, lengths)]
        labels = None if part.labels is None else [y[:n] for y, n in zip(part.labels, lengths)]
        nll, count = sequence_nll(model, rows, batch_size=cfg.eval_batch_size, labels=labels)
        return torch.stack([nll, count.double()], dim=1)

    rows = per_sequence(nll_and_count, ppl_sample(seqs, cfg), model, cfg, phase)
    nll, count = rows.sum(0).tolist()
    return math.exp(nll / count)


def retain_ppl(model: nn.Module, retain: SequenceSet | None, cfg: UnlearnConfig, phase: str = "") -> float | None:
    """The retain set's :func:`sample_ppl` (the text the run trains on); None unless ``cfg.eval_retain_ppl``."""
    if not cfg.eval_retain_ppl:
        return None
    return sample_ppl(model, retain, cfg, f"{phase} retain perplexity")


def utility_ppl(model: nn.Module, utility: dict[str, SequenceSet] | None, cfg: UnlearnConfig,
                phase: str = "") -> dict[str, float] | None:  # fmt: skip
    """{name: :func:`sample_ppl`} of each utility set (text never trained on: what unlearning costs the model);
    None when there is none."""
    if not utility:
        return None
    return {name: sample_ppl(model, seqs, cfg, f"{phase} utility {name} perplexity") for name, seqs in utility.items()}


def criterion_met(metrics: dict, criterion: dict) -> bool | None:
    """Whether ``metrics`` meet the criterion's limits; None with stop="epochs" (no criterion)."""
    if criterion.get("stop") == "epochs":
        return None
    return metrics["el"] is not None and metrics["ma"] <= criterion["ma"] and metrics["el"] <= criterion["el"]


def finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def baseline(model: nn.Module, cfg: UnlearnConfig, tasks, retain, heldout, cache: HeldoutCache | None = None,
             utility: dict[str, SequenceSet] | None = None) -> tuple[dict, dict, dict | None]:  # fmt: skip
    """(metrics before unlearning, the criterion's limits, where the held-out values came from). The held-out
    set's are read from ``cache`` when it holds them, else measured (and stored in it)."""
    held = cache.load() if cache is not None else None
    from_cache = held is not None
    retain_part = ""
    if cfg.eval_retain_ppl:
        retain_part = f", retain perplexity on {len(ppl_sample(retain, cfg))} of {len(retain)} sequences"
    for name, seqs in (utility or {}).items():
        retain_part += f", utility {name} perplexity on {len(ppl_sample(seqs, cfg))} of {len(seqs)} sequences"
    sets = [f"{set_name(k, len(tasks))} ({len(t)} sequences)" for k, t in enumerate(tasks)]
    if heldout is not None:
        sets.append(f"held-out set ({len(heldout)} sequences{', from the cache' if from_cache else ''})")
    info("baseline: MA and EL_%d of %s%s", cfg.el_n, ", ".join(sets), retain_part)
    forget = [measure(model, t, cfg, phase=f"baseline: {set_name(k, len(tasks))}") for k, t in enumerate(tasks)]
    if heldout is not None and held is None:
        held = measure(model, heldout, cfg, phase="baseline: held-out set")
        if cache is not None:
            cache.store(held, len(heldout))
    before = {"forget": forget, "heldout": held, "retain_ppl": retain_ppl(model, retain, cfg, phase="baseline:"),
              "utility_ppl": utility_ppl(model, utility, cfg, phase="baseline:")}  # fmt: skip
    source = None if cache is None else {"hit": from_cache, "file": str(cache.path)}
    limits = {"ma": cfg.ma_threshold, "el": cfg.el_threshold}  # stop="epochs": None, None
    if cfg.stop == "heldout":
        limits = before["heldout"]
    return before, {"stop": cfg.stop, "ma": limits["ma"], "el": limits["el"]}, source


def stop_reason(record: EpochRecord, cfg: UnlearnConfig) -> str | None:
    """Why the task stops after this epoch's ``record``, or None to go on."""
    epoch = record.epoch
    if not record.updated:
        return f"non-finite loss or gradient at epoch {epoch}: stopped without that update"
    if cfg.stop == "epochs":
        return f"ran the {epoch} epochs of stop='epochs'" if epoch == cfg.max_epochs else None
    if record.criterion_met and epoch >= cfg.min_epochs:
        return f"criterion met at epoch {epoch}"
    if epoch == cfg.max_epochs:
        return f"max_epochs ({cfg.max_epochs}) reached without meeting the criterion"
    return None


EpochHook = Callable[[nn.Module, int], dict]
HOOK = "evaluate_each_epoch"  # the evaluation hook's keyword; "on_epoch" before (still accepted, deprecated)


def evaluation_hook(evaluate_each_epoch: EpochHook | None, on_epoch: EpochHook | None) -> EpochHook | None:
    """The hook given as ``evaluate_each_epoch``, or as the deprecated ``on_epoch`` (a DeprecationWarning
    pointing at the caller's caller: the code that called ``unlearn`` or ``UnlearnRecipe``); TypeError for both
    or for one that is not callable."""
    if on_epoch is not None:
        if evaluate_each_epoch is not None:
            raise TypeError(f"pass {HOOK} (the evaluation hook) or the deprecated on_epoch, not both")
        warnings.warn(f"on_epoch= is deprecated: pass the same hook as {HOOK}=", DeprecationWarning, stacklevel=3)
        evaluate_each_epoch = on_epoch
    if evaluate_each_epoch is not None and not callable(evaluate_each_epoch):
        raise TypeError(f"{HOOK} must be a callable (model, epoch) -> dict, got {type(evaluate_each_epoch).__name__}")
    return evaluate_each_epoch


def call_hook(hook: EpochHook, model: nn.Module, epoch: int) -> dict[str, float | None]:
    """``hook(model, epoch)`` in eval mode without gradients (the mode restored after), its values checked:
    {name: float}, a non-finite value recorded as None; TypeError / ValueError naming ``evaluate_each_epoch``
    otherwise."""
    with inference(model):
        values = hook(model, epoch)
    if not isinstance(values, dict):
        raise TypeError(f"{HOOK} must return a dict {{name: float}}, got {type(values).__name__} at epoch {epoch}")
    out = {}
    for name, value in values.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{HOOK} must return non-empty string keys, got {name!r} at epoch {epoch}")
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{HOOK} value {name!r} must be a number or None, got {value!r} at epoch {epoch}")
        out[name] = None if value is None else finite(float(value))
    return out


def task_success(record: EpochRecord, cfg: UnlearnConfig) -> bool:
    """Whether a task that stopped after ``record`` succeeded: its last update was made and it met the criterion
    (stop="epochs": it ran every epoch)."""
    return record.updated and (cfg.stop == "epochs" or bool(record.criterion_met))


def epoch_check(ma_of: Callable[[], float], el_of: Callable[[], float], criterion: dict) -> tuple[dict, bool]:
    """One epoch end's stop check, the engine's rule for any training loop: the forget set's mean MA
    (``ma_of()``), then its mean EL_n (``el_of()``) only when MA is within ``criterion["ma"]`` (EL is expensive;
    None otherwise). Returns ({"ma", "el"}, :func:`criterion_met` of them)."""
    ma = ma_of()
    metrics = {"ma": ma, "el": el_of() if ma <= criterion["ma"] else None}
    return metrics, criterion_met(metrics, criterion)
