"""Per-token log-probability kernels (registry op ``logprob``): a streaming forward and a one-pass backward.

Per row (one token) with logits z (V,) and label y, in float32:

    logp = (z_y - m) - log s,   m = max_v z_v,   s = sum_v exp(z_v - m)

The forward streams over the vocabulary once, keeping a running max and sum of exponentials per lane (as the IHL
forward does, ``kernels/ihl.py``), and stores logp (N,) and stats = (m, log s) (N, 2). m and log s stay apart
so that exp((z_v - m) - log s) keeps float32 accuracy at any logit magnitude. The same pass also tracks the row's
argmax when asked (``logprob_argmax_forward``, registry op ``logprob_argmax``: what evaluation needs, log p(y)
for the NLL and the greedy token for memorization accuracy; ties -> the lowest index, as ``torch.argmax``).

Gradient (``fastunlearn.ops.reference.logprob`` derives it): d logp / d z_v = δ_vy - softmax(z)_v, so with the row's
grad_output g the backward writes g (δ_vy - exp((z_v - m) - log s)) in one more pass, in float32, over the
logits themselves when they are float32.

Row conventions shared with the torch path: ignored rows (y == ignore_index): logp 0, stats (0, 0), gradient 0,
argmax -1; a label outside [0, V) gives NaN (the host checks refuse it first on CPU); NaN / +inf / all -inf logits
give a NaN logp (and gradient) on that row, and argmax -1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ihl import FORWARD_CONFIGS, launch_config, settle_label
from .launch import interpreting


@triton.jit
def _logprob_forward_kernel(
    logits_ptr, logits_row_stride, labels_ptr, logp_ptr, stats_ptr, argmax_ptr, n_cols, ignore_index,
    BLOCK_V: tl.constexpr, WITH_ARGMAX: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * logits_row_stride
    y = tl.load(labels_ptr + row)
    if settle_label(logp_ptr, stats_ptr, row, y, n_cols, ignore_index):  # ignored: 0, out of range: NaN
        if WITH_ARGMAX:
            tl.store(argmax_ptr + row, -1)
        return
    # Per lane: max m_k and s_k = sum exp(z - m_k), one exp per element (see kernels/ihl.py); m_k starts at the
    # lowest finite float so -inf logits add 0 instead of NaN. WITH_ARGMAX: also the first index of the lane's
    # max (strict '>' keeps the first; a lane's first element equal to the start value -FLT_MAX is taken too).
    lane = tl.arange(0, BLOCK_V)
    m_lane = tl.full([BLOCK_V], -3.4028234663852886e38, tl.float32)
    s_lane = tl.zeros([BLOCK_V], dtype=tl.float32)
    i_lane = tl.zeros([BLOCK_V], dtype=tl.int32) + n_cols  # n_cols: nothing above -FLT_MAX seen in this lane
    for start in range(0, n_cols, BLOCK_V):
        offs = start + lane
        z = tl.load(logits_ptr + offs, mask=offs < n_cols, other=float("-inf")).to(tl.float32)
        d = z - m_lane
        e = tl.exp(-tl.abs(d))
        grow = d > 0.0
        if WITH_ARGMAX:
            i_lane = tl.where(grow | ((d == 0.0) & (i_lane == n_cols)), offs, i_lane)
        s_lane = tl.where(grow, s_lane * e + 1.0, s_lane + e)
        m_lane = tl.where(grow, z, m_lane)
    m = tl.max(m_lane, axis=0)
    log_s = tl.log(tl.sum(s_lane * tl.exp(m_lane - m), axis=0))
    z_y = tl.load(logits_ptr + y).to(tl.float32)
    tl.store(logp_ptr + row, (z_y - m) - log_s)
    tl.store(stats_ptr + 2 * row, m)
    tl.store(stats_ptr + 2 * row + 1, log_s)
    if WITH_ARGMAX:
        # The first index among the lanes holding the row max; -1 where the log-sum-exp is not finite (NaN,
        # +inf or all -inf logits: the log-probability is NaN there).
        first = tl.min(tl.where(m_lane == m, i_lane, n_cols), axis=0)
        lse = m + log_s
        finite = (lse == lse) & (tl.abs(lse) < float("inf")) & (first < n_cols)
        tl.store(argmax_ptr + row, tl.where(finite, first, -1).to(tl.int64))


_logprob_forward_autotuned = triton.autotune(configs=FORWARD_CONFIGS, key=["n_cols"])(_logprob_forward_kernel)
_logprob_argmax_autotuned = triton.autotune(configs=FORWARD_CONFIGS, key=["n_cols"])(_logprob_forward_kernel)


@triton.jit
def _logprob_backward_kernel(
    logits_ptr, logits_row_stride, grad_ptr, grad_row_stride, labels_ptr, stats_ptr, grad_rows_ptr, grad_rows_stride,
    n_cols, ignore_index, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * logits_row_stride
    grad_ptr += row * grad_row_stride
    y = tl.load(labels_ptr + row)
    ignored = y == ignore_index
    g = tl.where(ignored, 0.0, tl.load(grad_rows_ptr + row * grad_rows_stride).to(tl.float32))
    m = tl.load(stats_ptr + 2 * row)
    log_s = tl.load(stats_ptr + 2 * row + 1)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_row = offs < n_cols
        z = tl.load(logits_ptr + offs, mask=in_row, other=float("-inf")).to(tl.float32)
        d = g * (tl.where(offs == y, 1.0, 0.0) - tl.exp((z - m) - log_s))
        tl.store(grad_ptr + offs, tl.where(ignored, 0.0, d), mask=in_row)  # 0 on ignored rows, NaN logits or not


def _forward(logits, labels, ignore_index, block_v, num_warps, with_argmax):
    n_rows, n_cols = logits.shape
    logp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    stats = torch.empty(n_rows, 2, dtype=torch.float32, device=logits.device)
    # without WITH_ARGMAX the kernel never touches argmax_ptr: logp stands in for it
    argmax = torch.empty(n_rows, dtype=torch.int64, device=logits.device) if with_argmax else logp
    if n_rows == 0:
        return logp, stats, argmax
    args = (logits, logits.stride(0), labels, logp, stats, argmax, n_cols, ignore_index)
    if block_v is None and num_warps is None and not interpreting():
        tuned = _logprob_argmax_autotuned if with_argmax else _logprob_forward_autotuned
        tuned[(n_rows,)](*args, WITH_ARGMAX=with_argmax)
    else:
        block_v, num_warps = launch_config(n_cols, block_v, num_warps)
        _logprob_forward_kernel[(n_rows,)](*args, BLOCK_V=block_v, WITH_ARGMAX=with_argmax, num_warps=num_warps)
    return logp, stats, argmax


def logprob_forward(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, *, block_v: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(logp (C,), stats (C, 2) = (max, log sum exp(z - max))) float32. logits (C, V) with unit last-dim
    stride (not written), labels (C,) int64 contiguous."""
    logp, stats, _ = _forward(logits, labels, ignore_index, block_v, num_warps, False)
    return logp, stats


