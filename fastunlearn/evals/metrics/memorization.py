"""MA, memorization accuracy (see ``fastunlearn.evals.metrics``): one teacher-forced forward per batch."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastunlearn.data.labels import next_token_targets
from fastunlearn.evals.metrics.common import check_batch, inference, progress
from fastunlearn.utils.validate import check_int


def memorization_accuracy(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    batch_size: int = 32,
) -> Tensor:
    """MA of each sequence (N,) float64: the fraction of predicted positions t (x_t and x_{t-1} not padding)
    where argmax p(. | x_<t) == x_t. One teacher-forced forward per ``batch_size`` sequences; padding may be
    on either side (the position ids follow ``attention_mask``).

    ``labels`` (N, T) aligned with input_ids (Hugging Face style, -100 where nothing is scored) or None: only
    positions with a label count, and the greedy token is compared with the label. For a question/answer set
    (``fastunlearn.data.qa``) that is MA over the answer, each answer token predicted from the prompt and the answer
    before it (teacher forcing)."""
    ids = check_batch(model, input_ids, 2)
    check_int("batch_size", batch_size, 1)
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(ids.shape)}")
    if labels is not None:
        labels = labels.cpu().long()
        if labels.shape != ids.shape:
            raise ValueError(f"labels has shape {tuple(labels.shape)} but input_ids has {tuple(ids.shape)}")
        labels = labels.masked_fill(labels < 0, -100)  # any negative label is ignored, as the -1 below
    # (N, T-1): -1 where padding is predicted or predicts, -100 where a label says not to score
    targets = next_token_targets(ids, mask, labels, ignore_index=-1)
    scored = targets >= 0
    empty = (scored.sum(1) == 0).nonzero().flatten()
    if len(empty):
        if labels is not None:
            raise ValueError(f"sequence {int(empty[0])} has no labelled next-token target: MA is undefined")
        raise ValueError(f"attention_mask leaves sequence {int(empty[0])} with fewer than 2 tokens: MA is undefined")
    hits = []
    with inference(model) as device:
        for x, m in progress(
            zip(ids.split(batch_size), mask.split(batch_size)), "MA", total=-(-len(ids) // batch_size)
        ):
            x, m, kwargs = x.to(device), m.to(device), {}
            if attention_mask is not None:
                kwargs = {"attention_mask": m.long(), "position_ids": (m.cumsum(1) - 1).clamp(min=0)}
            logits = model(input_ids=x, **kwargs).logits  # (B, T, V)
            hits.append(logits[:, :-1].argmax(-1).cpu())
    hits = torch.cat(hits) == targets  # a greedy token is never -1: unscored positions never hit
    return hits.sum(1).double() / scored.sum(1)
