"""What TOFU measures with the model: answer NLLs (teacher-forced) and greedy answers with their ROUGE-L recall.

- :func:`answer_nll`: L(a | q) = -(1/|a|) sum_{t in a} log p(a_t | q, a_<t) per pair over the tokens after the
  prompt (the answer and its eos; ``tofu-phi``: the ``Answer:`` tag too) as :func:`fastunlearn.data.qa.encode_qa`
  lays them out (TOFU's ``get_batch_loss`` / number of labelled tokens), the targets by
  :func:`fastunlearn.losses.next_token_targets`. Rows are sorted by length and right-padded per batch: a causal
  model never looks at the padding after a row, so every value is the unpadded row's whatever ``batch_size`` is
  (up to float rounding of different GEMM shapes, ~1e-7 in float32).
- :func:`candidates_nll`: (N, K) NLLs of K candidate answers per question (TOFU's answer, paraphrase and perturbed
  answers), all N x K rows pooled into the same length-sorted batches. (Running each prompt once and sharing its
  KV cache among the K answers saves about half the tokens but measured no faster on 2 CPU cores: batches of
  one prompt and K answers are small.)
- :func:`greedy_answers`: greedy continuations of the prompts (:func:`fastunlearn.data.qa.generation_prompt`),
  left-padded per batch (as TOFU generates), decoded without the prompt and without special tokens; each answer
  ends at eos, after ``max_new_tokens`` tokens, or where prompt + answer reach ``max_length`` tokens (TOFU: 200).
- :func:`rouge_l_recall`: ROUGE-L recall of each generated answer against its reference with ``rouge_score``'s
  ``RougeScorer(["rougeL"], use_stemmer=True)`` (TOFU's ``eval_rouge_recall``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastunlearn.data.labels import next_token_targets
from fastunlearn.data.qa import IGNORE_INDEX, encode_qa, generation_prompt, resolve_template
from fastunlearn.data.text import special_id
from fastunlearn.evals.metrics.common import inference
from fastunlearn.utils.optional import missing
from fastunlearn.utils.validate import check_int

Tick = Callable[[], None] | None  # called after each batch (progress)


def _rows(tokenizer, questions: Sequence[str], answers: Sequence[str], template: str) -> list[tuple[list, int]]:
    if len(questions) != len(answers):
        raise ValueError(f"questions and answers differ in length: {len(questions)} vs {len(answers)}")
    if not questions:
        raise ValueError("questions is empty: nothing to score")
    template = resolve_template(tokenizer, template)
    return [encode_qa(tokenizer, q, a, template) for q, a in zip(questions, answers)]


def batches_for(n_rows: int, batch_size: int) -> int:
    """How many forwards (or ``generate`` calls) ``n_rows`` rows take."""
    return -(-n_rows // batch_size)


def _keeps_logits(model: nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (the LM head then skips the prompt positions)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _nll_rows(model: nn.Module, rows: list[tuple[list, int]], pad: int, batch_size: int, tick: Tick) -> np.ndarray:
    """(len(rows),) float64 mean NLL of each row's tokens after its prompt; length-sorted, right-padded batches."""
    check_int("batch_size", batch_size, 1)
    keep = _keeps_logits(model)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out = np.empty(len(rows), dtype=np.float64)
    with inference(model) as device:
        for lo in range(0, len(order), batch_size):
            chunk = order[lo : lo + batch_size]
            width = len(rows[chunk[0]][0])  # the longest row of the chunk (sorted)
            ids = torch.full((len(chunk), width), pad, dtype=torch.int64)
            mask = torch.zeros_like(ids)
            labels = torch.full_like(ids, IGNORE_INDEX)
            for r, i in enumerate(chunk):
                tokens, n_prompt = rows[i]
                ids[r, : len(tokens)] = torch.tensor(tokens)
                mask[r, : len(tokens)] = 1
                labels[r, n_prompt : len(tokens)] = ids[r, n_prompt : len(tokens)]
            targets = next_token_targets(ids, mask, labels)  # (B, T - 1)
            start = max(min(rows[i][1] for i in chunk) - 1, 0)  # first position predicting an answer token
            kwargs = {"logits_to_keep": width - start} if keep else {}
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits
            logits = logits[:, -(width - start) : -1]  # (B, T - 1 - start, V): positions start .. T - 2
            targets = targets[:, start:].to(device)  # (B, T - 1 - start)
            nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                  reduction="none").double()  # fmt: skip
            counts = (targets != IGNORE_INDEX).sum(1)  # (B,)
            out[chunk] = (nll.sum(1) / counts).cpu().numpy()
            if tick is not None:
                tick()
    return out


