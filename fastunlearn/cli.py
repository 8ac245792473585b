"""The ``fastunlearn`` command line: ``unlearn``, ``finetune`` (``cli_finetune``), ``eval``, ``demo``, ``info``.

One function per subcommand. Every failure ends with one line on stderr, never a traceback, and the exit
status ``EXIT_STATUS`` documents: user mistakes (missing files, bad options, a model that does not load) are
2; anything else (a bug, a full disk) is 3, with the traceback in a log file that the line names.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
import tempfile
import traceback
from pathlib import Path

from . import cli_info
from .cli_finetune import add_parser as add_finetune_parser
from .cli_tofu import add_tofu_args, run_tofu

EXAMPLES = """examples:
  fastunlearn unlearn --model EleutherAI/gpt-neo-125m --forget forget.csv --retain wiki.txt \\
      --heldout heldout.csv --loss ihl --params fila --rank 16 --out runs/fila-ihl
  torchrun --nproc-per-node 8 -m fastunlearn unlearn --model meta-llama/Llama-2-7b-hf --forget forget.csv \\
      --retain wiki.txt --heldout heldout.csv --dtype bfloat16 --parallel fsdp --out runs/llama-fila
  fastunlearn finetune --model microsoft/phi-1_5 --data tofu_full.json --qa --out runs/tofu-target
  fastunlearn eval --model runs/fila-ihl/merged --set forget=forget.csv --set heldout=heldout.csv
  fastunlearn eval --model runs/fila-ihl/merged --lm-eval-tasks paper --set wikitext=wiki.txt
  fastunlearn eval --model runs/tofu-ihl/merged --tofu data/tofu --retain-model runs/retain99 --json tofu.json
  fastunlearn demo
  fastunlearn demo --real
"""

EXIT_STATUS = """exit status:
  0    forgotten (unlearn, demo: the criterion was met); done (finetune, eval, info)
  1    not forgotten: the run finished without meeting the criterion (its report says why)
  2    usage or input error: a bad option, a missing or unreadable file, a model or data that cannot be used
  3    runtime failure (a bug, a full disk): the traceback is in OUT/.fastunlearn/error.log once unlearn has
       written to OUT, else in a temporary file; the one line on stderr names it
  130  interrupted (Ctrl-C); unlearn and finetune resume from its last finished epoch with the same command
