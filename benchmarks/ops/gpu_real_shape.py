"""The real-model cost at GPU scale, with RANDOM weights: timings and memory only, no quality numbers.

So that it runs on a GPU machine without network access or the model's weights (93 MB), this builds a
randomly initialized LlamaForCausalLM with SmolLM2-135M's exact config (30 layers, hidden 576, intermediate
1536, 9 heads / 3 KV heads, vocabulary 49152, tied embeddings, rope theta 100000) in bfloat16 and times, on
random token ids:

- ``fila``: FILA's setup (``fila.fila_init``, preset targets, rank 16): the forget and retain per-example
  Fishers plus the batched weighted low-rank SVD; ``fisher_only_s`` times the two Fishers alone (one extra
  pass), so low-rank + injection ~ ``fila_init_s - fisher_only_s``;
- ``steps``: one FILA + IHL step on the injected model (the engine's ``forget_term("ihl")`` and
  ``retain_term()``, each summed over its targets, backward after each) for ``logits`` (the (B, T, V) logits)
  and ``fused`` (``patch_fused_ihl``: IHL and the retain log-probabilities from the last hidden states):
  median ms of the forget fwd+bwd and of the whole step, tokens/s, peak CUDA memory of a step beyond what was
  allocated before it, and the first forget loss (the two paths should agree to bf16 rounding);
- ``el10``: ``metrics.extraction_likelihood`` (EL_10) on the forget batch.

    python benchmarks/ops/gpu_real_shape.py --out real_shape.json        # CUDA, full size (about 1 min on an H200)
    python benchmarks/ops/gpu_real_shape.py --device cpu --tiny          # a smoke run of the same code on CPU

Default batch: 32 x 200 forget tokens and 32 x 200 retain tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastunlearn.evals.metrics import extraction_likelihood
from fastunlearn.fused_lm import patch_fused_ihl, unpatch_fused_ihl
from fastunlearn.lora import fila
from fastunlearn.lora.fisher import empirical_fisher
from fastunlearn.lora.targets import find_targets
from fastunlearn.losses import forget_term, retain_term
from fastunlearn.utils.atomic import atomic_write

SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=True, hidden_act="silu", bos_token_id=1, eos_token_id=2,
)  # fmt: skip
TINY = dict(SMOLLM2_135M, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def make_batch(vocab: int, batch: int, seq: int, seed: int, device: torch.device) -> dict:
    ids = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def time_steps(model, forget, retain, path: str, repeats: int, device: torch.device) -> dict:
    """Forget fwd+bwd and whole-step timings of one path ("logits" or "fused") on the injected model."""
    fused = path == "fused"
    (patch_fused_ihl if fused else unpatch_fused_ihl)(model)
    forget_fn, retain_fn = forget_term("ihl", fused=fused), retain_term(fused=fused)

    def forget_only():
        loss = forget_fn(model, forget)
        loss.backward()
        return loss

    def step():
        model.zero_grad(set_to_none=True)
        loss = forget_only()
        retain_fn(model, retain).backward()
        return loss

    model.train()
    first_loss = float(step().detach()) / forget["input_ids"][:, 1:].numel()  # warm-up (autotune, first touch)
    step()
    peak = None
    if device.type == "cuda":
        model.zero_grad(set_to_none=True)
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync(device)
        peak = torch.cuda.max_memory_allocated() - base
    forget_s = statistics.median(seconds(forget_only, device) for _ in range(repeats))
    step_s = statistics.median(seconds(step, device) for _ in range(repeats))
    n_tokens = forget["input_ids"].numel() + retain["input_ids"].numel()
    unpatch_fused_ihl(model)
    model.zero_grad(set_to_none=True)
    return {
        "forget_fwd_bwd_ms": 1e3 * forget_s, "step_ms": 1e3 * step_s, "step_tokens_per_s": n_tokens / step_s,
        "forget_tokens_per_s": forget["input_ids"].numel() / forget_s,
        "peak_step_bytes": peak, "first_forget_ihl_per_token": first_loss,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model (a CPU smoke run)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per path (median)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    for name in ("batch", "seq", "repeats"):
        if getattr(args, name) < (11 if name == "seq" else 1):  # EL_10 needs n + 1 tokens
            parser.error(f"--{name} is too small: {getattr(args, name)} (--seq >= 11, the others >= 1)")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LlamaConfig(**(TINY if args.tiny else SMOLLM2_135M))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    vocab = config.vocab_size
    forget = make_batch(vocab, args.batch, args.seq, 1, device)
    retain = make_batch(vocab, args.batch, args.seq, 2, device)
    report = {
        "note": "RANDOM weights with SmolLM2-135M's config: timings and memory only" + (" (tiny)" if args.tiny else ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
        "config": {k: getattr(config, k, None) for k in SMOLLM2_135M},
        "rope_parameters": getattr(config, "rope_parameters", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "forget_tokens": [args.batch, args.seq], "retain_tokens": [args.batch, args.seq],
    }  # fmt: skip
    names = list(find_targets(model, "preset"))
    fisher_s = seconds(lambda: [empirical_fisher(model, d, names, progress=False) for d in (forget, retain)], device)
    result = {}
    fila_s = seconds(lambda: result.setdefault("fila", fila.fila_init(model, forget, retain, rank=16)), device)
    report["fila"] = {"targets": len(names), "fisher_only_s": fisher_s, "fila_init_s": fila_s}
    paths = ("logits", "fused")
    report["steps"] = {path: time_steps(model, forget, retain, path, args.repeats, device) for path in paths}
    steps = report["steps"]
    report["fused_vs_logits"] = {
        "step_speedup": steps["logits"]["step_ms"] / steps["fused"]["step_ms"],
        "peak_memory_ratio": None if steps["fused"]["peak_step_bytes"] is None
        else steps["logits"]["peak_step_bytes"] / steps["fused"]["peak_step_bytes"],
    }  # fmt: skip
    model.eval()
    with torch.no_grad():
        warm = seconds(lambda: extraction_likelihood(model, forget["input_ids"][:2], 10), device)
        values = {}
        el_s = seconds(lambda: values.setdefault("el", extraction_likelihood(model, forget["input_ids"], 10)), device)
    report["el10"] = {"seconds": el_s, "warmup_2_sequences_s": warm, "mean": float(values["el"].mean())}
    text = json.dumps(report, indent=1)
    if args.out is not None:  # first: a closed stdout must not lose the file
        atomic_write(args.out, text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