def logprob_argmax_forward(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, *, block_v: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(logp (C,) float32, argmax (C,) int64) in the same single pass over each row: argmax is the first index
    of the row's maximum, -1 on ignored rows and where logp is NaN. logits (C, V) with unit last-dim stride
    (not written), labels (C,) int64 contiguous."""
    logp, _, argmax = _forward(logits, labels, ignore_index, block_v, num_warps, True)
    return logp, argmax


def logprob_backward(
    grad_rows: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, stats: torch.Tensor, ignore_index: int,
    *, block_v: int | None = None, num_warps: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """dz (C, V) float32 = g (onehot(y) - softmax(z)) per row, written over ``logits`` when it is float32 (else
    into a new float32 tensor); 0 on ignored rows. grad_rows (C,) may have any stride."""
    grad = logits if logits.dtype == torch.float32 else torch.empty(logits.shape, dtype=torch.float32,
                                                                     device=logits.device)  # fmt: skip
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return grad
    block_v, num_warps = launch_config(n_cols, block_v, num_warps)
    _logprob_backward_kernel[(n_rows,)](
        logits, logits.stride(0), grad, grad.stride(0), labels, stats, grad_rows, grad_rows.stride(0), n_cols,
        ignore_index, BLOCK_V=block_v, num_warps=num_warps,
    )  # fmt: skip
    return grad
