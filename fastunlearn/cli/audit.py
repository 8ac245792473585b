"""``fastunlearn audit``: does the forgetting hold after quantization, a few fine-tuning steps, a membership
attack? Runs :func:`fastunlearn.evals.audit.audit` and writes ``OUT/audit.json`` and ``OUT/audit.md``.

    fastunlearn audit --model runs/fila-ihl/merged --forget forget.csv --heldout heldout.csv \\
        --reference SmolLM2-135M-Instruct.Q4_1.gguf --retain wiki.txt --out runs/fila-ihl/audit

Exit status: 0 when every probe passes, 1 when one fails, 2 for bad input (before any compute), 3 runtime failure.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastunlearn.cli.common import EXIT_STATUS, add_model_args, load_model, seq_len


def add_parser(sub) -> None:
    from fastunlearn.evals.audit.config import DEFAULT_FORMATS, PROBES, SLOW_FORMATS

    p = sub.add_parser("audit", help="does the forgetting hold under quantization, relearning, membership attacks?",
                       description="Audit an unlearned MODEL: the forget set's MA / EL_10 after round-tripping the "
                       "weights through quantized formats, after a few fine-tuning steps, and membership-inference "
                       "AUCs; a one-line verdict per probe. Writes OUT/audit.json and OUT/audit.md.",
                       epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_model_args(p)
    p.add_argument("--forget", required=True, help="the text that was unlearned: .txt, .jsonl, .csv or a dataset")
    p.add_argument("--heldout", required=True, help="similar text the model never saw (the criterion's level)")
    p.add_argument("--reference", metavar="R", help="the model before unlearning (directory, hub name or .gguf): "
                   "the held-out level on Q(R) and the MA that unlearning removed come from it")  # fmt: skip
    p.add_argument("--retain", help="text for the benign fine-tune of the relearning probe")
    p.add_argument("--retrain", metavar="M", help="a model trained without the forget set: the membership AUC "
                   "PrivLeak compares with (default: the ideal 0.5)")  # fmt: skip
    p.add_argument("--probes", default=",".join(PROBES), help=f"comma-separated, any of {', '.join(PROBES)} (all)")
    p.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                   help=f"quantization formats ({','.join(DEFAULT_FORMATS)}); also {', '.join(SLOW_FORMATS)} "
                   "(their scale search: 7 to 11 CPU s for 135M weights, 5x nf4), q5_1")  # fmt: skip
    p.add_argument("--no-gguf-formats", action="store_true",
                   help="when --model is a .gguf file, do not also audit the file's own tensor types")  # fmt: skip
    p.add_argument("--el-n", type=int, default=10, help="n of EL_n (10)")
    p.add_argument("--max-sequences", type=int, default=128, metavar="N",
                   help="a seeded sample of at most N sequences of each set; 0: all (128)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward when measuring (16)")
    p.add_argument("--relearn-steps", type=int, default=10, help="relearning: AdamW steps (10)")
    p.add_argument("--relearn-lr", type=float, default=1e-4, help="relearning: AdamW learning rate (1e-4)")
    p.add_argument("--relearn-rows", type=int, default=2, help="relearning: rows trained on (2)")
    p.add_argument("--relearn-trials", type=int, default=1, help="relearning: seeded draws of the rows, averaged (1)")
    p.add_argument("--pre-ma", type=float, help="the forget set's MA before unlearning (without --reference)")
    p.add_argument("--pre-el", type=float, help="the forget set's EL_n before unlearning (without --reference)")
    p.add_argument("--min-k", type=float, default=0.2, help="membership: k of Min-K%% and Min-K%%++ (0.2)")
    p.add_argument("--membership-z", type=float, default=2.5, help="membership: an AUC this many null standard "
                   "deviations from the target fails (2.5)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed (0)")
    p.add_argument("--out", required=True, help="output directory: audit.json and audit.md are written there (an "
                   "audit.json / audit.md that fastunlearn did not write is refused)")  # fmt: skip
    p.set_defaults(func=run)


def _names(spec: str, flag: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in spec.split(",") if name.strip())
    if not names:
        raise ValueError(f"{flag} names nothing")
    return names


def config_from_args(args: argparse.Namespace):
    """The AuditConfig of the flags; ValueError naming the flag."""
    from fastunlearn.evals.audit import AuditConfig

    flags = {"probes": "--probes", "formats": "--formats", "el_n": "--el-n", "max_sequences": "--max-sequences",
             "batch_size": "--batch-size", "relearn_steps": "--relearn-steps", "relearn_lr": "--relearn-lr",
             "relearn_rows": "--relearn-rows", "relearn_trials": "--relearn-trials", "pre_ma": "--pre-ma",
             "pre_el": "--pre-el", "min_k": "--min-k", "membership_z": "--membership-z", "seed": "--seed"}  # fmt: skip
    values = {name: getattr(args, flag[2:].replace("-", "_")) for name, flag in flags.items()}
    values["probes"] = _names(args.probes, "--probes")
    values["formats"] = _names(args.formats, "--formats") if "quantization" in values["probes"] else ()
    values["max_sequences"] = args.max_sequences or None
    try:
        return AuditConfig(**values)
    except ValueError as exc:
        field = str(exc).split(" ", 1)[0]
        raise ValueError(f"{flags.get(field, field)}{str(exc).removeprefix(field)}") from None


def _load(path: str, flag: str, dtype: str, device):
    from fastunlearn import models

    try:
        return models.load_model(path, dtype, device)
    except (ValueError, ImportError) as exc:
        raise ValueError(f"{flag} {path}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    from fastunlearn.data.text import load_texts, tokenize_sequences
    from fastunlearn.engine.progress import log_to_terminal
    from fastunlearn.evals.audit import audit
    from fastunlearn.evals.audit.report import check_out_dir

    cfg = config_from_args(args)  # every flag checked before a model loads
    if (args.pre_ma is not None or args.pre_el is not None) and args.reference:
        raise ValueError("--pre-ma / --pre-el stand in for --reference: give one or the other")
    if args.seq_len is not None and args.seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {args.seq_len}")
    check_out_dir(args.out)
    texts = {name: load_texts(source, text_field=args.text_field, role=f"{name} set")
             for name, source in (("forget", args.forget), ("held-out", args.heldout), ("retain", args.retain))
             if source is not None}  # fmt: skip
    log_to_terminal()  # progress lines with the ETA on stderr
    model, tokenizer = load_model(args.model, args.dtype)
    device = next(model.parameters()).device
    reference = _load(args.reference, "--reference", args.dtype, device)[0] if args.reference else None
    retrain = _load(args.retrain, "--retrain", args.dtype, device)[0] if args.retrain else None
    sets = {
        name: tokenize_sequences(rows, tokenizer, seq_len=seq_len(args), mode="pack" if name == "retain" else
                                 "truncate", role=f"{name} set")
        for name, rows in texts.items()
    }  # fmt: skip
    if "relearning" in cfg.probes:
        for name in ("forget", "held-out"):
            rows = len(sets[name]) if cfg.max_sequences is None else min(len(sets[name]), cfg.max_sequences)
            if rows <= cfg.relearn_rows:
                raise ValueError(f"--relearn-rows {cfg.relearn_rows} leaves no {name} row to score: the {name} set "
                                 f"has {rows} rows")  # fmt: skip
    gguf = args.model if Path(args.model).suffix == ".gguf" and not args.no_gguf_formats else None
    result = audit(model, sets["forget"], sets["held-out"], reference=reference, retain=sets.get("retain"),
                   retrain=retrain, tokenizer=tokenizer, gguf=gguf, config=cfg, out_dir=args.out)  # fmt: skip
    for probe, line in result.verdicts.items():
        print(f"{probe}: {line}")
    print(f"{'PASSED' if result.passed else 'FAILED'}: report in {result.markdown_path}")
    return 0 if result.passed else 1
