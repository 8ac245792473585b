"""What every metric shares: inference mode, progress bars, the (N, T) batch check."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fastunlearn.utils import distributed as dist_utils
from fastunlearn.utils.validate import check_token_ids


@contextlib.contextmanager
def inference(model: nn.Module) -> Iterator[torch.device]:
    """Eval mode (no dropout) without autograd; yields the model's device and restores its training flag."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def progress(iterable, desc: str, **kwargs):
    """A progress bar on a terminal, shown by rank 0 only in a multi-process run."""
    return tqdm(iterable, desc=desc, leave=False, disable=None if dist_utils.current().is_main else True, **kwargs)


def check_batch(model: nn.Module, input_ids, min_tokens: int) -> Tensor:
    """(N, T) token ids with N >= 1 and min_tokens <= T <= the model's context."""
    ids = check_token_ids("input_ids", input_ids, model)
    if ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (N, T), got {tuple(ids.shape)}")
    if ids.shape[1] < min_tokens:
        raise ValueError(f"input_ids needs at least {min_tokens} tokens per sequence, got T={ids.shape[1]}")
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and ids.shape[1] > context:
        raise ValueError(f"input_ids has T={ids.shape[1]} tokens but the model's context is {context}")
    return ids
