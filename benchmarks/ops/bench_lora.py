"""LoRALinear forward+backward vs the frozen nn.Linear it wraps (pytest-benchmark).

    pytest benchmarks/ops/bench_lora.py --benchmark-enable --benchmark-json=bench_lora.json

8 x 200 tokens through a GPT-2 sized 768 -> 768 and 768 -> 3072 layer. Both providers compute the
input gradient (as inside a network); LoRA also computes the adapters' gradients. test_overhead times
the providers interleaved (best of N each, robust to a loaded machine) and prints (with
FASTUNLEARN_BENCH_SUMMARY=path.json also keeps) the time ratio LoRA / frozen Linear.
"""

from __future__ import annotations

import time

import pytest
import torch
from bench_common import device_name, write_summary
from torch import nn

from fastunlearn.lora.layer import LoRALinear

CUDA = torch.cuda.is_available()
SHAPES = [(768, 768), (3072, 768)]  # (out, in)
RANKS = [8, 32]
DTYPES = [torch.bfloat16, torch.float32] if CUDA else [torch.float32]
TOKENS = (8, 200)


def setup_layer(provider: str, shape: tuple[int, int], rank: int, dtype: torch.dtype, device: torch.device):
    """The callable to time: forward, then the gradients of a fixed upstream gradient."""
    n_out, n_in = shape
    gen = torch.Generator(device=device).manual_seed(0)
    base = nn.Linear(n_in, n_out, device=device, dtype=dtype).requires_grad_(False)
    layer = base if provider == "linear" else LoRALinear(base, rank, 2.0 * rank)
    if provider == "lora":
        nn.init.normal_(layer.lora_b, std=0.02)
    x = torch.randn(*TOKENS, n_in, device=device, dtype=dtype, generator=gen).requires_grad_(True)
    grad_out = torch.randn(*TOKENS, n_out, device=device, dtype=dtype, generator=gen)
    wrt = [x] if provider == "linear" else [x, layer.lora_a, layer.lora_b]

    def run():
        grads = torch.autograd.grad(layer(x), wrt, grad_out)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return grads

    return run


def _interleaved_best_ms(runs: dict, rounds: int) -> dict[str, float]:
    """Best time of each callable over rounds run in turn, so machine load drifts hit all of them alike."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], 1e3 * (time.perf_counter() - start))
    return best


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("rank", RANKS, ids=lambda r: f"r{r}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("provider", ["linear", "lora"])
def test_layer(benchmark, device, provider, shape, rank, dtype):
    if provider == "linear" and rank != RANKS[0]:
        pytest.skip("the frozen Linear has no rank: timed once per shape")
    run = setup_layer(provider, shape, rank, dtype, device)
    run()  # first-touch outside the timing
    benchmark.group = f"lora fwd+bwd {shape[0]}x{shape[1]} {str(dtype).removeprefix('torch.')}"
    benchmark.pedantic(run, rounds=20 if CUDA else 7, iterations=1, warmup_rounds=2)


def test_overhead(device):
    """LoRA / frozen Linear time ratio from interleaved runs (best of N each; synchronized on CUDA)."""
    summary = {"device": device_name(device)}
    for shape in SHAPES:
        for dtype in DTYPES:
            runs = {"linear": setup_layer("linear", shape, RANKS[0], dtype, device)}
            runs.update({f"r{rank}": setup_layer("lora", shape, rank, dtype, device) for rank in RANKS})
            for run in runs.values():
                run()
            best = _interleaved_best_ms(runs, rounds=30 if CUDA else 10)
            for rank in RANKS:
                key = f"{shape[0]}x{shape[1]} r{rank} {str(dtype).removeprefix('torch.')}"
                lora = best[f"r{rank}"]
                summary[key] = {"linear_ms": best["linear"], "lora_ms": lora, "ratio": lora / best["linear"]}
    write_summary("lora", summary)
