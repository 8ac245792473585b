"""``tofu.py --estimate``: the time of each step of the TOFU benchmark from a few measured batches, before running it.

Three rates are measured on the real model with this process's torch threads, in CPU seconds of this process
(on an idle core the wall time is about the same; on shared cores the wall time is longer, the CPU time barely):

- scoring: rows of TOFU candidate answers per forward in the evaluation dtype, tokens per second;
- generation: seconds per greedy step of one batch of ``--eval-batch-size`` prompts (forced to run 32 steps);
- training: seconds per pair of a float32 forward + backward in micro-batches of ``--micro-batch-size``.

The counts come from the data: every scored row is tokenized; a generate call runs until the longest answer of
its batch ends, estimated as the reference answer's length in tokens ("typical": a model that answers like its
training data) or the whole ``--max-length`` budget ("worst": a model that no longer stops, e.g. after GA).
"""

from __future__ import annotations

import time

PROMPT_ROWS = {"forget": 2, "retain": 2}  # answer + paraphrase scored besides the perturbed answers (else 1)


def _cpu(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def measure(args, data: dict) -> dict:
    """{"score_tok_s", "gen_step_s", "train_row_s"} (CPU seconds), and the scored rows' token count per batch."""
    import torch

    from fastunlearn.data.qa import encode_qa
    from fastunlearn.demo.smollm2 import real_model
    from fastunlearn.evals.tofu import candidates_nll
    from fastunlearn.models import load_model

    model, tokenizer = real_model() if args.model is None else load_model(args.model, "float32", "cpu")
    pairs = data["eval"]["forget"][:8]
    candidates = [(p.answer, p.paraphrased_answer, *p.perturbed_answers) for p in pairs]
    tokens = sum(
        len(encode_qa(tokenizer, p.question, a, args.template)[0]) for p, c in zip(pairs, candidates) for a in c
    )
    evaluation = model.to(getattr(torch, args.eval_dtype))  # timing only: cast back to float32 for training below
    with torch.no_grad():

        def score():
            candidates_nll(evaluation, tokenizer, [p.question for p in pairs], candidates, template=args.template,
                           batch_size=args.eval_batch_size)  # fmt: skip

        score()  # warm-up
        score_s = _cpu(score)
        prompts = [f"Question: {p.question}\n" for p in data["eval"]["retain"][: args.eval_batch_size]]
        tokenizer.padding_side = "left"
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        steps = 32
        pad = tokenizer.pad_token_id or tokenizer.eos_token_id

        def generate():
            evaluation.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=pad)

        gen_s = _cpu(generate)
    model = model.float().train()
    rows = data["forget"].batch(slice(0, args.micro_batch_size))

    def train():
        out = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"])
        out.logits.float().logsumexp(-1).mean().backward()

    train()  # warm-up
    train_s = _cpu(train)
    return {"score_tok_s": tokens / score_s, "gen_step_s": gen_s / steps,
            "train_row_s": train_s / len(rows["input_ids"]), "threads": torch.get_num_threads()}  # fmt: skip


def evaluation_cost(args, data: dict, tokenizer, rates: dict) -> dict:
    """(typical, worst) seconds of one TOFU evaluation of the subset, and its counts."""
    from fastunlearn.data.qa import encode_qa, generation_prompt
    from fastunlearn.evals.tofu import new_tokens

    tokens = typical_steps = worst_steps = questions = 0
    for name, pairs in data["eval"].items():
        pairs = pairs[: args.max_questions]
        questions += len(pairs)
        for p in pairs:
            answers = (p.answer, p.paraphrased_answer)[: PROMPT_ROWS.get(name, 1)] + p.perturbed_answers
            tokens += sum(len(encode_qa(tokenizer, p.question, a, args.template)[0]) for a in answers)
        prompts = sorted(((len(generation_prompt(tokenizer, p.question, args.template)), p) for p in pairs),
                         key=lambda x: -x[0])  # fmt: skip
        for lo in range(0, len(prompts), args.eval_batch_size):
            chunk = prompts[lo : lo + args.eval_batch_size]
            limits = [new_tokens(n, None, args.max_length) for n, _ in chunk]
            answers = [len(encode_qa(tokenizer, p.question, p.answer, args.template)[0]) - n for n, p in chunk]
            typical_steps += min(max(answers), max(limits))
            worst_steps += max(limits)
    score_s = tokens / rates["score_tok_s"]
    return {"questions": questions, "scored_tokens": tokens, "typical_steps": typical_steps,
            "worst_steps": worst_steps, "typical_s": score_s + typical_steps * rates["gen_step_s"],
            "worst_s": score_s + worst_steps * rates["gen_step_s"], "score_s": score_s}  # fmt: skip


