"""``fastunlearn eval``: a model's MA / EL_n / perplexity on text sets, lm-evaluation-harness tasks, or TOFU's
forget quality and model utility (``--tofu DIR``).

    fastunlearn eval --model runs/unlearned/merged --tofu ../shared/data/tofu --retain-model runs/retain99 \\
        --forget-split forget01 --json tofu.json

``--retain-model`` is the model fine-tuned on the retain split only (its forget-set truth ratios are the KS test's
reference), or the ``--json`` file of an earlier ``eval --tofu`` of that model (no second model loads); a file made
on other forget questions or with another ``--template`` is refused (exit 2). As TOFU by default: the first 300
questions of each set, greedy answers until prompt + answer reach 200 tokens (``--template tofu-phi`` or
``tofu-llama2`` for TOFU's prompt formats).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastunlearn.cli.common import (
    DEFAULT_SEQ_LEN,
    TEMPLATE_HELP,
    TEMPLATES,
    add_model_args,
    check_seq_len,
    check_writable_file,
    load_model,
    named_sources,
    seq_len,
)
from fastunlearn.utils.atomic import atomic_write


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="EL_10 / MA / perplexity of a model on text sets, lm-eval tasks, TOFU")
    add_model_args(p)
    p.add_argument("--set", action="append", metavar="NAME=FILE", help="a set to measure (repeat)")
    p.add_argument("--metrics", default="ma,el,ppl", help="comma-separated: ma, el, ppl (all three)")
    p.add_argument("--el-n", type=int, default=10, help="n of EL_n (10)")
    p.add_argument("--json", help="also write the results to this JSON file (lm-eval's under the key lm_eval)")
    p.add_argument("--lm-eval-tasks", metavar="TASKS",
                   help="comma-separated lm-eval tasks to run too; 'paper': the paper's nine reasoning tasks "
                   '(needs pip install "fastunlearn[lm-eval]")')  # fmt: skip
    p.add_argument("--lm-eval-include", metavar="DIR", help="a directory of your own lm-eval task YAMLs "
                   "(their data_files: absolute paths)")  # fmt: skip
    p.add_argument("--lm-eval-limit", type=int, metavar="N", help="only the first N examples of each task (a check)")
    add_tofu_args(p)
    p.set_defaults(func=run)


def add_tofu_args(p: argparse.ArgumentParser) -> None:
    """The TOFU options of ``fastunlearn eval``."""
    p.add_argument("--tofu", metavar="DIR", help="evaluate on TOFU: a directory of its JSON files (forget01.json, "
                   "retain_perturbed.json, real_authors_perturbed.json, world_facts_perturbed.json); needs "
                   'pip install "fastunlearn[tofu]"')  # fmt: skip
    p.add_argument("--retain-model", metavar="M", help="with --tofu: the retain model (a model directory, hub name or "
                   ".gguf) or the --json of its earlier --tofu evaluation; gives the forget quality")  # fmt: skip
    p.add_argument("--forget-split", default="forget01", help="with --tofu: forget01, forget05 or forget10 (forget01)")
    p.add_argument("--tofu-max-questions", type=int, default=300, metavar="N",
                   help="with --tofu: the first N questions of each set, TOFU's ds_size; 0: all (300)")  # fmt: skip
    p.add_argument("--tofu-max-length", type=int, default=200, metavar="L",
                   help="with --tofu: greedy answers end where prompt + answer reach L tokens, TOFU's "
                   "max_length; 0: no such bound (200)")  # fmt: skip
    p.add_argument("--tofu-max-new-tokens", type=int, metavar="T",
                   help="with --tofu: also end greedy answers after T tokens (not TOFU's protocol; none)")  # fmt: skip
    p.add_argument("--tofu-batch-size", type=int, default=16, metavar="B", help="with --tofu: rows per forward (16)")
    p.add_argument("--template", choices=TEMPLATES, default="auto", help=f"with --tofu: {TEMPLATE_HELP}")


def run(args: argparse.Namespace) -> int:
    from fastunlearn.data.text import load_texts, tokenize_sequences
    from fastunlearn.evals.metrics import evaluate

    if args.tofu:
        return run_tofu(args)
    sets = named_sources(args.set, "--set")
    tasks = lm_eval_tasks(args.lm_eval_tasks)
    if not sets and not tasks:
        raise ValueError("nothing to evaluate: give --set NAME=FILE (repeat) and/or --lm-eval-tasks")
    if not tasks and (args.lm_eval_include or args.lm_eval_limit is not None):
        raise ValueError("--lm-eval-include and --lm-eval-limit need --lm-eval-tasks")
    if tasks and args.json and "lm_eval" in sets:
        raise ValueError("--set name 'lm_eval' is taken by the lm-eval results in --json; rename the set")
    if args.json:
        check_writable_file(args.json, "--json")
    if tasks:
        check_lm_eval_tasks(tasks, args.lm_eval_include)  # before the model loads
    model, tokenizer = load_model(args.model, args.dtype)
    results = {}
    if sets:
        check_seq_len(model, args.seq_len, DEFAULT_SEQ_LEN)
        tokens = {
            name: tokenize_sequences(load_texts(source, text_field=args.text_field, role=f"{name} set"), tokenizer,
                                     seq_len=seq_len(args), role=f"{name} set").input_ids
            for name, source in sets.items()
        }  # fmt: skip
        results = evaluate(model, tokens, metrics=tuple(args.metrics.split(",")), n=args.el_n)
        print(f"{'set':12}" + "".join(f"{m:>10}" for m in args.metrics.split(",")))
        for name, row in results.items():
            print(f"{name:12}" + "".join(f"{v:>10.4f}" for v in row.values()))
    if tasks:
        from fastunlearn.evals.downstream import evaluate_downstream

        downstream = evaluate_downstream(
            model, tokenizer, tasks, include_path=args.lm_eval_include, limit=args.lm_eval_limit
        )
        print(("\n" if sets else "") + downstream.to_markdown())
        results["lm_eval"] = downstream.to_dict()
    if args.json:  # atomically: a full disk leaves the file as it was, never a partial one
        atomic_write(Path(args.json), json.dumps(results, indent=1))
    return 0


def lm_eval_tasks(spec: str | None) -> list[str]:
    """``--lm-eval-tasks``: comma-separated lm-eval task names; ``paper`` stands for the paper's nine."""
    from fastunlearn.evals.downstream import PAPER_TASKS

    names = [name.strip() for name in (spec or "").split(",") if name.strip()]
    return list(dict.fromkeys(t for name in names for t in (PAPER_TASKS if name == "paper" else [name])))


