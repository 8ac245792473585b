"""fastunlearn.ops.quant's K-quants (Q4_K, Q6_K), which gguf-py dequantizes but does not quantize: gguf-py's
dequantizer reads our bytes as we do; a NumPy port of llama.cpp's quantize_row_q4_K_ref / quantize_row_q6_K_ref
written here gives the same bytes (run in float32: C's arithmetic; in float64: the algorithm in exact-er
arithmetic); float32 against the float64 port differs only on near-ties; error bounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastunlearn.ops import quant
from tests.helpers.quant import DTYPES, K_TYPES, gguf_dequantize, hard_rows, same_bits

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------
# A port of llama.cpp's quantize_row_q4_K_ref / quantize_row_q6_K_ref, vectorized over groups, in the input's precision
# ---------------------------------------------------------------------------------------------------------
def c_float(base: float, delta: float, step: int, nmax: int) -> float:
    """C's ``base + delta * step + nmax`` with float constants: every operation rounded to float32."""
    return float(np.float32(base) + np.float32(delta) * np.float32(step) + np.float32(nmax))


def c_round(v: np.ndarray) -> np.ndarray:
    """llama.cpp's nearest_int: in float32 its mantissa trick (inf and NaN included), in float64 half to even."""
    if v.dtype != np.float32:
        return np.round(v)
    with np.errstate(all="ignore"):
        bits = (v + np.float32(12582912.0)).view(np.int32)
    return ((bits & 0x7FFFFF) - 0x400000).astype(np.float32)


def seq(a: np.ndarray) -> np.ndarray:
    """Row sums added left to right, as llama.cpp's loops add (NumPy's sum adds pairwise)."""
    return np.cumsum(a, axis=1)[:, -1]


def ref_make_qkx2(x, w, nmax, rmin, rdelta, nstep):
    """make_qkx2_quants(use_mad=false) in x's precision for groups x, w (S, n): (scale, the_min, L)."""
    low0 = np.minimum(x.min(1), 0)
    top = x.max(1)
    flat = top == low0
    sum_w, sum_x = seq(w), seq(w * x)
    with np.errstate(all="ignore"):
        iscale = nmax / (top - low0)
        scale = 1 / iscale
        levels = np.clip(c_round(iscale[:, None] * (x - low0[:, None])), 0, nmax)
        best = seq(w * np.square(scale[:, None] * levels + low0[:, None] - x))
        low = low0.copy()
        for step in range(nstep + 1):
            iscale = c_float(rmin, rdelta, step, nmax) / (top - low)
            cand = np.clip(c_round(iscale[:, None] * (x - low[:, None])), 0, nmax)
            sum_l, sum_l2, sum_xl = seq(w * cand), seq(w * cand * cand), seq(w * cand * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            this_scale = np.where(this_min > 0, sum_xl / sum_l2, this_scale)
            this_min = np.minimum(this_min, 0)
            error = seq(w * np.square(this_scale[:, None] * cand + this_min[:, None] - x))
            better = (det > 0) & (error < best)
            levels[better], best[better] = cand[better], error[better]
            scale[better], low[better] = this_scale[better], this_min[better]
    scale[flat], levels[flat] = 0, 0
    return scale, -np.where(flat, low0, low), levels


def ref_q4_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q4_K_ref in x's precision (float32: C's arithmetic; float64): (B, 256) -> (B, 144) bytes."""
    n, ft = x.shape[0], x.dtype
    sub = x.reshape(n * 8, 32)
    w = np.sqrt(seq(sub * sub)[:, None] / 32) + np.abs(sub)
    scales, mins, levels = ref_make_qkx2(sub, w, 15, -1.0, 0.1, 20)
    scales, mins, levels = scales.reshape(n, 8), mins.reshape(n, 8), levels.reshape(n, 8, 32)
    max_scale, max_min = (np.where(m > 0, m, 0) for m in (scales.max(1), mins.max(1)))  # C: from +0, larger only
    with np.errstate(all="ignore"):
        ls = np.minimum(c_round(np.where(max_scale > 0, 63 / max_scale, 0)[:, None] * scales), 63).astype(int)
        lm = np.minimum(c_round(np.where(max_min > 0, 63 / max_min, 0)[:, None] * mins), 63).astype(int)
        d, dmin = (max_scale / 63).astype(np.float16), (max_min / 63).astype(np.float16)
        step = d.astype(ft)[:, None] * ls.astype(ft)
        shift = dmin.astype(ft)[:, None] * lm.astype(ft)
        again = np.clip(c_round((x.reshape(n, 8, 32) + shift[..., None]) / step[..., None]), 0, 15)
    levels = np.where(step[..., None] != 0, again, levels).astype(np.uint8).reshape(n, 4, 2, 32)
    packed = np.concatenate(
        [
            ls[:, :4] | (ls[:, 4:] >> 4) << 6,
            lm[:, :4] | (lm[:, 4:] >> 4) << 6,
            (ls[:, 4:] & 15) | (lm[:, 4:] & 15) << 4,
        ],
        axis=1,
    ).astype(np.uint8)
    qs = (levels[:, :, 0] | levels[:, :, 1] << 4).reshape(n, 128)
    return np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), packed, qs], axis=1)


def ref_make_qx(x, nmax):
    """make_qx_quants(rmse_type=1, no weights) in x's precision for groups x (S, n): (scale, L in [0, 2 nmax))."""
    top = x[np.arange(x.shape[0]), np.abs(x).argmax(1)]
    zero = np.abs(x).max(1) < np.asarray(1e-15, dtype=x.dtype)
    w = x * x
    with np.errstate(all="ignore"):

        def fit(iscale):
            cand = np.clip(c_round(iscale[:, None] * x), -nmax, nmax - 1)
            return cand, seq(w * x * cand), seq(w * cand * cand)

        cand, sumlx, suml2 = fit(-nmax / top)
        levels, scale = cand + nmax, np.where(suml2 != 0, sumlx / suml2, 0)
        best = scale * sumlx
        for step in [*range(-9, 0), *range(1, 10)]:
            cand, sumlx, suml2 = fit(-c_float(0.0, 0.1, step, nmax) / top)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            levels[better], scale[better] = cand[better] + nmax, sumlx[better] / suml2[better]
            best[better] = scale[better] * sumlx[better]
    scale[zero], levels[zero] = 0, 0
    return scale, levels