def estimate(args, data: dict) -> str:
    """The estimate as a Markdown table (each step, then totals for the ranks asked and for ranks 8 and 32)."""
    from fastunlearn.demo.smollm2 import real_model
    from fastunlearn.models import load_model

    tokenizer = (real_model() if args.model is None else load_model(args.model, "float32", "cpu"))[1]
    rates = measure(args, data)
    ev = evaluation_cost(args, data, tokenizer, rates)
    n_forget, n_retain = len(data["forget"]), len(data["retain"])
    row = rates["train_row_s"]
    steps = [
        ("fine-tune the retain model", n_retain * args.ft_epochs * row, n_retain * args.ft_epochs * row),
        ("fine-tune the target model", (n_forget + n_retain) * args.ft_epochs * row,
         (n_forget + n_retain) * args.ft_epochs * row),
        ("evaluate the retain model", ev["typical_s"], ev["typical_s"]),  # fine-tuned models answer and stop
        ("evaluate the target model", ev["typical_s"], ev["typical_s"]),
    ]  # fmt: skip
    prepared = (sum(s[1] for s in steps), sum(s[2] for s in steps))
    per_run = {}
    for name in args.methods:
        retain_rows = n_forget if name != "GA" else 0  # one retain micro-batch per forget micro-batch
        setup = 0.0  # FILA: per-pair Fisher over 128 retain and every forget pair; NPO: the reference forward
        if name == "FILA + IHL":
            setup = (min(128, n_retain) + n_forget) * row
        elif name == "NPO":
            setup = n_forget * row / 3
        epoch = (n_forget + retain_rows) * row + n_forget * row / 3  # the update(s), then the forget MA
        per_run[name] = (setup + args.epochs * (epoch + ev["typical_s"]), setup + args.epochs * (epoch + ev["worst_s"]))
        steps.append((f"{name}, one rank: {args.epochs} epochs + evaluations", *per_run[name]))
    lines = [
        f"Measured ({rates['threads']} torch thread(s), CPU seconds): scoring {rates['score_tok_s']:.0f} tokens/s in "
        f"{args.eval_dtype}; generation {rates['gen_step_s']:.3f} s per step of a batch of {args.eval_batch_size}; "
        f"training (float32 forward + backward) {row:.2f} s per pair.",
        f"One evaluation: {ev['questions']} questions, {ev['scored_tokens']} scored tokens ({ev['score_s']:.0f} s), "
        f"{ev['typical_steps']} (typical) to {ev['worst_steps']} (worst) greedy steps of batches of "
        f"{args.eval_batch_size}.",
        "",
        "| step | typical | worst case |",
        "| --- | --- | --- |",
        *(f"| {name} | {low / 60:.0f} min | {high / 60:.0f} min |" for name, low, high in steps),
    ]
    for ranks in ({*args.ranks}, {8, 32} & {*args.ranks}):
        if not ranks:
            continue
        runs = [sum(per_run[m][i] for m in args.methods) * len(ranks) for i in (0, 1)]
        total = [(prepared[i] + runs[i] / args.workers) / 3600 for i in (0, 1)]
        lines.append(
            f"| total, ranks {sorted(ranks)}, {args.workers} worker(s) | {total[0]:.1f} h | {total[1]:.1f} h |"
        )
    return "\n".join(lines)
