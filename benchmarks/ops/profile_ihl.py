"""Where the time of one fused IHL forward+backward goes on CUDA: kernel table and wall vs GPU time.

    python benchmarks/ops/profile_ihl.py [--rows 8192 --cols 128256]

Prints the forward config the autotuner chose, the CUDA kernels of 5 iterations (torch.profiler) and
the host wall time per iteration, to separate kernel time from framework overhead.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import fastunlearn
from fastunlearn.kernels import ihl as kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cols", type=int, default=128256)
    args = parser.parse_args()
    logits = torch.randn(args.rows, args.cols, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, args.cols, (args.rows,), device="cuda")

    def step():
        return torch.autograd.grad(fastunlearn.ihl_loss(logits, labels), logits)[0]

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    print("autotuned forward config:", kernels._ihl_forward_autotuned.best_config)
    start = time.perf_counter()
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    print(f"wall per fwd+bwd: {(time.perf_counter() - start) / 20 * 1e3:.3f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
