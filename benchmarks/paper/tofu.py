"""TOFU (Maini et al. 2024) with the methods of Cha et al. (arXiv 2408.06621, Sec. 5.2) on a real model:
SmolLM2-135M-Instruct as ``fastunlearn.demo.smollm2.real_model()`` provides it (a Q4_1 GGUF, dequantized to float32).

    nohup .venv/bin/python benchmarks/paper/tofu.py --data ../shared/data/tofu > benchmarks/results/tofu/run.log 2>&1 &

Every step is cached under ``--cache`` (default ``<fastunlearn cache>/tofu/<settings hash>``); a rerun skips the
finished ones and resumes an interrupted fine-tune or unlearning run from its last epoch:

1. Data (``--data``, TOFU's JSON files): the forget set = the first ``--forget-authors`` x 20 pairs of the forget
   split (then the first ``--forget-pairs`` of them); the retain training set = the first ``--retain-authors``
   x 20 pairs of the matching retain split (authors retain_perturbed.json covers, so model utility's retain
   questions were trained on).
2. Target model: ``fastunlearn.finetune`` of the real model on forget + retain pairs (answer-only loss).
3. Retain model: the same fine-tune on the retain pairs only (what perfect unlearning would leave). Its TOFU
   evaluation is the reference of forget quality (``fastunlearn.evals.tofu.evaluate_tofu``).
4. Each method (GA, GD, LoRA + GD, LoRA + IHL, FILA + IHL: ``paper/table1_config.methods``) unlearns the forget set
   from the target model through ``fastunlearn.unlearn`` with ``stop="epochs"`` (TOFU: 5 epochs; an epoch is one
   update from the whole forget set), the retain pairs as its retain set; its ``evaluate_each_epoch`` hook evaluates
   forget quality and model utility (epoch 0 = the target model, evaluated once for all methods).
5. ``--out``: runs.jsonl (one line per finished method), tofu.md (the table), tofu.png (model utility vs forget
   quality per epoch, one trajectory per method, the paper's figure), and the engine's own report per run in
   the cache. ``--gpu-scale``: the paper's full protocol (every author, forget01 / 05 / 10, all evaluation
   questions); not sized for a CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # table1_config, tofu_report
from table1_config import SCALES  # noqa: E402
from table1_config import methods as paper_methods  # noqa: E402
from tofu_report import write_outputs  # noqa: E402

logger = logging.getLogger("fastunlearn.tofu_bench")  # shown by log_to_terminal, like the engine's lines
PAIRS_PER_AUTHOR = 20  # TOFU: 20 question/answer pairs per fictitious author, stored author by author
RETAIN_SPLIT = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
METHODS = ("FILA + IHL", "LoRA + IHL", "LoRA + GD", "GD", "GA")  # run in this order: the paper's method first
# sized for 2 shared CPU cores (see the README of benchmarks/results/tofu): one forget author, few questions, the
# hook's evaluation at epochs 1, 3, 5; --gpu-scale is the paper's protocol
CPU_DEFAULTS = {"forget_authors": 1, "forget_pairs": 10, "retain_authors": 1, "eval_questions": 8, "ft_epochs": 2,
                "ft_batch": 4, "max_new_tokens": 32, "eval_epochs": "odd", "threads": 1}  # fmt: skip
GPU_SCALE = {"forget_authors": None, "forget_pairs": None, "retain_authors": None, "eval_questions": None,
             "ft_epochs": 5, "ft_batch": 32, "max_new_tokens": None, "eval_epochs": None, "threads": None}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="TOFU's JSON files (e.g. ../shared/data/tofu)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "tofu")
    p.add_argument("--cache", type=Path, help="step cache (default: <fastunlearn cache root>/tofu)")
    p.add_argument("--model", help="base model directory (default: SmolLM2-135M, demo.smollm2.real_model())")
    p.add_argument("--gpu-scale", action="store_true", help="full TOFU: every author, forget01/05/10, all questions")
    p.add_argument("--splits", nargs="+", default=None, help="forget splits (forget01; --gpu-scale: all three)")
    p.add_argument("--forget-authors", type=int, help="authors of the forget split unlearned (CPU: 2 = forget01)")
    p.add_argument("--forget-pairs", type=int, help="then only the first N of those pairs (CPU: 10)")
    p.add_argument("--retain-authors", type=int, help="retain authors fine-tuned on (CPU: 1)")
    p.add_argument("--eval-questions", type=int, help="questions per evaluation set (CPU: 20)")
    p.add_argument("--eval-epochs", type=int, nargs="+", help="epochs the hook evaluates (CPU: 1 3 5; GPU: all)")
    p.add_argument("--max-new-tokens", type=int, help="greedy answer length for ROUGE-L (CPU: 32; GPU: the answer's)")
    p.add_argument("--template", default="plain", help="QA prompt: plain (TOFU's Phi-1.5 format) or chat")
    p.add_argument("--ft-epochs", type=int, help="fine-tuning epochs (TOFU: 5; CPU: 2)")
    p.add_argument("--ft-lr", type=float, default=2e-4, help="fine-tuning peak lr (TOFU: 1e-5 for Llama-2-7B)")
    p.add_argument("--ft-batch", type=int, help="fine-tuning rows per update (TOFU: 32; CPU: 4)")
    p.add_argument("--epochs", type=int, default=5, help="unlearning epochs (TOFU: 5)")
    p.add_argument("--lr-scale", type=float, default=2.0, help="x the paper's lr (5e-5 full, 2e-4 LoRA / FILA) (2)")
    p.add_argument("--rank", type=int, default=16, help="LoRA / FILA rank (alpha = 2 x rank)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD")
    p.add_argument("--batch-size", type=int, default=20, help="sequences per forward in evaluation")
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (CPU: 1, which wastes no time spinning when the cores are shared)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    given = {name for name in CPU_DEFAULTS if getattr(args, name) is not None}
    for name, value in (GPU_SCALE if args.gpu_scale else CPU_DEFAULTS).items():
        if name not in given:
            setattr(args, name, value)
    args.splits = args.splits or (list(RETAIN_SPLIT) if args.gpu_scale else ["forget01"])
    for split in args.splits:
        if split not in RETAIN_SPLIT:
            raise SystemExit(f"--splits: {split!r} is not one of {', '.join(RETAIN_SPLIT)}")
    if args.eval_epochs == "odd":  # 1, 3, 5 and the last
        args.eval_epochs = [*range(1, args.epochs + 1, 2), args.epochs]
    args.eval_epochs = sorted(set(args.eval_epochs or range(1, args.epochs + 1)))
    if not set(args.eval_epochs) <= set(range(1, args.epochs + 1)):
        raise SystemExit(f"--eval-epochs must be within 1..{args.epochs}, got {args.eval_epochs}")
    return args


def key(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:10]


def first_authors(pairs: list, authors: int | None) -> list:
    return list(pairs) if authors is None else list(pairs[: authors * PAIRS_PER_AUTHOR])


def load_data(args, split: str, tokenizer) -> dict:
    """The split's training sets (QA pairs and their tokenized SequenceSets) and TOFU's evaluation sets, the
    retain evaluation questions limited to the retain authors trained on."""
    from fastunlearn.data.qa import load_qa, tokenize_qa
    from fastunlearn.evals.tofu import load_tofu_sets

    sets = load_tofu_sets(args.data, split)
    forget = first_authors(sets["forget"], args.forget_authors)[: args.forget_pairs]
    retain = first_authors(load_qa(args.data / f"{RETAIN_SPLIT[split]}.json", role="TOFU retain split"),
                           args.retain_authors)  # fmt: skip
    trained = {p.question for p in retain}
    sets["forget"] = forget
    sets["retain"] = [p for p in sets["retain"] if p.question in trained]
    if not sets["retain"]:
        raise SystemExit("no retain_perturbed question belongs to the retain authors trained on")

    def seqs(pairs, role):
        return tokenize_qa(pairs, tokenizer, template=args.template, role=role)

    evaluated = {name: min(len(p), args.eval_questions or len(p)) for name, p in sets.items()}
    return {"forget": seqs(forget, "forget"), "retain": seqs(retain, "retain"),
            "target": seqs(forget + retain, "target"), "eval": sets,
            "sizes": {"forget": len(forget), "retain": len(retain), "eval": evaluated}}  # fmt: skip


def base_model(args):
    """(model, tokenizer): ``--model``, else the real model."""
    from fastunlearn.demo.smollm2 import real_model
    from fastunlearn.models import load_model

    return real_model() if args.model is None else load_model(args.model, "float32", "cpu")


def finetuned(folder: Path, seqs, args):
    """The base model fine-tuned on ``seqs`` (cached in ``folder``; resumed when interrupted)."""
    import fastunlearn
    from fastunlearn.engine.finetune import FinetuneConfig
    from fastunlearn.models import load_model

    model_dir = folder / "model"
    if not (model_dir / "config.json").is_file():
        model, tokenizer = base_model(args)
        config = FinetuneConfig(epochs=args.ft_epochs, lr=args.ft_lr, batch_size=args.ft_batch, micro_batch_size=4,
                                seed=args.seed)  # fmt: skip
        start = time.perf_counter()
        fastunlearn.finetune(model, seqs, config, folder, tokenizer=tokenizer)
        logger.info("fine-tuned %s on %d pairs in %.0f s", folder.name, len(seqs), time.perf_counter() - start)
    return load_model(model_dir, "float32", "cpu")


def evaluated(path: Path, model, tokenizer, sets, args, reference=None) -> dict:
    """``evaluate_tofu`` of ``model``, cached as JSON in ``path``."""
    from fastunlearn.evals.tofu import save_result

    if path.is_file():
        return json.loads(path.read_text())
    result = evaluate(model, tokenizer, sets, args, reference)
    save_result(result, path)
    return result


def evaluate(model, tokenizer, sets, args, reference=None) -> dict:
    from fastunlearn.evals.tofu import evaluate_tofu

    return evaluate_tofu(model, tokenizer, sets, retain_reference=reference, max_questions=args.eval_questions,
                         batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, template=args.template,
                         seed=args.seed)  # fmt: skip


def summary(result: dict) -> dict:
    """The numbers the hook records (floats): forget quality, model utility, and each set's three."""
    values = {"forget_quality": result.get("forget_quality"), "model_utility": result.get("model_utility")}
    for name in ("forget", "retain", "real_authors", "world_facts"):
        for metric in ("probability", "rouge_l", "truth_ratio"):
            if name in result:
                values[f"{name}_{metric}"] = result[name][metric]
    return values


