"""Table 1 of Cha et al. (arXiv 2408.06621) at small scale: unlearning methods compared on TDEC forget sets.

    python benchmarks/paper/table1.py --scale small    # ~11 min on one CPU core; writes benchmarks/results/table1-small

1. A BPE tokenizer trained on the utility text (Pile + WikiText) and a small GPT-Neo (both cached).
2. A memorizer: LM training on Pile documents and WikiText passages, with the TDEC forget sequences mixed into
   every batch until they are memorized (a held-out TDEC set is never seen). Cached.
3. For every forget set, from the memorized model each time, ``fastunlearn.unlearn`` with each method of
   ``METHODS``: retain set WikiText, the paper's held-out stop rule (forget EL_10 and MA at or below the
   held-out set's values before unlearning), at most ``max_epochs`` epochs of one update each.
4. ``table1.md`` / ``table1.json`` / ``table1.png`` in ``--out``: per method, means over the forget sets of
   Params %, epochs to the criterion, forget EL_10 and MA, retain (WikiText) and held-out (Pile documents
   never trained on) perplexity, and LAMBADA last-word accuracy.

Needs the TDEC data folder (``--data``, see its README.md); without it the script says so and exits with
status 0 (skipped). Delete the cache folder (``--cache``) to rebuild the tokenizer, the memorizer and the runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tdec"
RESULTS = REPO / "benchmarks" / "results"  # every experiment's results folder lives here
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastunlearn"
logger = logging.getLogger("table1")

sys.path.insert(0, str(HERE))  # table1_config, table1_report beside this script
from table1_config import BUILD_FIELDS, SCALES, Data, Method, Scale, methods  # noqa: E402
from table1_report import _mean, aggregate, caption_text, table_markdown, verdicts, write_outputs  # noqa: E402


# ---------------------------------------------------------------------------------------------------------
# Cached builds: tokenizer, memorized model
# ---------------------------------------------------------------------------------------------------------
def _texts(path: Path) -> list[str]:
    from fastunlearn.data.text import load_texts

    return load_texts(path, role=path.stem)


def build_tokenizer(data_dir: Path, scale: Scale, cache: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = cache / "tokenizer"
    if not folder.is_dir():
        logger.info("training a byte-level BPE tokenizer (%d tokens) on Pile + WikiText", scale.vocab_size)
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=scale.vocab_size, special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )  # fmt: skip
        texts = _texts(data_dir / "utility" / "pile.csv") + _texts(data_dir / "utility" / "wikitext.csv")
        bpe.train_from_iterator(texts, trainer)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        _save_atomically(tokenizer, folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def _save_atomically(obj, folder: Path) -> None:
    from fastunlearn.lora.export import atomic_directory

    with atomic_directory(folder, overwrite=True) as tmp:
        obj.save_pretrained(tmp)


def build_model(scale: Scale, tokenizer):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    config = GPTNeoConfig(
        vocab_size=len(tokenizer), max_position_embeddings=scale.context, hidden_size=scale.hidden,
        num_layers=scale.layers, num_heads=scale.heads, attention_types=[[["global"], scale.layers]],
        window_size=scale.context, intermediate_size=4 * scale.hidden, embed_dropout=0.0, attention_dropout=0.0,
        resid_dropout=0.0, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return GPTNeoForCausalLM(config)


def memorize(data: Data, scale: Scale, tokenizer, cache: Path):
    """The memorized model (trained, or loaded from the cache)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import GPTNeoForCausalLM

    from fastunlearn.losses import retain_loss, shift_causal

    folder = cache / "memorized"
    if folder.is_dir():
        return GPTNeoForCausalLM.from_pretrained(folder)
    torch.manual_seed(scale.seed)
    model = build_model(scale, tokenizer)
    general = data.general.input_ids
    forget = torch.cat([s.input_ids for s in data.forget.values()])
    optimizer = torch.optim.AdamW(model.parameters(), lr=scale.lr_memorize, weight_decay=0.01)
    warmup = max(1, scale.memorize_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / scale.memorize_steps))
    )
    model.train()
    bar = tqdm(range(scale.memorize_steps), desc="memorizing", disable=None)
    for step in bar:
        batch = torch.cat([
            general[torch.randint(len(general), (scale.batch_general,))],
            forget[torch.randint(len(forget), (scale.batch_forget,))],
        ])  # fmt: skip
        loss = retain_loss(*shift_causal(model(input_ids=batch).logits, batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == scale.memorize_steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % 200 == 0:
                logger.info("memorizer step %d/%d: loss %.3f", step, scale.memorize_steps, loss.item())
    _save_atomically(model, folder)
    return model


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------
def load_data(data_dir: Path, scale: Scale, tokenizer) -> Data:
    import torch

    from fastunlearn.data.text import SequenceSet, tokenize_sequences

    def long_enough(texts: list[str]) -> list[str]:
        return [t for t in texts if len(tokenizer(t)["input_ids"]) >= scale.seq_len]

    forget, used = {}, set()
    for name in scale.forget_files:
        texts = [t for t in long_enough(_texts(data_dir / "forget" / name)) if t not in used][: scale.forget_size]
        used.update(texts)
        forget[Path(name).stem] = tokenize_sequences(texts, tokenizer, seq_len=scale.seq_len, role=name)
    heldout = [t for t in long_enough(_texts(data_dir / "forget" / scale.heldout_file)) if t not in used]
    heldout = tokenize_sequences(heldout[: scale.heldout_size], tokenizer, seq_len=scale.seq_len, role="held-out")
    pile = _texts(data_dir / "utility" / "pile.csv")
    pile_train, pile_heldout = pile[: -scale.pile_heldout_docs], pile[-scale.pile_heldout_docs :]
    wiki = tokenize_sequences(_texts(data_dir / "utility" / "wikitext.csv"), tokenizer, seq_len=scale.seq_len,
                              mode="pack", role="wikitext")  # fmt: skip
    pile_blocks = tokenize_sequences(pile_train, tokenizer, seq_len=scale.seq_len, mode="pack", role="pile")
    blocks = torch.cat([pile_blocks.input_ids, wiki.input_ids])
    general = SequenceSet(blocks, torch.ones_like(blocks), torch.arange(len(blocks)))
    data = Data(
        forget=forget, retain=wiki[list(range(scale.retain_blocks))], heldout=heldout, general=general,
        pile_heldout=[ids[: 4 * scale.context] for ids in tokenizer(pile_heldout)["input_ids"] if len(ids) > 1],
        lambada=lambada_examples(_texts(data_dir / "utility" / "lambada.csv")[: scale.lambada_size], tokenizer,
                                 scale.context),
    )  # fmt: skip
    data.sizes = {
        "forget": {k: len(v) for k, v in forget.items()}, "heldout": len(heldout), "retain_blocks": scale.retain_blocks,
        "general_blocks": len(general), "pile_heldout_docs": len(data.pile_heldout), "lambada": len(data.lambada),
        "general_tokens": general.input_ids.numel(),
    }  # fmt: skip
    return data


def lambada_examples(texts: list[str], tokenizer, context: int) -> list[tuple[list[int], list[int]]]:
    """(passage ids without the last word, left-truncated to fit, the last word's ids with its leading space)."""
    examples = []
    for text in texts:
        head, _, word = text.rstrip().rpartition(" ")
        target = tokenizer(" " + word)["input_ids"]
        examples.append((tokenizer(head)["input_ids"][-(context - len(target)) :], target))
    return examples


# ---------------------------------------------------------------------------------------------------------
# Utility metrics, the runs
# ---------------------------------------------------------------------------------------------------------
def lambada_scores(model, examples, batch_size: int = 32) -> dict:
    """LAMBADA last word: "lambada_acc", the fraction of passages whose last word greedy decoding reproduces (every
    target token is the argmax given the passage and the word's earlier tokens: teacher forcing = greedy decoding
    while it is right), and "lambada_ppl", the perplexity of the last words' tokens given the passages."""
    import torch

    was_training, hits, nll, count = model.training, 0, 0.0, 0
    model.eval()
    device = next(model.parameters()).device
    examples = sorted(examples, key=lambda e: len(e[0]) + len(e[1]))  # batches of similar length: little padding
    with torch.no_grad():
        for lo in range(0, len(examples), batch_size):
            batch = examples[lo : lo + batch_size]
            ids = torch.zeros(len(batch), max(len(c) + len(t) for c, t in batch), dtype=torch.long)
            for row, (ctx, tgt) in enumerate(batch):
                ids[row, : len(ctx) + len(tgt)] = torch.tensor(ctx + tgt)
            logits = model(input_ids=ids.to(device)).logits.float().cpu()  # right padding: causal, no effect
            for row, (ctx, tgt) in enumerate(batch):
                scores = logits[row, len(ctx) - 1 : len(ctx) + len(tgt) - 1].log_softmax(-1)  # (len(tgt), V)
                hits += scores.argmax(-1).tolist() == tgt
                nll -= scores.gather(1, torch.tensor(tgt)[:, None]).sum().item()
                count += len(tgt)
    model.train(was_training)
    return {"lambada_acc": hits / len(examples), "lambada_ppl": math.exp(nll / count)}


def utility(model, data: Data, scale: Scale) -> dict:
    from fastunlearn.evals.metrics import perplexity

    return {
        "heldout_ppl": perplexity(model, data.pile_heldout, context=scale.context, batch_size=16),
        **lambada_scores(model, data.lambada),
    }


def run_once(memorized: Path, data: Data, scale: Scale, method: Method, forget_set: str, lr: float, out: Path) -> dict:
    """One unlearning run from the memorized model; its summary is cached in ``out/summary.json``."""
    from transformers import GPTNeoForCausalLM

    from fastunlearn.data.text import UnlearningData
    from fastunlearn.engine import UnlearnConfig, checkpoint, unlearn
    from fastunlearn.engine.report import write_json

    summary_path = out / "summary.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    if out.exists() and not checkpoint.has_checkpoint(out):
        shutil.rmtree(out)  # a run finished but not summarized: redo it
    config = UnlearnConfig(
        forget_loss=method.forget_loss, retain_weight=method.retain_weight, params=method.params, rank=scale.rank,
        alpha=2.0 * scale.rank, lr=lr, max_epochs=scale.max_epochs, eval_retain_ppl=True, seed=scale.seed,
        fila={"row_weighting": method.row_weighting} if method.row_weighting else {},
        eval_every=1, fisher_max_examples=128,  # the retain perplexity curve of table1.png; the results' Fisher sample
    )  # fmt: skip
    model = GPTNeoForCausalLM.from_pretrained(memorized)
    result = unlearn(model, UnlearningData(data.forget[forget_set], data.retain, data.heldout), config, out)
    task = result.log["tasks"][0]
    summary = {
        "method": method.name, "forget_set": forget_set, "lr": lr, "success": result.success,
        "epochs": len(task["epochs"]), "params_percent": result.log["model"]["trainable_percent"],
        "el": task["after"]["forget"][0]["el"], "ma": task["after"]["forget"][0]["ma"],
        "retain_ppl": task["after"]["retain_ppl"], **utility(result.model, data, scale),
        "criterion": result.log["criterion"], "baseline": result.log["baseline"],
        "curve": [{k: e[k] for k in ("epoch", "forget_ma", "forget_el", "retain_ppl")} for e in task["epochs"]],
        "seconds": result.log["timings"]["total_s"],
    }  # fmt: skip
    write_json(summary_path, summary)
    return summary


def run_method(memorized: Path, data: Data, scale: Scale, method: Method, forget_set: str, runs: Path) -> dict:
    """The method's run on one forget set; with several learning rates, the first that meets the criterion
    (or the last one tried)."""
    base = scale.lr_full if method.params == "full" else scale.lr_adapter
    for factor in method.lr_factors:
        name = method.slug if len(method.lr_factors) == 1 else f"{method.slug}-x{factor:g}"
        summary = run_once(memorized, data, scale, method, forget_set, base * factor, runs / forget_set / name)
        logger.info(
            "%s | %s (lr %g): %s after %d epochs, forget MA %.3f EL %.4f, retain PPL %.2f", forget_set, method.name,
            base * factor, "met" if summary["success"] else "FAILED", summary["epochs"], summary["ma"], summary["el"],
            summary["retain_ppl"],
        )  # fmt: skip
        if summary["success"]:
            break
    return {**summary, "lr_factor": factor}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--scale", choices=sorted(SCALES), default="small", help="benchmark size (default: small)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"TDEC data folder (default: {DEFAULT_DATA})")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/table1-<scale>)")
    parser.add_argument(
        "--cache", type=Path, help="cache root: the tokenizer, memorizer and runs go in <cache>/table1-<scale>-<key> "
        f"(default: {DEFAULT_CACHE}, outside the repository: ~100 MB)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default: 1; more than the free cores slows the small model down many times)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.out = args.out or RESULTS / f"table1-{args.scale}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.data / "forget").is_dir() or not (args.data / "utility").is_dir():
        print(f"table1: skipped: no TDEC data folder at {args.data} (expected forget/ and utility/ in it; "
              "see --data)", file=sys.stderr)  # fmt: skip
        return 0
    import torch

    from fastunlearn.evals.metrics import memorization_accuracy

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    scale = SCALES[args.scale]
    out = args.out
    cache = (args.cache or DEFAULT_CACHE) / f"table1-{args.scale}-{scale.key(BUILD_FIELDS)}"
    start = time.perf_counter()
    tokenizer = build_tokenizer(args.data, scale, cache)
    data = load_data(args.data, scale, tokenizer)
    logger.info("data: %s", data.sizes)
    model = memorize(data, scale, tokenizer, cache)
    before = utility(model, data, scale)
    logger.info(
        "memorized model: MA forget %s, held-out TDEC %.3f | held-out PPL %.2f, LAMBADA acc %.3f, word PPL %.1f",
        ", ".join(f"{memorization_accuracy(model, s.input_ids).mean():.3f}" for s in data.forget.values()),
        memorization_accuracy(model, data.heldout.input_ids).mean(), *before.values(),
    )  # fmt: skip
    results: dict[str, list[dict]] = {}
    for method in methods(scale):
        for forget_set in data.forget:
            run = run_method(cache / "memorized", data, scale, method, forget_set, cache / "runs" / scale.key())
            results.setdefault(method.name, []).append(run)
    first = results["GA"]
    base = [r["baseline"] for r in first]
    before.update(
        el=_mean(b["forget"][0]["el"] for b in base), ma=_mean(b["forget"][0]["ma"] for b in base),
        retain_ppl=_mean(b["retain_ppl"] for b in base), heldout_el=base[0]["heldout"]["el"],
        heldout_ma=base[0]["heldout"]["ma"],
    )  # fmt: skip
    rows = aggregate(results)
    verdict = verdicts(rows, before, scale.max_epochs)
    wall_s = time.perf_counter() - start
    caption = caption_text(scale, args.scale, sum(p.numel() for p in model.parameters()), data, before, wall_s)
    write_outputs(out, rows, results, before, caption, verdict, scale, data, wall_s)
    print(table_markdown(rows, before, caption, verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
