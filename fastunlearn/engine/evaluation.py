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
from fastunlearn.evals.metrics.scoring import IGNORE, score_sequences
from fastunlearn.utils import distributed as dist_utils

RETAIN = "retain"  # the retain set's name among the perplexity sets (utility sets are "utility <name>")


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
    lines ("baseline: held-out set" -> "... MA 3/8 batches"). MA comes from one teacher-forced pass per batch
    (:func:`fastunlearn.evals.metrics.score_sequences`: log p(y) and the greedy token from the last hidden states,
    no (B, T, V) logits). A set with ``labels`` (question/answer pairs) is measured on its answers: MA over the
    labelled positions, EL_n over the prefixes prompt + answer[:k] (``fastunlearn.evals.metrics``)."""
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


def joined(sets: list[SequenceSet]) -> SequenceSet:
    """The rows of ``sets`` in one set, right-padded to the longest (mask 0); labels where any set has them (a set
    without: its real tokens)."""
    width = max(s.input_ids.shape[1] for s in sets)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    def own_labels(s: SequenceSet) -> torch.Tensor:
        return s.input_ids.masked_fill(s.attention_mask == 0, IGNORE) if s.labels is None else s.labels

    labels = None
    if any(s.labels is not None for s in sets):
        labels = torch.cat([pad(own_labels(s), IGNORE) for s in sets])
    ids = torch.cat([pad(s.input_ids, 0) for s in sets])
    mask = torch.cat([pad(s.attention_mask, 0) for s in sets])
    return SequenceSet(ids, mask, torch.cat([s.source_index for s in sets]), labels)


def perplexities(model: nn.Module, sets: dict[str, SequenceSet], cfg: UnlearnConfig, phase: str) -> dict[str, float]:
    """{name: exp(sum of next-token NLL / number of targets)} over the ``ppl_sample`` of each set, padding removed
    (token-weighted; only the labelled targets of a set with ``labels``). Every set's sample is scored together,
    ``cfg.eval_batch_size`` sequences per teacher-forced pass (:func:`score_sequences`); a sequence longer than the
    model's context (``max_position_embeddings``) is scored in sliding windows (``metrics.sequence_nll``)."""
    samples = {name: ppl_sample(seqs, cfg) for name, seqs in sets.items()}
    if not samples:
        return {}
    every = joined(list(samples.values()))
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    windows = context is not None and every.input_ids.shape[1] > context

    def nll_and_count(part: SequenceSet) -> torch.Tensor:  # (n, 2) float64
        if windows:
            lengths = [int(mask.sum()) for mask in part.attention_mask]
            rows = [ids[:n] for ids, n in zip(part.input_ids, lengths)]
            labels = None if part.labels is None else [y[:n] for y, n in zip(part.labels, lengths)]
            nll, count = sequence_nll(model, rows, batch_size=cfg.eval_batch_size, labels=labels)
        else:
            scores = score_sequences(model, part.input_ids, part.attention_mask, part.labels,
                                     batch_size=cfg.eval_batch_size, desc="perplexity")  # fmt: skip
            nll, count = scores.nll, scores.tokens
        return torch.stack([nll, count.double()], dim=1)

    rows = per_sequence(nll_and_count, every, model, cfg, f"{phase} {', '.join(samples)} perplexity")
    out, lo = {}, 0
    for name, sample in samples.items():
        nll, count = rows[lo : lo + len(sample)].sum(0).tolist()
        out[name], lo = math.exp(nll / count), lo + len(sample)
    return out


def sample_ppl(model: nn.Module, seqs: SequenceSet, cfg: UnlearnConfig, phase: str) -> float:
    """:func:`perplexities` of one set."""
    return perplexities(model, {"set": seqs}, cfg, phase)["set"]


def ppl_due(cfg: UnlearnConfig, epoch: int) -> bool:
    """Whether the retain and utility perplexities are measured after this epoch (every ``cfg.eval_every``-th; with
    0 never: only before unlearning and after each task)."""
    return cfg.eval_every > 0 and epoch % cfg.eval_every == 0


def retain_and_utility_ppl(
    model: nn.Module, retain: SequenceSet | None, utility: dict[str, SequenceSet] | None, cfg: UnlearnConfig,
    phase: str = "",
) -> tuple[float | None, dict[str, float] | None]:  # fmt: skip
    """(the retain set's perplexity, None unless ``cfg.eval_retain_ppl``; {name: perplexity} of each utility set,
    None when there is none), all sets scored together (:func:`perplexities`). The retain set is the text the run
    trains on; utility sets are text never trained on (what unlearning costs the model)."""
    sets = {RETAIN: retain} if cfg.eval_retain_ppl else {}
    sets.update({f"utility {name}": seqs for name, seqs in (utility or {}).items()})
    values = perplexities(model, sets, cfg, phase)
    util = {name: values[f"utility {name}"] for name in utility or {}} or None
    return values.get(RETAIN), util


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
    retain_value, utility_values = retain_and_utility_ppl(model, retain, utility, cfg, phase="baseline:")
    before = {"forget": forget, "heldout": held, "retain_ppl": retain_value, "utility_ppl": utility_values}
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
