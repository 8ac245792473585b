"""TOFU's evaluation of one model: four QA sets in, TOFU's numbers out (see the package docstring)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from torch import nn

from fastunlearn.data.qa import QAPair, load_qa, resolve_template
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
MAX_QUESTIONS = 300  # TOFU's ds_size: the first 300 rows of each set (forget01 / 05 whole, 300 of forget10)
MAX_LENGTH = 200  # TOFU's generation max_length: a greedy answer ends where prompt + answer reach 200 tokens


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


def question_indices(n: int, max_questions: int | None) -> np.ndarray:
    """The indices of the questions evaluated in a set of ``n``: the first ``max_questions`` (TOFU's ``ds_size``:
    ``dataset.select(range(min(ds_size, n)))``), every one when None. The same for every model."""
    return np.arange(n if max_questions is None else min(n, max_questions))


def forget_digest(pairs: Sequence[QAPair]) -> str:
    """A short hash of the forget questions evaluated (question, answer, paraphrase, perturbed answers, in order):
    two evaluations with equal digests scored the same texts."""
    texts = [[p.question, p.answer, p.paraphrased_answer, list(p.perturbed_answers)] for p in pairs]
    return hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]


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


def _describe(indices: Sequence[int]) -> str:
    n = len(indices)
    return f"the first {n}" if list(indices) == list(range(n)) else f"{n} (indices {list(indices)[:4]}...)"


def _mismatch(reference: Mapping, expected: Mapping) -> str | None:
    """What differs between a reference result and the evaluation ``expected`` describes, or None."""
    try:
        found = {"indices": list(reference["forget"]["indices"]), "digest": reference["forget"]["digest"],
                 "template": reference["settings"]["template"]}  # fmt: skip
    except (KeyError, TypeError):
        return ("it records no forget-set indices, digest and template (an evaluation by an older version): "
                "evaluate the retain model again")  # fmt: skip
    if found["indices"] != list(expected["indices"]):
        return f"forget questions: {_describe(found['indices'])} vs {_describe(expected['indices'])} here"
    if found["digest"] != expected["digest"]:
        return "forget question texts differ (another forget split or file)"
    if expected.get("template") is not None and found["template"] != expected["template"]:
        return f"template {found['template']!r} vs {expected['template']!r} here"
    return None


def _number(value) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)


def _numbers(values) -> bool:
    """A sequence of numbers (a list, a tuple, a 1-D array, a tensor): what ``stats.as_vector`` reads."""
    if isinstance(values, (list, tuple)):
        return all(_number(v) for v in values)
    return hasattr(values, "shape") and hasattr(values, "dtype")


def reference_values(reference, expected: Mapping | None = None) -> np.ndarray:
    """The retain model's forget-set truth-ratio values s from: a sequence of numbers, :func:`evaluate_tofu`'s
    result, or a JSON file holding either (e.g. ``fastunlearn eval --tofu ... --json`` of the retain model).

    ``expected`` ({"indices", "digest"[, "template"]}: :func:`reference_key`): the evaluation the reference must
    match; a result made on other forget questions, other texts or another template is a one-line ValueError
    saying what differs (the KS test would compare truth ratios of different questions), and so is a bare
    sequence of another length."""
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
            values = reference["forget"]["values"]["truth_ratio_s"]
        except (KeyError, TypeError):
            raise ValueError(f"{where} holds no forget set values (['forget']['values']['truth_ratio_s'])") from None
        why = None if expected is None else _mismatch(reference, expected)
        if why is not None:
            raise ValueError(f"{where} does not match this evaluation: {why}")
        reference = values
    elif not _numbers(reference):
        got = type(reference).__name__ if not isinstance(reference, (list, tuple)) else "a list holding " + ", ".join(
            sorted({type(v).__name__ for v in reference if not _number(v)})
        )  # fmt: skip
        raise ValueError(f"{where} is not a retain reference ({got}): give the --json of an eval --tofu of "
                         "the retain model (forget.values.truth_ratio_s), a list of numbers, or the model")  # fmt: skip
    try:
        values = stats.as_vector(where, reference)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None
    if expected is not None and len(values) != len(expected["indices"]):
        raise ValueError(f"{where} has {len(values)} values but this evaluation scores {len(expected['indices'])} "
                         "forget questions")  # fmt: skip
    return values


def reference_key(forget: Sequence[QAPair], max_questions: int | None, template: str | None) -> dict:
    """What a retain reference must share with an evaluation of ``forget``: the question indices, the digest of
    their texts and the template (None: not checked, e.g. "auto" before the tokenizer is known)."""
    indices = question_indices(len(forget), max_questions)
    return {"indices": indices.tolist(), "digest": forget_digest([forget[i] for i in indices]), "template": template}


def _evaluate_set(model, tokenizer, name, pairs, *, template, batch_size, max_length, max_new_tokens, tick) -> dict:
    """One set's numbers and per-question values (JSON types)."""
    questions, answers = [p.question for p in pairs], [p.answer for p in pairs]
    kw = {"template": template, "batch_size": batch_size, "tick": tick}
    extra = 1 + (name in PARAPHRASED)  # the answer, and the paraphrase when it is the truth ratio's base
    candidates = [(p.answer, p.paraphrased_answer)[:extra] + p.perturbed_answers for p in pairs]
    nll = candidates_nll(model, tokenizer, questions, candidates, **kw)  # (N, extra + K), one length-sorted pool
    answer, base, perturbed = nll[:, 0], nll[:, extra - 1], nll[:, extra:]  # (N,), (N,), (N, K)
    s = stats.truth_ratio_values(base, perturbed)  # (N,)
    generated = greedy_answers(model, tokenizer, questions, max_new_tokens=max_new_tokens, max_length=max_length, **kw)
    rouge = rouge_l_recall(generated, answers)  # (N,)
    return {
        "n": len(pairs),
        "probability": stats.probability(answer, perturbed if name in NORMALIZED else None),
        "rouge_l": float(rouge.mean()),
        "truth_ratio": stats.truth_ratio(s, forget=name == "forget"),
        "values": {"answer_nll": answer.tolist(), "base_nll": base.tolist(), "perturbed_nll": perturbed.tolist(),
                   "truth_ratio_s": s.tolist(), "rouge_l": rouge.tolist(), "generated": generated},
    }  # fmt: skip


