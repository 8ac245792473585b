"""Which tokens a causal LM is scored on: the one rule for next-token targets, where an answer starts, and how many
targets a batch has. Shared by the losses, the Fisher, the metrics, the data and the engine."""

from __future__ import annotations

import torch
from torch import Tensor


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


def answer_start(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """(...,) int64: the first position of each row of ``labels`` (..., T) that is not ``ignore_index`` (T where
    none is). For a question/answer row (``fastunlearn.data.qa``), where the answer starts: x_<a is the prompt, and
    the first scored next-token target is x_a, predicted from the prompt alone."""
    T = labels.shape[-1]
    positions = torch.arange(T, device=labels.device).expand_as(labels)
    return torch.where(labels != ignore_index, positions, T).min(-1).values


def count_targets(
    input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None, ignore_index: int = -100
) -> Tensor:
    """How many next-token targets :func:`next_token_targets` keeps (an int64 scalar on the inputs' device)."""
    return (next_token_targets(input_ids, attention_mask, labels, ignore_index) != ignore_index).sum()