"""
# Exceptions that mean the input or the environment is wrong (exit 2). Anything else is a runtime failure (3).
USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                PermissionError, ImportError)  # fmt: skip
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
RESUMABLE = ("unlearn", "finetune")  # commands with an OUT run directory that a rerun resumes


def _load_model(path: str, dtype: str, device=None):
    """(model on ``device``, by default the GPU if there is one; its tokenizer): a model directory, a hub name
    or a ``.gguf`` file (:func:`fastunlearn.models.load_model`); every failure one line naming ``--model``."""
    from .models import load_model

    try:
        return load_model(path, dtype, device)
    except (ValueError, ImportError) as exc:  # ImportError: the gguf extra is missing
        raise ValueError(f"--model {path}: {exc}") from None


def _unlearn(args: argparse.Namespace) -> int:
    """One process, or every rank of a ``torchrun`` launch (each loads the model onto its own device)."""
    import torch.distributed as dist

    from .cli_data import check_qa_options, unlearning_data
    from .distributed import current, init_from_env
    from .engine import UnlearnConfig, unlearn
    from .engine.progress import log_to_terminal

    check_qa_options(args)
    fila = {"fisher_mode": args.fisher_mode} if args.params == "fila" else {}
    utility = named_sources(args.utility, "--utility")  # before any model loads
    config = UnlearnConfig(
        **_objective_options(args.loss, args.beta, args.gamma),
        forget_loss=args.loss, retain_weight=0.0 if args.no_retain else args.retain_weight, params=args.params,
        rank=args.rank, alpha=args.alpha if args.alpha is not None else 2.0 * args.rank, lr=args.lr,
        max_epochs=args.max_epochs, min_epochs=args.min_epochs, micro_batch_size=args.micro_batch_size,
        stop=args.stop or ("heldout" if args.ma_threshold is None and args.el_threshold is None else "threshold"),
        ma_threshold=args.ma_threshold, el_threshold=args.el_threshold, dtype=args.dtype, seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing, fila=fila, eval_retain_ppl=args.retain is not None,
        parallel=args.parallel, fused_ihl=args.fused_ihl, allow_heldout_overlap=args.allow_heldout_overlap,
        eval_retain_max=args.eval_retain_max or None, fisher_max_examples=args.fisher_max_examples or None,
        cache_heldout_baseline=not args.no_baseline_cache, eval_heldout_el_after=args.heldout_el_after,
    )  # fmt: skip
    log_to_terminal()  # the engine's progress lines (INFO) on stderr
    owns_group = not (dist.is_available() and dist.is_initialized())
    device = init_from_env()  # under torchrun: the process group and this rank's GPU
    if args.parallel == "fsdp" and args.params != "fila" and current().distributed:
        device = "cpu"  # FSDP moves each block to this rank's GPU as it shards it (FILA's setup needs the model whole)
    try:
        model, tokenizer = _load_model(args.model, args.dtype, device)
        data = unlearning_data(args, tokenizer, utility)  # text, or with --qa question/answer pairs
        result = unlearn(model, data, config, args.out, tokenizer=tokenizer, resume=not args.no_resume)
        is_main = current().is_main
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
    if is_main:
        print(f"{'forgotten' if result.success else 'NOT forgotten'}: report in {args.out}/report.md")
    return 0 if result.success else 1


def _objective_options(loss: str, beta: float | None, gamma: float | None) -> dict:
    """``--beta`` / ``--gamma`` as the config fields of ``--loss`` (ValueError for a loss that takes neither)."""
    if beta is not None and loss not in ("npo", "simnpo"):
        raise ValueError(f"--beta is a parameter of --loss npo or simnpo, not of --loss {loss}")
    if gamma is not None and loss != "simnpo":
        raise ValueError(f"--gamma is a parameter of --loss simnpo, not of --loss {loss}")
    for flag, value, ok in (("--beta", beta, "> 0"), ("--gamma", gamma, ">= 0")):
        if value is not None and not (math.isfinite(value) and (value > 0 if ok == "> 0" else value >= 0)):
            raise ValueError(f"{flag} must be a finite number {ok}, got {value!r}")
    options = {} if beta is None else {f"{loss}_beta": beta}
    return options if gamma is None else {**options, "simnpo_gamma": gamma}


def named_sources(specs: list[str] | None, flag: str) -> dict[str, str]:
    """{NAME: FILE} of a repeatable ``flag NAME=FILE`` option, in order; ValueError naming ``flag`` for a spec
    without both parts or a NAME given twice."""
    sources: dict[str, str] = {}
    for spec in specs or []:
        name, sep, source = spec.partition("=")
        if not sep or not name or not source:
            raise ValueError(f"{flag} takes NAME=FILE, got {spec!r}")
        if name in sources:
            raise ValueError(f"{flag} name {name!r} is given twice")
        sources[name] = source
    return sources


def _lm_eval_tasks(spec: str | None) -> list[str]:
    """``--lm-eval-tasks``: comma-separated lm-eval task names; ``paper`` stands for the paper's nine."""
    from .downstream import PAPER_TASKS

    names = [name.strip() for name in (spec or "").split(",") if name.strip()]
    return list(dict.fromkeys(t for name in names for t in (PAPER_TASKS if name == "paper" else [name])))


