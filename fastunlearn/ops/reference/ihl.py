"""Plain-PyTorch implementation of the IHL row statistics and gradient, processed in row chunks.

Same signatures and row conventions as the Triton kernels (``fastunlearn.kernels.ihl``) and the C++
ops (``fastunlearn._C``): ignored rows give loss 0 / stats 0 / runner -1 / gradient 0; invalid rows
(label out of range, non-finite log-sum-exp) give loss NaN / runner -1 / gradient NaN.

Peak extra memory is bounded by the chunk: at most ``chunk_bytes`` of float32 temporaries
(two (rows, V) buffers), whatever N is. ``FASTUNLEARN_TORCH_CHUNK_MB`` sets the budget (default 256).
"""

from __future__ import annotations

import os

import torch

_DEFAULT_CHUNK_MB = 256
_TEMPS_PER_ELEMENT = 2  # the float32 copy of the chunk and one (z - m) buffer, exponentiated in place


def chunk_rows(n_cols: int, chunk_bytes: int | None = None) -> int:
    """Rows per chunk so that the float32 temporaries stay within ``chunk_bytes``."""
    if chunk_bytes is None:
        chunk_bytes = int(float(os.environ.get("FASTUNLEARN_TORCH_CHUNK_MB", _DEFAULT_CHUNK_MB)) * 2**20)
    return max(1, chunk_bytes // (_TEMPS_PER_ELEMENT * 4 * n_cols))


def ihl_forward(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, margin: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (N, V), labels (N,) int64 -> loss (N,), stats (N, 2) = (max, log sum exp(z - max)), runner (N,) int32."""
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    stats = torch.empty(n_rows, 2, dtype=torch.float32, device=logits.device)
    runner = torch.empty(n_rows, dtype=torch.int32, device=logits.device)
    step = chunk_rows(n_cols)
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        z = logits[rows].to(torch.float32, copy=True)  # (C, V), ours to overwrite
        y = labels[rows]
        ignored = y == ignore_index
        in_range = (y >= 0) & (y < n_cols)
        y_safe = torch.where(in_range, y, 0)[:, None]  # (C, 1)
        # 1. Row max m and log s = log sum exp(z - m); m = -inf (all -inf) uses 0 as reference.
        m = z.amax(dim=-1)  # (C,)
        m_ref = torch.where(m == float("-inf"), 0.0, m)[:, None]
        log_s = (z - m_ref).exp_().sum(dim=-1).log()  # exp_ in place: 2 (C, V) buffers live, not 3
        z.sub_(m_ref)  # z - m from here on
        z_y = z.gather(1, y_safe).squeeze(1)
        # 2. Runner-up: argmax over v != y (argmax returns the first maximal index).
        z.scatter_(1, y_safe, float("-inf"))
        r = z.argmax(dim=-1)
        z_r = z.gather(1, r[:, None]).squeeze(1)
        # every v != y is -inf: the lowest index other than y
        r = torch.where(z_r == float("-inf"), (y_safe.squeeze(1) == 0).long(), r)
        # 3. The hinge and the row conventions.
        row_loss = (margin + torch.exp(z_y - log_s) - torch.exp(z_r - log_s)).clamp_(min=0.0)
        valid = in_range & torch.isfinite(m + log_s)
        loss[rows] = torch.where(ignored, 0.0, torch.where(valid, row_loss, float("nan")))
        stats[rows] = torch.where(ignored[:, None], 0.0, torch.stack((m, log_s), dim=1))
        runner[rows] = torch.where(valid & ~ignored, r, -1).to(torch.int32)
    return loss, stats, runner


def ihl_backward(
    grad_rows: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    runner: torch.Tensor,
    ignore_index: int,
    margin: float,
    grad_out: torch.Tensor,
) -> torch.Tensor:
    """Write d(sum_i g_i L_i)/dlogits into ``grad_out`` (may be ``logits``); see kernels/ihl.py for the math."""
    n_rows, n_cols = logits.shape
    step = chunk_rows(n_cols)
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        y = labels[rows]
        r = runner[rows].long()
        ok = r >= 0
        y_safe = torch.where(ok, y, 0)[:, None]  # (C, 1)
        r_safe = r.clamp(min=0)[:, None]
        # 1. p = exp((z - m) - log s) in float32, in place on the chunk's copy.
        p = logits[rows].to(torch.float32, copy=True)  # (C, V)
        p.sub_(stats[rows, :1]).sub_(stats[rows, 1:]).exp_()
        p_y = p.gather(1, y_safe).squeeze(1)
        p_r = p.gather(1, r_safe).squeeze(1)
        # 2. c = g where the hinge is active; dL/dz_v = p_y δ_yv - p_r δ_rv - p_v (p_y - p_r).
        c = torch.where(margin + p_y - p_r > 0, grad_rows[rows].to(torch.float32), 0.0)
        p.mul_((-c * (p_y - p_r))[:, None])
        p.scatter_add_(1, y_safe, (c * p_y)[:, None])
        p.scatter_add_(1, r_safe, (-c * p_r)[:, None])
        # 3. Ignored rows 0, invalid rows NaN.
        ignored = y == ignore_index
        p.masked_fill_((~ok & ignored)[:, None], 0.0).masked_fill_((~ok & ~ignored)[:, None], float("nan"))
        grad_out[rows] = p
    return grad_out
