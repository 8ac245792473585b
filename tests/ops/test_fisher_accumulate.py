"""The Fisher accumulation op (sum over examples of the squared per-example weight gradient G^T X): the torch
path's chunks, and the Triton kernel against the torch path on tiles with ragged edges and strided inputs."""

from __future__ import annotations

import pytest
import torch

from fastunlearn.ops.reference import fisher as _fisher_torch
from tests.helpers.backends import interpreter
from tests.helpers.reference import assert_close_verbose


def test_torch_path_chunks_give_the_same_result():
    x = torch.randn(7, 9, 20, dtype=torch.float64)
    g = torch.randn(7, 9, 12, dtype=torch.float64)
    expected = (torch.einsum("bto,bti->boi", g, x) ** 2).sum(0)
    one_per_chunk = 4 * (12 * 20 + 9 * 32)
    assert _fisher_torch.chunk_examples(9, 12, 20, one_per_chunk) == 1
    for chunk_bytes in (one_per_chunk, 3 * one_per_chunk, 2**30):
        got = _fisher_torch.fisher_accumulate(torch.zeros(12, 20), x, g, chunk_bytes=chunk_bytes)
        assert_close_verbose(got, expected, 0.0, 1e-6, f"chunk {chunk_bytes}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("blocks", [None, 16], ids=["whole", "tiled"])
@interpreter
def test_triton_kernel_matches_torch_path(dtype, blocks):
    """Several out/in tiles with ragged edges, T not a multiple of the chunk, strided inputs and a
    transposed (Conv1D) output view that already holds values."""
    kernels = pytest.importorskip("fastunlearn.kernels.fisher")
    x = torch.randn(3, 21, 40).to(dtype)[:, :, ::2]  # (3, 21, 20), strided features
    g = torch.randn(21, 3, 36).to(dtype).transpose(0, 1)  # (3, 21, 36), examples not outermost
    start = torch.rand(20, 36)
    expected = _fisher_torch.fisher_accumulate(start.clone().t(), x, g, chunk_bytes=2**20)
    sizes = {} if blocks is None else {"block_o": blocks, "block_i": blocks, "block_t": blocks}
    got = kernels.fisher_accumulate(start.clone().t(), x, g, **sizes)
    # inputs are exact in fp32 either way: only the order of float32 sums differs
    assert_close_verbose(got, expected, 1e-5 * expected.abs().max().item(), 1e-5, f"triton {dtype}")
