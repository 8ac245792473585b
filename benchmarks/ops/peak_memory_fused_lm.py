"""Peak host memory of one forget-batch IHL forward+backward of a causal LM on CPU: the model's logits +
``causal_lm_ihl_loss`` against the patched model's fused path (``model(..., ihl=True)``), each measured in
a fresh process.

    python benchmarks/ops/peak_memory_fused_lm.py                      # both paths, one JSON line each
    python benchmarks/ops/peak_memory_fused_lm.py --path fused --batch 8 --seq 200 --vocab 50257

"peak_bytes" = peak RSS - RSS once the model and the batch exist (after a warm-up on 2 tokens): what the
step holds at its high-water mark (activations, logits or their chunks, gradients). The default model is a
2-layer GPT-Neo with hidden size 256 and GPT-2's vocabulary, so the (B, T, V) logits dominate, as they do
for a real model on long batches.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
from transformers import GPTNeoConfig, GPTNeoForCausalLM

from fastunlearn import causal_lm_ihl_loss
from fastunlearn.integrations.patch import patch_fused_ihl

PATHS = ("logits", "fused")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(path: str, batch: int, seq: int, vocab: int) -> dict:
    torch.manual_seed(0)
    config = GPTNeoConfig(vocab_size=vocab, max_position_embeddings=seq, hidden_size=256, num_layers=2, num_heads=4,
                          attention_types=[[["global"], 2]], intermediate_size=1024)  # fmt: skip
    model = patch_fused_ihl(GPTNeoForCausalLM(config))
    ids = torch.randint(0, vocab, (batch, seq))

    def step(x: torch.Tensor) -> None:
        if path == "fused":
            loss = model(input_ids=x, ihl=True).loss
        else:
            loss = causal_lm_ihl_loss(model(input_ids=x, use_cache=False).logits, x)
        loss.backward()

    step(ids[:1, :2])  # warm-up: libraries, thread pools and the parameters' .grad are allocated
    base = rss_bytes()
    step(ids)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    logits_bytes = batch * seq * vocab * 4
    return {"path": path, "batch": batch, "seq": seq, "vocab": vocab, "peak_bytes": peak - base,
            "logits_bytes": logits_bytes}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", choices=PATHS, help="measure one path in this process (default: both, each fresh)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=200)
    parser.add_argument("--vocab", type=int, default=50257)
    args = parser.parse_args()
    if args.path:
        print(json.dumps(measure(args.path, args.batch, args.seq, args.vocab)))
        return
    for path in PATHS:  # ru_maxrss is a process high-water mark: one fresh process per path
        argv = [sys.executable, __file__, "--path", path, "--batch", str(args.batch), "--seq", str(args.seq),
                "--vocab", str(args.vocab)]  # fmt: skip
        print(subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
