"""TOFU (Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for LLMs"): forget quality and model utility
of a question-answering model, as locuslab/tofu's ``evaluate_util.py`` and ``aggregate_eval_stat.py`` compute them.

Four sets (``load_tofu_sets``): the forget split (forget01 / 05 / 10), retain_perturbed, real_authors_perturbed
and world_facts_perturbed. With L(a) = the mean per-token NLL of answer a given the question (answer tokens and
eos, the prompt of :mod:`fastunlearn.data.qa`) and P(a) = exp(-L(a)), per set:

- probability: mean P(answer) (forget, retain); mean P(a) / (P(a) + sum_k P(perturbed_k)) (real authors, world facts);
- ROUGE-L recall of the greedy answer against the answer (``rouge_score``, stemmed);
- truth ratio, from s = exp(mean_k L(perturbed_k) - L(paraphrased)) per question (the answer stands in for the
  paraphrase on real authors / world facts): mean min(s, 1/s) on the forget set, mean max(0, 1 - 1/s) elsewhere.

Model utility = the harmonic mean of the 9 numbers of retain, real authors and world facts. Forget quality = the
p-value of ``scipy.stats.ks_2samp`` between the forget-set s of the unlearned model and of the retain model (a model
fine-tuned on the retain split only): :func:`evaluate_tofu` on the retain model returns those s values, and its
result (or its JSON, :func:`save_result`) is the ``retain_reference`` of later evaluations.

Work is bounded: ``max_questions`` per set (40 by default, a seeded sample; TOFU samples 300), greedy answers no
longer than the set's longest answer (at least 32 tokens). ``scipy`` and ``rouge_score`` come with
``pip install "fastunlearn[tofu]"``.

Modules: ``scoring`` (what runs the model: NLLs, greedy answers, ROUGE-L), ``stats`` (the formulas),
``evaluate`` (the sets, sampling, :func:`evaluate_tofu`, the table).
"""

from __future__ import annotations

from fastunlearn.evals.tofu.evaluate import (
    MAX_QUESTIONS,
    SET_NAMES,
    evaluate_tofu,
    format_table,
    load_tofu_sets,
    reference_values,
    sample_indices,
    save_result,
)
from fastunlearn.evals.tofu.scoring import answer_nll, candidates_nll, greedy_answers, rouge_l_recall
from fastunlearn.evals.tofu.stats import (
    forget_quality,
    harmonic_mean,
    ks_test,
    probability,
    truth_ratio,
    truth_ratio_values,
)

__all__ = [
    "MAX_QUESTIONS", "SET_NAMES", "answer_nll", "candidates_nll", "evaluate_tofu", "forget_quality", "format_table",
    "greedy_answers", "harmonic_mean", "ks_test", "load_tofu_sets", "probability", "reference_values",
    "rouge_l_recall", "sample_indices", "save_result", "truth_ratio", "truth_ratio_values",
]  # fmt: skip
