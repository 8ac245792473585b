"""One epoch: the whole forget set's gradient accumulated over micro-batches, then ONE optimizer update.

Multi-process: the epoch's micro-batch pairs (the same list on every rank) go round robin to the ranks, and
only each rank's last backward synchronizes gradients, so the update is the one-process update.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from fastunlearn.data.text import SequenceSet, iterate_batches
from fastunlearn.engine import parallel
from fastunlearn.engine.config import UnlearnConfig
from fastunlearn.engine.evaluation import finite
from fastunlearn.engine.inputs import n_targets
from fastunlearn.losses import REFERENCE_KEY, ForgetTerm
from fastunlearn.losses import forget_units as count_forget_units
from fastunlearn.utils import distributed as dist_utils


def forget_batches(forget: SequenceSet, reference, cfg: UnlearnConfig, generator) -> list[dict]:
    """The epoch's forget micro-batches (``SequenceSet.batch``: with ``labels`` when the set has them); with
    ``reference`` (N,) (NPO) each also holds its rows' values under ``REFERENCE_KEY``. The rows are drawn
    exactly as ``iterate_batches(forget, ...)`` draws them."""
    if reference is None:
        return list(iterate_batches(forget, cfg.micro_batch_size, shuffle=True, generator=generator))
    rows = torch.arange(len(forget))
    index = SequenceSet(rows[:, None], torch.ones(len(forget), 1, dtype=torch.int64), rows)  # (N, 1): row numbers
    chunks = iterate_batches(index, cfg.micro_batch_size, shuffle=True, generator=generator)  # the same draw
    return [{**forget.batch(i), REFERENCE_KEY: reference[i]} for i in (chunk["input_ids"][:, 0] for chunk in chunks)]


def forget_units(batch: dict, cfg: UnlearnConfig) -> int:
    """What the forget term of a micro-batch sums over (``objectives.forget_units``: next-token targets for IHL
    and GA, sequences with at least one target for NPO and SimNPO; only labelled ones when the batch has
    ``labels``), counted where the batch lives."""
    return int(count_forget_units(cfg.forget_loss, batch["input_ids"], batch["attention_mask"], batch.get("labels")))


def epoch_pairs(forget, retain, cfg: UnlearnConfig, generator, reference=None) -> list[tuple[dict, dict | None]]:
    """(forget micro-batch, retain micro-batch or None) pairs of one epoch: the same list on every rank."""
    f_batches = forget_batches(forget, reference, cfg, generator)
    r_batches = []
    if retain is not None and cfg.retain_weight > 0:
        r_batches = list(iterate_batches(retain, cfg.micro_batch_size, shuffle=True, generator=generator))
    pairs = [(f, r_batches[i % len(r_batches)] if r_batches else None) for i, f in enumerate(f_batches)]
    process = dist_utils.current()
    if len(pairs) < process.world_size:
        raise ValueError(
            f"the forget set gives {len(pairs)} micro-batches of micro_batch_size={cfg.micro_batch_size}, fewer "
            f"than the {process.world_size} processes: lower micro_batch_size so that every rank gets one"
        )
    return pairs


def reduce_summary(sums: torch.Tensor, extremes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums added over the ranks, and the max of ``extremes`` (negate to get a min)."""
    if dist_utils.current().distributed:
        sums, extremes = sums.to(dist_utils.comm_device()), extremes.to(dist_utils.comm_device())
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX)
    return sums, extremes


def train_epoch(
    train_model, forget_term: ForgetTerm, retain_term: ForgetTerm, optimizer, params, forget, retain,
    cfg: UnlearnConfig, generator, device, reference=None,
) -> dict:  # fmt: skip
    """Accumulate the whole forget set's gradient over micro-batches, then make ONE update (unless not finite).
    Multi-process: rank r runs pairs r, r + world_size, ...; its last backward reduces the gradients.

    The forget term is a sum over the micro-batch's units (``forget_units``: tokens, or sequences for NPO /
    SimNPO) divided by the epoch's count of them, so the update does not depend on ``micro_batch_size``.
    ``reference`` (N,): NPO's reference log-likelihoods of ``forget`` (``engine.reference``)."""
    pairs = epoch_pairs(forget, retain, cfg, generator, reference)
    n_forget = sum(forget_units(f, cfg) for f, _ in pairs)
    n_retain = sum(n_targets(r) for _, r in pairs if r is not None)
    process = dist_utils.current()
    mine = pairs[process.rank :: process.world_size]
    scale = process.world_size  # DDP / FSDP average the ranks' gradients; the update needs their sum
    optimizer.zero_grad(set_to_none=True)
    train_model.train()
    f_sums, r_sums, f_means = [], [], []  # stay on the device: no host sync inside the loop
    progress = tqdm(mine, desc="micro-batches", leave=False, disable=None if process.is_main else True)
    for i, (f, r) in enumerate(progress):
        n = forget_units(f, cfg)  # counted on the CPU copy: no sync
        with parallel.gradient_sync(train_model, enabled=i == len(mine) - 1):
            f = {k: v.to(device) for k, v in f.items()}
            f_sum = forget_term(train_model, f)  # summed over the micro-batch's next-token targets
            loss = f_sum / n_forget  # this micro-batch's share of the mean over the epoch's forget units
            if r is not None:
                r = {k: v.to(device) for k, v in r.items()}
                r_sum = retain_term(train_model, r)  # summed over the micro-batch's next-token targets
                loss = loss + cfg.retain_weight * r_sum / n_retain
                r_sums.append(r_sum.detach())
            (loss * scale).backward()
        f_sums.append(f_sum.detach())
        if n:
            f_means.append(f_sum.detach() / n)
    grad_norm = parallel.total_norm([p.grad for p in params if p.grad is not None])
    means = torch.stack(f_means)
    retain_sum = torch.stack(r_sums).sum() if r_sums else torch.zeros((), device=device)
    sums, extremes = reduce_summary(
        torch.stack([torch.stack(f_sums).sum(), retain_sum]), torch.stack([-means.min(), means.max()])
    )
    summary = torch.stack(
        [sums[0] / n_forget, -extremes[0], extremes[1], sums[1] / max(n_retain, 1), grad_norm.to(sums.device)]
    )
    forget_loss, low, high, retain_value, norm = summary.tolist()  # host sync: once per epoch
    updated = all(math.isfinite(v) for v in (forget_loss, retain_value, norm))
    if updated:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # frees the gradients while evaluating
    return {
        "forget_loss": finite(forget_loss),  # mean forget term over the epoch's forget units, before the update
        "retain_loss": finite(retain_value) if n_retain else None,
        "forget_loss_range": [
            finite(low),
            finite(high),
        ],  # min, max of the micro-batches' mean forget term
        "grad_norm": finite(norm),
        "updated": updated,
    }
