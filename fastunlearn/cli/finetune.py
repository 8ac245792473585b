"""``fastunlearn finetune``: supervised fine-tuning of a model on question/answer pairs (``--qa``: the loss on
the answers only) or on plain text (packed into ``--seq-len`` blocks), with :func:`fastunlearn.finetune`.
Failures and exit statuses as for the other subcommands (``fastunlearn.cli.app``)."""

from __future__ import annotations

import argparse

from fastunlearn.cli.common import TEMPLATE_HELP, TEMPLATES, check_seq_len, load_model

EXAMPLE = """example (TOFU's target model: every author, 5 epochs, batch 32, lr 1e-5, one epoch of warmup):
  fastunlearn finetune --model microsoft/phi-1_5 --data tofu_full.json --qa --template plain \\
      --epochs 5 --lr 1e-5 --batch-size 32 --micro-batch-size 4 --out runs/tofu-target

writes OUT/model (a transformers model with its tokenizer) and OUT/log.json (loss per step and epoch); an
interrupted run resumes from its last finished epoch with the same command.
"""
TEXT_SEQ_LEN = 256  # plain text: tokens per packed block unless --seq-len


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model on question/answer pairs or text (e.g. TOFU's target)",
                       description="Supervised fine-tuning of every weight of MODEL on DATA with AdamW; writes "
                       "OUT/model (transformers + tokenizer) and OUT/log.json.", epilog=EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", required=True, help="a model directory, a hub name or a .gguf file")
    p.add_argument("--data", required=True, help="--qa: .json / .jsonl question/answer records or a dataset; "
                   "else text: .txt, .jsonl, .csv or a dataset")  # fmt: skip
    p.add_argument("--qa", action="store_true", help="DATA holds question/answer pairs: train on the answers only")
    p.add_argument("--template", choices=TEMPLATES, default="auto", help=f"--qa: {TEMPLATE_HELP} (auto)")
    p.add_argument("--question-field", default="question", help="--qa: the question's field (question)")
    p.add_argument("--answer-field", default="answer", help="--qa: the answer's field (answer)")
    p.add_argument("--text-field", default="text", help="text: the field / column in .jsonl / .csv (text)")
    p.add_argument("--seq-len", type=int, help=f"tokens per row: --qa the longest pair (a longer one is an "
                   f"error), text {TEXT_SEQ_LEN} (packed blocks)")  # fmt: skip
    p.add_argument("--epochs", type=int, default=5, help="passes over DATA (5)")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (1e-5)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per optimizer update (32)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="rows per forward/backward (4); the update "
                   "does not depend on it")  # fmt: skip
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay, matrices only (0.01)")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warmup, in epochs (1.0)")
    p.add_argument("--schedule", choices=("linear", "constant"), default="linear",
                   help="learning rate after warmup: linear decay to 0, or constant (linear)")  # fmt: skip
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient norm clip; 0: none (1.0)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model dtype (float32)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--seed", type=int, default=0, help="data order seed (0)")
    p.add_argument("--out", required=True, help="output directory (an interrupted run there is resumed)")
    p.add_argument("--no-resume", action="store_true", help="fail instead of resuming a run found in OUT")
    p.set_defaults(func=run)


def load_data(args: argparse.Namespace, tokenizer):
    """The SequenceSet to train on: QA rows (labels -100 on the prompt) or packed text blocks."""
    from fastunlearn.data.qa import load_qa, tokenize_qa
    from fastunlearn.data.text import load_texts, tokenize_sequences

    if args.qa:
        pairs = load_qa(args.data, question_field=args.question_field, answer_field=args.answer_field,
                        role="--data")  # fmt: skip
        return tokenize_qa(pairs, tokenizer, seq_len=args.seq_len, template=args.template, role="--data")
    texts = load_texts(args.data, text_field=args.text_field, role="--data")
    return tokenize_sequences(texts, tokenizer, seq_len=args.seq_len or TEXT_SEQ_LEN, mode="pack", role="--data")


def run(args: argparse.Namespace) -> int:
    from fastunlearn.engine.finetune import FinetuneConfig, finetune, fmt_loss
    from fastunlearn.engine.outdir import RunFinished
    from fastunlearn.engine.progress import log_to_terminal

    config = FinetuneConfig(
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, schedule=args.schedule,
        max_grad_norm=args.max_grad_norm or None, seed=args.seed, dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing,
    )  # fmt: skip
    log_to_terminal()
    model, tokenizer = load_model(args.model, args.dtype)
    check_seq_len(model, args.seq_len, None if args.qa else TEXT_SEQ_LEN)
    data = load_data(args, tokenizer)
    try:
        result = finetune(model, data, config, args.out, tokenizer=tokenizer, resume=not args.no_resume)
    except RunFinished:  # a rerun of a finished command: nothing redone
        print(
            f"already finished: model in {args.out}/model (to run it again, remove {args.out} or choose another --out)"
        )
        return 0
    last = fmt_loss(result.log["epochs"][-1]["loss"])
    print(f"fine-tuned: {len(result.log['steps'])} steps, final epoch loss {last}; model in {result.model_dir}")
    return 0
