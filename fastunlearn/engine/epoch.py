"""One epoch: a seeded permutation of the forget set cut into updates of ``batch_size`` sequences (None: the whole
set, ONE update per epoch, the paper's TDEC protocol; 32: TOFU's effective batch), each update's gradient
accumulated over micro-batches of ``micro_batch_size``, then one optimizer step per update.

Multi-process: each update's micro-batch pairs (the same list on every rank) go round robin to the ranks, and
only each rank's last backward of the update synchronizes gradients, so every update is the one-process update.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager

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


def forget_batches(forget: SequenceSet, reference, cfg: UnlearnConfig, generator) -> list[list[dict]]:
    """The epoch's forget micro-batches (``SequenceSet.batch``: with ``labels`` when the set has them), grouped by
    update: one seeded permutation of the rows (the draw of ``iterate_batches(forget, ..., shuffle=True)``) cut
    into updates of ``cfg.batch_size`` rows (None: one update of all), each cut into micro-batches of
    ``cfg.micro_batch_size`` rows (the last ones smaller). With ``reference`` (N,) (NPO) each micro-batch also
    holds its rows' values under ``REFERENCE_KEY``."""
    order = torch.randperm(len(forget), generator=generator)
    size, micro = cfg.batch_size or len(forget), cfg.micro_batch_size
    updates = []
    for lo in range(0, len(order), size):
        rows = order[lo : lo + size]
        chunks = [rows[m : m + micro] for m in range(0, len(rows), micro)]
        batches = [forget.batch(i) for i in chunks]
        if reference is not None:
            batches = [{**b, REFERENCE_KEY: reference[i]} for b, i in zip(batches, chunks)]
        updates.append(batches)
    return updates


def forget_units(batch: dict, cfg: UnlearnConfig) -> int:
    """What the forget term of a micro-batch sums over (``objectives.forget_units``: next-token targets for IHL
    and GA, sequences with at least one target for NPO and SimNPO; only labelled ones when the batch has
    ``labels``), counted where the batch lives."""
    return int(count_forget_units(cfg.forget_loss, batch["input_ids"], batch["attention_mask"], batch.get("labels")))


def epoch_pairs(forget, retain, cfg: UnlearnConfig, generator, reference=None) -> list[list[tuple[dict, dict | None]]]:
    """The epoch's updates, each a list of (forget micro-batch, retain micro-batch or None) pairs: the same lists on
    every rank. The retain micro-batches come from one shuffle of the retain set per epoch, the i-th forget
    micro-batch of the epoch paired with the (i mod their number)-th."""
    updates = forget_batches(forget, reference, cfg, generator)
    r_batches = []
    if retain is not None and cfg.retain_weight > 0:
        r_batches = list(iterate_batches(retain, cfg.micro_batch_size, shuffle=True, generator=generator))
    out, i = [], 0
    for f_batches in updates:
        out.append([(f, r_batches[(i + j) % len(r_batches)] if r_batches else None) for j, f in enumerate(f_batches)])
        i += len(f_batches)
    process = dist_utils.current()
    fewest = min(len(pairs) for pairs in out)
    if fewest < process.world_size:
        raise ValueError(
            f"an update of the forget set gives {fewest} micro-batches of micro_batch_size={cfg.micro_batch_size} "
            f"(batch_size={cfg.batch_size}, {len(forget)} forget sequences), fewer than the {process.world_size} "
            "processes: lower micro_batch_size so that every rank gets one in every update"
        )
    return out


