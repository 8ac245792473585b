"""The unlearning loss of a :func:`~fastunlearn.integrations.hf.data.collate_forget_retain` batch, for any
Trainer's ``compute_loss`` (the normalization is described in ``fastunlearn.integrations.hf``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from fastunlearn import losses as objectives
from fastunlearn.fused_lm import is_fused_ihl_patched
from fastunlearn.integrations.hf.data import FORGET_KEYS, REFERENCE_KEY, RETAIN_KEYS, count_targets, require_keys
from fastunlearn.losses import (
    SEQUENCE_LOSSES,
    UnlearningLossOutput,
    check_fused,
    check_objective,
    forget_term,
    ga_loss,
    retain_loss,
    shift_causal,
)
from fastunlearn.ops.ihl import ihl_loss


def _token_sum(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_fn, **options) -> Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, T, V)
    return loss_fn(*shift_causal(logits, input_ids, attention_mask), reduction="sum", **options)


def _check_patched(model: nn.Module) -> None:
    inner = getattr(model, "module", model)  # DDP / DataParallel keep the model in .module
    if not (is_fused_ihl_patched(model) or is_fused_ihl_patched(inner)):
        raise ValueError("fused_ihl=True needs a model patched by fastunlearn.integrations.patch.patch_fused_ihl")


def _fused_ihl_sum(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, margin: float) -> Tensor:
    """The IHL token sum through a patched model's fused path (through any wrapper's forward: DDP, FSDP)."""
    _check_patched(model)
    out = model(input_ids=input_ids, attention_mask=attention_mask, ihl=True, reduction="sum", margin=margin)
    return out.loss


def _sequence_sum(model: nn.Module, inputs: Mapping[str, Tensor], forget_loss: str, fused: bool, beta, gamma) -> Tensor:
    """The NPO / SimNPO sum over the forget sequences (``objectives.forget_term``); NPO reads ``forget_reference``."""
    forget_ids, forget_mask = require_keys(inputs, FORGET_KEYS, "the forget term needs the forget sequences")
    batch = {"input_ids": forget_ids, "attention_mask": forget_mask}
    if forget_loss == "npo":
        if REFERENCE_KEY not in inputs:
            raise ValueError(
                f"forget_loss='npo' needs the batch key {REFERENCE_KEY!r}: build the dataset as ForgetRetainDataset("
                f"forget, retain, reference=reference_logprobs(model, forget)) before training"
            )
        batch[objectives.REFERENCE_KEY] = inputs[REFERENCE_KEY]
    if fused:
        _check_patched(model)
    return forget_term(forget_loss, fused=fused, beta=beta, gamma=gamma)(model, batch)


def _step_counts(num_items_in_batch, inputs: Mapping[str, Tensor], device: torch.device, sequences: bool) -> Tensor:
    """(2,) float (N_F, N_R), each at least 1 (an all-padding term is then 0, not NaN)."""
    if num_items_in_batch is None:
        return count_targets([inputs], sequences=sequences).to(device).clamp(min=1).float()
    counts = torch.as_tensor(num_items_in_batch)
    if counts.shape != (2,):
        raise ValueError(
            f"num_items_in_batch must be None or the (forget targets, retain targets) of the optimizer step, as "
            f"count_targets returns; got {num_items_in_batch!r} (a single count, such as the Trainer's count of "
            f"labels, cannot normalize the two terms)"
        )
    return counts.to(device).clamp(min=1).float()


def unlearning_compute_loss(
    model: nn.Module,
    inputs: Mapping[str, Tensor],
    *,
    forget_loss: str = "ihl",
    retain_weight: float = 1.0,
    margin: float = 1.0,
    num_items_in_batch: Tensor | Sequence[int] | None = None,
    return_outputs: bool = False,
    fused_ihl: bool = False,
    beta: float | None = None,
    gamma: float | None = None,
) -> Tensor | tuple[Tensor, UnlearningLossOutput]:
    """forget term + retain_weight x retain CE on a :func:`collate_forget_retain` batch, for any Trainer's
    ``compute_loss`` (see the module docstring for the normalization).

    ``num_items_in_batch``: None (token means over this batch) or the (2,) counts (N_F, N_R) of the whole
    optimizer step from :func:`count_targets`. ``return_outputs``: also return the
    ``UnlearningLossOutput(total, forget, retain)`` with the detached terms (retain 0 when not computed).
    ``fused_ihl``: the forget term from hidden states (a model patched by ``patch_fused_ihl``; IHL, NPO,
    SimNPO). ``forget_loss="npo"`` / ``"simnpo"``: a sum over the forget sequences divided by their count N_F
    (``num_items_in_batch`` from ``count_targets(..., sequences=True)``); ``beta``, ``gamma``: their
    parameters (None: defaults); NPO needs ``forget_reference`` in the batch (``ForgetRetainDataset(...,
    reference=...)``). ValueError names a missing batch key or a bad argument.
    """
    check_objective(forget_loss, retain_weight, margin, beta, gamma)
    check_fused(forget_loss, fused_ihl)
    forget_ids, forget_mask = require_keys(inputs, FORGET_KEYS, "the forget term needs the forget sequences")
    use_retain = retain_weight > 0
    if use_retain:
        why = f"retain_weight={retain_weight} needs the retain sequences; set retain_weight=0 for none"
        retain_ids, retain_mask = require_keys(inputs, RETAIN_KEYS, why)
    if forget_loss in SEQUENCE_LOSSES:
        forget_sum = _sequence_sum(model, inputs, forget_loss, fused_ihl, beta, gamma)
    elif fused_ihl and forget_loss == "ihl":
        forget_sum = _fused_ihl_sum(model, forget_ids, forget_mask, margin)
    elif fused_ihl:  # GA: the summed log-probabilities from the hidden states
        _check_patched(model)
        forget_sum = forget_term("ga", fused=True)(model, {"input_ids": forget_ids, "attention_mask": forget_mask})
    elif forget_loss == "ihl":
        forget_sum = _token_sum(model, forget_ids, forget_mask, ihl_loss, margin=margin)
    else:
        forget_sum = _token_sum(model, forget_ids, forget_mask, ga_loss)
    n_forget, n_retain = _step_counts(num_items_in_batch, inputs, forget_sum.device, forget_loss in SEQUENCE_LOSSES)
    forget = forget_sum / n_forget
    total, retain = forget, torch.zeros((), device=forget.device)
    if use_retain:
        retain = _token_sum(model, retain_ids, retain_mask, retain_loss) / n_retain
        total = forget + retain_weight * retain
    return (total, UnlearningLossOutput(total, forget.detach(), retain.detach())) if return_outputs else total
