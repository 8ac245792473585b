"""TOFU's evaluation of one model: four QA sets in, TOFU's numbers out (see the package docstring)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from torch import nn

from fastunlearn.data.qa import QAPair, encode_qa, load_qa, resolve_template
from fastunlearn.evals.metrics.common import progress
from fastunlearn.evals.tofu import stats
from fastunlearn.evals.tofu.scoring import batches_for, candidates_nll, greedy_answers, rouge_l_recall
from fastunlearn.utils.atomic import atomic_write
from fastunlearn.utils.validate import check_int

logger = logging.getLogger("fastunlearn.evals.tofu")

SET_NAMES = ("forget", "retain", "real_authors", "world_facts")
UTILITY_SETS = ("retain", "real_authors", "world_facts")  # model utility: 3 numbers on each
PARAPHRASED = ("forget", "retain")  # the truth ratio's base answer is the paraphrase (else the answer itself)
NORMALIZED = ("real_authors", "world_facts")  # probability P(a) / (P(a) + sum_k P(perturbed_k))
FILES = {"retain": "retain_perturbed.json", "real_authors": "real_authors_perturbed.json",
         "world_facts": "world_facts_perturbed.json"}  # fmt: skip
MIN_NEW_TOKENS = 32  # greedy answers may run this long even where the set's answers are shorter (real authors)
MAX_QUESTIONS = 40  # per set by default: forget01 whole; a seeded sample of the others (TOFU itself takes 300)


def load_tofu_sets(directory: str | os.PathLike, forget_split: str = "forget01") -> dict[str, list[QAPair]]:
    """{"forget": <forget_split>.json, "retain": retain_perturbed.json, "real_authors": ..., "world_facts": ...}
    from a directory of TOFU's files (../shared/data/tofu's layout, the Hub dataset's file names)."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"TOFU directory not found: {root}")
    files = {"forget": f"{forget_split}.json", **FILES}
    sets = {}
    for name, file in files.items():
        if not (root / file).is_file():
            raise ValueError(f"TOFU directory {root} has no {file} (the {name} set)")
        sets[name] = load_qa(root / file, role=f"TOFU {name} set")
    return sets


def sample_indices(name: str, n: int, max_questions: int | None, seed: int) -> np.ndarray:
    """Sorted indices of the questions evaluated: all, or a sample of ``max_questions`` seeded by (seed, name), so
    every model (unlearned, retain) is measured on the same questions."""
    if max_questions is None or n <= max_questions:
        return np.arange(n)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return np.sort(rng.choice(n, size=max_questions, replace=False))


def _check_sets(sets: Mapping[str, Sequence[QAPair]]) -> None:
    if not isinstance(sets, Mapping) or not sets:
        raise ValueError(f"sets must be a non-empty mapping of {SET_NAMES} to QA pairs (see load_tofu_sets)")
    for name, pairs in sets.items():
        if name not in SET_NAMES:
            raise ValueError(f"sets has an unknown set {name!r}; TOFU's sets are {SET_NAMES}")
        if not pairs or not all(isinstance(p, QAPair) for p in pairs):
            raise ValueError(f"sets[{name!r}] must be a non-empty list of QAPair (fastunlearn.data.qa.load_qa)")
        for i, pair in enumerate(pairs):
            if not pair.perturbed_answers or (name in PARAPHRASED and pair.paraphrased_answer is None):
                need = "perturbed_answer" + (" and paraphrased_answer" if name in PARAPHRASED else "")
                raise ValueError(f"TOFU {name} set question {i} has no {need} (the truth ratio needs it)")


