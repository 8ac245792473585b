"""TOFU's numbers from the per-question NLLs, as locuslab/tofu ``aggregate_eval_stat.py`` computes them.

With L(a) the mean per-token NLL of answer a given the question and P(a) = exp(-L(a)):

- truth ratio value per question: s = exp(mean_k L(perturbed_k) - L(paraphrased)) (real authors / world facts:
  the answer stands in for the paraphrase); :func:`truth_ratio_values`.
- truth ratio of a set: forget sets mean min(s, 1/s); the utility sets mean max(0, 1 - 1/s); :func:`truth_ratio`.
- probability: forget / retain sets mean P(answer); real authors / world facts mean P(a) / (P(a) + sum_k
  P(perturbed_k)); :func:`probability`.
- forget quality: the p-value of ``scipy.stats.ks_2samp`` between the unlearned model's and the retain model's s
  on the forget set; :func:`forget_quality`.
- model utility: the harmonic mean n / sum_i 1/x_i of the 9 numbers (probability, ROUGE-L, truth ratio on
  retain, real authors and world facts), 0 if any is 0; :func:`harmonic_mean`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fastunlearn.utils.optional import missing


def as_vector(name: str, values, ndim: int = 1) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim or array.shape[0] == 0 or (ndim == 2 and array.shape[1] == 0):
        raise ValueError(f"{name} must be a non-empty {ndim}-D array of numbers, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds non-finite values")
    return array


def truth_ratio_values(base_nll, perturbed_nll) -> np.ndarray:
    """(N,) s = exp(mean_k L(perturbed_k) - L(base)) from base NLLs (N,) and perturbed NLLs (N, K)."""
    base = as_vector("base_nll", base_nll)
    perturbed = as_vector("perturbed_nll", perturbed_nll, ndim=2)
    if perturbed.shape[0] != base.shape[0]:
        raise ValueError(f"perturbed_nll has {perturbed.shape[0]} rows but base_nll has {base.shape[0]}")
    return np.exp(perturbed.mean(axis=1) - base)


def truth_ratio(s, *, forget: bool) -> float:
    """A set's truth ratio from its values s: mean min(s, 1/s) on a forget set, else mean max(0, 1 - 1/s)."""
    s = as_vector("s", s)
    return float(np.mean(np.minimum(s, 1 / s)) if forget else np.mean(np.maximum(0.0, 1 - 1 / s)))


def probability(answer_nll, perturbed_nll=None) -> float:
    """mean P(answer), or with ``perturbed_nll`` (N, K) mean P(a) / (P(a) + sum_k P(perturbed_k))."""
    p = np.exp(-as_vector("answer_nll", answer_nll))
    if perturbed_nll is None:
        return float(p.mean())
    q = np.exp(-as_vector("perturbed_nll", perturbed_nll, ndim=2))
    if q.shape[0] != p.shape[0]:
        raise ValueError(f"perturbed_nll has {q.shape[0]} rows but answer_nll has {p.shape[0]}")
    return float(np.mean(p / (p + q.sum(axis=1))))


def forget_quality(unlearned_s, retain_s) -> float:
    """p-value of the two-sample Kolmogorov-Smirnov test between the two models' forget-set s values."""
    return float(ks_test(unlearned_s, retain_s)[1])


def ks_2samp():
    """``scipy.stats.ks_2samp``, or the ImportError naming the ``tofu`` extra."""
    try:
        from scipy.stats import ks_2samp
    except ImportError as exc:
        raise missing("scipy", "tofu", "TOFU's forget quality (KS test)") from exc
    return ks_2samp


def ks_test(unlearned_s, retain_s) -> tuple[float, float]:
    """(KS statistic, p-value) of ``scipy.stats.ks_2samp``."""
    result = ks_2samp()(as_vector("unlearned_s", unlearned_s), as_vector("retain_s", retain_s))
    return float(result.statistic), float(result.pvalue)


def harmonic_mean(values: Sequence[float]) -> float:
    """n / sum_i 1/x_i of non-negative numbers; 0 when any is 0 (its limit)."""
    x = as_vector("values", values)
    if (x < 0).any():
        raise ValueError(f"harmonic_mean takes non-negative numbers, got {x.tolist()}")
    return 0.0 if (x == 0).any() else float(len(x) / np.sum(1 / x))
