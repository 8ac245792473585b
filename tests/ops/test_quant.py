"""fastunlearn.ops.quant against gguf-py (bytes and values bit for bit for every format gguf-py quantizes: odd
shapes, zero and constant rows, 1e30, denormals, rounding ties, fp32/bf16/fp16 inputs), the K-quants against
gguf-py's dequantizer and a float64 port of llama.cpp's reference quantizers written here, NF4 against a float64
nearest-level reference; roundtrip_model in place and undone exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastunlearn.ops import quant
from fastunlearn.ops.quant_legacy import NF4_LEVELS, nearest_int, round_half_away

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")
T = gguf.GGMLQuantizationType
GGUF_TYPES = {"q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1, "q5_0": T.Q5_0, "q5_1": T.Q5_1}
K_TYPES = {"q4_k": T.Q4_K, "q6_k": T.Q6_K}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def gguf_quantize(x: torch.Tensor, fmt: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf.quants.quantize(x.float().numpy(), GGUF_TYPES[fmt])


def gguf_dequantize(raw: np.ndarray | torch.Tensor, fmt: str) -> torch.Tensor:
    types = GGUF_TYPES | K_TYPES
    return torch.from_numpy(gguf.quants.dequantize(np.asarray(raw), types[fmt]).copy())


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (tells -0.0 from 0.0; NaN equals a NaN of the same payload)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    int_type = {4: torch.int32, 2: torch.int16, 1: torch.uint8}[a.element_size()]
    return torch.equal(a.contiguous().view(int_type), b.contiguous().view(int_type))


def hard_rows(k: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Named (rows, k) float32 cases: random odd row counts, zero and constant rows, huge, tiny and mixed values."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(7, k, generator=g)
    mixed = normal.clone()
    mixed[0, 3], mixed[1, 0], mixed[2, 5] = 1e30, -1e30, 3e38  # overflow of fp16 scales
    mixed[3] *= 1e-40  # denormal float32 blocks (their 1 / d overflows)
    mixed[4, ::2] = 1e-45  # the smallest denormal beside normal values
    mixed[5, :7] = 0.0
    mixed[6] = mixed[6].abs() + 1.0  # all positive: the min is not 0
    return {
        "normal": normal,
        "odd_rows": torch.randn(3, k, generator=g) * 0.02,
        "zeros": torch.zeros(2, k),
        "negative_zeros": torch.full((1, k), -0.0),
        "constant": torch.stack([torch.full((k,), 0.37), torch.full((k,), -2.5), torch.full((k,), 1e-39)]),
        "mixed": mixed,
        "ties_max_equal_magnitude": torch.tensor([[-1.0, 1.0] * (k // 2), [1.0, -1.0] * (k // 2)]),
        "student_t": torch.distributions.StudentT(2.0).sample((5, k)),
    }


def tie_rows(fmt: str, k: int = 64) -> torch.Tensor:
    """Rows whose scaled values sit exactly on a rounding boundary: roundf and truncation differ from
    round-half-even there."""
    halves = torch.arange(-7, 8, dtype=torch.float32) + 0.5
    if fmt == "q8_0":  # amax 127: d = 1, x * id = x; roundf(k + 0.5) rounds away from 0
        row = torch.cat([torch.tensor([127.0]), halves, -halves, torch.arange(16.0)])
    elif fmt in ("q4_0", "q5_0"):  # max = -8 (-16): d = 1, trunc(x + 8.5) at integers
        top = 8.0 if fmt == "q4_0" else 16.0
        row = torch.cat([torch.tensor([-top]), halves, torch.arange(-7.0, 9.0)])
    else:  # q4_1 / q5_1: min 0, max 15 (31): d = 1, trunc(x + 0.5)
        top = 15.0 if fmt == "q4_1" else 31.0
        row = torch.cat([torch.tensor([0.0, top]), (halves + 7).clamp(max=top), torch.arange(15.0)])
    row = row[:32] if row.numel() >= 32 else torch.cat([row, torch.zeros(32 - row.numel())])
    return torch.stack([row, row * 0.25, row * 3.0]).repeat(1, k // 32)


# ---------------------------------------------------------------------------------------------------------
# Rounding helpers
# ---------------------------------------------------------------------------------------------------------
def test_nearest_int_is_half_to_even_and_roundf_half_away():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 4194303.0, -4194303.0, 7.0])
    assert nearest_int(x).tolist() == [0, 2, 2, 0, -2, -2, 0, 4194303, -4194303, 7]
    assert round_half_away(x).tolist() == [1, 2, 3, -1, -2, -3, 0, 4194303, -4194303, 7]
    assert nearest_int(x).tolist() == torch.round(x).to(torch.int32).tolist()  # the same as ATen's round here


# ---------------------------------------------------------------------------------------------------------
# The formats gguf-py quantizes: bytes and values bit for bit
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(GGUF_TYPES))
@pytest.mark.parametrize("k", [32, 96, 160])
def test_bytes_and_values_equal_gguf(fmt, k):
    for name, x in hard_rows(k).items():
        raw = quant.quantize_blocks(x, fmt)
        expected = gguf_quantize(x, fmt)
        assert np.array_equal(raw.numpy(), expected), (fmt, name)
        values = quant.dequantize_blocks(raw, fmt, x.shape)
        assert same_bits(values, gguf_dequantize(expected, fmt)), (fmt, name)
        assert same_bits(quant.roundtrip(x, fmt), values), (fmt, name)


@pytest.mark.parametrize("fmt", list(GGUF_TYPES))
def test_rounding_ties_follow_llama_cpp(fmt):
    x = tie_rows(fmt)
    raw = quant.quantize_blocks(x, fmt)
    assert np.array_equal(raw.numpy(), gguf_quantize(x, fmt))
    if fmt == "q8_0":  # 2.5 -> 3, -2.5 -> -3 (round half away from zero, C's roundf)
        q = raw[0, 2:34].view(torch.int8)
        assert q[1:16].tolist() == [int(np.copysign(np.floor(abs(h) + 0.5), h)) for h in x[0, 1:16].tolist()]


@pytest.mark.parametrize("fmt", list(GGUF_TYPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_low_precision_inputs_match_gguf_on_their_float32_values(fmt, dtype):
    x = (torch.randn(5, 96) * 0.05).to(dtype)
    expected = gguf_quantize(x.float(), fmt)
    assert np.array_equal(quant.quantize_blocks(x, fmt).numpy(), expected)
    out = quant.roundtrip(x, fmt)
    assert out.dtype == dtype and same_bits(out, gguf_dequantize(expected, fmt).to(dtype))


@pytest.mark.parametrize("fmt", [*GGUF_TYPES, *K_TYPES, "nf4", *quant.FLOAT_FORMATS])
def test_chunking_and_leading_dimensions_do_not_change_the_result(fmt):
    x = torch.randn(3, 5, 512)
    whole = quant.quantize_blocks(x, fmt)
    spec = quant.SPECS[fmt]
    assert whole.shape == (3, 5, 512 // spec.block * spec.size) and whole.dtype == torch.uint8
    assert torch.equal(quant.quantize_blocks(x, fmt, chunk_elements=spec.block * 3), whole)
    assert torch.equal(quant.quantize_blocks(x.reshape(15, 512), fmt).reshape(whole.shape), whole)
    values = quant.dequantize_blocks(whole, fmt, x.shape, chunk_elements=1)
    assert same_bits(values, quant.dequantize_blocks(whole.flatten(), fmt, x.shape))
    assert same_bits(quant.roundtrip(x, fmt, chunk_elements=700), values)
    assert same_bits(quant.roundtrip(x.mT.contiguous().mT, fmt), values)  # a non-contiguous weight


@pytest.mark.parametrize("fmt", quant.FLOAT_FORMATS)
def test_float_formats_are_rounding_casts(fmt):
    x = torch.randn(4, 64) * 1e3
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[fmt]
    assert same_bits(quant.roundtrip(x, fmt), x.to(dtype).float())
    if fmt != "bf16":
        assert np.array_equal(quant.quantize_blocks(x, fmt).numpy().view(dtype=np.dtype(fmt.replace("f", "float"))),
                              gguf.quants.quantize(x.numpy(), getattr(T, fmt.upper())))  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------
def test_bad_input_is_one_line_naming_it():
    with pytest.raises(ValueError, match="fmt must be one of .* got 'q3_k'"):
        quant.roundtrip(torch.randn(2, 32), "q3_k")
    with pytest.raises(ValueError, match=r"shape \(2, 48\): q4_0 stores rows in blocks of 32"):
        quant.quantize_blocks(torch.randn(2, 48), "q4_0")
    with pytest.raises(ValueError, match=r"shape \(2, 64\).*blocks of 256"):
        quant.roundtrip(torch.randn(2, 64), "q4_k")
    with pytest.raises(TypeError, match="weight must be float32"):
        quant.roundtrip(torch.ones(2, 32, dtype=torch.int32), "q8_0")
    bad = torch.randn(2, 64)
    bad[1, 7] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        quant.roundtrip(bad, "q8_0")
    with pytest.raises(ValueError, match="raw has 30 bytes, q8_0 of shape .* takes 68"):
        quant.dequantize_blocks(torch.zeros(30, dtype=torch.uint8), "q8_0", (2, 32))
    with pytest.raises(ValueError, match="chunk_elements must be a positive int"):
        quant.roundtrip(torch.randn(2, 32), "q8_0", chunk_elements=0)


# ---------------------------------------------------------------------------------------------------------
# K-quants: a float64 port of llama.cpp's quantize_row_q4_K_ref / quantize_row_q6_K_ref (vectorized over groups)
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


# ---------------------------------------------------------------------------------------------------------
# NF4
# ---------------------------------------------------------------------------------------------------------
def test_nf4_is_the_nearest_level_times_the_block_absmax():
    x = torch.cat([torch.randn(40, 192), torch.distributions.StudentT(2.0).sample((8, 192))]).double()
    blocks = x.reshape(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    scaled = blocks / absmax
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    ref_idx = (scaled.unsqueeze(-1) - levels).abs().argmin(-1)
    ours = quant.roundtrip(x.float(), "nf4").double().reshape(-1, 64)
    our_idx = (ours.unsqueeze(-1) / absmax.unsqueeze(-1) - levels).abs().argmin(-1)
    on_levels = (levels.float()[our_idx] * absmax.float()).double()  # float32 level x float32 absmax
    torch.testing.assert_close(ours, on_levels, rtol=0, atol=0)
    midpoints = (levels[:-1] + levels[1:]) / 2
    near_tie = (scaled.unsqueeze(-1) - midpoints).abs().amin(-1) < 1e-6
    assert bool((our_idx == ref_idx)[~near_tie].all())
    assert bool(((our_idx - ref_idx).abs() <= 1)[near_tie].all())


def test_nf4_ties_take_the_lower_level_and_bytes_follow_bitsandbytes_layout():
    midpoints = torch.tensor(
        [(a + b) / 2 for a, b in zip(NF4_LEVELS[:-1], NF4_LEVELS[1:], strict=True)], dtype=torch.float64
    ).float()
    row = torch.cat([torch.tensor([1.0]), midpoints, torch.zeros(48)])
    raw = quant.quantize_blocks(row.unsqueeze(0), "nf4")
    assert raw.shape == (1, 36) and raw[0, :4].view(torch.float32).item() == 1.0
    q = torch.stack([raw[0, 4:] >> 4, raw[0, 4:] & 15], dim=1).reshape(-1)
    assert q[0].item() == 15 and q[1:16].tolist() == list(range(15)) and set(q[16:].tolist()) == {7}
    assert not bool(quant.roundtrip(torch.zeros(3, 64), "nf4").any())


# ---------------------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------------------
class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 64)
        self.proj = torch.nn.Linear(64, 256)
        self.down = torch.nn.Linear(256, 96)
        self.norm = torch.nn.LayerNorm(96)
        self.head = torch.nn.Linear(64, 50, bias=False)
        self.head.weight = self.embed.weight  # tied


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


def test_roundtrip_model_in_place_once_per_tied_weight_then_restored_bit_for_bit():
    model = Tiny()
    before = snapshot(model)
    with quant.roundtrip_model(model, "q4_1", progress=False) as handle:
        assert handle.formats == {"embed.weight": "q4_1", "proj.weight": "q4_1", "down.weight": "q4_1"}
        for name in ("embed.weight", "proj.weight", "down.weight"):
            assert torch.equal(dict(model.named_parameters())[name], quant.roundtrip(before[name], "q4_1"))
        assert model.head.weight is model.embed.weight
        for name in ("proj.bias", "norm.weight", "norm.bias"):
            assert torch.equal(dict(model.named_parameters())[name], before[name])
    after = snapshot(model)
    assert all(same_bits(after[n], before[n]) for n in before)


def test_roundtrip_model_takes_per_parameter_formats_and_llama_cpps_k_quant_fallback():
    model = Tiny()
    before = snapshot(model)
    formats = {"embed.weight": "q4_k", "proj.weight": "q6_k", "down.weight": "q4_k", "norm.weight": "q8_0"}
    handle = quant.roundtrip_model(model, formats, progress=False, backup=False)
    # embed (50, 64): 64 % 256 -> q5_0 (llama-quantize's substitute); down (96, 256) fits; norm is 1-D: not chosen
    assert handle.formats == {"embed.weight": "q5_0", "proj.weight": "q8_0", "down.weight": "q4_k"}
    assert torch.equal(model.proj.weight, quant.roundtrip(before["proj.weight"], "q8_0"))
    assert torch.equal(model.down.weight, quant.roundtrip(before["down.weight"], "q4_k"))
    with pytest.raises(RuntimeError, match="backup=False"):
        handle.restore()
    assert quant.llama_cpp_format((8, 48), "q6_k") == "f16" and quant.llama_cpp_format((8, 512), "q6_k") == "q6_k"
    with pytest.raises(ValueError, match=r"parameter 'embed.weight' has shape \(50, 64\).*blocks of 256"):
        quant.roundtrip_model(Tiny(), "q4_k", fallback=False, progress=False)
    with pytest.raises(ValueError, match="does not have: nope"):
        quant.roundtrip_model(Tiny(), {"nope": "q8_0"}, progress=False)


def test_roundtrip_model_checks_everything_before_changing_anything_and_undoes_a_failure(monkeypatch):
    model = Tiny()
    with torch.no_grad():
        model.down.weight[3, 5] = float("inf")
    before = snapshot(model)
    with pytest.raises(ValueError, match="parameter 'down.weight' has non-finite values"):
        quant.roundtrip_model(model, "q8_0", progress=False)
    assert all(same_bits(p, before[n]) for n, p in snapshot(model).items())

    model = Tiny()
    before = snapshot(model)
    calls = []

    def failing(x):
        calls.append(x.shape)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return quant.lq.encode_q8_0(x)

    monkeypatch.setitem(quant.SPECS, "q8_0", quant.SPECS["q8_0"]._replace(encode=failing))
    with pytest.raises(KeyboardInterrupt):
        quant.roundtrip_model(model, "q8_0", progress=False)
    assert all(same_bits(p, before[n]) for n, p in snapshot(model).items())