def _eval(args: argparse.Namespace) -> int:
    from .cli_data import seq_len
    from .data import load_texts, tokenize_sequences
    from .metrics import evaluate

    if args.tofu:
        return run_tofu(args, _load_model)
    sets = named_sources(args.set, "--set")
    tasks = _lm_eval_tasks(args.lm_eval_tasks)
    if not sets and not tasks:
        raise ValueError("nothing to evaluate: give --set NAME=FILE (repeat) and/or --lm-eval-tasks")
    if not tasks and (args.lm_eval_include or args.lm_eval_limit is not None):
        raise ValueError("--lm-eval-include and --lm-eval-limit need --lm-eval-tasks")
    if tasks and args.json and "lm_eval" in sets:
        raise ValueError("--set name 'lm_eval' is taken by the lm-eval results in --json; rename the set")
    if args.json:
        _check_writable_file(args.json, "--json")
    if tasks:
        _check_lm_eval_tasks(tasks, args.lm_eval_include)  # before the model loads
    model, tokenizer = _load_model(args.model, args.dtype)
    results = {}
    if sets:
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
        from .downstream import evaluate_downstream

        downstream = evaluate_downstream(
            model, tokenizer, tasks, include_path=args.lm_eval_include, limit=args.lm_eval_limit
        )
        print(("\n" if sets else "") + downstream.to_markdown())
        results["lm_eval"] = downstream.to_dict()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def _check_writable_file(path: str, flag: str) -> None:
    """Before any work: ``path`` can be a file written in an existing directory."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path}: is a directory; give a file path")
    if not target.parent.is_dir():
        raise ValueError(f"{flag} {path}: its directory {target.parent} does not exist")


def _check_lm_eval_tasks(tasks: list[str], include: str | None) -> None:
    """Unknown task names and a missing lm-eval are user mistakes: one line, exit 2."""
    from .downstream import check_tasks

    try:
        check_tasks(tasks, include_path=include)
    except ImportError as exc:
        raise ValueError(str(exc)) from None


def _demo(args: argparse.Namespace) -> int:
    if args.real:
        from .demo_real import RealDemoConfig
        from .demo_real import main as real_main

        return real_main(RealDemoConfig(seed=args.seed, out_dir=args.out or "fastunlearn-demo-real",
                                        cache_dir=args.cache_dir))  # fmt: skip
    from .demo import DemoConfig, main

    return main(DemoConfig(seed=args.seed, out_dir=args.out or "fastunlearn-demo", cache_dir=args.cache_dir))


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a local model directory (or a hub name already in the HF cache)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model dtype (float32)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (200 as the paper; unlearn --qa: longest pair)")
    p.add_argument("--text-field", default="text", help="column / field holding the text in csv / jsonl (text)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastunlearn",
        description="Make language models forget data: fused Inverted Hinge Loss and FILA (arXiv 2408.06621).",
        epilog=EXAMPLES + "\n" + EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("unlearn", help="make a model forget a data set, measured and saved",
                       description="Unlearn FORGET from MODEL until its extraction likelihood (EL_10) and "
                       "memorization accuracy (MA) fall to the held-out set's level; writes the adapter, the merged "
                       "model, a JSON log, a Markdown report and a plot to OUT.",
                       epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    _add_model_args(p)
    p.add_argument("--forget", required=True, help="text to forget: .txt (one per line), .jsonl, .csv or a dataset")
    p.add_argument("--qa", action="store_true", help="forget / retain / held-out are question/answer pairs (.json, "
                   ".jsonl or a dataset with question, answer): losses and MA / EL on the answers only")  # fmt: skip
    p.add_argument("--template", choices=("auto", "chat", "plain"), help="--qa prompt: the tokenizer's chat "
                   "template, or plain 'Question: ...\\nAnswer:' (auto: chat if the tokenizer has one)")  # fmt: skip
    p.add_argument("--retain", help="text to keep (retain loss, FILA's retain Fisher, perplexity)")
    p.add_argument("--heldout", help="similar text the model never saw: its EL / MA are the target (a held-out "
                   "row that repeats forget text is refused)")  # fmt: skip
    p.add_argument("--allow-heldout-overlap", action="store_true",
                   help="accept held-out rows identical to forget rows or sharing >= 90%% of their 8-token n-grams "
                   "with them (refused by default: the criterion would copy a memorized level)")  # fmt: skip
    p.add_argument("--utility", action="append", metavar="NAME=FILE",
                   help="text never trained on whose perplexity shows what unlearning costs (repeat: wikitext=..., "
                   "pile=...); measured before, every epoch and after on a seeded sample of --eval-retain-max "
                   "sequences")  # fmt: skip
    p.add_argument("--loss", choices=("ihl", "ga", "npo", "simnpo"), default="ihl",
                   help="forget loss: ihl (the paper's), ga (gradient ascent), npo (Zhang et al. 2024; its reference "
                   "log-likelihoods are computed once, no second model), simnpo (Fan et al. 2024) (ihl)")  # fmt: skip
    p.add_argument("--beta", type=float, help="beta of --loss npo (0.1) or simnpo (4.5)")
    p.add_argument("--gamma", type=float, help="margin gamma of --loss simnpo (0.0)")
    p.add_argument("--no-retain", action="store_true", help="no retain loss (plain GA when --loss ga)")
    p.add_argument("--retain-weight", type=float, default=1.0, help="weight of the retain loss (1.0)")
    p.add_argument("--params", choices=("full", "lora", "fila"), default="fila", help="what trains (fila)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (16)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (2 x rank)")
    p.add_argument("--fisher-mode", choices=("per_example", "per_batch"), default="per_example",
                   help="FILA's Fisher estimator (per_example: the paper's Eq. 2)")  # fmt: skip
    p.add_argument("--lr", type=float, help="learning rate (5e-5 full, 2e-4 lora/fila)")
    p.add_argument("--max-epochs", type=int, default=20, help="give up after this many epochs (20)")
    p.add_argument("--min-epochs", type=int, default=1, help="never stop before this many epochs (1)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward/backward (8)")
    p.add_argument("--stop", choices=("heldout", "threshold", "epochs"),  # engine.STOPS (a test checks)
                   help="heldout: at the held-out set's MA / EL (default); threshold: at --ma-threshold / "
                   "--el-threshold (default when given); epochs: run --max-epochs, no criterion (TOFU)")  # fmt: skip
    p.add_argument("--ma-threshold", type=float, help="stop at this forget MA instead of the held-out level")
    p.add_argument("--el-threshold", type=float, help="stop at this forget EL_10 instead of the held-out level")
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    p.add_argument("--fused-ihl", action="store_true",
                   help="forget and retain terms from hidden states: no (B, T, V) logits")  # fmt: skip
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                   help="under torchrun: ddp (a model copy per GPU) or fsdp (FSDP2 shards; with --params full or lora "
                        "the model is loaded on the CPU and sharded onto the GPUs) (ddp)")  # fmt: skip
    p.add_argument("--eval-retain-max", type=int, default=128, metavar="N",
                   help="retain / utility perplexity on a seeded sample of N sequences each; 0: all (128)")  # fmt: skip
    p.add_argument("--fisher-max-examples", type=int, default=128, metavar="N",
                   help="FILA's retain Fisher on a seeded sample of N retain sequences; 0: all (128)")  # fmt: skip
    p.add_argument("--no-baseline-cache", action="store_true",
                   help="measure the held-out set's MA / EL again instead of reading them from the cache "
                        "($FASTUNLEARN_CACHE_DIR, else ~/.cache/fastunlearn)")  # fmt: skip
    p.add_argument("--heldout-el-after", action="store_true",
                   help="after unlearning, measure the held-out set's EL too (costly; MA always)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed (0)")
    p.add_argument("--out", required=True, help="output directory (an interrupted run there is resumed)")
    p.add_argument("--no-resume", action="store_true", help="fail instead of resuming a run found in OUT")
    p.set_defaults(func=_unlearn)

    p = sub.add_parser("eval", help="EL_10 / MA / perplexity of a model on text sets, lm-eval tasks, TOFU")
    _add_model_args(p)
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
    p.set_defaults(func=_eval)

    p = sub.add_parser("demo", help="offline demo: a tiny model memorizes data, then FILA + IHL unlearns it")
    p.add_argument("--seed", type=int, default=0, help="seed for data, model and unlearning (default 0)")
    p.add_argument("--out", help="output directory (./fastunlearn-demo, with --real ./fastunlearn-demo-real); a "
                   "previous demo output there is replaced")  # fmt: skip
    p.add_argument("--real", action="store_true",
                   help="the same story on a real pretrained model: SmolLM2-135M-Instruct (a Q4_1 GGUF, "
                   "dequantized; 93 MB downloaded once) is fine-tuned to memorize the records, then unlearns 12; "
                   "minutes on a CPU")  # fmt: skip
    p.add_argument("--cache-dir", help="where the memorized model is cached ($FASTUNLEARN_CACHE_DIR, else "
                   "~/.cache/fastunlearn)")  # fmt: skip
    p.set_defaults(func=_demo)

    add_finetune_parser(sub)
    p = sub.add_parser("info", help="show which kernels (Triton, C++, torch) this install will use")
    p.set_defaults(func=cli_info.run)
    return parser


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (library messages may span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _error_log(args: argparse.Namespace, argv: list[str]) -> Path | None:
    """The traceback of the exception being handled, written to OUT/.fastunlearn/error.log when OUT is a run's
    directory (so nothing is written where a run never started, nor into a user's directory), else a temporary file;
    None if neither can be written (a full disk). Other ranks of a torchrun launch write error-rank<N>.log."""
    from ._atomic import PRIVATE
    from .engine.outdir import is_run_dir

    rank = os.environ.get("RANK", "0")
    text = f"fastunlearn {' '.join(argv)}\n\n{traceback.format_exc()}"
    out = Path(args.out) if args.command in RESUMABLE else None
    if out is not None and out.is_dir() and is_run_dir(out):
        try:
            path = out / PRIVATE / ("error.log" if rank == "0" else f"error-rank{rank}.log")
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
            return path
        except OSError:
            pass
    try:
        handle, name = tempfile.mkstemp(prefix="fastunlearn-error-", suffix=".log")
        with os.fdopen(handle, "w") as f:
            f.write(text)
        return Path(name)
    except OSError:
        return None


def _runtime_failure(args: argparse.Namespace, argv: list[str], exc: Exception) -> str:
    """The one line for exit status 3; a full disk names the output being written."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        where = exc.filename or getattr(args, "out", None) or getattr(args, "json", None) or "the output"
        message = f"{os.strerror(exc.errno)} writing {where}"
        if args.command in RESUMABLE:
            message += " (free space, then the same command resumes from the last finished epoch)"
    else:
        message = f"{type(exc).__name__}: {_one_line(exc)}"
    log = _error_log(args, argv)
    return message + (f" (traceback in {log})" if log else "")


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit status (``EXIT_STATUS``)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)  # a usage error exits 2 here (argparse)
    try:
        return args.func(args)
    except USAGE_ERRORS as exc:  # user mistakes: a message, not a traceback
        print(f"fastunlearn {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " (the same command resumes from the last finished epoch)" if args.command in RESUMABLE else ""
        print(f"fastunlearn {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a runtime failure: one line, the traceback in a log file
        print(f"fastunlearn {args.command}: failed: {_runtime_failure(args, argv, exc)}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