def reference_values(reference) -> np.ndarray:
    """The retain model's forget-set truth-ratio values s from: a sequence of numbers, :func:`evaluate_tofu`'s
    result, or a JSON file holding either (e.g. ``fastunlearn eval --tofu ... --json`` of the retain model)."""
    where = "retain_reference"
    if isinstance(reference, (str, os.PathLike)):
        path, where = Path(reference), f"retain reference file {reference}"
        if not path.is_file():
            raise ValueError(f"{where} not found")
        try:
            reference = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{where} is not JSON: {err}") from None
    if isinstance(reference, Mapping):
        try:
            reference = reference["forget"]["values"]["truth_ratio_s"]
        except (KeyError, TypeError):
            raise ValueError(f"{where} holds no forget set values (['forget']['values']['truth_ratio_s'])") from None
    try:
        return stats.as_vector(where, reference)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


def _evaluate_set(model, tokenizer, name, pairs, *, template, batch_size, max_new_tokens, tick) -> dict:
    """One set's numbers and per-question values (JSON types)."""
    questions, answers = [p.question for p in pairs], [p.answer for p in pairs]
    kw = {"template": template, "batch_size": batch_size, "tick": tick}
    extra = 1 + (name in PARAPHRASED)  # the answer, and the paraphrase when it is the truth ratio's base
    candidates = [(p.answer, p.paraphrased_answer)[:extra] + p.perturbed_answers for p in pairs]
    nll = candidates_nll(model, tokenizer, questions, candidates, **kw)  # (N, extra + K), one length-sorted pool
    answer, base, perturbed = nll[:, 0], nll[:, extra - 1], nll[:, extra:]  # (N,), (N,), (N, K)
    s = stats.truth_ratio_values(base, perturbed)  # (N,)
    generated = greedy_answers(model, tokenizer, questions, answers, max_new_tokens=max_new_tokens, **kw)
    rouge = rouge_l_recall(generated, answers)  # (N,)
    return {
        "n": len(pairs),
        "probability": stats.probability(answer, perturbed if name in NORMALIZED else None),
        "rouge_l": float(rouge.mean()),
        "truth_ratio": stats.truth_ratio(s, forget=name == "forget"),
        "values": {"answer_nll": answer.tolist(), "base_nll": base.tolist(), "perturbed_nll": perturbed.tolist(),
                   "truth_ratio_s": s.tolist(), "rouge_l": rouge.tolist(), "generated": generated},
    }  # fmt: skip


def _default_new_tokens(model: nn.Module, tokenizer, pairs: Sequence[QAPair], template: str) -> int:
    """max(the longest answer in tokens with its eos, MIN_NEW_TOKENS), within the model's context after the
    longest prompt: a verbatim answer fits, and so does a sentence that ends in a short one."""
    rows = [encode_qa(tokenizer, p.question, p.answer, template) for p in pairs]
    wanted = max(MIN_NEW_TOKENS, *(len(ids) - n for ids, n in rows))
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return wanted if context is None else max(1, min(wanted, context - max(n for _, n in rows)))


