"""Block codecs of llama.cpp's K-quants Q4_K and Q6_K (super-blocks of 256 weights), ported from its reference
quantizers ``quantize_row_q4_K_ref`` / ``quantize_row_q6_K_ref`` (ggml-quants.c), which ``llama-quantize`` runs
when no importance matrix is given. gguf-py dequantizes these formats but does not quantize them.

Q4_K (144 bytes): d, dmin (fp16), 12 bytes of eight 6-bit scales and eight 6-bit mins, 128 bytes of nibbles;
``w = d * sc_j * q - dmin * m_j`` for sub-block j (32 weights). Per sub-block, ``make_qkx2_quants`` searches a
scale and a min (weights ``w_i = sqrt(mean x²) + |x_i|``; the plain max-min fit, then 21 candidate scales
``(nmax - 1 + 0.1 k) / (max - min)``, each refit by weighted least squares, kept when its weighted squared error
is lower; the min it keeps moves the next candidate). Scales and mins are then quantized to 6 bits against their
super-block maxima, and every weight re-quantized against the stored (fp16 x 6-bit) scale and min.

Q6_K (210 bytes): 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales, d (fp16);
``w = d * sc_j * (q - 32)`` for sub-block j (16 weights). Per sub-block, ``make_qx_quants`` (rmse_type 1:
weights x²) tries 19 scales ``-(32 + 0.1 k) / max`` and keeps the least-squares one of largest (sum w x l)² /
(sum w l²); scales are quantized to int8 against the super-block's largest, weights re-quantized.

Both are vectorized over all sub-blocks of a chunk (a sub-block is a column of an (n, S) tensor), with
llama.cpp's float32 operations in its order: sums of the 16 or 32 terms added one after another as its loops do
(``seq_sum``), its ``nearest_int`` (half to even), its ties (the first maximum, strict comparisons), its quirks (a
sub-block whose 6-bit scale rounds to 0 keeps the levels of the search). So the bytes are those of llama.cpp's C
reference as compiled without floating-point contraction; a build that fuses ``a * b + c`` into FMAs (GCC's
default with -march=native) rounds some intermediate values differently, which decides a few exact ties (e.g. the
largest weight lands on ``14.5`` at one candidate scale by construction) the other way. tests/ops/test_quant.py
checks the bytes against a NumPy port of the reference, in float32 and in float64.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fastunlearn.ops.quant_legacy import bytes_of, div, f16_at, f16_bytes, nearest_int

QK_K = 256
GROUP_MAX_EPS = 1e-15  # llama.cpp: a group whose largest |x| is below this is all zero


def step_numerators(nmax: int, rmin: float, rdelta: float, nstep: int) -> list[float]:
    """``rmin + rdelta * is + nmax`` for is = 0..nstep, each operation rounded to float32 as in C."""
    r0, dr, top = np.float32(rmin), np.float32(rdelta), np.float32(nmax)
    return [float(r0 + dr * np.float32(step) + top) for step in range(nstep + 1)]


def seq_sum(t: Tensor) -> Tensor:
    """t (n, S) -> (1, S): t[0] + t[1] + ... + t[n - 1] in that order, as llama.cpp's loops add (ATen's ``sum``
    may add in another order, which moves the least-squares fits by an ulp and flips exact ties)."""
    acc = t[0:1].clone()
    for i in range(1, t.shape[0]):
        acc += t[i : i + 1]
    return acc


def make_qkx2_quants(x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """llama.cpp's make_qkx2_quants (use_mad=false) for S groups of n weights laid out as columns: x, w (n, S)
    (importance w). Returns (scale (1, S), the_min (1, S), L (n, S) int32): ``scale * L - the_min ~ x``."""
    x_max = x.amax(0, keepdim=True)
    low0 = x.amin(0, keepdim=True)
    low0 = torch.where(low0 > 0, 0.0, low0)
    flat = x_max == low0
    sum_w = seq_sum(w)
    sum_x = seq_sum(w * x)
    iscale = div(float(nmax), x_max - low0)
    scale = iscale.reciprocal()
    levels = nearest_int(iscale * (x - low0)).clamp(0, nmax)
    best = seq_sum(w * (scale * levels + low0 - x).square())
    low = low0
    for numerator in step_numerators(nmax, rmin, rdelta, nstep):
        cand = nearest_int(div(numerator, x_max - low) * (x - low)).clamp(0, nmax)
        c = cand.to(x.dtype)
        wl = w * c
        sum_l = seq_sum(wl)
        sum_l2 = seq_sum(wl * c)
        sum_xl = seq_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clipped = this_min > 0
        this_min = torch.where(clipped, 0.0, this_min)
        this_scale = torch.where(clipped, sum_xl / sum_l2, this_scale)
        error = seq_sum(w * (this_scale * c + this_min - x).square())
        better = (det > 0) & (error < best)
        levels = torch.where(better, cand, levels)
        best = torch.where(better, error, best)
        scale = torch.where(better, this_scale, scale)
        low = torch.where(better, this_min, low)
    scale = torch.where(flat, 0.0, scale)
    the_min = -torch.where(flat, low0, low)
    return scale, the_min, torch.where(flat, 0, levels)


def make_qx_quants(x: Tensor, nmax: int):
    """llama.cpp's make_qx_quants (rmse_type=1, no importance weights) for S groups laid out as columns: x (n, S).
    Returns (scale (1, S), L (n, S) int32 in [0, 2 nmax)): ``scale * (L - nmax) ~ x``."""
    ax = x.abs()
    signed_max = x.gather(0, ax.argmax(0, keepdim=True))
    zero = ax.amax(0, keepdim=True) < GROUP_MAX_EPS
    w = x * x
    wx = w * x

    def fit(iscale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cand = nearest_int(iscale * x).clamp(-nmax, nmax - 1)
        c = cand.to(x.dtype)
        return cand, seq_sum(wx * c), seq_sum((w * c) * c)

    cand, sumlx, suml2 = fit(div(-float(nmax), signed_max))
    levels = cand + nmax
    scale = torch.where(suml2 != 0, sumlx / suml2, 0.0)
    best = scale * sumlx
    tenth, top = np.float32(0.1), np.float32(nmax)
    for step in [*range(-9, 0), *range(1, 10)]:
        cand, sumlx, suml2 = fit(div(float(-(top + tenth * np.float32(step))), signed_max))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        levels = torch.where(better, cand + nmax, levels)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0, levels)


def columns(x: Tensor, n: int) -> Tensor:
    """(B, k) -> (n, B k / n): the groups of n consecutive weights as contiguous columns."""
    return x.reshape(-1, n).t().contiguous()


# ---------------------------------------------------------------------------------------------------------
# Q4_K
# ---------------------------------------------------------------------------------------------------------
def _six_bit(value: Tensor, inv: Tensor) -> Tensor:
    """``uint8_t l = nearest_int(inv * value); l = MIN(63, l)`` (the uint8 cast wraps)."""
    return (nearest_int(inv * value) & 0xFF).clamp(max=63)


def encode_q4_k(x: Tensor) -> Tensor:
    n = x.shape[0]
    cols = columns(x, 32)
    av_x = div(seq_sum(cols * cols), 32.0).double().sqrt().to(x.dtype)  # ATen's float32 sqrt is off by an ulp
    scales, mins, levels = make_qkx2_quants(cols, av_x + cols.abs(), 15, -1.0, 0.1, 20)
    scales, mins, levels = scales.reshape(n, 8), mins.reshape(n, 8), levels.t()
    sub = x.reshape(n * 8, 32)
    max_scale, max_min = scales.amax(-1, keepdim=True), mins.amax(-1, keepdim=True)
    max_scale = torch.where(max_scale > 0, max_scale, 0.0)  # C starts from +0 and takes only larger values
    max_min = torch.where(max_min > 0, max_min, 0.0)
    ls = _six_bit(scales, torch.where(max_scale > 0, div(63.0, max_scale), 0.0))
    lm = _six_bit(mins, torch.where(max_min > 0, div(63.0, max_min), 0.0))
    d, dmin = f16_bytes(div(max_scale, 63.0)), f16_bytes(div(max_min, 63.0))
    step = (f16_at(d, 0) * ls.float()).reshape(n * 8, 1)
    shift = (f16_at(dmin, 0) * lm.float()).reshape(n * 8, 1)
    again = nearest_int((sub + shift) / step).clamp(0, 15)
    levels = torch.where(step != 0, again, levels).reshape(n, 4, 2, 32)
    packed_scales = torch.cat(
        [
            ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
            lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
            (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4),
        ],
        dim=-1,
    )
    qs = (levels[:, :, 0] | (levels[:, :, 1] << 4)).reshape(n, 128)
    return torch.cat([d, dmin, bytes_of(packed_scales), bytes_of(qs)], dim=-1)


def _scales_mins_k4(packed: Tensor) -> tuple[Tensor, Tensor]:
    """ggml's get_scale_min_k4 for j = 0..7: (B, 12) bytes -> the 6-bit scales and mins, (B, 8) int32 each."""
    b = packed.to(torch.int32)
    scales = torch.cat([b[:, 0:4] & 63, (b[:, 8:12] & 0xF) | ((b[:, 0:4] >> 6) << 4)], dim=-1)
    mins = torch.cat([b[:, 4:8] & 63, (b[:, 8:12] >> 4) | ((b[:, 4:8] >> 6) << 4)], dim=-1)
    return scales, mins