def unlearn_method(method, target_dir: Path, data: dict, target_eval: dict, retain_eval: dict, folder: Path,
                   args) -> dict:  # fmt: skip
    """One method from the target model, stop="epochs", its hook evaluating TOFU; the runs.jsonl record."""
    from fastunlearn.data.text import UnlearningData
    from fastunlearn.engine import DEFAULT_LR, UnlearnConfig, unlearn
    from fastunlearn.models import load_model

    model, tokenizer = load_model(target_dir, "float32", "cpu")
    lr = DEFAULT_LR[method.params] * args.lr_scale
    config = UnlearnConfig(forget_loss=method.forget_loss, retain_weight=method.retain_weight, params=method.params,
                           rank=args.rank, alpha=2.0 * args.rank, lr=lr, stop="epochs", max_epochs=args.epochs,
                           micro_batch_size=8, seed=args.seed, eval_retain_max=None)  # fmt: skip
    seconds = {"hook_s": 0.0}

    def hook(model, epoch: int) -> dict:
        if epoch == 0:
            return summary(target_eval)  # the target model: evaluated once, for every method
        if epoch not in args.eval_epochs:
            return {}
        start = time.perf_counter()
        result = evaluate(model, tokenizer, data["eval"], args, retain_eval)
        seconds["hook_s"] += time.perf_counter() - start
        logger.info("%s epoch %d: forget quality %.3g, model utility %.4f (%.0f s)", method.name, epoch,
                    result["forget_quality"], result["model_utility"], time.perf_counter() - start)  # fmt: skip
        return summary(result)

    start = time.perf_counter()
    result = unlearn(model, UnlearningData(data["forget"], data["retain"]), config, folder, evaluate_each_epoch=hook)
    log = result.log
    trajectory = [{"epoch": 0, **log["baseline"]["on_epoch"]}]
    trajectory += [{"epoch": e["epoch"], "forget_ma": e["forget_ma"], **e["on_epoch"]}
                   for e in log["tasks"][0]["epochs"] if e.get("on_epoch")]  # fmt: skip
    return {"method": method.name, "params": method.params, "forget_loss": method.forget_loss,
            "retain_weight": method.retain_weight, "lr": lr, "rank": args.rank, "epochs": args.epochs,
            "trainable_percent": log["model"]["trainable_percent"], "success": result.success,
            "forget_ma_before": log["baseline"]["forget"][0]["ma"], "trajectory": trajectory,
            "train_s": log["timings"]["train_s"], "hook_s": seconds["hook_s"], "total_s": log["timings"]["total_s"],
            "wall_s": time.perf_counter() - start, "run_dir": str(folder)}  # fmt: skip


