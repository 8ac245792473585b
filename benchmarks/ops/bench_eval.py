"""Evaluation of one batch, MA + NLL (the greedy token and log p of every next token), through the logits and fused,
each path in a fresh process (``ru_maxrss`` is a process high-water mark).

Level ``op`` (from the last hidden states, what the output layer and the metrics do):

- ``logits``: z = hidden @ W.T (B, T, V) in the model's dtype, ``z.argmax(-1)`` and float32 cross-entropy (how
  MA and perplexity read the logits; here both from one set of logits);
- ``fused``: ``fused_linear_logprob_argmax`` (one (C, V) chunk of logits at a time, one pass per row).

Level ``model`` (a Llama with SmolLM2-135M's widths and ``--layers`` layers, tied embeddings):

- ``two_forwards``: ``memorization_accuracy`` and ``sequence_nll`` through the logits, a forward each;
- ``logits``: ``score_sequences(fused=False)``, one forward and the logits;
- ``fused``: ``score_sequences`` from the last hidden states (one forward, no (B, T, V) logits).

    python benchmarks/ops/bench_eval.py                  # CPU: V 49152, H 576, 8 x 64 and 32 x 200 tokens
    python benchmarks/ops/bench_eval.py --level model    # the same shapes through a model
    python benchmarks/ops/bench_eval.py --path fused --batch 8 --seq 64     # one path in this process

On CUDA (when present) the defaults are V 128256, H 4096 in bfloat16, 8 x 512 and 16 x 2048 tokens (op level).
"ms": median of ``--repeats`` runs after a warm-up run at the full shape. "peak_mb": CPU, peak RSS minus the RSS
once the inputs exist and a warm-up on 2 rows has loaded every library; CUDA, peak allocated minus allocated
before the runs. "load": the 1-minute load average when the path finished, against "cores" (shared cores show as a
load above the threads this process uses). The summary lines give logits / fused (and two_forwards / fused).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

OP_PATHS = ("logits", "fused")
MODEL_PATHS = ("two_forwards", "logits", "fused")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def op_runner(path: str, batch: int, seq: int, vocab: int, hidden: int, dtype: torch.dtype, device: torch.device):
    """(run(n_rows) -> None) for the op level; run(2) is the small warm-up."""
    from fastunlearn.ops.logprob import fused_linear_logprob_argmax

    gen = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(batch, seq, hidden, generator=gen).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(device, dtype)
    y = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)

    def run(rows: int | None = None) -> None:
        hh, yy = (h, y) if rows is None else (h[:1, :rows], y[:1, :rows])
        if path == "fused":
            logp, greedy = fused_linear_logprob_argmax(hh, w, yy)
        else:
            z = F.linear(hh, w)  # (B, T, V)
            greedy = z.argmax(-1)
            logp = -F.cross_entropy(z.float().transpose(1, 2), yy, reduction="none")
            del z
        (greedy == yy).sum().item(), logp.double().sum().item()  # what MA and the NLL keep

    return run


def model_runner(path: str, batch: int, seq: int, vocab: int, hidden: int, dtype: torch.dtype,
                 device: torch.device, layers: int):  # fmt: skip
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastunlearn.evals.metrics import memorization_accuracy, score_sequences, sequence_nll

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=1536 * hidden // 576,
                         num_hidden_layers=layers, num_attention_heads=9 * hidden // 576,
                         num_key_value_heads=3 * hidden // 576, max_position_embeddings=max(seq, 2048),
                         tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config).to(device, dtype).eval()
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))

    def run(rows: int | None = None) -> None:
        x = ids if rows is None else ids[:1, : max(rows, 2)]
        if path == "two_forwards":
            memorization_accuracy(model, x, batch_size=len(x), fused=False)
            sequence_nll(model, x, batch_size=len(x), fused=False)
        else:
            score_sequences(model, x, batch_size=len(x), fused=path == "fused")

    return run


def measure(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = (args.path, args.batch, args.seq, args.vocab, args.hidden, dtype, device)
    run = op_runner(*shape) if args.level == "op" else model_runner(*shape, args.layers)
    with torch.inference_mode():
        run(2)  # libraries, thread pools, kernels' first compilation
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = rss_bytes()
        times = []
        for _ in range(args.repeats + 1):  # the first one is a warm-up at the full shape
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - start))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
        where = torch.cuda.get_device_name(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        where = f"cpu x{torch.get_num_threads()} threads"
    return {
        "level": args.level, "path": args.path, "batch": args.batch, "seq": args.seq, "vocab": args.vocab,
        "hidden": args.hidden, "dtype": args.dtype, "device": where, "ms": statistics.median(times[1:]),
        "peak_mb": peak / 2**20, "logits_mb": args.batch * args.seq * args.vocab * dtype.itemsize / 2**20,
        "load": round(os.getloadavg()[0], 2), "cores": os.cpu_count(),
        **({"layers": args.layers} if args.level == "model" else {}),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--level", choices=("op", "model"), default="op")
    parser.add_argument("--path", help="measure one path in this process (default: every path, each fresh)")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--batch", type=int, help="one shape (default: two, see the docstring)")
    parser.add_argument("--seq", type=int)
    parser.add_argument("--layers", type=int, default=2, help="model level: decoder layers")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    on_cuda = args.device.startswith("cuda")
    args.vocab = args.vocab or (128256 if on_cuda else 49152)
    args.hidden = args.hidden or (4096 if on_cuda else 576)
    args.dtype = args.dtype or ("bfloat16" if on_cuda else "float32")
    if args.path:
        print(json.dumps(measure(args)))
        return
    shapes = [(args.batch, args.seq)] if args.batch else ([(8, 512), (16, 2048)] if on_cuda else [(8, 64), (32, 200)])
    paths = OP_PATHS if args.level == "op" else MODEL_PATHS
    for batch, seq in shapes:
        rows = {}
        for path in paths:
            argv = [sys.executable, __file__, "--level", args.level, "--path", path, "--device", args.device,
                    "--dtype", args.dtype, "--vocab", str(args.vocab), "--hidden", str(args.hidden),
                    "--batch", str(batch), "--seq", str(seq), "--layers", str(args.layers),
                    "--repeats", str(args.repeats)]  # fmt: skip
            rows[path] = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)
            print(json.dumps(rows[path]), flush=True)
        fused = rows["fused"]
        summary = {"level": args.level, "batch": batch, "seq": seq, "vocab": args.vocab}
        for path in paths[:-1]:
            summary[f"{path}/fused time"] = round(rows[path]["ms"] / fused["ms"], 2)
            summary[f"{path}/fused memory"] = round(rows[path]["peak_mb"] / max(fused["peak_mb"], 1e-3), 2)
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