def decode_q4_k(raw: Tensor) -> Tensor:
    n = raw.shape[0]
    scales, mins = _scales_mins_k4(raw[:, 4:16])
    step = (f16_at(raw, 0) * scales.float()).unsqueeze(-1)
    shift = (f16_at(raw, 2) * mins.float()).unsqueeze(-1)
    qs = raw[:, 16:].to(torch.int32).reshape(n, 4, 1, 32)
    q = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(n, 8, 32).float()
    return (step * q - shift).reshape(n, QK_K)


# ---------------------------------------------------------------------------------------------------------
# Q6_K
# ---------------------------------------------------------------------------------------------------------
def encode_q6_k(x: Tensor) -> Tensor:
    n = x.shape[0]
    scales, levels = make_qx_quants(columns(x, 16), 32)
    scales, levels = scales.reshape(n, 16), levels.t()
    sub = x.reshape(n * 16, 16)
    abs_scales = scales.abs()
    max_scale = scales.gather(-1, abs_scales.argmax(-1, keepdim=True))
    zero = abs_scales.amax(-1, keepdim=True) < GROUP_MAX_EPS
    iscale = div(-128.0, max_scale)
    d = f16_bytes(iscale.reciprocal())
    sc = ((nearest_int(iscale * scales).clamp(max=127) + 128) & 0xFF) - 128  # stored as int8
    step = (f16_at(d, 0) * sc.float()).reshape(n * 16, 1)
    again = nearest_int(sub / step).clamp(-32, 31) + 32
    levels = torch.where(step != 0, again, levels).reshape(n, 2, 4, 32)
    g0, g1, g2, g3 = levels.unbind(2)
    ql = torch.cat([(g0 & 0xF) | ((g2 & 0xF) << 4), (g1 & 0xF) | ((g3 & 0xF) << 4)], dim=-1).reshape(n, 128)
    qh = ((g0 >> 4) | ((g1 >> 4) << 2) | ((g2 >> 4) << 4) | ((g3 >> 4) << 6)).reshape(n, 64)
    out = torch.cat([bytes_of(ql), bytes_of(qh), sc.to(torch.int8).view(torch.uint8), d], dim=-1)
    return torch.where(zero, 0, out).to(torch.uint8)  # llama.cpp: memset(block, 0) when every scale is ~0


def decode_q6_k(raw: Tensor) -> Tensor:
    n = raw.shape[0]
    step = (f16_at(raw, 208) * raw[:, 192:208].view(torch.int8).float()).unsqueeze(-1)
    ql = raw[:, :128].to(torch.int32).reshape(n, 2, 1, 64)
    ql = torch.cat([ql & 0xF, ql >> 4], dim=2).reshape(n, 2, 4, 32)
    qh = raw[:, 128:192].to(torch.int32).reshape(n, 2, 1, 32)
    qh = torch.cat([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=2)
    q = ((ql | (qh << 4)) - 32).reshape(n, 16, 16).float()
    return (step * q).reshape(n, QK_K)
