"""The unlearning objectives built from the loss terms: IHL, gradient ascent (GA) and the retain loss.

- ``retain_loss``: next-token cross-entropy (the "descent" part of GD), mean over non-ignored tokens.
- ``ga_loss``: its negation on the forget set (gradient ascent); unbounded below.
- ``unlearning_loss``: forget term (``"ihl"`` or ``"ga"``) + ``retain_weight`` x retain loss. The paper's
  objective is IHL + retain loss; GD is GA + retain loss; ``retain_weight=0`` (or no retain batch) gives
  the forget term alone.
- ``shift_causal``: aligns a causal LM's logits (B, T, V) with its next tokens, masking padding.

Every reduction over tokens divides by the non-ignored count on the device, so an all-ignored batch
gives 0 and zero gradients, never NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _validate
from .ihl import count_valid, flatten_labels, ihl_loss, reduce_rows

FORGET_LOSSES = ("ihl", "ga")


def next_token_targets(
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """(..., T - 1) next-token targets of a causal LM: ``(labels or input_ids)[..., 1:]``, with ``ignore_index``
    where the target is padding or is predicted from padding (``attention_mask`` 0 at t + 1 or at t).

    The one rule for "which next tokens count", shared by the losses, the Fisher, the metrics and the engine.
    ``labels`` are aligned with ``input_ids`` (Hugging Face style) and may already hold ``ignore_index``.
    """
    if input_ids.shape[-1] < 2:
        raise ValueError(f"input_ids needs at least 2 positions to form next-token targets, got {input_ids.shape[-1]}")
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels has shape {tuple(labels.shape)} but input_ids has {tuple(input_ids.shape)}")
    targets = (input_ids if labels is None else labels)[..., 1:]
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}"
            )
        padded = (attention_mask[..., 1:] == 0) | (attention_mask[..., :-1] == 0)
        targets = targets.masked_fill(padded, ignore_index)
    return targets


def count_targets(
    input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None, ignore_index: int = -100
) -> Tensor:
    """How many next-token targets :func:`next_token_targets` keeps (an int64 scalar on the inputs' device)."""
    return (next_token_targets(input_ids, attention_mask, labels, ignore_index) != ignore_index).sum()


def shift_causal(
    logits: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor]:
    """(logits[..., :-1, :], :func:`next_token_targets`): a causal LM's outputs aligned with what they predict.

    The logits are a view: no copy.
    """
    _validate.check_float_tensor("logits", logits, min_dim=2)
    if input_ids.shape != logits.shape[:-1]:
        raise ValueError(
            f"input_ids has shape {tuple(input_ids.shape)} but logits (..., T, V) needs {tuple(logits.shape[:-1])}"
        )
    return logits[..., :-1, :], next_token_targets(input_ids, attention_mask, labels, ignore_index)


def causal_lm_ihl_loss(
    logits: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    margin: float = 1.0,
) -> Tensor:
    """IHL of a causal LM's output (B, T, V) on its own next tokens (one-token shift, padding masked)."""
    shifted, targets = shift_causal(logits, input_ids, attention_mask, labels, ignore_index)
    return ihl_loss(shifted, targets, ignore_index=ignore_index, reduction=reduction, margin=margin)


def retain_loss(logits: Tensor, labels: Tensor, *, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy (float32 result); ``mean`` over non-ignored tokens, 0 when there are none."""
    _validate.check_float_tensor("logits", logits)
    _validate.check_labels(labels, logits.shape[:-1], logits.device, "logits (..., V)")
    _validate.check_reduction_and_margin(reduction, 1.0)
    y = flatten_labels(labels)
    if _validate.value_checks_enabled(logits.device):
        _validate.check_label_values(y, logits.shape[-1], ignore_index)
    rows = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y, ignore_index=ignore_index, reduction="none")
    return reduce_rows(rows.float(), count_valid(y, ignore_index), reduction, labels.shape)


def ga_loss(logits: Tensor, labels: Tensor, *, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Gradient ascent on the forget set: the negated next-token cross-entropy."""
    return -retain_loss(logits, labels, ignore_index=ignore_index, reduction=reduction)


def check_objective(forget_loss: object, retain_weight: object, margin: object = 1.0) -> None:
    """The unlearning objective's options: ValueError naming the bad one and its value."""
    _validate.check_choice("forget_loss", forget_loss, FORGET_LOSSES)
    _validate.check_number("retain_weight", retain_weight, 0)
    _validate.check_number("margin", margin, 0, strict=True)


def check_fused(forget_loss: str, fused: object) -> None:
    """A fused forget term exists for IHL only (it computes IHL from the last hidden states)."""
    if fused and forget_loss != "ihl":
        raise ValueError(f"fused_ihl=True computes the IHL term; forget_loss={forget_loss!r} has no fused path")


class UnlearningLossOutput(NamedTuple):
    total: Tensor  # what to backpropagate
    forget: Tensor  # forget term (IHL or negated CE), detached
    retain: Tensor  # retain CE, detached (0 when no retain batch)


def unlearning_loss(
    forget_logits: Tensor,
    forget_labels: Tensor,
    retain_logits: Tensor | None = None,
    retain_labels: Tensor | None = None,
    *,
    forget_loss: str = "ihl",
    retain_weight: float = 1.0,
    ignore_index: int = -100,
    margin: float = 1.0,
) -> UnlearningLossOutput:
    """forget term + retain_weight x retain CE, on labels already aligned with the logits."""
    check_objective(forget_loss, retain_weight, margin)
    if (retain_logits is None) != (retain_labels is None):
        raise ValueError("retain_logits and retain_labels must be given together")
    if forget_loss == "ihl":
        forget = ihl_loss(forget_logits, forget_labels, ignore_index=ignore_index, margin=margin)
    else:
        forget = ga_loss(forget_logits, forget_labels, ignore_index=ignore_index)
    total = forget
    retain = torch.zeros((), device=forget.device)
    if retain_logits is not None and retain_weight > 0:
        retain = retain_loss(retain_logits, retain_labels, ignore_index=ignore_index)
        total = forget + retain_weight * retain
    return UnlearningLossOutput(total, forget.detach(), retain.detach())


class UnlearningLoss(nn.Module):
    """Module form of :func:`unlearning_loss` (IHL + retain CE by default; ``forget_loss="ga"`` for GA/GD)."""

    def __init__(
        self, forget_loss: str = "ihl", retain_weight: float = 1.0, ignore_index: int = -100, margin: float = 1.0
    ) -> None:
        super().__init__()
        check_objective(forget_loss, retain_weight, margin)
        self.forget_loss = forget_loss
        self.retain_weight = retain_weight
        self.ignore_index = ignore_index
        self.margin = margin

    def forward(self, forget_logits, forget_labels, retain_logits=None, retain_labels=None) -> UnlearningLossOutput:
        return unlearning_loss(
            forget_logits, forget_labels, retain_logits, retain_labels, forget_loss=self.forget_loss,
            retain_weight=self.retain_weight, ignore_index=self.ignore_index, margin=self.margin,
        )  # fmt: skip


# (model, batch) -> the forget term summed over the batch's next-token targets; the batch is a dict with
# input_ids and attention_mask (B, T).
ForgetTerm = Callable[[nn.Module, Mapping[str, Tensor]], Tensor]


def forget_term(forget_loss: str, *, fused: bool = False) -> ForgetTerm:
    """The forget term of the unlearning engine, as a function of (model, batch).

    ``fused=True`` (IHL only) calls a model patched by :func:`fastunlearn.fused_lm.patch_fused_ihl`, which
    computes IHL from the last hidden states without the (B, T, V) logits; otherwise the model's logits go
    through :func:`shift_causal` and the loss.
    """
    _validate.check_choice("forget_loss", forget_loss, FORGET_LOSSES)
    check_fused(forget_loss, fused)
    if fused:
        return lambda model, batch: model(**batch, ihl=True, reduction="sum").loss
    loss_fn = ihl_loss if forget_loss == "ihl" else ga_loss
    return lambda model, batch: loss_fn(*shift_causal(model(**batch, use_cache=False).logits, **batch), reduction="sum")
