"""IHL forward+backward: fastunlearn vs the eager formula vs torch.compile of it (pytest-benchmark).

    pytest benchmarks/ops/bench_ihl.py --benchmark-enable --benchmark-json=bench.json

On CUDA: the issue's shapes in bf16 and fp32, peak memory, and (test_targets) the targets at
(8192, 128256) bf16: >= 80% of the device-copy bandwidth for the bytes the kernels must move, >= 5x the
eager formula, <= 16 extra bytes per row beyond the gradient. On CPU: small shapes so the suite runs
anywhere, and the torch path's peak extra memory within its chunk budget at (8192, 50257).
Set FASTUNLEARN_BENCH_SUMMARY=path.json to keep the target numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bench_common import device_name, write_summary
from providers import setup_ihl

CUDA = torch.cuda.is_available()
SHAPES = [(4096, 50257), (8192, 128256), (4096, 151936)] if CUDA else [(256, 50257), (1024, 32000)]
PROVIDERS = ["fastunlearn", "eager", "compiled"] if CUDA else ["fastunlearn", "fastunlearn-torch", "eager", "compiled"]
DTYPES = [torch.bfloat16, torch.float32]
TARGET_SHAPE, TARGET_DTYPE = (8192, 128256), torch.bfloat16


@pytest.mark.parametrize("mode", ["full", "forward"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_ihl(benchmark, results, device, provider, shape, dtype, mode):
    if provider == "compiled" and mode == "forward":
        pytest.skip("torch.compile is timed on forward+backward only (each graph costs a compilation)")
    run, logits = setup_ihl(provider, mode, shape, dtype, device)
    run()  # compile / autotune / first-touch outside the timing
    peak_extra = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        grad_bytes = logits.numel() * logits.element_size() if mode == "full" else 0
        peak_extra = torch.cuda.max_memory_allocated() - base - grad_bytes
    benchmark.group = f"ihl {mode} {shape[0]}x{shape[1]} {str(dtype).removeprefix('torch.')}"
    benchmark.pedantic(run, rounds=10 if device.type == "cuda" else 3, iterations=1, warmup_rounds=1)
    info = {
        "device": device_name(device),
        "median_s": benchmark.stats.stats.median,
        "peak_extra_bytes": peak_extra,
        "extra_bytes_per_row": None if peak_extra is None else peak_extra / shape[0],
    }
    benchmark.extra_info.update(info)
    results[(provider, mode, shape, dtype)] = info


def _steady_ms(fn, calls: int = 20) -> float:
    """Milliseconds per call of ``fn`` queued back to back (as in training), timed with CUDA events.

    triton.testing.do_bench times each call alone after an L2 flush, which adds the host's launch latency
    (Python, autograd) to every call: 2.38 ms instead of 1.84 ms for the fused loss at the target shape.
    """
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


@pytest.mark.skipif(not CUDA, reason="GPU targets need CUDA")
def test_targets_cuda(results, device):
    """Bandwidth fraction and speed-up in steady state (CUDA events); extra memory from the timing test."""
    n_rows, n_cols = TARGET_SHAPE
    fused, logits = setup_ihl("fastunlearn", "full", TARGET_SHAPE, TARGET_DTYPE, device, sync=False)
    eager, _ = setup_ihl("eager", "full", TARGET_SHAPE, TARGET_DTYPE, device, sync=False)
    src = torch.empty_like(logits, requires_grad=False)
    dst = torch.empty_like(src)
    t_fused, t_eager = _steady_ms(fused), _steady_ms(eager)
    t_copy = _steady_ms(lambda: dst.copy_(src))
    nbytes = logits.numel() * logits.element_size()
    copy_bw = 2 * nbytes / (t_copy * 1e-3)  # read + write
    kernel_bw = 3 * nbytes / (t_fused * 1e-3)  # forward read, backward read + write
    extra = results.get(("fastunlearn", "full", TARGET_SHAPE, TARGET_DTYPE), {}).get("extra_bytes_per_row")
    summary = {
        "device": device_name(device), "shape": [n_rows, n_cols], "dtype": "bfloat16",
        "fused_ms": t_fused, "eager_ms": t_eager, "copy_ms": t_copy,
        "copy_GBps": copy_bw / 1e9, "fused_GBps": kernel_bw / 1e9,
        "bandwidth_fraction": kernel_bw / copy_bw, "speedup_vs_eager": t_eager / t_fused,
        "extra_bytes_per_row": extra,
    }  # fmt: skip
    write_summary("ihl", summary)
    assert summary["bandwidth_fraction"] >= 0.80, summary
    assert summary["speedup_vs_eager"] >= 5.0, summary
    if extra is not None:  # absent when the timing test was deselected
        # 16 bytes per row (loss, max, log-sum-exp, runner) plus O(1) device scalars (at most 4 KiB)
        assert extra <= 16 + 4096 / n_rows, summary


@pytest.mark.skipif(CUDA, reason="the CPU memory target is for machines without CUDA")
def test_targets_cpu_torch_path_memory():
    script = Path(__file__).with_name("peak_memory_cpu.py")
    out = subprocess.run(
        [sys.executable, str(script), "--rows", "8192", "--cols", "50257", "--impl", "torch"],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    write_summary("ihl-cpu-memory", measured)
    assert measured["extra_bytes"] <= measured["chunk_budget_bytes"], measured