def ref_q6_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q6_K_ref in x's precision: (B, 256) -> (B, 210) bytes."""
    n, ft = x.shape[0], x.dtype
    scales, levels = ref_make_qx(x.reshape(n * 16, 16), 32)
    scales, levels = scales.reshape(n, 16), levels.reshape(n, 16, 16)
    max_scale = scales[np.arange(n), np.abs(scales).argmax(1)]
    zero = np.abs(scales).max(1) < np.asarray(1e-15, dtype=ft)
    with np.errstate(all="ignore"):
        iscale = -128 / max_scale
        d = (1 / iscale).astype(np.float16)
        sc = np.minimum(c_round(iscale[:, None] * scales), 127)
        sc = np.where(np.isfinite(sc), sc, 0).astype(int)
        step = d.astype(ft)[:, None] * sc.astype(ft)
        again = np.clip(c_round(x.reshape(n, 16, 16) / step[..., None]), -32, 31) + 32
    levels = np.where(step[..., None] != 0, again, levels).astype(np.uint8).reshape(n, 2, 4, 32)
    g0, g1, g2, g3 = (levels[:, :, i] for i in range(4))
    ql = np.concatenate([(g0 & 15) | (g2 & 15) << 4, (g1 & 15) | (g3 & 15) << 4], axis=2).reshape(n, 128)
    qh = (g0 >> 4 | (g1 >> 4) << 2 | (g2 >> 4) << 4 | (g3 >> 4) << 6).reshape(n, 64)
    out = np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), d.view(np.uint8).reshape(n, 2)], axis=1)
    out[zero] = 0
    return out


REF_K = {"q4_k": ref_q4_k, "q6_k": ref_q6_k}


def nan_same(values: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(values), float("nan"), values)


