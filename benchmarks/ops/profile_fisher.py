"""Where the per-example Fisher pass of FILA's setup spends its time, on SmolLM2-135M-Instruct (CPU).

    python benchmarks/ops/profile_fisher.py [--blocks 32] [--threads 2]

The retain Fisher of ``--blocks`` WikiText blocks of 64 tokens (``fastunlearn.lora.fisher.empirical_fisher``,
per_example, the engine's preset targets), timed whole and split into its parts by running them apart on the same
batches: the model's forward and the backward to the target layers' outputs (the taps' hooks consuming nothing),
the per-example accumulation (the ``fisher`` op: the kernel's work) on the captured (X, G), and the rest
(the compensated running sum, scratch buffers). Then ``torch.profiler``'s top operators by self CPU time.
Prints one JSON line; ``--out`` writes it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "tdec"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DATA, help="TDEC's folder (utility/wikitext.csv)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--profile", action="store_true", help="also torch.profiler's top operators")
    args = parser.parse_args(argv)

    import torch

    from fastunlearn.data.text import load_texts, tokenize_sequences
    from fastunlearn.demo.smollm2 import real_model
    from fastunlearn.lora import fisher as fisher_mod
    from fastunlearn.lora.targets import find_targets

    torch.set_num_threads(args.threads)
    model, tokenizer = real_model()
    model.eval()
    texts = load_texts(args.data / "utility" / "wikitext.csv", role="wikitext")[:400]
    blocks = tokenize_sequences(texts, tokenizer, seq_len=64, mode="pack", role="wikitext")
    ids = blocks.input_ids[: args.blocks]
    names = list(find_targets(model, "preset"))
    modules = find_targets(model, "preset")
    row = {"blocks": len(ids), "seq_len": ids.shape[1], "batch_size": args.batch_size, "threads": args.threads,
           "layers": len(names), "weights": sum(m.weight.numel() for m in modules.values())}  # fmt: skip

    def whole() -> float:
        t0 = time.perf_counter()
        fisher_mod.empirical_fisher(model, ids, names, batch_size=args.batch_size, progress=False)
        return time.perf_counter() - t0

    whole()  # warm-up (allocator, lazy init)
    row["empirical_fisher_s"] = min(whole() for _ in range(2))

    captured: list[tuple[torch.Tensor, torch.Tensor, str]] = []
    batches = [ids[lo : lo + args.batch_size] for lo in range(0, len(ids), args.batch_size)]
    t0 = time.perf_counter()
    for batch in batches:  # forward + backward to the taps, nothing consumed
        taps = fisher_mod._Taps(modules, lambda name, x, g: None)
        with torch.enable_grad():
            loss, _ = fisher_mod._sequence_nll(model, {"input_ids": batch}, -100)
            taps.backward(loss, modules)
        taps.remove()
    row["forward_backward_s"] = time.perf_counter() - t0
    taps = fisher_mod._Taps(modules, lambda name, x, g: captured.append((x, g, name)))
    with torch.enable_grad():
        loss, _ = fisher_mod._sequence_nll(model, {"input_ids": batches[0]}, -100)
        taps.backward(loss, modules)
    taps.remove()
    scratch = {name: torch.zeros_like(m.weight, dtype=torch.float32) for name, m in modules.items()}
    t0 = time.perf_counter()
    for x, g, name in captured:
        fisher_mod.accumulate_per_example(scratch[name], x, g, 256 * 2**20)
    row["kernel_s"] = (time.perf_counter() - t0) * len(batches)
    total = {name: torch.zeros_like(s) for name, s in scratch.items()}
    error = {name: torch.zeros_like(s) for name, s in scratch.items()}
    t0 = time.perf_counter()
    for name, s in scratch.items():
        term = torch.zeros_like(s)
        term.copy_(s)
        fisher_mod._two_sum_(total[name], error[name], term)
    row["running_sum_s"] = (time.perf_counter() - t0) * len(batches)
    row["other_s"] = row["empirical_fisher_s"] - row["forward_backward_s"] - row["kernel_s"] - row["running_sum_s"]
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fisher_mod.empirical_fisher(model, ids, names, batch_size=args.batch_size, progress=False)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        print(table, file=sys.stderr)
    print(json.dumps(row))
    if args.out:
        args.out.write_text(json.dumps(row, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
