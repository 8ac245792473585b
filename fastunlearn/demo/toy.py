"""Offline demo: a tiny GPT-Neo memorizes synthetic personal records, then forgets a dozen of them.

1. **Data** (``demo_data``): records of made-up people (name, birth date, phone, licence, address) from a
   seeded RNG, split into a forget set (people who asked to be forgotten), a retain set (everyone else in the
   training data) and a held-out set (similar people the model never saw); a byte-level BPE trained on other
   generated records.
2. **Memorization**: a small GPT-Neo trained on forget + retain until it reproduces them, cached under
   ``<cache root>/demo-<hash>`` (model and tokenizer via ``save_pretrained``, a manifest of file hashes written
   last, the directory renamed into place), so a second run skips it. A cache that fails its check is rebuilt.
3. **Unlearning** with the library's engine, :func:`fastunlearn.unlearn.unlearn`: IHL + retain loss on FILA
   adapters, the paper's learning rate, until the forget set's MA and EL_10 are at or below the held-out
   set's (Cha et al., arXiv 2408.06621). The engine writes ``report.md``, ``metrics.png``, ``log.json``,
   ``adapter/`` and ``merged/``; the demo adds ``demo.json`` (its scores and completions).

The output directory is replaced as a whole once the new one is complete, and only if it is missing, empty
or a previous demo output. Printed: MA and EL_10 of the three sets and the retain perplexity before and
after, and greedy completions of a few forgotten people's names before and after.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastunlearn.data.text import SequenceSet, UnlearningData, tokenize_sequences
from fastunlearn.demo import cache as demo_cache
from fastunlearn.demo.cache import MANIFEST, cache_path, check_cache_root, load_cached, save_cache  # noqa: F401 - the demo API
from fastunlearn.demo.config import EL_N, BaseDemoConfig
from fastunlearn.demo.data import make_records, person, train_tokenizer
from fastunlearn.engine import UnlearnConfig, unlearn
from fastunlearn.engine.finetune import sft_step
from fastunlearn.evals.metrics import evaluate, memorization_accuracy, perplexity
from fastunlearn.utils.atomic import atomic_directory

logger = logging.getLogger("fastunlearn.demo")  # memorization progress; shown where log_to_terminal() is on
VOCAB_SIZE = 1024  # BPE tokens: whole names and words are single tokens
MAX_SEQ_LEN = 32  # records are longer (34+ tokens over 60 seeds), so no sequence is padded
NUM_HEADS = 4
MEMORIZED_MA = 1.0  # memorization stops once greedy decoding reproduces every training record
CHECK_EVERY = 25  # memorization steps between two MA checks
CACHE_FORMAT = 1  # bump when the cached files change meaning
MARKER = "demo.json"  # in an output directory: the demo's summary, which makes it a previous demo output
# The keys every demo summary holds (the toy and the real demo, this version and earlier ones): a demo.json is
# the demo's own only when it is a JSON object holding all of them.
SUMMARY_KEYS = ("config", "memorization", "before", "after", "success", "completions")
DEMO_OUTPUTS = {MARKER, "report.md", "metrics.png", "log.json", "adapter", "merged"}
SETS = ("forget", "retain", "heldout")


@dataclass
class DemoConfig(BaseDemoConfig):
    """The default demo: :class:`fastunlearn.demo.config.BaseDemoConfig`'s fields and defaults, and the tiny
    GPT-Neo's size. ``memorize_steps`` stop early once the training records' MA reaches MEMORIZED_MA; ``seq_len``
    is at most MAX_SEQ_LEN."""

    hidden_size: int = 128  # GPT-Neo width (NUM_HEADS heads), MLP 4x
    num_layers: int = 2

    MEMORIZATION_FIELDS = (*BaseDemoConfig.MEMORIZATION_FIELDS, "hidden_size", "num_layers")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seq_len > MAX_SEQ_LEN:
            raise ValueError(f"seq_len must be <= {MAX_SEQ_LEN} (the shortest records' length), got {self.seq_len}")
        if self.hidden_size % NUM_HEADS:
            raise ValueError(f"hidden_size must be a multiple of {NUM_HEADS} (attention heads), got {self.hidden_size}")

    def minimums(self) -> dict[str, int]:
        return {**super().minimums(), "hidden_size": NUM_HEADS, "num_layers": 1}

    def fixed_settings(self) -> dict:
        return {"format": CACHE_FORMAT, "vocab_size": VOCAB_SIZE, "memorized_ma": MEMORIZED_MA,
                "check_every": CHECK_EVERY}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Data and model
# ---------------------------------------------------------------------------------------------------------
def tokenize_records(records: dict[str, list[str]], tokenizer, seq_len: int) -> UnlearningData:
    """One ``seq_len``-token row per record (no padding: a shorter record raises)."""
    sets = {
        name: tokenize_sequences(texts, tokenizer, seq_len=seq_len, min_len=seq_len, role=f"{name} set")
        for name, texts in records.items()
    }
    return UnlearningData(**sets)


def build_model(cfg: DemoConfig, tokenizer) -> torch.nn.Module:
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    config = GPTNeoConfig(
        vocab_size=len(tokenizer), max_position_embeddings=cfg.seq_len, hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers, num_heads=NUM_HEADS, attention_types=[[["global"], cfg.num_layers]],
        window_size=cfg.seq_len, intermediate_size=4 * cfg.hidden_size, embed_dropout=0.0, attention_dropout=0.0,
        resid_dropout=0.0, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return GPTNeoForCausalLM(config)


def train_until_memorized(model: torch.nn.Module, train: torch.Tensor, check: torch.Tensor, *, steps: int, lr: float,
                          target: float, check_every: int, batch_size: int | None = None) -> dict:  # fmt: skip
    """AdamW steps (no weight decay) on ``train`` (N, L) token ids, each over all N rows (``engine.finetune.sft_step``,
    the fine-tuning step: micro-batches of ``batch_size`` rows, the mean over every token; one update per step),
    until the mean MA of ``check`` (M, L) reaches ``target`` (measured every ``check_every`` steps and after the
    last) or ``steps`` end. Returns {"steps", "train_ma" (``check``'s MA), "seconds"}; the model is left in eval
    mode."""
    start = time.perf_counter()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    batch = {"input_ids": train, "attention_mask": torch.ones_like(train)}
    bar = tqdm(range(1, steps + 1), desc="memorizing", unit="step", leave=False, disable=None)
    for step in bar:
        loss = sft_step(model, optimizer, batch, batch_size or len(train), next(model.parameters()).device)["loss"]
        if step % check_every == 0 or step == steps:
            model.eval()
            train_ma = memorization_accuracy(model, check).mean().item()
            model.train()
            bar.set_postfix(loss=f"{loss:.3f}", MA=f"{train_ma:.3f}")
            logger.info("memorizing: step %d/%d, loss %.3f, MA %.3f (target %g), %.0f s", step, steps, loss,
                        train_ma, target, time.perf_counter() - start)  # fmt: skip
            if train_ma >= target:
                break
    bar.close()
    return {"steps": step, "train_ma": train_ma, "seconds": time.perf_counter() - start}


def memorize(cfg: DemoConfig, data: UnlearningData, tokenizer) -> tuple[torch.nn.Module, dict]:
    """A fresh model trained (full batch, AdamW) on forget + retain until their MA reaches MEMORIZED_MA or the
    step budget ends; returns it in eval mode with {"steps", "train_ma", "seconds"}."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tokenizer)
    train = torch.cat([data.forget.input_ids, data.retain.input_ids])
    stats = train_until_memorized(model, train, train, steps=cfg.memorize_steps, lr=cfg.memorize_lr,
                                  target=MEMORIZED_MA, check_every=CHECK_EVERY)  # fmt: skip
    return model.eval(), stats


def memorize_fresh(cfg: DemoConfig, records: dict[str, list[str]]) -> tuple[torch.nn.Module, object, dict]:
    """(a new GPT-Neo trained until it reproduces the records, the demo's BPE tokenizer, memorization stats)."""
    tokenizer = train_tokenizer(cfg.seed, VOCAB_SIZE)
    model, stats = memorize(cfg, tokenize_records(records, tokenizer, cfg.seq_len), tokenizer)
    return model, tokenizer, stats


def memorized_model(cfg, records: dict[str, list[str]],
                    make: Callable = memorize_fresh) -> tuple[torch.nn.Module, object, dict]:  # fmt: skip
    """(model, tokenizer, stats) of the demo: from the cache, else ``make(cfg, records)``, then cached
    (:func:`fastunlearn.demo.cache.memorized_model`)."""
    return demo_cache.memorized_model(cfg, records, make)


# ---------------------------------------------------------------------------------------------------------
# Measuring and showing
# ---------------------------------------------------------------------------------------------------------
def scores(model: torch.nn.Module, data: UnlearningData) -> dict:
    """{set: {"ma", "el"}} for the three sets, and "retain_ppl"."""
    results = evaluate(model, {name: getattr(data, name).input_ids for name in SETS}, n=EL_N)
    return {**results, "retain_ppl": perplexity(model, data.retain.input_ids)}


@dataclass
class Example:
    """A forget record shown in completions: the person's name as tokens, and the rest of the record."""

    person: str
    prefix: torch.Tensor
    record: str


def examples(tokenizer, forget: SequenceSet, texts: list[str], n: int) -> list[Example]:
    """The first ``n`` forget records, each split after the name that starts it."""
    rows = []
    for ids, text in zip(forget.input_ids[:n], texts):
        name_len = len(tokenizer(person(text))["input_ids"])
        rows.append(Example(person(text), ids[:name_len], tokenizer.decode(ids[name_len:])))
    return rows


def complete(model: torch.nn.Module, tokenizer, shown: list[Example], seq_len: int) -> list[str]:
    """The model's greedy continuation of each example's name, up to ``seq_len`` tokens in all, decoded."""
    model.eval()
    texts = []
    with torch.no_grad():
        for example in shown:
            ids = example.prefix[None]
            while ids.shape[1] < seq_len:
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
            texts.append(tokenizer.decode(ids[0, len(example.prefix) :]))
    return texts


def print_memorization(stats: dict, vocab_size: int, cfg: DemoConfig) -> None:
    how = "loaded from the cache" if stats["cached"] else f"memorized in {stats['seconds']:.0f} s, cached"
    print(
        f"Model {how}: {stats['cache']}\n  ({stats['steps']} full-batch steps to training-set MA "
        f"{stats['train_ma']:.3f}; {vocab_size}-token BPE, records cut to {cfg.seq_len} tokens)"
    )
    if stats["train_ma"] < MEMORIZED_MA:
        print(f"  Not every training record is memorized after memorize_steps={cfg.memorize_steps}.")


def print_table(before: dict, after: dict, cfg: DemoConfig) -> None:
    print(f"{'':24}{'MA before':>10}{'MA after':>10}{f'EL_{EL_N} before':>14}{f'EL_{EL_N} after':>13}")
    for name, label in (("forget", "forget"), ("retain", "retain"), ("heldout", "held-out")):
        b, a = before[name], after[name]
        label = f"{label} ({cfg.sizes[name]} records)"
        print(f"{label:24}{b['ma']:>10.2f}{a['ma']:>10.2f}{b['el']:>14.2f}{a['el']:>13.2f}")
    print(f"{'retain perplexity':24}{before['retain_ppl']:>10.2f}{after['retain_ppl']:>10.2f}")


def print_outcome(log: dict) -> None:
    crit = log["criterion"]
    print(
        f"\n{'SUCCESS' if log['success'] else 'FAILURE'}: {log['tasks'][0]['stop_reason']}.\n  Criterion: forget "
        f"MA <= {crit['ma']:.2f} and EL_{EL_N} <= {crit['el']:.2f}, the held-out set's values before unlearning."
    )


def print_completions(rows: list[dict]) -> None:
    print("\nGreedy completions of forgotten people's names: the memorized record, then the model before and after")
    for row in rows:
        print(f"\n  {row['person']}\n    record: {row['record']}…")
        for when in ("before", "after"):
            print(f"    {when + ':':7} {row[when]}…{'   (verbatim)' if row[when] == row['record'] else ''}")


# ---------------------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------------------
def is_demo_summary(path: Path) -> bool:
    """Whether ``path`` is a summary the demo wrote: a JSON object with every key of SUMMARY_KEYS."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(summary, dict) and all(key in summary for key in SUMMARY_KEYS)


def check_out_dir(out: Path) -> None:
    """Raise ValueError unless ``out`` is missing, empty or a previous demo output (the demo replaces it)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output directory {str(out)!r} exists and is not a directory")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not is_demo_summary(out / MARKER):
        raise ValueError(
            f"output directory {str(out)!r} is not empty and is not a previous demo output (it has no {MARKER} "
            "that the demo wrote); the demo replaces its output directory: choose another one"
        )
    foreign = [name for name in entries if name not in DEMO_OUTPUTS]
    if foreign:
        raise ValueError(
            f"output directory {str(out)!r} is a previous demo output but also holds {', '.join(foreign)}; the demo "
            "replaces its output directory: move them or choose another one"
        )


def unlearn_config(cfg: DemoConfig) -> UnlearnConfig:
    """IHL + retain loss on FILA adapters until the held-out criterion (MA and EL_10), retain perplexity too."""
    return UnlearnConfig(
        forget_loss="ihl", params="fila", rank=cfg.rank, alpha=2.0 * cfg.rank, lr=cfg.unlearn_lr,
        max_epochs=cfg.unlearn_epochs, stop="heldout", el_n=EL_N, eval_retain_ppl=True, seed=cfg.seed,
    )  # fmt: skip


def run_unlearning(model, tokenizer, data: UnlearningData, cfg: DemoConfig, out_dir: Path,
                   config: UnlearnConfig | None = None):  # fmt: skip
    """The engine's run (``config``, else :func:`unlearn_config` of ``cfg``) in ``out_dir`` with a progress bar
    over its epochs; returns its UnlearnResult."""
    bar = tqdm(total=cfg.unlearn_epochs, desc="unlearning", unit="epoch", leave=False, disable=None)

    def progress(task: int, record: dict) -> None:
        bar.update()
        bar.set_postfix(forget_MA=f"{record['forget_ma']:.3f}")

    try:
        config = config or unlearn_config(cfg)
        return unlearn(model, data, config, out_dir, tokenizer=tokenizer, on_epoch_end=progress)
    finally:
        bar.close()


@contextlib.contextmanager
def one_thread():
    """Torch on one CPU thread for the demo: its matrices are too small to gain from more, extra threads stall
    on cores other jobs use, and the results then do not depend on the machine's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def main(cfg: DemoConfig | None = None) -> int:
    """Run the demo; 0 when the forget set met the unlearning criterion, 1 when it did not."""
    with one_thread():
        return run_demo(cfg or DemoConfig())


def run_demo(cfg: DemoConfig) -> int:
    start = time.perf_counter()
    out = cfg.out_dir.resolve()
    check_out_dir(out)
    print(
        f"fastunlearn demo: a {cfg.num_layers}-layer GPT-Neo memorizes {cfg.n_forget + cfg.n_retain} synthetic "
        f"personal records, then forgets {cfg.n_forget} of them\nwith IHL + FILA (Cha et al., arXiv 2408.06621).\n"
    )
    records = make_records(cfg.seed, cfg.sizes)
    model, tokenizer, stats = memorized_model(cfg, records)
    print_memorization(stats, len(tokenizer), cfg)
    data = tokenize_records(records, tokenizer, cfg.seq_len)
    shown = examples(tokenizer, data.forget, records["forget"], cfg.n_examples)
    before, completed_before = scores(model, data), complete(model, tokenizer, shown, cfg.seq_len)
    print(
        f"Unlearning the {cfg.n_forget} forget records (IHL + retain loss, FILA rank {cfg.rank}, lr "
        f"{cfg.unlearn_lr:g}, at most {cfg.unlearn_epochs} epochs)...\n"
    )
    with atomic_directory(out, overwrite=True) as tmp:  # the previous output stays until this one is complete
        result = run_unlearning(model, tokenizer, data, cfg, tmp)
        after, completed_after = scores(model, data), complete(model, tokenizer, shown, cfg.seq_len)
        rows = [{"person": e.person, "record": e.record, "before": b, "after": a}
                for e, b, a in zip(shown, completed_before, completed_after)]  # fmt: skip
        summary = {"config": asdict(cfg), "memorization": stats, "before": before, "after": after,
                   "success": result.success, "completions": rows}  # fmt: skip
        (tmp / MARKER).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print_table(before, after, cfg)
    print_outcome(result.log)
    if rows:
        print_completions(rows)
    print(
        f"\nReport: {out / 'report.md'}\nPlot:   {out / 'metrics.png'}\n"
        f"Unlearned model and tokenizer: {out / 'merged'} (adapter: {out / 'adapter'})"
    )
    print(f"Done in {time.perf_counter() - start:.0f} s.")
    return 0 if result.success else 1
