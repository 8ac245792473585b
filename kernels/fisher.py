"""Fused per-example empirical Fisher of one linear layer: F += sum_n (G_n^T X_n)^2, elementwise.

For a linear layer Y = X W^T (+ b) applied to the T positions of example n, with inputs X_n (T, in) and
output gradients G_n = dL_n/dY_n (T, out), the example's weight gradient is

    dL_n/dW = G_n^T X_n = sum_t g_{n,t} x_{n,t}^T                                  (out, in)

and its contribution to the diagonal empirical Fisher is the elementwise square of that matrix. The
kernel never forms the B per-example gradients (B, out, in): program (p, q) owns one (BLOCK_O, BLOCK_I)
tile of F and, for each example in turn, accumulates the tile of G_n^T X_n over T-chunks with tl.dot in
float32 registers, squares it and adds it to a second float32 register tile; F is read and written once
at the end. Each program reads the G columns of its out-tile and the X columns of its in-tile once per
example, so the extra memory is F itself, O(out * in), whatever B and T are.

Padded positions must carry g = 0 (the caller's loss ignores them), x is then irrelevant; positions past
T inside the last chunk are masked to 0 on load. Half-precision inputs go to tl.dot as they are (exact
products, float32 accumulation) on CUDA and are upcast first in the interpreter, whose bf16 dot is wrong.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import interpreting

# Fixed launch configuration on CUDA: not yet tuned on a GPU (dot tiles need every dimension >= 16).
# The interpreter pays per loop iteration per program, so it takes each dimension whole, up to 256.
_BLOCK_O, _BLOCK_I, _BLOCK_T, _NUM_WARPS, _NUM_STAGES = 64, 64, 32, 4, 3
_INTERPRETER_MAX_BLOCK = 256
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _fisher_kernel(
    x_ptr, x_stride_b, x_stride_t, x_stride_i,  # X (B, T, in)
    g_ptr, g_stride_b, g_stride_t, g_stride_o,  # G (B, T, out)
    f_ptr, f_stride_o, f_stride_i,  # F (out, in) float32
    n_examples, n_tokens, n_out, n_in,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_o = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1).to(tl.int64)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)  # (BLOCK_O,) int64
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)  # (BLOCK_I,) int64
    offs_t = tl.arange(0, BLOCK_T)
    in_o = offs_o < n_out
    in_i = offs_i < n_in

    # 1. Pointers to the first chunk of example 0: G^T tile (BLOCK_O, BLOCK_T), X tile (BLOCK_T, BLOCK_I).
    #    They advance by pointer increments, so no index product overflows for large B * T * features.
    gt_ptrs = g_ptr + offs_o[:, None] * g_stride_o + offs_t[None, :] * g_stride_t
    x_ptrs = x_ptr + offs_t[:, None] * x_stride_t + offs_i[None, :] * x_stride_i
    fisher = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for _ in range(n_examples):
        # 2. acc = G_n^T X_n restricted to this tile, over the T-chunks of example n.
        acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        gt_n, x_n = gt_ptrs, x_ptrs
        for t0 in range(0, n_tokens, BLOCK_T):
            in_t = offs_t < n_tokens - t0
            gt = tl.load(gt_n, mask=in_o[:, None] & in_t[None, :], other=0.0)
            x = tl.load(x_n, mask=in_t[:, None] & in_i[None, :], other=0.0)
            if UPCAST:
                gt = gt.to(tl.float32)
                x = x.to(tl.float32)
            acc = tl.dot(gt, x, acc, input_precision=INPUT_PRECISION)
            gt_n += BLOCK_T * g_stride_t
            x_n += BLOCK_T * x_stride_t
        # 3. The example's squared gradient joins the tile's running sum.
        fisher += acc * acc
        gt_ptrs += g_stride_b
        x_ptrs += x_stride_b

    # 4. One read-modify-write of the F tile.
    f_ptrs = f_ptr + offs_o[:, None] * f_stride_o + offs_i[None, :] * f_stride_i
    in_f = in_o[:, None] & in_i[None, :]
    tl.store(f_ptrs, tl.load(f_ptrs, mask=in_f, other=0.0) + fisher, mask=in_f)


def _block(size: int, default: int, given: int | None, name: str) -> int:
    if given is None:
        given = min(_INTERPRETER_MAX_BLOCK, max(16, triton.next_power_of_2(size))) if interpreting() else default
    if given < 16 or given & (given - 1):
        raise ValueError(f"{name} must be a power of two >= 16 (tl.dot tiles), got {given}")
    return given


def fisher_accumulate(
    fisher: torch.Tensor,
    x: torch.Tensor,
    g: torch.Tensor,
    *,
    block_o: int | None = None,
    block_i: int | None = None,
    block_t: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """fisher (out, in) float32, any strides (a transposed view for Conv1D) += sum_n (g_n^T x_n)^2.

    x (B, T, in) and g (B, T, out): same device and dtype (float32, bfloat16 or float16), any strides.
    """
    n_examples, n_tokens, n_in = x.shape
    n_out = g.shape[-1]
    if g.shape[:2] != x.shape[:2] or tuple(fisher.shape) != (n_out, n_in):
        raise ValueError(
            f"shapes do not fit: x {tuple(x.shape)} (B, T, in), g {tuple(g.shape)} (B, T, out), "
            f"fisher {tuple(fisher.shape)} (out, in)"
        )
    if x.dtype != g.dtype or x.dtype not in _DTYPES:
        raise TypeError(f"x and g must share one dtype of {_DTYPES}, got {x.dtype} and {g.dtype}")
    if fisher.dtype != torch.float32:
        raise TypeError(f"fisher must be float32, got {fisher.dtype}")
    if n_examples == 0 or n_tokens == 0:
        return fisher
    block_o = _block(n_out, _BLOCK_O, block_o, "block_o")
    block_i = _block(n_in, _BLOCK_I, block_i, "block_i")
    block_t = _block(n_tokens, _BLOCK_T, block_t, "block_t")
    tf32 = x.dtype == torch.float32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32  # as torch.mm does
    grid = (triton.cdiv(n_out, block_o), triton.cdiv(n_in, block_i))
    _fisher_kernel[grid](
        x, *x.stride(), g, *g.stride(), fisher, *fisher.stride(),
        n_examples, n_tokens, n_out, n_in,
        BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_T=block_t,
        UPCAST=interpreting() and x.dtype != torch.float32, INPUT_PRECISION="tf32" if tf32 else "ieee",
        num_warps=num_warps or _NUM_WARPS, num_stages=_NUM_STAGES,
    )  # fmt: skip
    return fisher