def check_lm_eval_tasks(tasks: list[str], include: str | None) -> None:
    """Unknown task names and a missing lm-eval are user mistakes: one line, exit 2."""
    from fastunlearn.evals.downstream import check_tasks

    try:
        check_tasks(tasks, include_path=include)
    except ImportError as exc:
        raise ValueError(str(exc)) from None


def run_tofu(args: argparse.Namespace) -> int:
    """``eval --tofu``: check everything cheap first, then evaluate the retain model (unless a JSON) and the model,
    print the table, write ``--json``."""
    from fastunlearn.engine.progress import log_to_terminal
    from fastunlearn.evals.tofu import (
        evaluate_tofu,
        format_table,
        load_tofu_sets,
        reference_key,
        reference_values,
        save_result,
    )

    if args.set or args.lm_eval_tasks:
        raise ValueError("--tofu runs alone: drop --set / --lm-eval-tasks (run them in another eval)")
    if args.tofu_max_questions < 0 or args.tofu_max_length < 0 or args.tofu_batch_size < 1:
        raise ValueError("--tofu-max-questions and --tofu-max-length must be >= 0 and --tofu-batch-size >= 1")
    if args.tofu_max_new_tokens is not None and args.tofu_max_new_tokens < 1:
        raise ValueError(f"--tofu-max-new-tokens must be >= 1, got {args.tofu_max_new_tokens}")
    if not args.tofu_max_length and args.tofu_max_new_tokens is None:
        raise ValueError("--tofu-max-length 0 needs --tofu-max-new-tokens: greedy answers must end")
    if args.json:
        check_writable_file(args.json, "--json")
    sets = load_tofu_sets(args.tofu, args.forget_split)
    options = {"max_questions": args.tofu_max_questions or None, "batch_size": args.tofu_batch_size,
               "max_length": args.tofu_max_length or None, "max_new_tokens": args.tofu_max_new_tokens,
               "template": args.template}  # fmt: skip
    log_to_terminal()  # progress lines with the ETA on stderr
    reference = None
    if args.retain_model and Path(args.retain_model).suffix == ".json":
        template = None if args.template == "auto" else args.template  # "auto": checked once the tokenizer loads
        reference_values(args.retain_model, reference_key(sets["forget"], options["max_questions"], template))
        reference = args.retain_model  # before the model loads; evaluate_tofu checks it again, template resolved
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