def answer_nll(
    model: nn.Module,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    template: str = "auto",
    batch_size: int = 16,
    tick: Tick = None,
) -> np.ndarray:
    """(N,) float64 mean per-token NLL of each answer given its question (the tokens after the prompt and eos)."""
    if len(questions) != len(answers):
        raise ValueError(f"questions and answers differ in length: {len(questions)} vs {len(answers)}")
    candidates = [[answer] for answer in answers]
    return candidates_nll(model, tokenizer, questions, candidates, template=template, batch_size=batch_size,
                          tick=tick)[:, 0]  # fmt: skip


def candidates_nll(
    model: nn.Module,
    tokenizer,
    questions: Sequence[str],
    candidates: Sequence[Sequence[str]],
    *,
    template: str = "auto",
    batch_size: int = 16,
    tick: Tick = None,
) -> np.ndarray:
    """(N, K) float64 :func:`answer_nll` of K candidate answers per question (the same K for every question), the
    N x K rows pooled into length-sorted batches of ``batch_size``."""
    ks = {len(c) for c in candidates}
    if len(ks) != 1 or 0 in ks:
        raise ValueError(f"candidates must give every question the same number K >= 1 of answers, got K in {ks}")
    k = ks.pop()
    if len(questions) != len(candidates):
        raise ValueError(f"questions and candidates differ in length: {len(questions)} vs {len(candidates)}")
    flat_q = [q for q in questions for _ in range(k)]
    flat_a = [a for c in candidates for a in c]
    rows = _rows(tokenizer, flat_q, flat_a, template)
    pad = special_id(tokenizer, ("pad_token_id", "eos_token_id"), "TOFU", "padding")
    return _nll_rows(model, rows, pad, batch_size, tick).reshape(len(questions), k)


def new_tokens(n_prompt: int, max_new_tokens: int | None, max_length: int | None) -> int:
    """How many tokens a greedy answer after ``n_prompt`` prompt tokens may have: ``max_new_tokens``, and no more
    than ``max_length - n_prompt`` (at least 1) when ``max_length`` is given."""
    bounds = [] if max_new_tokens is None else [max_new_tokens]
    if max_length is not None:
        bounds.append(max(1, max_length - n_prompt))
    return min(bounds)


def greedy_answers(
    model: nn.Module,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str] | None = None,
    *,
    template: str = "auto",
    batch_size: int = 16,
    max_new_tokens: int | None = 64,
    max_length: int | None = None,
    tick: Tick = None,
) -> list[str]:
    """Greedy answers to ``questions`` (the prompts of :func:`fastunlearn.data.qa.generation_prompt`; ``answers``
    is not used), decoded without the prompt. An answer ends at eos, after ``max_new_tokens`` tokens, or where
    its prompt and it reach ``max_length`` tokens (TOFU's ``max_length=200``; at least one new token), whichever
    comes first; None: no such bound (one of the two must be given). Per row, whatever the batch: a batch
    generates as long as its longest-allowed row, and each row is cut to its own bound."""
    from transformers import GenerationConfig

    if max_new_tokens is None and max_length is None:
        raise ValueError("greedy_answers needs max_new_tokens or max_length (or both): answers must end")
    for name, value in (("max_new_tokens", max_new_tokens), ("max_length", max_length)):
        if value is not None:
            check_int(name, value, 1)
    check_int("batch_size", batch_size, 1)
    if not questions:
        raise ValueError("questions is empty: nothing to answer")
    template = resolve_template(tokenizer, template)
    prompts = [generation_prompt(tokenizer, q, template) for q in questions]
    limits = [new_tokens(len(p), max_new_tokens, max_length) for p in prompts]  # each row's bound
    eos = special_id(tokenizer, ("eos_token_id",), "TOFU", "ending answers")
    pad = special_id(tokenizer, ("pad_token_id", "eos_token_id"), "TOFU", "padding")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    with inference(model) as device:
        for lo in range(0, len(order), batch_size):
            chunk = order[lo : lo + batch_size]
            width = len(prompts[chunk[0]])
            ids = torch.full((len(chunk), width), pad, dtype=torch.int64)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(chunk):  # left padding: every prompt ends where generation starts
                ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[r, width - len(prompts[i]) :] = 1
            config = GenerationConfig(max_new_tokens=max(limits[i] for i in chunk), do_sample=False, num_beams=1,
                                      pad_token_id=pad, eos_token_id=eos)  # fmt: skip
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                       generation_config=config)[:, width:].cpu()  # fmt: skip
            for r, i in enumerate(chunk):
                out[i] = tokenizer.decode(generated[r, : limits[i]], skip_special_tokens=True).strip()
            if tick is not None:
                tick()
    return out


def rouge_l_recall(generated: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """(N,) float64 ROUGE-L recall of each generated text against its reference (stemmed, as TOFU)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as exc:
        raise missing("rouge_score", "tofu", "TOFU's ROUGE-L") from exc
    if len(generated) != len(references):
        raise ValueError(f"generated and references differ in length: {len(generated)} vs {len(references)}")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return np.array([scorer.score(ref, gen)["rougeL"].recall for gen, ref in zip(generated, references)])
