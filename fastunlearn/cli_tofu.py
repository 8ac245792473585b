"""``fastunlearn eval --tofu DIR``: TOFU's forget quality and model utility of ``--model`` (fastunlearn.tofu).

    fastunlearn eval --model runs/unlearned/merged --tofu ../shared/data/tofu --retain-model runs/retain99 \\
        --forget-split forget01 --json tofu.json

``--retain-model`` is the model fine-tuned on the retain split only (its forget-set truth ratios are the KS test's
reference), or the ``--json`` file of an earlier ``eval --tofu`` of that model (no second model loads).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_tofu_args(p: argparse.ArgumentParser) -> None:
    """The TOFU options of ``fastunlearn eval``."""
    p.add_argument("--tofu", metavar="DIR", help="evaluate on TOFU: a directory of its JSON files (forget01.json, "
                   "retain_perturbed.json, real_authors_perturbed.json, world_facts_perturbed.json); needs "
                   'pip install "fastunlearn[tofu]"')  # fmt: skip
    p.add_argument("--retain-model", metavar="M", help="with --tofu: the retain model (a model directory, hub name or "
                   ".gguf) or the --json of its earlier --tofu evaluation; gives the forget quality")  # fmt: skip
    p.add_argument("--forget-split", default="forget01", help="with --tofu: forget01, forget05 or forget10 (forget01)")
    p.add_argument("--tofu-max-questions", type=int, default=40, metavar="N",
                   help="with --tofu: a seeded sample of N questions per set; 0: all (40)")  # fmt: skip
    p.add_argument("--tofu-batch-size", type=int, default=16, metavar="B", help="with --tofu: rows per forward (16)")
    p.add_argument("--template", choices=("auto", "chat", "plain"), default="auto",
                   help="with --tofu: the QA prompt: chat (the tokenizer's chat template), plain ('Question: ... "
                   "Answer:'), auto (chat when the tokenizer has one)")  # fmt: skip


def run_tofu(args: argparse.Namespace, load_model) -> int:
    """``eval --tofu``: check everything cheap first, then evaluate the retain model (unless a JSON) and the model,
    print the table, write ``--json``. ``load_model(path, dtype)`` is the CLI's loader (one-line errors)."""
    from .engine.progress import log_to_terminal
    from .tofu import evaluate_tofu, format_table, load_tofu_sets, reference_values, save_result

    if args.set or args.lm_eval_tasks:
        raise ValueError("--tofu runs alone: drop --set / --lm-eval-tasks (run them in another eval)")
    if args.tofu_max_questions < 0 or args.tofu_batch_size < 1:
        raise ValueError("--tofu-max-questions must be >= 0 and --tofu-batch-size >= 1")
    if args.json:
        from .cli import _check_writable_file

        _check_writable_file(args.json, "--json")
    sets = load_tofu_sets(args.tofu, args.forget_split)
    options = {"max_questions": args.tofu_max_questions or None, "batch_size": args.tofu_batch_size,
               "template": args.template}  # fmt: skip
    log_to_terminal()  # progress lines with the ETA on stderr
    reference = None
    if args.retain_model and Path(args.retain_model).suffix == ".json":
        reference = reference_values(args.retain_model)
    elif args.retain_model:
        retain, tokenizer = load_model(args.retain_model, args.dtype)
        reference = evaluate_tofu(retain, tokenizer, {"forget": sets["forget"]}, **options)
        del retain
    model, tokenizer = load_model(args.model, args.dtype)
    result = evaluate_tofu(model, tokenizer, sets, retain_reference=reference, **options)
    result["forget_split"] = args.forget_split
    print(format_table(result, args.forget_split))
    print(
        f"({result['seconds']:.0f} s; forget quality: KS p-value of the forget-set truth ratios against the retain "
        "model; model utility: harmonic mean of the 9 retain / real_authors / world_facts numbers)"
    )
    if args.json:
        save_result(result, args.json)
    return 0
