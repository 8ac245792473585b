"""``fastunlearn unlearn``: make a model forget a set until it is at the held-out level; the engine does the work
(:func:`fastunlearn.unlearn`), this module turns flags into its config and data."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from fastunlearn.cli.common import (
    DEFAULT_SEQ_LEN,
    EXIT_STATUS,
    TEMPLATE_HELP,
    TEMPLATES,
    add_model_args,
    check_seq_len,
    load_model,
    named_sources,
    seq_len,
)

# engine.config.DEPLOY_QUANTS (a test checks; written out here so that --help does not import torch)
DEPLOY_QUANTS = ("none", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q6_k", "nf4", "gguf")


def add_parser(sub) -> None:
    p = sub.add_parser("unlearn", help="make a model forget a data set, measured and saved",
                       description="Unlearn FORGET from MODEL until its extraction likelihood (EL_10) and "
                       "memorization accuracy (MA) fall to the held-out set's level; writes the adapter, the merged "
                       "model, a JSON log, a Markdown report and a plot to OUT.",
                       epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_model_args(p)
    p.add_argument("--forget", required=True, help="text to forget: .txt (one per line), .jsonl, .csv or a dataset")
    p.add_argument("--qa", action="store_true", help="forget / retain / held-out are question/answer pairs (.json, "
                   ".jsonl or a dataset with question, answer): losses and MA / EL on the answers only")  # fmt: skip
    p.add_argument("--template", choices=TEMPLATES, help=f"--qa: {TEMPLATE_HELP} (auto)")
    p.add_argument("--retain", help="text to keep (retain loss, FILA's retain Fisher, perplexity)")
    p.add_argument("--heldout", help="similar text the model never saw: its EL / MA are the target (a held-out "
                   "row that repeats forget text is refused)")  # fmt: skip
    p.add_argument("--allow-heldout-overlap", action="store_true",
                   help="accept held-out rows identical to forget rows or sharing >= 90%% of their 8-token n-grams "
                   "with them (refused by default: the criterion would copy a memorized level)")  # fmt: skip
    p.add_argument("--utility", action="append", metavar="NAME=FILE",
                   help="text never trained on whose perplexity shows what unlearning costs (repeat: wikitext=..., "
                   "pile=...); measured before and after (--eval-every: also every K epochs) on a seeded sample "
                   "of --eval-retain-max sequences")  # fmt: skip
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
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="forget sequences per optimizer update: an epoch is ceil(|forget| / N) updates (TOFU: 32); "
                   "default: the whole forget set, one update per epoch (the paper's TDEC protocol)")  # fmt: skip
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
    p.add_argument("--fisher-max-examples", type=int, default=32, metavar="N",
                   help="FILA's retain Fisher on a seeded sample of N retain sequences; 0: all (32)")  # fmt: skip
    p.add_argument("--eval-every", type=int, default=0, metavar="K",
                   help="retain / utility perplexities also after every K-th epoch; 0: only before and after "
                        "unlearning (the forget MA, and EL once MA is met, are measured every epoch) (0)")  # fmt: skip
    p.add_argument("--no-baseline-cache", action="store_true",
                   help="measure the held-out set's MA / EL again instead of reading them from the cache "
                        "($FASTUNLEARN_CACHE_DIR, else ~/.cache/fastunlearn)")  # fmt: skip
    p.add_argument("--heldout-el-after", action="store_true",
                   help="after unlearning, measure the held-out set's EL too (costly; MA always)")  # fmt: skip
    p.add_argument("--deploy-quant", choices=DEPLOY_QUANTS, default="none", metavar="FORMAT",
                   help="also meet the criterion on the model deployed in FORMAT (adapters merged, every weight "
                   "matrix quantized and dequantized), against the held-out set's values on the original model "
                   "deployed so: none, " + ", ".join(DEPLOY_QUANTS[1:-1]) + ", or gguf (the tensor types of the "
                   ".gguf --model) (none)")  # fmt: skip
    p.add_argument("--quant-aware", choices=DEPLOY_QUANTS, default="none", metavar="FORMAT",
                   help="train at the weights deployed in FORMAT (straight-through estimator): the forgetting must "
                   "cross quantization buckets; one quantization per epoch (none)")  # fmt: skip
    p.add_argument("--no-gguf", action="store_true",
                   help="with a .gguf --model, do not write OUT/merged.gguf (written by default: the input file's "
                   "metadata, tokenizer and tensor types, re-quantized from the merged model)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed (0)")
    p.add_argument("--out", required=True, help="output directory (an interrupted run there is resumed)")
    p.add_argument("--no-resume", action="store_true", help="fail instead of resuming a run found in OUT")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """One process, or every rank of a ``torchrun`` launch (each loads the model onto its own device)."""
    import torch.distributed as dist

    from fastunlearn.engine import UnlearnConfig, unlearn
    from fastunlearn.engine.outdir import RunFinished
    from fastunlearn.engine.progress import log_to_terminal
    from fastunlearn.utils.distributed import current, init_from_env

    check_qa_options(args)
    template = gguf_template(args)
    fila = {"fisher_mode": args.fisher_mode} if args.params == "fila" else {}
    utility = named_sources(args.utility, "--utility")  # before any model loads
    config = UnlearnConfig(
        **objective_options(args.loss, args.beta, args.gamma),
        forget_loss=args.loss, retain_weight=0.0 if args.no_retain else args.retain_weight, params=args.params,
        rank=args.rank, alpha=args.alpha if args.alpha is not None else 2.0 * args.rank, lr=args.lr,
        max_epochs=args.max_epochs, min_epochs=args.min_epochs, batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        stop=args.stop or ("heldout" if args.ma_threshold is None and args.el_threshold is None else "threshold"),
        ma_threshold=args.ma_threshold, el_threshold=args.el_threshold, dtype=args.dtype, seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing, fila=fila, eval_retain_ppl=args.retain is not None,
        parallel=args.parallel, fused_ihl=args.fused_ihl, allow_heldout_overlap=args.allow_heldout_overlap,
        eval_retain_max=args.eval_retain_max or None, fisher_max_examples=args.fisher_max_examples or None,
        cache_heldout_baseline=not args.no_baseline_cache, eval_heldout_el_after=args.heldout_el_after,
        deploy_quant=args.deploy_quant, quant_aware=args.quant_aware, gguf_template=template,
        write_gguf=not args.no_gguf, eval_every=args.eval_every,
    )  # fmt: skip
    log_to_terminal()  # the engine's progress lines (INFO) on stderr
    owns_group = not (dist.is_available() and dist.is_initialized())
    device = init_from_env()  # under torchrun: the process group and this rank's GPU
    if args.parallel == "fsdp" and args.params != "fila" and current().distributed:
        device = "cpu"  # FSDP moves each block to this rank's GPU as it shards it (FILA's setup needs the model whole)
    try:
        model, tokenizer = load_model(args.model, args.dtype, device)
        check_seq_len(model, args.seq_len, None if args.qa and not utility else DEFAULT_SEQ_LEN)
        data = unlearning_data(args, tokenizer, utility)  # text, or with --qa question/answer pairs
        is_main = current().is_main
        try:
            result = unlearn(model, data, config, args.out, tokenizer=tokenizer, resume=not args.no_resume)
        except RunFinished as done:  # a rerun of a finished command: its outcome, nothing redone
            success = done.log.get("success") is True
            if is_main:
                print(f"already finished: {'forgotten' if success else 'NOT forgotten'}: report in {args.out}/"
                      f"report.md (to run it again, remove {args.out} or choose another --out)")  # fmt: skip
            return 0 if success else 1
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
    if is_main:
        print(f"{'forgotten' if result.success else 'NOT forgotten'}: report in {args.out}/report.md")
    return 0 if result.success else 1


def objective_options(loss: str, beta: float | None, gamma: float | None) -> dict:
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


def gguf_template(args: argparse.Namespace) -> str | None:
    """The .gguf ``--model`` as the template of merged.gguf and of ``gguf`` formats (None for another model);
    ValueError for a ``gguf`` format or ``--no-gguf`` without one."""
    if args.model.endswith(".gguf"):
        return str(Path(args.model).expanduser().resolve())
    for flag, value in (("--deploy-quant", args.deploy_quant), ("--quant-aware", args.quant_aware)):
        if value == "gguf":
            raise ValueError(f"{flag} gguf takes the tensor types of a .gguf --model; --model {args.model} is none")
    if args.no_gguf:
        raise ValueError(f"--no-gguf turns off merged.gguf, written only for a .gguf --model; --model {args.model} "
                         "is none")  # fmt: skip
    return None


def check_qa_options(args: argparse.Namespace) -> None:
    """Before any model loads: ``--template`` formats question/answer pairs, so it needs ``--qa``."""
    if args.template is not None and not args.qa:
        raise ValueError("--template formats question/answer pairs: it needs --qa")


def unlearning_data(args: argparse.Namespace, tokenizer, utility: dict[str, str]):
    """The ``UnlearningData`` of ``--forget``, ``--retain``, ``--heldout`` (and ``--utility``, always text)."""
    from fastunlearn.data.qa import load_qa_data
    from fastunlearn.data.text import load_unlearning_data

    sets = (tokenizer, args.forget, args.retain, args.heldout)
    if args.qa:
        return load_qa_data(
            *sets, seq_len=args.seq_len, template=args.template or "auto", utility=utility,
            utility_seq_len=seq_len(args), text_field=args.text_field,
        )  # fmt: skip
    return load_unlearning_data(*sets, seq_len=seq_len(args), text_field=args.text_field, utility=utility)
