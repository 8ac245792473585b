"""Fused Inverted Hinge Loss (IHL) kernels: a streaming forward and a one-pass backward.

Per row (one token) with logits z (V,), label y and p = softmax(z) in float32:

    L = max(0, margin + p_y - p_r),   r = argmax_{v != y} z_v   (ties -> lowest index)

The forward streams over the vocabulary once, keeping a running max m, sum of exponentials s and
the runner-up (value and index), and stores 16 bytes per row: loss, stats = (m, log s) (fp32) and r
(int32). Keeping m apart from log s lets p_v = exp((z_v - m) - log s) stay exact to fp32 rounding even
for logits of magnitude 1e4, where a single lse = m + log s would lose ~1e-3 relative accuracy.
The backward recomputes p_v and writes the grad_output-scaled gradient in one more
pass, optionally into the logits buffer itself. No (N, V) intermediate besides the gradient, and no
host synchronization: ignored and invalid rows are resolved inside the kernels.

Row conventions shared with the torch and C++ paths:
- ignored rows (y == ignore_index): loss 0, stats (0, 0), runner -1, gradient 0;
- invalid rows (label outside [0, V), or NaN / +inf / all -inf logits): loss NaN, runner -1, gradient NaN.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Blocks of the vocabulary per loop iteration. On a GPU, 4096 elements and 8 warps keep enough bytes in
# flight per SM without spilling; the interpreter pays per iteration, so it takes the whole row at once.
_GPU_BLOCK_V = 4096
_GPU_NUM_WARPS = 8
_INTERPRETER_MAX_BLOCK_V = 1 << 17


def _launch_config(n_cols: int, block_v: int | None, num_warps: int | None) -> tuple[int, int]:
    if block_v is None:
        cap = _INTERPRETER_MAX_BLOCK_V if os.environ.get("TRITON_INTERPRET") == "1" else _GPU_BLOCK_V
        block_v = min(cap, triton.next_power_of_2(n_cols))
    if block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    return block_v, num_warps or _GPU_NUM_WARPS


@triton.jit
def _ihl_forward_kernel(
    logits_ptr,
    logits_row_stride,
    labels_ptr,
    loss_ptr,
    stats_ptr,
    runner_ptr,
    n_cols,
    ignore_index,
    margin,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * logits_row_stride
    y = tl.load(labels_ptr + row)

    # 1. Ignored and out-of-range labels are settled before touching the logits.
    if y == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        tl.store(stats_ptr + 2 * row, 0.0)
        tl.store(stats_ptr + 2 * row + 1, 0.0)
        tl.store(runner_ptr + row, -1)
        return
    if (y < 0) | (y >= n_cols):
        tl.store(loss_ptr + row, float("nan"))
        tl.store(stats_ptr + 2 * row, float("nan"))
        tl.store(stats_ptr + 2 * row + 1, float("nan"))
        tl.store(runner_ptr + row, -1)
        return

    # 2. One streaming pass: online log-sum-exp and the runner-up over v != y.
    m = float("-inf")
    s = 0.0
    r_max = float("-inf")
    r_idx = n_cols  # sentinel: no candidate seen yet
    for start in range(0, n_cols, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_row = offs < n_cols
        z = tl.load(logits_ptr + offs, mask=in_row, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: avoid -inf - -inf
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(z - m_ref), axis=0)
        m = m_new
        cand = in_row & (offs != y)
        z_cand = tl.where(cand, z, float("-inf"))
        b_max = tl.max(z_cand, axis=0)
        b_idx = tl.min(tl.where(cand & (z_cand == b_max), offs, n_cols), axis=0)
        # Blocks arrive in index order, so a strictly larger value is needed to move the runner-up.
        take = (b_max > r_max) | ((r_idx == n_cols) & (b_idx < n_cols))
        r_max = tl.where(take, b_max, r_max)
        r_idx = tl.where(take, b_idx, r_idx)

    # 3. Probabilities of the label and the runner-up, and the hinge.
    log_s = tl.log(s)
    z_y = tl.load(logits_ptr + y).to(tl.float32)
    p_y = tl.exp((z_y - m) - log_s)
    p_r = tl.exp((r_max - m) - log_s)
    loss = tl.maximum(margin + p_y - p_r, 0.0)
    lse = m + log_s  # NaN, +inf or -inf exactly when the row is unusable
    finite = (lse == lse) & (tl.abs(lse) < float("inf")) & (r_idx < n_cols)
    tl.store(loss_ptr + row, tl.where(finite, loss, float("nan")))
    tl.store(stats_ptr + 2 * row, m)
    tl.store(stats_ptr + 2 * row + 1, log_s)
    tl.store(runner_ptr + row, tl.where(finite, r_idx, -1).to(tl.int32))


# Gradient. With p_k = exp((z_k - m) - log s), dp_k/dz_v = p_k (δ_kv - p_v), so for L = margin + p_y - p_r:
#
#     dL/dz_v = p_y δ_yv - p_r δ_rv - p_v (p_y - p_r)
#
# i.e. the label logit gets p_y (1 - p_y + p_r), the runner-up -p_r (1 + p_y - p_r), and every other
# logit -p_v (p_y - p_r). The runner-up is whichever v != y is largest: when y is not the argmax, r is
# the argmax; when y is the argmax, r is the second. Where the hinge is inactive (margin + p_y - p_r <= 0,
# possible only for margin < 1) the gradient is 0. Each row is scaled by its grad_output g (g / n_valid
# for a mean reduction, computed on the device).
@triton.jit
def _ihl_backward_kernel(
    logits_ptr,
    logits_row_stride,
    grad_ptr,
    grad_row_stride,
    labels_ptr,
    stats_ptr,
    runner_ptr,
    grad_rows_ptr,
    grad_rows_stride,
    n_cols,
    ignore_index,
    margin,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * logits_row_stride
    grad_ptr += row * grad_row_stride
    y = tl.load(labels_ptr + row)
    r = tl.load(runner_ptr + row)

    # 1. Ignored rows get 0, invalid rows (runner -1) NaN.
    if r < 0:
        fill = tl.where(y == ignore_index, 0.0, float("nan"))
        for start in range(0, n_cols, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            vals = tl.zeros([BLOCK_V], dtype=tl.float32) + fill
            tl.store(grad_ptr + offs, vals.to(grad_ptr.dtype.element_ty), mask=offs < n_cols)
        return

    # 2. Row coefficients. z_y and z_r are read before the row is written (grad may alias logits).
    m = tl.load(stats_ptr + 2 * row)
    log_s = tl.load(stats_ptr + 2 * row + 1)
    g = tl.load(grad_rows_ptr + row * grad_rows_stride).to(tl.float32)
    p_y = tl.exp((tl.load(logits_ptr + y).to(tl.float32) - m) - log_s)
    p_r = tl.exp((tl.load(logits_ptr + r).to(tl.float32) - m) - log_s)
    c = tl.where(margin + p_y - p_r > 0.0, g, 0.0)
    c_all = c * (p_y - p_r)

    # 3. One pass writing the gradient.
    for start in range(0, n_cols, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_row = offs < n_cols
        z = tl.load(logits_ptr + offs, mask=in_row, other=float("-inf")).to(tl.float32)
        p = tl.exp((z - m) - log_s)
        d = -p * c_all + tl.where(offs == y, c * p_y, 0.0) - tl.where(offs == r, c * p_r, 0.0)
        tl.store(grad_ptr + offs, d.to(grad_ptr.dtype.element_ty), mask=in_row)


def ihl_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    margin: float,
    *,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row statistics of IHL. logits (N, V) with unit last-dim stride; labels (N,) int64 contiguous.

    Returns loss (N,) float32, stats (N, 2) float32 = (max, log sum exp(z - max)), runner (N,) int32.
    """
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    stats = torch.empty(n_rows, 2, dtype=torch.float32, device=logits.device)
    runner = torch.empty(n_rows, dtype=torch.int32, device=logits.device)
    if n_rows == 0:
        return loss, stats, runner
    block_v, num_warps = _launch_config(n_cols, block_v, num_warps)
    _ihl_forward_kernel[(n_rows,)](
        logits, logits.stride(0), labels, loss, stats, runner,
        n_cols, ignore_index, margin,
        BLOCK_V=block_v, num_warps=num_warps,
    )  # fmt: skip
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
    *,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Write d(sum_i g_i L_i)/dlogits into ``grad_out`` (N, V), which may be ``logits`` itself.

    grad_rows (N,) float32 may have any stride (an expanded scalar has stride 0).
    """
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return grad_out
    block_v, num_warps = _launch_config(n_cols, block_v, num_warps)
    _ihl_backward_kernel[(n_rows,)](
        logits, logits.stride(0), grad_out, grad_out.stride(0), labels, stats, runner,
        grad_rows, grad_rows.stride(0),
        n_cols, ignore_index, margin,
        BLOCK_V=block_v, num_warps=num_warps,
    )  # fmt: skip
    return grad_out
