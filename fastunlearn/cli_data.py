"""The command line's data: ``fastunlearn unlearn``'s sets as text (``data.load_unlearning_data``) or, with
``--qa``, as question/answer pairs (``qa.load_qa_data``: losses and metrics on the answers only)."""

from __future__ import annotations

import argparse

DEFAULT_SEQ_LEN = 200  # the paper's 200-token sequences


def seq_len(args: argparse.Namespace) -> int:
    """``--seq-len`` for text sets (200 when not given; ``--qa`` sets then pad to their longest pair)."""
    return DEFAULT_SEQ_LEN if args.seq_len is None else args.seq_len


def check_qa_options(args: argparse.Namespace) -> None:
    """Before any model loads: ``--template`` formats question/answer pairs, so it needs ``--qa``."""
    if args.template is not None and not args.qa:
        raise ValueError("--template formats question/answer pairs: it needs --qa")


def unlearning_data(args: argparse.Namespace, tokenizer, utility: dict[str, str]):
    """The ``UnlearningData`` of ``--forget``, ``--retain``, ``--heldout`` (and ``--utility``, always text)."""
    from .data import load_unlearning_data
    from .qa import load_qa_data

    sets = (tokenizer, args.forget, args.retain, args.heldout)
    if args.qa:
        return load_qa_data(
            *sets, seq_len=args.seq_len, template=args.template or "auto", utility=utility,
            utility_seq_len=seq_len(args), text_field=args.text_field,
        )  # fmt: skip
    return load_unlearning_data(*sets, seq_len=seq_len(args), text_field=args.text_field, utility=utility)
