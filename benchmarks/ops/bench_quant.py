"""Round trip dequantize(quantize(W)) of a Llama-2-7B layer stack: fastunlearn.ops.quant vs gguf-py's NumPy path.

    pytest benchmarks/ops/bench_quant.py --benchmark-enable --benchmark-json=bench.json
    python benchmarks/ops/bench_quant.py --peak fastunlearn q4_1 11008 4096    # one peak-memory measurement

The stack: 32 decoder layers of Llama-2-7B (hidden 4096, intermediate 11008), each q, k, v, o (4096 x 4096),
gate, up (11008 x 4096) and down (4096 x 11008): 202.4 M weights a layer, 6.48 G in all (embeddings left out),
float32 on the CPU, bfloat16 on CUDA. What is timed is a SAMPLE, and the stack's time is EXTRAPOLATED by weight
count (labelled ``stack_s_extrapolated`` everywhere): on CUDA one whole layer; on the CPU one 11008 x 4096 matrix
for the 32-weight formats and one 4096 x 4096 matrix for the K-quants and NF4, whose search is ~10x slower.

Providers: ``fastunlearn`` (``quant.roundtrip``, default chunk) for every format; ``gguf-numpy``
(``gguf.quants.dequantize(gguf.quants.quantize(w))`` on a float32 NumPy copy, what transformers' and llama.cpp's
Python tools run) for the formats gguf-py quantizes (not Q4_K, Q6_K, NF4). The two give the same values bit for
bit (tests/ops/test_quant.py).

Peak memory (``test_peak_memory``): each (provider, format) runs in a fresh process on one 11008 x 4096 float32
matrix (180 MB); "extra" = peak RSS (CPU: VmHWM, reset once the input is in place) or peak allocated memory (CUDA) -
what the input holds - the output's size: the memory the round trip itself needs. fastunlearn's is bounded by its
chunk, whatever the matrix (``quant.extra_bytes_bound(fmt, quant.default_chunk(device))``), gguf-py's grows with the
matrix.

test_targets checks that bound, and on CUDA fastunlearn >= 5x faster than gguf-numpy; set
FASTUNLEARN_BENCH_SUMMARY=path.json to keep the numbers. CPU timings depend on the thread count and on what else
runs: compare only providers of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bench_common import device_name, write_summary

from fastunlearn.ops import quant

gguf = pytest.importorskip("gguf")

CUDA = torch.cuda.is_available()
LAYER = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
LAYERS = 32
LAYER_WEIGHTS = sum(r * c for r, c in LAYER)
STACK_WEIGHTS = LAYERS * LAYER_WEIGHTS
GGUF_FORMATS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
SLOW_FORMATS = ("q4_k", "q6_k", "nf4")
PEAK_SHAPE = (11008, 4096)


def sample_shapes(fmt: str) -> list[tuple[int, int]]:
    """What is timed: one layer on CUDA; one matrix on the CPU (a smaller one for the slow formats)."""
    if CUDA:
        return LAYER
    return [(4096, 4096)] if fmt in SLOW_FORMATS else [(11008, 4096)]


def make_weights(shapes, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator(device).manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return [(torch.randn(shape, generator=gen, device=device) * 0.02).to(dtype) for shape in shapes]


def run_provider(provider: str, fmt: str, weights: list[torch.Tensor]) -> list:
    if provider == "fastunlearn":
        return [quant.roundtrip(w, fmt) for w in weights]
    qtype = getattr(gguf.GGMLQuantizationType, fmt.upper())
    out = []
    for w in weights:
        array = w.float().cpu().numpy()
        out.append(gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype))
    return out


CASES = [
    (p, f) for f in quant.FORMATS for p in ("fastunlearn", "gguf-numpy") if p == "fastunlearn" or f in GGUF_FORMATS
]


@pytest.mark.parametrize(("provider", "fmt"), CASES, ids=[f"{f}-{p}" for p, f in CASES])
def test_roundtrip_stack(benchmark, results, device, provider, fmt):
    weights = make_weights(sample_shapes(fmt), device)
    sampled = sum(w.numel() for w in weights)

    def run():
        out = run_provider(provider, fmt, weights)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = f"round trip {fmt}"
    benchmark.pedantic(run, rounds=3 if CUDA else 1, iterations=1, warmup_rounds=1 if CUDA else 0)
    seconds = benchmark.stats.stats.median
    info = {
        "device": device_name(device),
        "sampled_weights": sampled,
        "sample_s": seconds,
        "weights_per_s": sampled / seconds,
        "stack_s_extrapolated": seconds * STACK_WEIGHTS / sampled,
    }
    benchmark.extra_info.update(info)
    results[("time", provider, fmt)] = info


def vm_hwm() -> int:
    """This process's peak resident set size since the last reset, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def measure_peak(provider: str, fmt: str, rows: int, cols: int) -> dict:
    """In this (fresh) process: the extra memory of one round trip of a (rows, cols) float32 matrix."""
    cuda = CUDA and provider == "fastunlearn"
    device = torch.device("cuda" if cuda else "cpu")
    run_provider(provider, fmt, [torch.randn(8, 256, device=device)])  # libraries and pools warm
    weight = torch.empty(rows, cols, device=device).normal_(0, 0.02)  # one allocation: no earlier peak
    out_bytes = weight.numel() * 4
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_provider(provider, fmt, [weight])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        with open("/proc/self/statm") as f:
            base = int(f.read().split()[1]) * resource.getpagesize()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := the current RSS (ru_maxrss would keep a forking parent's high-water mark)
        run_provider(provider, fmt, [weight])
        peak = vm_hwm()
    extra = max(0, peak - base - out_bytes)
    return {"provider": provider, "fmt": fmt, "shape": [rows, cols], "device": str(device),
            "extra_bytes": extra, "extra_bytes_per_weight": extra / weight.numel(),
            "bound_bytes": quant.extra_bytes_bound(fmt, quant.default_chunk(device))}  # fmt: skip


PEAK_CASES = [(p, f) for p, f in CASES if f in ("q8_0", "q4_1", "q4_k", "q6_k", "nf4")]


@pytest.mark.parametrize(("provider", "fmt"), PEAK_CASES, ids=[f"{f}-{p}" for p, f in PEAK_CASES])
def test_peak_memory(results, provider, fmt):
    command = [sys.executable, __file__, "--peak", provider, fmt, *map(str, PEAK_SHAPE)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr[-2000:]
    results[("peak", provider, fmt)] = json.loads(done.stdout.strip().splitlines()[-1])


def test_targets(results, device):
    timed = {(p, f): v for (kind, p, f), v in results.items() if kind == "time"}
    peaks = {(p, f): v for (kind, p, f), v in results.items() if kind == "peak"}
    if not timed and not peaks:
        pytest.skip("needs the runs of test_roundtrip_stack / test_peak_memory")
    speedups = {
        f: timed[("gguf-numpy", f)]["sample_s"] / timed[("fastunlearn", f)]["sample_s"]
        for f in GGUF_FORMATS
        if ("gguf-numpy", f) in timed and ("fastunlearn", f) in timed
    }
    summary = {
        "device": device_name(device),
        "stack_weights": STACK_WEIGHTS,
        "stack_s_extrapolated": {f"{f}-{p}": v["stack_s_extrapolated"] for (p, f), v in timed.items()},
        "speedup_vs_gguf_numpy": speedups,
        "extra_bytes": {f"{f}-{p}": v["extra_bytes"] for (p, f), v in peaks.items()},
        "fastunlearn_extra_bound_bytes": {f: v["bound_bytes"] for (p, f), v in peaks.items() if p == "fastunlearn"},
    }
    write_summary("quant-roundtrip-llama-2-7b", summary)
    for (provider, fmt), peak in peaks.items():
        if provider == "fastunlearn":
            assert peak["extra_bytes"] <= peak["bound_bytes"], (fmt, peak)
    if device.type == "cuda":
        assert all(s >= 5.0 for s in speedups.values()), speedups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak", nargs=4, metavar=("PROVIDER", "FMT", "ROWS", "COLS"), required=True)
    args = parser.parse_args()
    provider, fmt, rows, cols = args.peak
    torch.manual_seed(0)
    np.random.seed(0)
    print(json.dumps(measure_peak(provider, fmt, int(rows), int(cols))))


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "0")
    main()