@pytest.mark.parametrize("fmt", list(K_TYPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_k_quant_values_equal_ggufs_dequantizer_of_the_same_bytes(fmt, dtype):
    for name, x in hard_rows(512).items():
        x = x.to(dtype)
        if not bool(x.isfinite().all()):  # 1e30 in float16
            continue
        raw = quant.quantize_blocks(x, fmt)
        ours = quant.dequantize_blocks(raw, fmt, x.shape)
        assert same_bits(nan_same(ours), nan_same(gguf_dequantize(raw.numpy(), fmt))), (fmt, name)
        assert same_bits(quant.roundtrip(x, fmt), ours.to(dtype)), (fmt, name)


def k_sample(seed: int = 0) -> torch.Tensor:
    """768 super-blocks of weights shaped like trained ones: Gaussian rows of varied scale, heavy-tailed rows."""
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(96, 1024, generator=g) * torch.logspace(-3, 0, 96).unsqueeze(1)
    heavy = torch.distributions.StudentT(3.0).sample((96, 1024)) * 0.02
    return torch.cat([gauss, heavy]).reshape(-1, 256)


@pytest.mark.parametrize("fmt", list(K_TYPES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_k_quants_equal_a_numpy_port_of_llama_cpps_reference_byte_for_byte(fmt, dtype):
    """float32: the arithmetic of llama.cpp's C reference (without FMA contraction); float64: the same algorithm
    in exact-er arithmetic. The codecs run in both."""
    x = k_sample().to(torch.float64 if dtype == np.float64 else torch.float32)
    assert np.array_equal(quant.SPECS[fmt].encode(x).numpy(), REF_K[fmt](x.numpy()))
    if dtype == np.float32:
        extra = torch.cat([t for t in hard_rows(512).values()]).reshape(-1, 256)
        assert np.array_equal(quant.SPECS[fmt].encode(extra).numpy(), REF_K[fmt](extra.numpy()))


@pytest.mark.parametrize("fmt", list(K_TYPES))
def test_k_quants_in_float32_match_the_float64_port_up_to_near_ties(fmt):
    """float32 (as llama.cpp computes) against the float64 port: byte for byte on nearly every super-block; the
    others are decided by float32 rounding (exact ties by construction, near-ties) and reconstruct the block about
    as well, with no bias over all of them."""
    x = k_sample()
    ours = quant.quantize_blocks(x, fmt).numpy()
    ref = REF_K[fmt](x.double().numpy())
    same = (ours == ref).all(1)
    err_ours = (gguf_dequantize(ours, fmt).double() - x.double()).square().sum(1)
    err_ref = (gguf_dequantize(ref, fmt).double() - x.double()).square().sum(1)
    assert same.mean() >= 0.95, same.mean()
    assert bool((err_ours <= err_ref * 1.25).all()), (err_ours / err_ref).max()
    assert abs(float(err_ours.sum() / err_ref.sum()) - 1) < 1e-3


@pytest.mark.parametrize(("fmt", "worse", "bound"), [("q4_k", "q4_1", 0.085), ("q6_k", "q5_1", 0.021)])
def test_k_quant_error_is_bounded_and_below_the_legacy_format_of_fewer_bits(fmt, worse, bound):
    x = torch.randn(16, 1024)
    rel = float((quant.roundtrip(x, fmt) - x).norm() / x.norm())
    assert rel < bound and rel < float((quant.roundtrip(x, worse) - x).norm() / x.norm()), rel
    blocks = x.reshape(-1, 256)
    spread = (blocks.amax(1) - blocks.amin(1)).unsqueeze(1)
    assert bool(((quant.roundtrip(x, fmt).reshape(-1, 256) - blocks).abs() <= spread / 15).all())


@pytest.mark.parametrize("fmt", list(K_TYPES))
def test_k_quant_zero_and_constant_rows(fmt):
    zeros = torch.zeros(2, 256)
    raw = quant.quantize_blocks(zeros, fmt)
    assert not bool(quant.roundtrip(zeros, fmt).any())
    if fmt == "q6_k":
        assert not bool(raw.any())  # llama.cpp zeroes the whole block
    for c in (0.37, -2.5, 7.0):  # (tiny constants have fp16 scales in the subnormal range: less precise)
        x = torch.full((1, 256), c)
        torch.testing.assert_close(quant.roundtrip(x, fmt), x, rtol=2e-3, atol=0)
