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

import torch
import triton
import triton.language as tl

from .launch import interpreting

# Launch configuration. The backward is a plain streaming pass: 4096-element blocks and 16 warps measured
# best on an H200 (93% of the device-copy bandwidth at (8192, 128256) bf16, benchmarks/ops/sweep_ihl_blocks.py).
# The forward carries per-lane state, so its best block depends on V and dtype: on CUDA it is autotuned
# over the configs below (it writes only its outputs, so trial runs are harmless). The interpreter pays
# per loop iteration, so it takes the whole row (up to 2^17) at once with one config.
_BACKWARD_BLOCK_V, _BACKWARD_NUM_WARPS = 4096, 16
FORWARD_CONFIGS = [
    triton.Config({"BLOCK_V": block_v}, num_warps=warps)
    for block_v, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16))
]
_INTERPRETER_MAX_BLOCK_V = 1 << 17


def launch_config(n_cols: int, block_v: int | None, num_warps: int | None) -> tuple[int, int]:
    """Explicit (block_v, num_warps), or the fixed backward default (whole row in the interpreter)."""
    if block_v is None:
        cap = _INTERPRETER_MAX_BLOCK_V if interpreting() else _BACKWARD_BLOCK_V
        block_v = min(cap, triton.next_power_of_2(n_cols))
    if block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    return block_v, num_warps or _BACKWARD_NUM_WARPS


@triton.jit
def settle_label(out_ptr, stats_ptr, row, y, n_cols, ignore_index):
    """Whether ``row``'s label ``y`` leaves nothing to compute, in which case its value ``out[row]`` and its two
    stats are stored here: 0 for an ignored row (y == ignore_index), NaN for a label outside [0, n_cols). The
    forward kernels (IHL, log-prob) call it before reading the row's logits."""
    settled = (y == ignore_index) | (y < 0) | (y >= n_cols)
    if settled:
        fill = tl.where(y == ignore_index, 0.0, float("nan"))
        tl.store(out_ptr + row, fill)
        tl.store(stats_ptr + 2 * row, fill)
        tl.store(stats_ptr + 2 * row + 1, fill)
    return settled


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
    if settle_label(loss_ptr, stats_ptr, row, y, n_cols, ignore_index):
        tl.store(runner_ptr + row, -1)
        return

    # 2. One streaming pass over v != y (the label is masked out of the loads), accumulated per lane so
    #    that no cross-warp reduction runs inside the loop. Lane k sees columns k, k + BLOCK_V, ...; it
    #    keeps its max m_k, its sum s_k = sum exp(z - m_k) with one exp per element (e = exp(-|z - m_k|)
    #    either rescales the old sum when z is a new max, or is the new term), and the first index of its
    #    max. The lane max over v != y is also the runner-up candidate. m_k starts at the lowest finite
    #    float rather than -inf, so -inf logits give e = 0 instead of NaN; NaN and +inf logits make s NaN.
    lane = tl.arange(0, BLOCK_V)
    y32 = y.to(tl.int32)
    m_lane = tl.full([BLOCK_V], -3.4028234663852886e38, tl.float32)
    s_lane = tl.zeros([BLOCK_V], dtype=tl.float32)
    i_lane = tl.zeros([BLOCK_V], dtype=tl.int32) + n_cols  # n_cols: no finite value seen in this lane
    for start in range(0, n_cols, BLOCK_V):
        offs = start + lane
        z = tl.load(logits_ptr + offs, mask=(offs < n_cols) & (offs != y32), other=float("-inf")).to(tl.float32)
        d = z - m_lane
        e = tl.exp(-tl.abs(d))
        grow = d > 0.0  # strict: a lane keeps the first index of its max
        s_lane = tl.where(grow, s_lane * e + 1.0, s_lane + e)
        m_lane = tl.where(grow, z, m_lane)
        i_lane = tl.where(grow, offs, i_lane)

    # 3. Merge the lanes: runner-up (lowest index among tied maxima; if every v != y is -inf, the lowest
    #    index other than y, with p_r = 0), then the sum over v != y, then the label's own term.
    r_max = tl.max(m_lane, axis=0)
    r_idx = tl.min(tl.where(m_lane == r_max, i_lane, n_cols), axis=0)
    no_runner = r_idx == n_cols
    r_idx = tl.where(no_runner, tl.where(y32 == 0, 1, 0), r_idx)
    z_r = tl.where(no_runner, float("-inf"), r_max)
    s = tl.sum(s_lane * tl.exp(m_lane - r_max), axis=0)  # relative to r_max
    z_y = tl.load(logits_ptr + y).to(tl.float32)
    m = tl.maximum(r_max, z_y)
    s = s * tl.exp(r_max - m) + tl.exp(z_y - m)
    log_s = tl.log(s)
    p_y = tl.exp((z_y - m) - log_s)
    p_r = tl.exp((z_r - m) - log_s)
    loss = tl.maximum(margin + p_y - p_r, 0.0)
    lse = m + log_s  # NaN, +inf or -inf exactly when the row is unusable
    finite = (lse == lse) & (tl.abs(lse) < float("inf"))
    tl.store(loss_ptr + row, tl.where(finite, loss, float("nan")))
    tl.store(stats_ptr + 2 * row, m)
    tl.store(stats_ptr + 2 * row + 1, log_s)
    tl.store(runner_ptr + row, tl.where(finite, r_idx, -1).to(tl.int32))


_ihl_forward_autotuned = triton.autotune(configs=FORWARD_CONFIGS, key=["n_cols"])(_ihl_forward_kernel)


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
    args = (logits, logits.stride(0), labels, loss, stats, runner, n_cols, ignore_index, margin)
    if block_v is None and num_warps is None and not interpreting():
        _ihl_forward_autotuned[(n_rows,)](*args)
    else:
        block_v, num_warps = launch_config(n_cols, block_v, num_warps)
        _ihl_forward_kernel[(n_rows,)](*args, BLOCK_V=block_v, num_warps=num_warps)
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
    block_v, num_warps = launch_config(n_cols, block_v, num_warps)
    _ihl_backward_kernel[(n_rows,)](
        logits, logits.stride(0), grad_out, grad_out.stride(0), labels, stats, runner,
        grad_rows, grad_rows.stride(0),
        n_cols, ignore_index, margin,
        BLOCK_V=block_v, num_warps=num_warps,
    )  # fmt: skip
    return grad_out
