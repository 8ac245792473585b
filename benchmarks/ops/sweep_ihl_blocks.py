"""Time the IHL Triton kernels over block sizes and warp counts on CUDA (informs kernels/ihl.py defaults).

python benchmarks/ops/sweep_ihl_blocks.py --out sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton.testing

from fastunlearn.kernels import ihl as kernels


def time_config(cfg: dict, logits, labels, grad, g) -> dict:
    _, stats, runner = kernels.ihl_forward(logits, labels, -100, 1.0, **cfg)
    fwd = triton.testing.do_bench(lambda: kernels.ihl_forward(logits, labels, -100, 1.0, **cfg), return_mode="median")
    bwd = triton.testing.do_bench(
        lambda: kernels.ihl_backward(g, logits, labels, stats, runner, -100, 1.0, grad, **cfg), return_mode="median"
    )
    return {"fwd_ms": fwd, "bwd_ms": bwd}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cols", type=int, default=128256)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    logits = torch.randn(args.rows, args.cols, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, args.cols, (args.rows,), device="cuda")
    grad = torch.empty_like(logits)
    g = torch.ones((), device="cuda").expand(args.rows)
    nbytes = logits.numel() * logits.element_size()
    dst = torch.empty_like(logits)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(logits), return_mode="median")
    copy_bw = 2 * nbytes / copy_ms / 1e6  # GB/s
    rows = []
    for block_v, warps in itertools.product([1024, 2048, 4096, 8192, 16384], [4, 8, 16]):
        cfg = {"block_v": block_v, "num_warps": warps}
        rows.append({**cfg, **time_config(cfg, logits, labels, grad, g)})
        rows[-1]["fwd_frac_of_copy"] = nbytes / rows[-1]["fwd_ms"] / 1e6 / copy_bw
        rows[-1]["bwd_frac_of_copy"] = 2 * nbytes / rows[-1]["bwd_ms"] / 1e6 / copy_bw
        print(json.dumps(rows[-1]), flush=True)
    result = {"shape": [args.rows, args.cols], "dtype": "bfloat16", "copy_ms": copy_ms, "copy_GBps": copy_bw,
              "device": torch.cuda.get_device_name(), "configs": rows}  # fmt: skip
    best_f = min(rows, key=lambda r: r["fwd_ms"])
    best_b = min(rows, key=lambda r: r["bwd_ms"])
    print("best forward", best_f, "\nbest backward", best_b)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
