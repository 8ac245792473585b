"""Plain-PyTorch per-example Fisher accumulation, in example chunks (same signature as the Triton kernel).

For a chunk of b examples: P = bmm(G^T, X) (b, out, in) in F's dtype (float32, or float64 for a float64
model; one buffer reused by every chunk), F += sum_b P^2. The chunk is sized so that P and the copies of the
chunk's X and G in F's dtype stay within ``chunk_bytes``; at least one example runs per chunk, so the floor is
one (out, in) matrix plus the (out, in) sum.
"""

from __future__ import annotations

import torch


def chunk_examples(n_tokens: int, n_out: int, n_in: int, chunk_bytes: int) -> int:
    """Examples per chunk: float32 P (out, in) plus float32 X (T, in) and G (T, out) per example."""
    return max(1, chunk_bytes // (4 * (n_out * n_in + n_tokens * (n_in + n_out))))


def fisher_accumulate(fisher: torch.Tensor, x: torch.Tensor, g: torch.Tensor, *, chunk_bytes: int) -> torch.Tensor:
    """fisher (out, in) float32 or float64, any strides += sum_n (g_n^T x_n)^2 computed in fisher's dtype;
    x (B, T, in), g (B, T, out)."""
    n_examples, n_tokens, n_in = x.shape
    n_out = g.shape[-1]
    step = max(1, min(n_examples, chunk_examples(n_tokens, n_out, n_in, chunk_bytes // (fisher.element_size() // 4))))
    products = torch.empty(step, n_out, n_in, dtype=fisher.dtype, device=x.device)  # reused by every chunk
    for start in range(0, n_examples, step):
        gc = g[start : start + step].to(fisher.dtype)  # (b, T, out)
        xc = x[start : start + step].to(fisher.dtype)  # (b, T, in)
        per_example = torch.bmm(gc.transpose(1, 2), xc, out=products[: len(gc)])  # (b, out, in)
        fisher.add_(per_example.square_().sum(dim=0))
    return fisher