def evaluate_tofu(
    model: nn.Module,
    tokenizer,
    sets: Mapping[str, Sequence[QAPair]],
    *,
    retain_reference=None,
    max_questions: int | None = MAX_QUESTIONS,
    batch_size: int = 16,
    max_length: int | None = MAX_LENGTH,
    max_new_tokens: int | None = None,
    template: str = "auto",
) -> dict:
    """TOFU's numbers for ``model`` on ``sets`` ({name: QA pairs}, names from ``SET_NAMES``; see
    :func:`load_tofu_sets`).

    Per set a dict {"n", "probability", "rouge_l", "truth_ratio", "indices", "values": per-question lists}, under
    the set's name (the forget set's also "digest", :func:`forget_digest`); "model_utility" (the harmonic mean of
    the 9 numbers of retain, real_authors and world_facts; None unless all three are given); "forget_quality" and
    "forget_ks" (KS p-value and statistic against ``retain_reference``, the retain model's forget-set s: see
    :func:`reference_values`, which refuses one made on other questions or with another template; None without
    one); "settings" (every option below, ``template`` resolved) and "seconds".

    As TOFU by default: the first ``max_questions`` rows of each set (300, TOFU's ``ds_size``; None: all), greedy
    answers that end at eos or where prompt + answer reach ``max_length`` tokens (200; None: no such bound;
    within the model's context either way). ``max_new_tokens`` (None) also caps each answer's own length.
    ``batch_size`` sequences per forward. Progress: a bar on a terminal, and one log line per set (logger
    ``fastunlearn.evals.tofu``, INFO) with the time elapsed and the ETA.
    """
    _check_sets(sets)
    check_int("batch_size", batch_size, 1)
    for name, value in (("max_questions", max_questions), ("max_length", max_length),
                        ("max_new_tokens", max_new_tokens)):  # fmt: skip
        if value is not None:
            check_int(name, value, 1)
    if max_length is None and max_new_tokens is None:
        raise ValueError("max_length and max_new_tokens are both None: greedy answers need a bound")
    template = resolve_template(tokenizer, template)
    chosen = {name: question_indices(len(pairs), max_questions) for name, pairs in sets.items()}
    picked = {name: [sets[name][i] for i in idx] for name, idx in chosen.items()}
    reference = None
    if retain_reference is not None:
        if "forget" not in sets:
            raise ValueError("retain_reference is given but sets has no forget set to compare with it")
        expected = reference_key(sets["forget"], max_questions, template)
        reference = reference_values(retain_reference, expected)
        stats.ks_2samp()  # scipy is installed: fail before the model runs
    rouge_l_recall([], [])  # and rouge_score
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    length = max_length if context is None else min(max_length or context, context)  # the model's context bounds it

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
            result[name] = _evaluate_set(model, tokenizer, name, pairs, template=template, batch_size=batch_size,
                                         max_length=length, max_new_tokens=max_new_tokens, tick=tick)  # fmt: skip
            result[name]["indices"] = chosen[name].tolist()
            if name == "forget":
                result[name]["digest"] = forget_digest(pairs)
            elapsed = time.perf_counter() - start
            eta = elapsed / max(done[0], 1) * (total - done[0])
            logger.info("TOFU eval: %s set, %d questions done; %.0f s elapsed, ETA %.0f s", name, len(pairs),
                        elapsed, eta)  # fmt: skip
    numbers = [result[n][m] for n in UTILITY_SETS if n in result for m in ("probability", "rouge_l", "truth_ratio")]
    result["model_utility"] = stats.harmonic_mean(numbers) if all(n in result for n in UTILITY_SETS) else None
    result["forget_quality"] = result["forget_ks"] = None
    if reference is not None:
        ks, p_value = stats.ks_test(result["forget"]["values"]["truth_ratio_s"], reference)
        result["forget_quality"], result["forget_ks"] = p_value, ks
    result["settings"] = {"max_questions": max_questions, "selection": "first rows", "max_length": max_length,
                          "max_new_tokens": max_new_tokens, "template": template, "batch_size": batch_size}  # fmt: skip
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
    settings = result.get("settings") or {}
    if settings:
        lines.append(describe_settings(settings))
    return "\n".join(lines)


def describe_settings(settings: Mapping) -> str:
    """One line naming the questions and answer lengths an evaluation used (its ``settings``)."""
    n = settings.get("max_questions")
    questions = "every question of each set" if n is None else f"the first {n} questions of each set"
    bounds = []
    if settings.get("max_length") is not None:
        bounds.append(f"prompt + answer <= {settings['max_length']} tokens")
    if settings.get("max_new_tokens") is not None:
        bounds.append(f"answers <= {settings['max_new_tokens']} tokens")
    tofu = n == MAX_QUESTIONS and settings.get("max_length") == MAX_LENGTH and settings.get("max_new_tokens") is None
    return (
        f"({questions}; greedy answers until eos or {' and '.join(bounds)}; template {settings.get('template')}"
        f"{'; as TOFU' if tofu else '; TOFU: the first 300, prompt + answer <= 200 tokens'})"
    )
