"""Peak extra host memory of one IHL forward+backward on CPU, measured in a fresh process.

    python benchmarks/ops/peak_memory_cpu.py --rows 8192 --cols 50257 --impl torch

Prints one JSON line. "extra" = peak RSS - (RSS with the inputs allocated) - the gradient buffer: what
the loss itself holds beyond its output. ru_maxrss is a process high-water mark, hence the fresh process.
"""

from __future__ import annotations

import argparse
import json
import resource

import torch

import fastunlearn
from fastunlearn.ops import dispatch
from fastunlearn.ops.reference import ihl as _ihl_torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cols", type=int, default=50257)
    parser.add_argument("--impl", choices=dispatch.IMPLS, default="torch")
    args = parser.parse_args()

    torch.manual_seed(0)
    with dispatch._force_impl(args.impl):  # warm-up: libraries and thread pools load before the base is read
        warm = torch.randn(8, args.cols, requires_grad=True)
        torch.autograd.grad(fastunlearn.ihl_loss(warm, torch.zeros(8, dtype=torch.long)), warm)
    logits = torch.randn(args.rows, args.cols).requires_grad_(True)  # pages touched: counted in the base
    labels = torch.randint(0, args.cols, (args.rows,))
    base = rss_bytes()
    with dispatch._force_impl(args.impl):
        loss = fastunlearn.ihl_loss(logits, labels)
        (grad,) = torch.autograd.grad(loss, logits)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grad_bytes = grad.numel() * grad.element_size()
    chunk = _ihl_torch.chunk_rows(args.cols)
    print(json.dumps({
        "impl": args.impl, "shape": [args.rows, args.cols], "extra_bytes": peak - base - grad_bytes,
        "grad_bytes": grad_bytes, "chunk_rows": chunk, "chunk_budget_bytes": chunk * args.cols * 4 * 2,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
