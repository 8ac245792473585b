"""Block codecs of llama.cpp's 32-weight formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: its "legacy" quants), of NF4, of
the float formats a GGUF file holds (F32, F16, BF16), and the rounding / bit helpers the K-quants share.

A codec is three functions on float32 blocks: ``encode(x (B, block)) -> uint8 (B, bytes)`` writes ggml's byte layout
(``block_q4_1`` etc. in ggml-common.h, little-endian), ``decode(raw (B, bytes)) -> float32 (B, block)`` reads it,
and ``values(x)`` gives decode(encode(x)) without packing bytes (the round trip's fast path). All are plain ATen
ops, so they run on any device. The arithmetic repeats llama.cpp's reference quantizers (``quantize_row_*_ref`` in
ggml-quants.c) and gguf-py's ``gguf.quants`` operation by operation in float32: the same scale ``d = max / -8``
(Q4_0), ``(max - min) / 15`` (Q4_1), ``amax / 127`` (Q8_0), the same reciprocal ``id = 1 / d`` (0 where d is 0), the
same rounding (truncation of ``x * id + 8.5`` for Q4_0, C's ``roundf``, i.e. half away from zero, for Q8_0), and the
float32 product / sum order of the dequantizers, so bytes and values equal gguf-py's bit for bit. Non-finite
intermediate values (a block whose ``1 / d`` overflows, e.g. ``amax`` below 4e-37, where the stored fp16 scale is 0
anyway) are quantized to 0, as gguf-py does on x86; C leaves that cast undefined.

NF4 (bitsandbytes' 4-bit NormalFloat, Dettmers et al. 2023): blocks of 64, ``absmax`` per block kept in float32
(no double quantization), each weight replaced by the nearest of the 16 NF4 levels times absmax. The level index
counts the float32 midpoints between levels strictly below ``x / absmax`` (bitsandbytes' ``x > threshold`` tree,
so a value exactly on a midpoint takes the lower level); bitsandbytes multiplies by a fast reciprocal instead of
dividing, which can move a value within one float32 ulp of a midpoint to the other level. Byte layout (ours; NF4
is no ggml type): the float32 absmax, then 32 bytes with the first of each pair of weights in the high nibble
(bitsandbytes' packing).
"""

from __future__ import annotations

import torch
from torch import Tensor

MAGIC = 12582912.0  # 1.5 * 2**23: x + MAGIC holds round-half-even(x) in its low 22 mantissa bits, |x| < 2**22

# bitsandbytes' NF4 levels (quantiles of N(0, 1) normalized to [-1, 1], exactly representable as float32)
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# The decision thresholds: midpoints of neighbouring levels, computed in float64 and rounded to float32
NF4_MIDPOINTS = tuple((a + b) / 2 for a, b in zip(NF4_LEVELS[:-1], NF4_LEVELS[1:], strict=True))


