"""Sliding-window next-token NLL and perplexity (see ``fastunlearn.evals.metrics``); each batch of windows is
scored by ``scoring.score_batch`` (one forward, the logits never materialized where the model allows it)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastunlearn.data.labels import next_token_targets
from fastunlearn.evals.metrics.common import inference, progress
from fastunlearn.evals.metrics.scoring import score_batch, use_fused
from fastunlearn.utils.validate import check_int, check_token_ids


def _as_sequences(model: nn.Module, sequences) -> list[Tensor]:
    if isinstance(sequences, Tensor):
        ids = check_token_ids("sequences", sequences, model)
        if ids.dim() != 2:
            raise ValueError(f"sequences must have shape (N, L) or be a list of 1-D sequences, got {tuple(ids.shape)}")
        seqs = list(ids)
    elif isinstance(sequences, Sequence) and not isinstance(sequences, str):
        if len(sequences) == 0:
            raise ValueError("sequences is empty")
        seqs = [check_token_ids(f"sequences[{i}]", torch.as_tensor(s), model) for i, s in enumerate(sequences)]
    else:
        raise TypeError(f"sequences must be a (N, L) tensor or a list of 1-D sequences, got {type(sequences).__name__}")
    for i, s in enumerate(seqs):
        if s.dim() != 1 or len(s) < 2:
            raise ValueError(f"sequences[{i}] must be 1-D with at least 2 tokens, got shape {tuple(s.shape)}")
    return seqs


def sequence_nll(
    model: nn.Module, sequences, *, context: int | None = None, stride: int | None = None, batch_size: int = 8,
    labels=None, fused: bool | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(summed next-token NLL (N,) float64, number of scored tokens (N,) int64) of each sequence.

    ``sequences``: a (N, L) tensor or a list of 1-D sequences of any lengths. Windows of at most ``context``
    tokens (default: the model's ``max_position_embeddings``) start every ``stride`` tokens (default context // 2)
    and score the tokens after the previous window's end; ``batch_size`` windows per forward, right-padded
    (causal attention: padding after a token never changes its logits). ``labels``: None, or the same shapes
    as ``sequences`` (Hugging Face style, aligned with them): only tokens with a label other than -100 are
    scored, against that label (the answers of a question/answer set). ``fused``: how each window is scored
    (``scoring.score_batch``; None: from the last hidden states without the logits where the model allows it).
    """
    seqs = _as_sequences(model, sequences)
    given = None
    if labels is not None:
        given = [torch.as_tensor(t).long().cpu() for t in labels]
        if len(given) != len(seqs) or any(g.shape != s.shape for g, s in zip(given, seqs)):
            raise ValueError("labels must have the shapes of sequences (one label per token)")
    context = context if context is not None else getattr(model.config, "max_position_embeddings", None)
    if context is None:
        raise ValueError("context is None and the model's config has no max_position_embeddings: pass context")
    check_int("context", context, 1)
    if context < 2:
        raise ValueError(f"context must be >= 2 (a window predicts its tokens after the first), got {context}")
    stride = context // 2 if stride is None else stride
    check_int("stride", stride, 1)
    if stride > context:
        raise ValueError(f"stride must be <= context ({context}), got {stride}")
    check_int("batch_size", batch_size, 1)
    fused = use_fused(model, fused)
    windows = []  # (sequence, begin, end, first scored position)
    for i, s in enumerate(seqs):
        prev_end = 0
        for begin in range(0, len(s), stride):
            end = min(begin + context, len(s))
            windows.append((i, begin, end, max(prev_end, begin + 1)))
            prev_end = end
            if end == len(s):
                break
    nll = torch.zeros(len(seqs), dtype=torch.float64)
    count = torch.zeros(len(seqs), dtype=torch.int64)
    with inference(model) as device:
        for lo in progress(range(0, len(windows), batch_size), "perplexity"):
            batch = windows[lo : lo + batch_size]
            ids = torch.zeros(len(batch), max(end - begin for _, begin, end, _ in batch), dtype=torch.long)
            mask = torch.zeros_like(ids)  # 1 on the window's tokens, 0 on the right padding
            labels = ids.clone()  # -100 on tokens an earlier window scored
            for j, (i, begin, end, first) in enumerate(batch):
                ids[j, : end - begin] = labels[j, : end - begin] = seqs[i][begin:end]
                if given is not None:
                    labels[j, : end - begin] = given[i][begin:end]
                mask[j, : end - begin] = 1
                labels[j, : first - begin] = -100
            targets = next_token_targets(ids, mask, labels)  # (W, width - 1)
            full = torch.cat([torch.full((len(batch), 1), -100), targets], dim=1)  # padding: -100, no mask needed
            window_nll, _ = score_batch(model, ids.to(device), full.to(device), None, fused=fused)
            owner = torch.tensor([w[0] for w in batch])
            nll.index_add_(0, owner, window_nll)
            count.index_add_(0, owner, (targets != -100).sum(1))
    return nll, count


def perplexity(
    model: nn.Module, sequences, *, context: int | None = None, stride: int | None = None, batch_size: int = 8,
    labels=None, fused: bool | None = None,
) -> float:  # fmt: skip
    """exp(total NLL / total scored tokens) over ``sequences`` (token-weighted; see ``sequence_nll``)."""
    nll, count = sequence_nll(model, sequences, context=context, stride=stride, batch_size=batch_size, labels=labels,
                              fused=fused)  # fmt: skip
    return math.exp(nll.sum().item() / count.sum().item())