def evaluate_tofu(
    model: nn.Module,
    tokenizer,
    sets: Mapping[str, Sequence[QAPair]],
    *,
    retain_reference=None,
    max_questions: int | None = MAX_QUESTIONS,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    template: str = "auto",
    seed: int = 0,
) -> dict:
    """TOFU's numbers for ``model`` on ``sets`` ({name: QA pairs}, names from ``SET_NAMES``; see
    :func:`load_tofu_sets`).

    Per set a dict {"n", "probability", "rouge_l", "truth_ratio", "indices", "values": per-question lists}, under
    the set's name; "model_utility" (the harmonic mean of the 9 numbers of retain, real_authors and world_facts;
    None unless all three are given); "forget_quality" and "forget_ks" (KS p-value and statistic against
    ``retain_reference``, the retain model's forget-set s: see :func:`reference_values`; None without one);
    "settings" and "seconds".

    Work bounds: ``max_questions`` per set (a sample seeded by ``seed``, the same for every model; None: all),
    ``batch_size`` sequences per forward, greedy answers of at most ``max_new_tokens`` tokens (None: the set's
    longest answer or ``MIN_NEW_TOKENS`` if more, within the model's context; TOFU lets prompt + answer reach
    200 tokens). Progress: a bar on a terminal, and one log line per set
    (logger ``fastunlearn.evals.tofu``, INFO) with the time elapsed and the ETA.
    """
    _check_sets(sets)
    check_int("batch_size", batch_size, 1)
    if max_questions is not None:
        check_int("max_questions", max_questions, 1)
    if max_new_tokens is not None:
        check_int("max_new_tokens", max_new_tokens, 1)
    template = resolve_template(tokenizer, template)
    reference = None if retain_reference is None else reference_values(retain_reference)
    if reference is not None:
        stats.ks_2samp()  # scipy is installed: fail before the model runs
    rouge_l_recall([], [])  # and rouge_score

    chosen = {name: sample_indices(name, len(pairs), max_questions, seed) for name, pairs in sets.items()}
    picked = {name: [sets[name][i] for i in idx] for name, idx in chosen.items()}
    total = sum(
        batches_for(len(p) * (1 + (name in PARAPHRASED) + len(p[0].perturbed_answers)), batch_size)  # forwards
        + batches_for(len(p), batch_size)  # generate calls
        for name, p in picked.items()
    )
    start, done = time.perf_counter(), [0]  # batches done (a disabled bar counts nothing)
    result: dict = {}
    with progress(None, "TOFU eval", total=total) as bar:

        def tick() -> None:
            done[0] += 1
            bar.update(1)

        for name in (n for n in SET_NAMES if n in picked):
            pairs = picked[name]
            limit = max_new_tokens or _default_new_tokens(model, tokenizer, pairs, template)
            result[name] = _evaluate_set(model, tokenizer, name, pairs, template=template, batch_size=batch_size,
                                         max_new_tokens=limit, tick=tick)  # fmt: skip
            result[name]["indices"] = chosen[name].tolist()
            elapsed = time.perf_counter() - start
            eta = elapsed / max(done[0], 1) * (total - done[0])
            logger.info("TOFU eval: %s set, %d questions done; %.0f s elapsed, ETA %.0f s", name, len(pairs),
                        elapsed, eta)  # fmt: skip
    numbers = [result[n][m] for n in UTILITY_SETS if n in result for m in ("probability", "rouge_l", "truth_ratio")]
    result["model_utility"] = stats.harmonic_mean(numbers) if all(n in result for n in UTILITY_SETS) else None
    result["forget_quality"] = result["forget_ks"] = None
    if reference is not None and "forget" in result:
        ks, p_value = stats.ks_test(result["forget"]["values"]["truth_ratio_s"], reference)
        result["forget_quality"], result["forget_ks"] = p_value, ks
    result["settings"] = {"max_questions": max_questions, "batch_size": batch_size, "template": template,
                          "max_new_tokens": max_new_tokens, "seed": seed}  # fmt: skip
    result["seconds"] = time.perf_counter() - start
    return result


def save_result(result: Mapping, path: str | os.PathLike) -> None:
    """``result`` as JSON, written atomically (a retain model's result is a ``retain_reference`` later)."""
    atomic_write(Path(path), json.dumps(result, indent=1, allow_nan=True) + "\n")


def format_table(result: Mapping, forget_label: str = "forget") -> str:
    """The result as a text table: one row per set, then forget quality and model utility."""

    def cell(value) -> str:
        return f"{value:>12.4f}" if isinstance(value, float) and math.isfinite(value) else f"{'n/a':>12}"

    lines = [f"{'set':24}{'probability':>12}{'ROUGE-L':>12}{'truth ratio':>12}"]
    for name in (n for n in SET_NAMES if n in result):
        row = result[name]
        label = f"{forget_label if name == 'forget' else name} ({row['n']} q)"
        lines.append(f"{label:24}" + "".join(cell(row[m]) for m in ("probability", "rouge_l", "truth_ratio")))
    quality = result.get("forget_quality")
    lines.append(f"{'forget quality':24}{cell(quality)}" + ("" if quality is not None else "  (no retain reference)"))
    lines.append(f"{'model utility':24}{cell(result.get('model_utility'))}")
    return "\n".join(lines)