# ---------------------------------------------------------------------------------------------------------
# Helpers (also used by fastunlearn.ops.quant_k)
# ---------------------------------------------------------------------------------------------------------
def nearest_int(x: Tensor) -> Tensor:
    """llama.cpp's ``nearest_int``: round half to even through the float32 mantissa (int32 result). For |x| >=
    2**22 (an assert in llama.cpp) it returns what the C trick returns; NaN (only in blocks whose scale overflows)
    gives 0, what x86's default NaN gives in C, on every device (CUDA's NaN has other bits).
    A float64 ``x`` (the tests run the codecs in float64 against a float64 port) is rounded half to even."""
    if x.dtype == torch.float64:
        return torch.round(x).to(torch.int32)
    x = torch.nan_to_num(x, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    return ((x + MAGIC).view(torch.int32) & 0x7FFFFF) - 0x400000


def round_half_away(x: Tensor) -> Tensor:
    """C's ``roundf`` (half away from zero) on float32, exactly: floor(|x|) + floor(2 * frac(|x|)), signed."""
    a = x.abs()
    whole = a.floor()
    return torch.copysign(whole + (2 * (a - whole)).floor(), x)


def finite_or_zero(q: Tensor) -> Tensor:
    """NaN and +-inf read as 0 (see the module docstring)."""
    return torch.nan_to_num(q, nan=0.0, posinf=0.0, neginf=0.0)


def div(a: Tensor | float, b: Tensor | float) -> Tensor:
    """a / b correctly rounded, as C divides. ATen computes ``number / tensor`` as ``reciprocal(tensor) * number``
    and, on CUDA, ``tensor / number`` as ``tensor * (1 / number)``: both round twice. A number is made a 0-d
    tensor on the other operand's device, which takes the true-division kernel."""
    like = b if isinstance(b, Tensor) else a
    a = a if isinstance(a, Tensor) else torch.full((), a, dtype=like.dtype, device=like.device)
    b = b if isinstance(b, Tensor) else torch.full((), b, dtype=like.dtype, device=like.device)
    return a / b


def inverse(d: Tensor) -> Tensor:
    """``d ? 1.0f / d : 0.0f``."""
    return torch.where(d == 0, 0.0, d.reciprocal())


def f16_bytes(x: Tensor) -> Tensor:
    """float32 (B, 1) or (B,) -> (B, 2) uint8: ggml's ``GGML_FP32_TO_FP16`` (round to nearest even)."""
    return x.reshape(-1, 1).to(torch.float16).view(torch.uint8)


def as_f16(x: Tensor) -> Tensor:
    """float32 -> the float32 value of its fp16 rounding (what f16_at reads back from f16_bytes)."""
    return x.to(torch.float16).float()


def f16_at(raw: Tensor, start: int) -> Tensor:
    """The fp16 at bytes [start, start + 2) of every block, as float32 (B, 1)."""
    return raw[:, start : start + 2].contiguous().view(torch.float16).float()


def bytes_of(values: Tensor) -> Tensor:
    """int32 values in [0, 256) -> uint8."""
    return values.to(torch.uint8)


def pack_bits(bits: Tensor) -> Tensor:
    """(B, 8 n) zeros and ones -> (B, n) uint8, bit j of byte k = element 8 k + j (ggml's ``qh``)."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.int32)
    return bytes_of((bits.reshape(bits.shape[0], -1, 8) << shifts).sum(-1, dtype=torch.int32))


def unpack_bits(raw: Tensor) -> Tensor:
    """(B, n) uint8 -> (B, 8 n) int32 zeros and ones (inverse of pack_bits)."""
    shifts = torch.arange(8, device=raw.device, dtype=torch.int32)
    return ((raw.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(raw.shape[0], -1)


def pack_halves(q: Tensor) -> Tensor:
    """(B, 2 h) nibbles -> (B, h) bytes: element j in the low nibble of byte j, element h + j in its high one."""
    half = q.shape[-1] // 2
    return bytes_of(q[:, :half] | (q[:, half:] << 4))


def unpack_halves(raw: Tensor) -> Tensor:
    """(B, h) bytes -> (B, 2 h) int32 nibbles (inverse of pack_halves)."""
    raw = raw.to(torch.int32)
    return torch.cat([raw & 0xF, raw >> 4], dim=-1)


# ---------------------------------------------------------------------------------------------------------
# Q8_0: d (fp16), 32 x int8.  w = d * q,  d = amax / 127,  q = roundf(w / d)
# Each format: its levels (float32, integer-valued), encode (bytes), decode (values of bytes) and values (the
# values decode(encode(x)) gives, without the bytes: the round trip's fast path, the same float32 operations)
# ---------------------------------------------------------------------------------------------------------
def _q8_0(x: Tensor) -> tuple[Tensor, Tensor]:
    d = div(x.abs().amax(-1, keepdim=True), 127.0)
    return d, finite_or_zero(round_half_away(x * inverse(d))) + 0.0  # + 0.0: the int8 path has no -0


def encode_q8_0(x: Tensor) -> Tensor:
    d, q = _q8_0(x)
    return torch.cat([f16_bytes(d), q.to(torch.int8).view(torch.uint8)], dim=-1)


def decode_q8_0(raw: Tensor) -> Tensor:
    return raw[:, 2:].view(torch.int8).float() * f16_at(raw, 0)


def values_q8_0(x: Tensor) -> Tensor:
    d, q = _q8_0(x)
    return q * as_f16(d)


# ---------------------------------------------------------------------------------------------------------
# Q4_0 / Q5_0: d (fp16) [, qh: 32 fifth bits], 16 bytes of nibbles.  w = d * (q - 2^(b-1)), d = max / -2^(b-1)
# where max is the weight of largest magnitude (the first one on ties), q = trunc(w / d + 2^(b-1) + 0.5)
# ---------------------------------------------------------------------------------------------------------
def _symmetric(x: Tensor, half: int) -> tuple[Tensor, Tensor]:
    signed_max = x.gather(-1, x.abs().argmax(-1, keepdim=True))
    d = div(signed_max, -float(half))
    return d, finite_or_zero((x * inverse(d) + (half + 0.5)).trunc()).clamp(0, 2 * half - 1)


def encode_q4_0(x: Tensor) -> Tensor:
    d, q = _symmetric(x, 8)
    return torch.cat([f16_bytes(d), pack_halves(q.to(torch.int32))], dim=-1)


def decode_q4_0(raw: Tensor) -> Tensor:
    return f16_at(raw, 0) * (unpack_halves(raw[:, 2:]) - 8).float()


def values_q4_0(x: Tensor) -> Tensor:
    d, q = _symmetric(x, 8)
    return as_f16(d) * (q - 8)


def encode_q5_0(x: Tensor) -> Tensor:
    d, q = _symmetric(x, 16)
    q = q.to(torch.int32)
    return torch.cat([f16_bytes(d), pack_bits(q >> 4), pack_halves(q & 0xF)], dim=-1)


def decode_q5_0(raw: Tensor) -> Tensor:
    q = unpack_halves(raw[:, 6:]) | (unpack_bits(raw[:, 2:6]) << 4)
    return f16_at(raw, 0) * (q - 16).float()


def values_q5_0(x: Tensor) -> Tensor:
    d, q = _symmetric(x, 16)
    return as_f16(d) * (q - 16)


# ---------------------------------------------------------------------------------------------------------
# Q4_1 / Q5_1: d, m (fp16) [, qh], nibbles.  w = d * q + m,  m = min,  d = (max - min) / (2^b - 1),
# q = trunc((w - min) / d + 0.5)
# ---------------------------------------------------------------------------------------------------------
def _affine(x: Tensor, top: int) -> tuple[Tensor, Tensor, Tensor]:
    low = x.amin(-1, keepdim=True)
    d = div(x.amax(-1, keepdim=True) - low, float(top))
    return d, low, finite_or_zero(((x - low) * inverse(d) + 0.5).trunc()).clamp(0, top)


def encode_q4_1(x: Tensor) -> Tensor:
    d, low, q = _affine(x, 15)
    return torch.cat([f16_bytes(d), f16_bytes(low), pack_halves(q.to(torch.int32))], dim=-1)


def decode_q4_1(raw: Tensor) -> Tensor:
    return f16_at(raw, 0) * unpack_halves(raw[:, 4:]).float() + f16_at(raw, 2)


def values_q4_1(x: Tensor) -> Tensor:
    d, low, q = _affine(x, 15)
    return as_f16(d) * q + as_f16(low)


def encode_q5_1(x: Tensor) -> Tensor:
    d, low, q = _affine(x, 31)
    q = q.to(torch.int32)
    return torch.cat([f16_bytes(d), f16_bytes(low), pack_bits(q >> 4), pack_halves(q & 0xF)], dim=-1)


def decode_q5_1(raw: Tensor) -> Tensor:
    q = unpack_halves(raw[:, 8:]) | (unpack_bits(raw[:, 4:8]) << 4)
    return f16_at(raw, 0) * q.float() + f16_at(raw, 2)


def values_q5_1(x: Tensor) -> Tensor:
    d, low, q = _affine(x, 31)
    return as_f16(d) * q + as_f16(low)


# ---------------------------------------------------------------------------------------------------------
# NF4: absmax (float32), 32 bytes (first of each pair in the high nibble).  w = level[q] * absmax
# ---------------------------------------------------------------------------------------------------------
def _nf4(x: Tensor) -> tuple[Tensor, Tensor]:
    absmax = x.abs().amax(-1, keepdim=True)
    scaled = torch.where(absmax == 0, 0.0, x / absmax)
    midpoints = torch.tensor(NF4_MIDPOINTS, dtype=torch.float32, device=x.device)
    return absmax, torch.bucketize(scaled, midpoints, out_int32=True)  # the number of midpoints < scaled


def encode_nf4(x: Tensor) -> Tensor:
    absmax, q = _nf4(x)
    return torch.cat([absmax.view(torch.uint8), bytes_of((q[:, 0::2] << 4) | q[:, 1::2])], dim=-1)


def _nf4_values(q: Tensor, absmax: Tensor) -> Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=q.device)[q] * absmax


def decode_nf4(raw: Tensor) -> Tensor:
    packed = raw[:, 4:].to(torch.int32)
    q = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(raw.shape[0], -1)
    return _nf4_values(q, raw[:, :4].contiguous().view(torch.float32))


def values_nf4(x: Tensor) -> Tensor:
    absmax, q = _nf4(x)
    return _nf4_values(q, absmax)


# ---------------------------------------------------------------------------------------------------------
# Float formats (blocks of one weight): round to nearest even, as gguf-py's F16 / BF16 writers
# ---------------------------------------------------------------------------------------------------------
def float_codec(dtype: torch.dtype):
    """(encode, decode, values) that store each weight as ``dtype``."""

    def encode(x: Tensor) -> Tensor:
        return x.to(dtype).view(torch.uint8)

    def decode(raw: Tensor) -> Tensor:
        return raw.contiguous().view(dtype).float()

    def values(x: Tensor) -> Tensor:
        return x.to(dtype).float()

    return encode, decode, values
