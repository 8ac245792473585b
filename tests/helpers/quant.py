"""Shared by the quantization tests: gguf-py's quantizer and dequantizer as tensors, a bit-exact comparison, and
the hard rows (odd shapes, zeros, constants, 1e30, denormals, ties) every format is tested on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
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
