"""Per-example Fisher of one GPT-Neo-125M layer: fastunlearn vs a per-example backward loop vs vmap(grad).

    pytest benchmarks/ops/bench_fisher.py --benchmark-enable [--benchmark-json=bench.json]
    python benchmarks/ops/bench_fisher.py --provider loop      # peak extra host memory of one provider (JSON)

The layer is the MLP's c_fc (768 -> 3072) and the batch 8 sequences x 200 tokens: X (8, 200, 768) ~ N(0, 1)
(a layer-normed hidden state) and G (8, 200, 3072) ~ N(0, 1e-3^2) (output gradients of a summed NLL). Each
provider returns F = sum_n (G_n^T X_n)^2 (3072, 768) float32:

- ``fastunlearn-torch``: the chunked bmm path (the fused path on CPU) at empirical_fisher's default budget
  (256 MiB: the 8 examples in one chunk); ``fastunlearn-torch-1``: the same with one example per chunk;
- ``fastunlearn-triton``: the fused kernel (CUDA only);
- ``loop``: one forward and backward of the layer per sequence, the weight's gradient squared;
- ``vmap``: ``torch.func.vmap(torch.func.grad(...))`` per-example gradients (B, out, in), squared, summed.

Targets (CUDA, bf16, ``test_targets_cuda``): the kernel >= 10x the loop and >= 3x vmap(grad), extra memory
O(out * in). On CPU ``test_cpu_summary`` measures each provider's peak extra memory in a fresh process,
checks that the torch path with one example per chunk stays O(out * in) and prints the numbers.
Set FASTUNLEARN_BENCH_SUMMARY=path.json to keep the summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch
from bench_common import device_name, write_summary

from fastunlearn.lora.fisher import accumulate_per_example
from fastunlearn.ops import dispatch

CUDA = torch.cuda.is_available()
N_EXAMPLES, N_TOKENS, N_IN, N_OUT = 8, 200, 768, 3072
CHUNK_BYTES = 256 * 2**20  # empirical_fisher's default chunk_mb
ONE_EXAMPLE_BYTES = 4 * (N_OUT * N_IN + N_TOKENS * (N_IN + N_OUT))  # the torch path's chunk of one example
PROVIDERS = ["fastunlearn-torch", "fastunlearn-torch-1", "fastunlearn-triton", "loop", "vmap"]
CPU_PROVIDERS = [p for p in PROVIDERS if p != "fastunlearn-triton"]
DTYPES = [torch.bfloat16, torch.float32] if CUDA else [torch.float32]


def make_inputs(dtype: torch.dtype, device: torch.device, shape=(N_EXAMPLES, N_TOKENS, N_IN, N_OUT)):
    n, t, n_in, n_out = shape
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, t, n_in, device=device, generator=gen).to(dtype)
    g = torch.randn(n, t, n_out, device=device, generator=gen).mul_(1e-3).to(dtype)
    w = torch.randn(n_out, n_in, device=device, generator=gen).mul_(0.02).to(dtype)
    return x, g, w


def fisher_fn(provider: str):
    """provider -> callable(x (B, T, in), g (B, T, out), w (out, in)) -> F (out, in) float32."""

    def fused(impl, chunk_bytes=CHUNK_BYTES):
        def run(x, g, w):
            fisher = torch.zeros(w.shape, device=w.device)
            with dispatch._force_impl(impl):
                accumulate_per_example(fisher, x, g, chunk_bytes)
            return fisher

        return run

    def loop(x, g, w):
        fisher = torch.zeros(w.shape, device=w.device)
        w = w.detach().requires_grad_(True)
        for x_n, g_n in zip(x, g):
            (grad,) = torch.autograd.grad(x_n @ w.T, w, grad_outputs=g_n)
            fisher.add_(grad.float().square_())
        return fisher

    def vmap(x, g, w):
        def weighted_output(w_, x_n, g_n):
            return torch.vdot((x_n @ w_.T).flatten(), g_n.flatten())  # its gradient in w_ is g_n^T x_n

        per_example = torch.func.vmap(torch.func.grad(weighted_output), in_dims=(None, 0, 0))(w, x, g)
        return per_example.float().square_().sum(dim=0)

    return {
        "fastunlearn-torch": fused("torch"),
        "fastunlearn-torch-1": fused("torch", ONE_EXAMPLE_BYTES),
        "fastunlearn-triton": fused("triton"),
        "loop": loop,
        "vmap": vmap,
    }[provider]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_fisher(benchmark, results, device, provider, dtype):
    if provider == "fastunlearn-triton" and device.type != "cuda":
        pytest.skip("the Triton kernel is timed on CUDA only (the interpreter is a correctness tool)")
    x, g, w = make_inputs(dtype, device)
    fn = fisher_fn(provider)

    def run():
        out = fn(x, g, w)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    run()  # compilation / first touch outside the timing
    peak_extra = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        peak_extra = torch.cuda.max_memory_allocated() - base - N_OUT * N_IN * 4  # beyond the result
    benchmark.group = f"per-example fisher {N_EXAMPLES}x{N_TOKENS} {N_IN}->{N_OUT} {str(dtype).removeprefix('torch.')}"
    benchmark.pedantic(run, rounds=10 if device.type == "cuda" else 5, iterations=1, warmup_rounds=1)
    info = {"device": device_name(device), "median_s": benchmark.stats.stats.median, "peak_extra_bytes": peak_extra}
    benchmark.extra_info.update(info)
    results[("fisher", provider, dtype)] = info


def _speedups(results: dict, fused: str, dtype: torch.dtype) -> dict:
    times = {p: results.get(("fisher", p, dtype), {}).get("median_s") for p in (fused, "loop", "vmap")}
    if None in times.values():
        pytest.skip("run the timing tests first (they fill the results)")
    return {
        "speedup_vs_loop": times["loop"] / times[fused],
        "speedup_vs_vmap": times["vmap"] / times[fused],
    }


@pytest.mark.skipif(not CUDA, reason="GPU targets need CUDA")
def test_targets_cuda(results, device):
    x, g, w = make_inputs(torch.bfloat16, device)
    expected = fisher_fn("loop")(x.float(), g.float(), w.float())  # the same bf16 values, fp32 products
    got = fisher_fn("fastunlearn-triton")(x, g, w)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
    extra = results.get(("fisher", "fastunlearn-triton", torch.bfloat16), {}).get("peak_extra_bytes")
    times = {p: results.get(("fisher", p, torch.bfloat16), {}).get("median_s") for p in PROVIDERS}
    summary = {"device": device_name(device), "median_s": times}
    summary.update(_speedups(results, "fastunlearn-triton", torch.bfloat16))
    summary["triton_peak_extra_bytes"] = extra
    write_summary("fisher", summary)
    assert summary["speedup_vs_loop"] >= 10.0, summary
    assert summary["speedup_vs_vmap"] >= 3.0, summary
    assert extra is None or extra <= 2**20, summary  # nothing beyond F but launch metadata


@pytest.mark.skipif(CUDA, reason="the CPU summary is for machines without CUDA")
def test_cpu_summary(results, device):
    x, g, w = make_inputs(torch.float32, device)
    torch.testing.assert_close(fisher_fn("fastunlearn-torch")(x, g, w), fisher_fn("loop")(x, g, w))
    memory = {}
    for provider in CPU_PROVIDERS:
        out = subprocess.run(
            [sys.executable, __file__, "--provider", provider], capture_output=True, text=True, check=True, timeout=600
        )
        memory[provider] = json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"]
    summary = {
        "device": device_name(device),
        "shape": {"examples": N_EXAMPLES, "tokens": N_TOKENS, "in": N_IN, "out": N_OUT, "dtype": "float32"},
        "peak_extra_bytes": memory,
        "peak_extra_in_out_x_in_float32": {p: m / (N_OUT * N_IN * 4) for p, m in memory.items()},
    }
    if all(("fisher", p, torch.float32) in results for p in CPU_PROVIDERS):
        summary["median_s"] = {p: results[("fisher", p, torch.float32)]["median_s"] for p in CPU_PROVIDERS}
        for fused in ("fastunlearn-torch", "fastunlearn-torch-1"):
            summary[fused] = _speedups(results, fused, torch.float32)
    write_summary("fisher", summary)
    # one example per chunk: O(out * in) (its product, the (out, in) sum and allocator slack, as RSS), where
    # the whole batch at once (default budget here, vmap) holds B = 8 such products
    assert memory["fastunlearn-torch-1"] <= 4 * N_OUT * N_IN * 4, summary


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def main() -> None:
    """Peak extra host memory of one provider: peak RSS - RSS with the inputs - F, in steady state (after one
    full-size warm-up run, the peak is reset through /proc/self/clear_refs)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", choices=CPU_PROVIDERS, required=True)
    args = parser.parse_args()
    fn = fisher_fn(args.provider)
    x, g, w = make_inputs(torch.float32, torch.device("cpu"))
    fn(x, g, w)  # libraries, thread pools and allocator caches settle; the result is dropped
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status_bytes("VmRSS:")
    fisher = fn(x, g, w)
    extra = _status_bytes("VmHWM:") - base - fisher.numel() * fisher.element_size()
    print(json.dumps({"provider": args.provider, "extra_bytes": extra}))


if __name__ == "__main__":
    main()
