"""One NPO training step (forward + backward of the forget term) two ways, each in a fresh process:

- ``fused``: the patched model's fused per-token log-probabilities (``model(..., logprob=True)``: no (B, T, V)
  logits) and the reference log-likelihoods cached once (a (B,) tensor, as the engine keeps them);
- ``logits``: the model's logits + ``token_logprob``, and a second, frozen copy of the model run every step for
  the reference (how open-unlearning's NPO trainer computes it).

    python benchmarks/ops/bench_logprob.py                       # both paths at V = 49152 and 128256, and ratios
    python benchmarks/ops/bench_logprob.py --path fused --vocab 128256 --batch 8 --seq 128

"step_ms": the median of ``--repeats`` steps after a warm-up. "peak_mb": peak RSS minus the RSS once the model
and the batch exist and a warm-up step on 2 tokens has allocated the parameters' gradients; it includes the
reference model for ``logits`` (created after that baseline) and everything the step holds at its high-water
mark (activations, logits or their chunks, gradients). The model: a 2-layer GPT-Neo with hidden size 256, so the
vocabulary-sized tensors dominate, as they do for a real model on long batches.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from transformers import GPTNeoConfig, GPTNeoForCausalLM

from fastunlearn.data.text import SequenceSet
from fastunlearn.engine.reference import sequence_logprobs
from fastunlearn.fused_lm import patch_fused_lm
from fastunlearn.losses import REFERENCE_KEY, forget_term, sequence_logprob, token_logprobs

PATHS = ("fused", "logits")
VOCABS = (49152, 128256)  # SmolLM2's vocabulary, Llama 3's


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(path: str, batch: int, seq: int, vocab: int, repeats: int) -> dict:
    torch.manual_seed(0)
    config = GPTNeoConfig(vocab_size=vocab, max_position_embeddings=seq, hidden_size=256, num_layers=2, num_heads=4,
                          attention_types=[[["global"], 2]], intermediate_size=1024)  # fmt: skip
    model = patch_fused_lm(GPTNeoForCausalLM(config))
    ids = torch.randint(0, vocab, (batch, seq))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    npo = forget_term("npo", fused=path == "fused")

    def step(inputs: dict, reference) -> None:
        if reference is None:  # a reference model run on the batch, every step
            with torch.no_grad():
                ref = sequence_logprob(*token_logprobs(ref_model, inputs))[0]
        else:
            ref = reference[: len(inputs["input_ids"])]
        (npo(model, {**inputs, REFERENCE_KEY: ref}) / len(ref)).backward()

    tiny = {k: v[:1, :2] for k, v in data.items()}
    ref_model = model
    step(tiny, None if path == "logits" else torch.zeros(1))  # warm-up: libraries, threads, the .grad tensors
    base = rss_bytes()
    if path == "logits":
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # held for the whole run
        reference = None
    else:
        seqs = SequenceSet(ids, data["attention_mask"], torch.arange(batch))
        reference = sequence_logprobs(model, seqs, batch, fused=True)  # once per run, as the engine does
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=False)
        start = time.perf_counter()
        step(data, reference)
        times.append(1e3 * (time.perf_counter() - start))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"path": path, "batch": batch, "seq": seq, "vocab": vocab, "hidden": 256,
            "step_ms": statistics.median(times), "peak_mb": (peak - base) / 2**20,
            "logits_mb": batch * seq * vocab * 4 / 2**20, "threads": torch.get_num_threads()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", choices=PATHS, help="measure one path in this process (default: both, each fresh)")
    parser.add_argument("--vocab", type=int, help=f"one vocabulary size (default: {VOCABS})")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    vocabs = (args.vocab,) if args.vocab else VOCABS
    if args.path:
        for vocab in vocabs:
            print(json.dumps(measure(args.path, args.batch, args.seq, vocab, args.repeats)))
        return
    for vocab in vocabs:
        rows = {}
        for path in PATHS:  # ru_maxrss is a process high-water mark: one fresh process per path
            argv = [sys.executable, __file__, "--path", path, "--vocab", str(vocab), "--batch", str(args.batch),
                    "--seq", str(args.seq), "--repeats", str(args.repeats)]  # fmt: skip
            rows[path] = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)
            print(json.dumps(rows[path]))
        fused, logits = rows["fused"], rows["logits"]
        print(json.dumps({"vocab": vocab, "speedup": logits["step_ms"] / fused["step_ms"],
                          "memory_ratio": logits["peak_mb"] / fused["peak_mb"]}))  # fmt: skip


if __name__ == "__main__":
    main()
