"""TOFU (Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for LLMs"): forget quality and model utility
of a question-answering model, as locuslab/tofu's ``evaluate_util.py`` and ``aggregate_eval_stat.py`` compute them.

Four sets (``load_tofu_sets``): the forget split (forget01 / 05 / 10), retain_perturbed, real_authors_perturbed
and world_facts_perturbed. With L(a) = the mean per-token NLL of answer a given the question (the tokens after
the prompt of :mod:`fastunlearn.data.qa`'s template, and eos; template ``tofu-phi``, TOFU's Phi-1.5 format: the
``Answer:`` tag too) and P(a) = exp(-L(a)), per set:

- probability: mean P(answer) (forget, retain); mean P(a) / (P(a) + sum_k P(perturbed_k)) (real authors, world facts);
- ROUGE-L recall of the greedy answer against the answer (``rouge_score``, stemmed); the answer continues the
  template's generation prompt (``tofu-phi``: ``Question: {q}\n``, so the model writes ``Answer: ...`` itself);
- truth ratio, from s = exp(mean_k L(perturbed_k) - L(paraphrased)) per question (the answer stands in for the
  paraphrase on real authors / world facts): mean min(s, 1/s) on the forget set, mean max(0, 1 - 1/s) elsewhere.

Model utility = the harmonic mean of the 9 numbers of retain, real authors and world facts. Forget quality = the
p-value of ``scipy.stats.ks_2samp`` between the forget-set s of the unlearned model and of the retain model (a model
fine-tuned on the retain split only): :func:`evaluate_tofu` on the retain model returns those s values, and its
result (or its JSON, :func:`save_result`) is the ``retain_reference`` of later evaluations, refused when it was
made on other forget questions or with another template (:func:`reference_values`).

Work is bounded as TOFU bounds it: the first ``max_questions`` = 300 rows of each set (``ds_size``), greedy answers
until eos or prompt + answer = ``max_length`` = 200 tokens; both are options (``max_new_tokens`` caps the answer
alone), and the result's "settings" names them. ``scipy`` and ``rouge_score`` come with
``pip install "fastunlearn[tofu]"``.

Modules: ``scoring`` (what runs the model: NLLs, greedy answers, ROUGE-L), ``stats`` (the formulas),
``evaluate`` (the sets, the questions chosen, the retain reference, :func:`evaluate_tofu`, the table).
"""

from __future__ import annotations

from fastunlearn.evals.tofu.evaluate import (
    MAX_LENGTH,
    MAX_QUESTIONS,
    SET_NAMES,
    evaluate_tofu,
    forget_digest,
    format_table,
    load_tofu_sets,
    question_indices,
    reference_key,
    reference_values,
    save_result,
)
from fastunlearn.evals.tofu.scoring import answer_nll, candidates_nll, greedy_answers, new_tokens, rouge_l_recall
from fastunlearn.evals.tofu.stats import (
    forget_quality,
    harmonic_mean,
    ks_test,
    probability,
    truth_ratio,
    truth_ratio_values,
)

__all__ = [
    "MAX_LENGTH", "MAX_QUESTIONS", "SET_NAMES", "answer_nll", "candidates_nll", "evaluate_tofu", "forget_digest",
    "forget_quality", "format_table", "greedy_answers", "harmonic_mean", "ks_test", "load_tofu_sets", "new_tokens",
    "probability", "question_indices", "reference_key", "reference_values", "rouge_l_recall", "save_result",
    "truth_ratio", "truth_ratio_values",
]  # fmt: skip
