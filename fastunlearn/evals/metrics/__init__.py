"""Evaluation metrics of the TDEC protocol (Jang et al. 2023) as Cha et al. use them: MA, EL_n, perplexity.

For a sequence x = (x_0, ..., x_{T-1}) and a causal LM, g_t = argmax p(. | x_<t) is the greedy next token.

- **MA** (memorization accuracy): sum_{t=1}^{T-1} [g_t == x_t] / (T - 1), from one teacher-forced forward.
- **EL_n** (extraction likelihood, n = 10 by default): for each prefix length t = 1..T-1, greedily continue
  x_<t up to length T and compare the continuation's n-grams with those of the true suffix x_>=t:
  overlap_t = #(continuation n-grams, with multiplicity, in the *set* of suffix n-grams) / #(suffix n-grams).
  Prefixes whose suffix is shorter than n are skipped and EL_n = sum_t overlap_t / (T - n), as in
  joeljang/knowledge-unlearning (``validation_el``: one ``generate`` call per prefix length, the overlaps
  summed from the longest prefix down). Both EL functions do those float operations in that order, so equal
  continuations give bit-equal values. Sequences of T <= n tokens raise (no prefix is scored); a right-padded
  batch (``attention_mask``) is scored per sequence length.
  ``eos_token_id``: a continuation ends at its first EOS (kept), as ``generate`` stops there; its n-grams
  are those of the tokens up to it. (Jang et al. pad finished rows with EOS up to the batch's length, which
  adds EOS-padded n-grams that match only a suffix holding the same EOS run.) None: never stop.
- **Question/answer sets** (``fastunlearn.data.qa``: labels -100 on the prompt): MA counts only the labelled
  positions (``labels=``), each answer token predicted from the prompt and the answer before it; EL_n scores
  only the prefixes prompt + answer[:k] (``answer_start=``, a = the answer's first position), continuations
  compared with the rest of the answer: EL_n = sum_{t=a}^{T-n} overlap_t / (T - n - a + 1) (a = 1: the above).
  The engine passes both when a ``SequenceSet`` has labels, and counts answer tokens only in perplexity.
- **Perplexity**: exp(sum of next-token NLL / number of predicted tokens) over a set of sequences. A sequence
  longer than ``context`` is scored in windows of ``context`` tokens starting every ``stride`` tokens; each
  window scores only the tokens after the previous window's end (the HF perplexity guide): every token but
  the first is scored once, with as much left context as the windows give (when stride < context).

**One forward for both** (``scoring.score_sequences``): MA and the NLL come from the same teacher-forced forward
per batch, by default straight from the model's last hidden states: one fused pass over each chunk of the output
layer's logits gives log p(target) and the greedy token of every position, and the (B, T, V) logits never exist
(models whose logits that cannot reproduce are scored through their logits; ``fused=False`` forces that path).

Modules: ``scoring`` (NLL, token counts and greedy hits per sequence), ``memorization`` (MA), ``extraction``
(EL_n, fast and reference), ``perplexity``; ``evaluate`` below runs them on named sets (MA and perplexity of a
set from one scoring pass when both are asked for).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from fastunlearn.evals.metrics.extraction import extraction_likelihood, extraction_likelihood_reference
from fastunlearn.evals.metrics.memorization import memorization_accuracy
from fastunlearn.evals.metrics.perplexity import perplexity, sequence_nll
from fastunlearn.evals.metrics.scoring import SequenceScores, score_sequences

METRICS = ("ma", "el", "ppl")


def evaluate(
    model: nn.Module,
    sets: dict[str, Tensor],
    *,
    metrics: Sequence[str] = ("ma", "el"),
    n: int = 10,
    eos_token_id: int | None = None,
    batch_size: int = 32,
    cache_mb: float = 1024.0,
) -> dict[str, dict[str, float]]:
    """{set name: {metric: value}} for (N, T) token sets: "ma" and "el" (EL_n) are means over the set's
    sequences, "ppl" the set's token-weighted perplexity. Each metric's function is also callable alone."""
    if not isinstance(sets, dict) or not sets:
        raise ValueError(f"sets must be a non-empty dict of name -> (N, T) token ids, got {sets!r}")
    unknown = [m for m in metrics if m not in METRICS]
    if isinstance(metrics, str) or not metrics or unknown:
        raise ValueError(f"metrics must be a non-empty sequence of {METRICS}, got {metrics!r}")
    results = {}
    for name, ids in sets.items():
        row, scores = {}, None
        if "ma" in metrics and "ppl" in metrics:  # both from one forward per batch (a set fits the context for MA)
            scores = score_sequences(model, ids, batch_size=batch_size, desc="MA + perplexity")
        if "ma" in metrics:
            ma = memorization_accuracy(model, ids, batch_size=batch_size) if scores is None else scores.ma()
            row["ma"] = ma.mean().item()
        if "el" in metrics:
            el = extraction_likelihood(
                model, ids, n, eos_token_id=eos_token_id, batch_size=batch_size, cache_mb=cache_mb
            )
            row["el"] = el.mean().item()
        if "ppl" in metrics:
            row["ppl"] = perplexity(model, ids, batch_size=batch_size) if scores is None else scores.perplexity()
        results[name] = row
    return results


__all__ = [
    "METRICS",
    "evaluate",
    "extraction_likelihood",
    "extraction_likelihood_reference",
    "memorization_accuracy",
    "perplexity",
    "score_sequences",
    "sequence_nll",
    "SequenceScores",
]
