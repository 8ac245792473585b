"""The ``fastunlearn`` command line: ``unlearn``, ``eval``, ``audit``, ``demo``, ``finetune``, ``info``.

One module per subcommand (its ``add_parser`` and ``run``); this one builds the parser and runs a command.
Every failure ends with one line on stderr, never a traceback, and the exit status ``EXIT_STATUS`` documents:
user mistakes (missing files, bad options, a model that does not load) are 2; anything else (a bug, a full disk)
is 3, with the traceback in a log file that the line names.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
import traceback
from pathlib import Path

from fastunlearn.cli import audit, demo, eval, finetune, info, unlearn
from fastunlearn.cli.common import EXIT_STATUS

EXAMPLES = """examples:
  fastunlearn unlearn --model EleutherAI/gpt-neo-125m --forget forget.csv --retain wiki.txt \\
      --heldout heldout.csv --loss ihl --params fila --rank 16 --out runs/fila-ihl
  torchrun --nproc-per-node 8 -m fastunlearn unlearn --model meta-llama/Llama-2-7b-hf --forget forget.csv \\
      --retain wiki.txt --heldout heldout.csv --dtype bfloat16 --parallel fsdp --out runs/llama-fila
  fastunlearn finetune --model microsoft/phi-1_5 --data tofu_full.json --qa --out runs/tofu-target
  fastunlearn eval --model runs/fila-ihl/merged --set forget=forget.csv --set heldout=heldout.csv
  fastunlearn eval --model runs/fila-ihl/merged --lm-eval-tasks paper --set wikitext=wiki.txt
  fastunlearn eval --model runs/tofu-ihl/merged --tofu data/tofu --retain-model runs/retain99 --json tofu.json
  fastunlearn audit --model runs/fila-ihl/merged --forget forget.csv --heldout heldout.csv \\
      --reference EleutherAI/gpt-neo-125m --retain wiki.txt --out runs/fila-ihl/audit
  fastunlearn demo
  fastunlearn demo --real
"""

# Exceptions that mean the input or the environment is wrong (exit 2). Anything else is a runtime failure (3).
USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                PermissionError, ImportError)  # fmt: skip
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, over quota, over the file size limit
RESUMABLE = ("unlearn", "finetune")  # commands with an OUT run directory that a rerun resumes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastunlearn",
        description="Make language models forget data: fused Inverted Hinge Loss and FILA (arXiv 2408.06621).",
        epilog=EXAMPLES + "\n" + EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (unlearn, eval, audit, demo, finetune, info):
        command.add_parser(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (library messages may span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _error_log(args: argparse.Namespace, argv: list[str]) -> Path | None:
    """The traceback of the exception being handled, written to OUT/.fastunlearn/error.log when OUT is a run's
    directory (so nothing is written where a run never started, nor into a user's directory), else a temporary file;
    None if neither can be written (a full disk). Other ranks of a torchrun launch write error-rank<N>.log."""
    from fastunlearn.engine.outdir import is_run_dir
    from fastunlearn.utils.atomic import PRIVATE

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


def write_failure(exc: BaseException) -> tuple[int, str | None] | None:
    """(errno, file name or None) when ``exc``, or an exception it was raised from, is a write that found no
    space (``DISK_FULL``): an OSError, or another library's error saying so (safetensors' SafetensorError is no
    OSError: its message holds the system's text, e.g. "No space left on device (os error 28)"); else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return exc.errno, exc.filename
        text = str(exc)
        for code in DISK_FULL:
            if os.strerror(code) in text or f"os error {code})" in text:
                return code, None
        exc = exc.__cause__ or exc.__context__
    return None


def _runtime_failure(args: argparse.Namespace, argv: list[str], exc: Exception) -> str:
    """The one line for exit status 3; a full disk (any library's error) names the output being written."""
    full = write_failure(exc)
    if full is not None:
        code, filename = full
        where = getattr(args, "out", None) or getattr(args, "json", None) or filename or "the output"  # not a temporary
        message = f"{os.strerror(code)} writing {where}"
        if args.command in RESUMABLE:
            message += " (free space, then the same command resumes from the last finished epoch)"
        else:
            message += " (free space, then run the same command again)"
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