def reduce_summary(sums: torch.Tensor, extremes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums added over the ranks, and the max of ``extremes`` (negate to get a min)."""
    if dist_utils.current().distributed:
        sums, extremes = sums.to(dist_utils.comm_device()), extremes.to(dist_utils.comm_device())
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX)
    return sums, extremes


def accumulate(train_model, forget_term: ForgetTerm, retain_term: ForgetTerm, pairs, params, cfg: UnlearnConfig,
               device, bar) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:  # fmt: skip
    """One update's gradient, accumulated over its micro-batch pairs (this rank's share). Returns the forget and
    retain sums (2,) and the [-min, max] of the micro-batches' mean forget term (2,), both reduced over the
    ranks, the gradient norm, and the update's forget units and retain targets."""
    n_forget = sum(forget_units(f, cfg) for f, _ in pairs)
    n_retain = sum(n_targets(r) for _, r in pairs if r is not None)
    process = dist_utils.current()
    mine = pairs[process.rank :: process.world_size]
    scale = process.world_size  # DDP / FSDP average the ranks' gradients; the update needs their sum
    f_sums, r_sums, f_means = [], [], []  # stay on the device: no host sync inside the loop
    for i, (f, r) in enumerate(mine):
        n = forget_units(f, cfg)  # counted on the CPU copy: no sync
        with parallel.gradient_sync(train_model, enabled=i == len(mine) - 1):
            f = {k: v.to(device) for k, v in f.items()}
            f_sum = forget_term(train_model, f)  # summed over the micro-batch's next-token targets
            loss = f_sum / n_forget  # this micro-batch's share of the mean over the update's forget units
            if r is not None:
                r = {k: v.to(device) for k, v in r.items()}
                r_sum = retain_term(train_model, r)  # summed over the micro-batch's next-token targets
                loss = loss + cfg.retain_weight * r_sum / n_retain
                r_sums.append(r_sum.detach())
            (loss * scale).backward()
        f_sums.append(f_sum.detach())
        if n:
            f_means.append(f_sum.detach() / n)
        bar.update(1)
    grad_norm = parallel.total_norm([p.grad for p in params if p.grad is not None])
    means = torch.stack(f_means)
    retain_sum = torch.stack(r_sums).sum() if r_sums else torch.zeros((), device=device)
    sums, extremes = reduce_summary(
        torch.stack([torch.stack(f_sums).sum(), retain_sum]), torch.stack([-means.min(), means.max()])
    )
    return sums, extremes, grad_norm.to(sums.device), n_forget, n_retain


def train_epoch(
    train_model, forget_term: ForgetTerm, retain_term: ForgetTerm, optimizer, params, forget, retain,
    cfg: UnlearnConfig, generator, device, reference=None,
    weights: Callable[[], AbstractContextManager] | None = None,
) -> dict:  # fmt: skip
    """One epoch: ceil(N / ``cfg.batch_size``) updates (one when None), each from its sequences' gradient
    accumulated over micro-batches, unless not finite: then the epoch stops without that update.
    Multi-process: rank r runs pairs r, r + world_size, ... of each update; its last backward reduces the gradients.

    The forget term is a sum over the micro-batch's units (``forget_units``: tokens, or sequences for NPO /
    SimNPO) divided by the update's count of them, so the update does not depend on ``micro_batch_size``; the
    retain term likewise. ``reference`` (N,): NPO's reference log-likelihoods of ``forget`` (``engine.reference``).
    ``weights()``: a context each update's forward and backward passes run in, left before its step (quant_aware:
    the deployed weights with a straight-through gradient, ``engine.quantized``).
    The record: the mean forget and retain terms over the epoch's units (each measured before its own update), the
    min and max of the micro-batches' mean forget term, the largest gradient norm of the epoch's updates, and
    "updated": whether every update was made."""
    updates = epoch_pairs(forget, retain, cfg, generator, reference)
    process = dist_utils.current()
    train_model.train()
    sums, extremes, norms = [], [], []
    n_forget = n_retain = 0
    updated = True
    total = sum(len(pairs[process.rank :: process.world_size]) for pairs in updates)
    bar = tqdm(total=total, desc="micro-batches", leave=False, disable=None if process.is_main else True)
    for pairs in updates:
        optimizer.zero_grad(set_to_none=True)
        with weights() if weights is not None else contextlib.nullcontext():
            s, e, norm, n_f, n_r = accumulate(train_model, forget_term, retain_term, pairs, params, cfg, device, bar)
        sums.append(s)
        extremes.append(e)
        norms.append(norm)
        n_forget, n_retain = n_forget + n_f, n_retain + n_r
        check = torch.stack([s[0] / n_f, s[1] / max(n_r, 1), norm]).tolist()  # host sync: once per update
        if not all(math.isfinite(v) for v in check):
            updated = False
            break
        optimizer.step()
    bar.close()
    optimizer.zero_grad(set_to_none=True)  # frees the gradients while evaluating
    total_sums, worst = torch.stack(sums).sum(0), torch.stack(extremes).max(0).values
    summary = torch.stack(
        [total_sums[0] / n_forget, -worst[0], worst[1], total_sums[1] / max(n_retain, 1), torch.stack(norms).max()]
    )
    forget_loss, low, high, retain_value, norm = summary.tolist()  # host sync: once per epoch
    return {
        "forget_loss": finite(forget_loss),  # mean forget term over the epoch's forget units, each before its update
        "retain_loss": finite(retain_value) if n_retain else None,
        "forget_loss_range": [finite(low), finite(high)],  # min, max of the micro-batches' mean forget term
        "grad_norm": finite(norm),  # the largest of the epoch's updates
        "updated": updated,
    }
