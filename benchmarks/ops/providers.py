"""What the benchmarks compare: fastunlearn's IHL against the eager formula and torch.compile of it."""

from __future__ import annotations

import functools

import torch

import fastunlearn
from fastunlearn.ops import dispatch


def eager_ihl(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """IHL as a user would write it in PyTorch: float32 softmax over the full (N, V), runner-up by masking."""
    p = torch.softmax(logits.float(), dim=-1)  # (N, V) float32
    valid = labels != ignore_index
    y = torch.where(valid, labels, 0)[:, None]
    p_y = p.gather(1, y).squeeze(1)
    p_r = p.scatter(1, y, -1.0).amax(dim=1)
    rows = (1.0 + p_y - p_r).clamp(min=0.0) * valid
    return rows.sum() / valid.sum().clamp(min=1)


@functools.cache
def compiled_ihl():
    return torch.compile(eager_ihl, dynamic=True)


def loss_fn(provider: str):
    """provider -> callable(logits, labels) -> scalar loss."""
    if provider == "fastunlearn":
        return fastunlearn.ihl_loss
    if provider == "fastunlearn-torch":

        def torch_path(logits, labels):
            with dispatch._force_impl("torch"):
                return fastunlearn.ihl_loss(logits, labels)

        return torch_path
    if provider == "eager":
        return eager_ihl
    if provider == "compiled":
        return compiled_ihl()
    raise ValueError(f"unknown provider {provider!r}")


def setup_ihl(
    provider: str, mode: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device, sync: bool = True
):
    """Inputs and the callable to time: mode "forward" (loss only) or "full" (loss and its gradient).

    ``sync``: the callable waits for the GPU (wall-clock timing); without it calls queue up back to back,
    as in a training loop, for timing with CUDA events over many calls.
    """
    n_rows, n_cols = shape
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(n_rows, n_cols, device=device, dtype=dtype, generator=gen).mul_(4)
    labels = torch.randint(0, n_cols, (n_rows,), device=device, generator=gen)
    logits.requires_grad_(mode == "full")
    fn = loss_fn(provider)

    def run():
        loss = fn(logits, labels)
        out = torch.autograd.grad(loss, logits)[0] if mode == "full" else loss
        if sync and device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return run, logits