def run_split(split: str, args, cache: Path, runs_file: Path) -> None:
    _, tokenizer = base_model(args)
    data = load_data(args, split, tokenizer)
    settings = {"model": args.model or "real_model", "split": split, "forget_authors": args.forget_authors,
                "forget_pairs": args.forget_pairs,
                "retain_authors": args.retain_authors,
                "template": args.template, "ft_epochs": args.ft_epochs, "ft_lr": args.ft_lr,
                "ft_batch": args.ft_batch, "seed": args.seed}  # fmt: skip
    models = cache / f"{split}-{key(settings)}"
    models.mkdir(parents=True, exist_ok=True)
    logger.info("%s: forget %d pairs, retain %d pairs, evaluation sets %s; cache %s", split, data["sizes"]["forget"],
                data["sizes"]["retain"], data["sizes"]["eval"], models)  # fmt: skip
    eval_key = key({"eval_questions": args.eval_questions, "batch_size": args.batch_size, "seed": args.seed,
                    "max_new_tokens": args.max_new_tokens})  # fmt: skip
    retain_model, _ = finetuned(models / "retain-model", data["retain"], args)
    retain_eval = evaluated(models / f"retain-eval-{eval_key}.json", retain_model, tokenizer, data["eval"], args)
    del retain_model
    target_model, _ = finetuned(models / "target-model", data["target"], args)
    target_eval = evaluated(models / f"target-eval-{eval_key}.json", target_model, tokenizer, data["eval"], args,
                            retain_eval)  # fmt: skip
    del target_model
    head = {"split": split, "settings": settings, "sizes": data["sizes"], "eval_key": eval_key,
            "retain_model": summary(retain_eval), "target_model": summary(target_eval),
            "eval_seconds": {"retain": retain_eval["seconds"], "target": target_eval["seconds"]}}  # fmt: skip
    done = read_runs(runs_file)
    by_name = {m.name: m for m in paper_methods(SCALES["small"])}
    for method in (by_name[name] for name in args.methods):
        run_key = key({**settings, "eval_key": eval_key, "method": method.name, "lr_scale": args.lr_scale,
                       "rank": args.rank, "epochs": args.epochs, "eval_epochs": args.eval_epochs})  # fmt: skip
        if any(r.get("key") == run_key for r in done):
            logger.info("%s %s: finished before, skipped", split, method.name)
            continue
        logger.info("%s %s: unlearning", split, method.name)
        record = unlearn_method(method, models / "target-model" / "model", data, target_eval, retain_eval,
                                models / "runs" / f"{method.slug}-{run_key}", args)  # fmt: skip
        record.update(head, key=run_key)
        with runs_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        done.append(record)
        write_outputs(args.out, done)


def read_runs(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.is_dir():
        print(f"tofu.py: skipped: the TOFU data folder {args.data} does not exist (--data)", file=sys.stderr)
        return 0
    from fastunlearn.engine.progress import log_to_terminal
    from fastunlearn.models import cache_root

    log_to_terminal()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    logging.getLogger("fastunlearn").propagate = False  # its lines once, through log_to_terminal's handler
    cache = args.cache or cache_root() / "tofu"
    args.out.mkdir(parents=True, exist_ok=True)
    runs_file = args.out / "runs.jsonl"
    start = time.perf_counter()
    for split in args.splits:
        run_split(split, args, cache, runs_file)
    write_outputs(args.out, read_runs(runs_file))
    logger.info("done in %.0f s; outputs in %s", time.perf_counter() - start, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
