"""What the subcommands share: the model loader and the checks whose errors name a flag (exit 2)."""

from __future__ import annotations

import argparse
from pathlib import Path

EXIT_STATUS = """exit status:
  0    forgotten (unlearn, demo: the criterion was met); every probe passed (audit); done (finetune, eval, info);
       a finished run, rerun, prints "already finished" and exits with its own status (remove OUT to run it again)
  1    not forgotten: the run finished without meeting the criterion (its report says why); audit: a probe
       failed (the forgetting does not hold after quantization, relearning or a membership attack: audit.md)
  2    usage or input error: a bad option, a missing or unreadable file, a model or data that cannot be used
  3    runtime failure (a bug, a full disk): the traceback is in OUT/.fastunlearn/error.log once unlearn has
       written to OUT, else in a temporary file; the one line on stderr names it (a full disk: the output, and
       that the same command resumes)
  130  interrupted (Ctrl-C); unlearn and finetune resume from its last finished epoch with the same command
"""
DEFAULT_SEQ_LEN = 200  # the paper's 200-token sequences
TEMPLATES = ("auto", "chat", "plain", "tofu-phi", "tofu-llama2")  # fastunlearn.data.qa.TEMPLATES (a test checks)
TEMPLATE_HELP = ("the QA prompt: chat (the tokenizer's chat template), plain ('Question: {q}\\nAnswer:', loss on "
                 "the answer), tofu-phi (TOFU's Phi-1.5 format: 'Question: {q}\\n' masked, 'Answer: {a}' in the "
                 "loss), tofu-llama2 (TOFU's Llama-2 format: '[INST] {q} [/INST]{a}'), auto (chat if the tokenizer "
                 "has one, else plain)")  # fmt: skip


def load_model(path: str, dtype: str, device=None):
    """(model on ``device``, by default the GPU if there is one; its tokenizer): a model directory, a hub name
    or a ``.gguf`` file (:func:`fastunlearn.models.load_model`); every failure one line naming ``--model``."""
    from fastunlearn import models

    try:
        return models.load_model(path, dtype, device)
    except (ValueError, ImportError) as exc:  # ImportError: the gguf extra is missing
        raise ValueError(f"--model {path}: {exc}") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a local model directory (or a hub name already in the HF cache)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model dtype (float32)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (200 as the paper; unlearn --qa: longest pair)")
    p.add_argument("--text-field", default="text", help="column / field holding the text in csv / jsonl (text)")


def seq_len(args: argparse.Namespace) -> int:
    """``--seq-len`` for text sets (200 when not given; ``--qa`` sets then pad to their longest pair)."""
    return DEFAULT_SEQ_LEN if args.seq_len is None else args.seq_len


def check_seq_len(model, value: int | None, default: int | None) -> None:
    """``--seq-len`` (``value``, else the command's ``default``; None: each set's own length, checked by the
    engine) against the positions the model's config declares: exit 2 before any data is tokenized."""
    from fastunlearn.utils.validate import max_positions

    length, limit = (value if value is not None else default), max_positions(model)
    if length is not None and limit is not None and length > limit:
        given = f"--seq-len {value}" if value is not None else f"--seq-len (default {default})"
        raise ValueError(f"{given} is longer than the model's {limit} positions: give --seq-len {limit} or less")


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


def check_writable_file(path: str, flag: str) -> None:
    """Before any work: ``path`` can be a file written in an existing directory."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path}: is a directory; give a file path")
    if not target.parent.is_dir():
        raise ValueError(f"{flag} {path}: its directory {target.parent} does not exist")
