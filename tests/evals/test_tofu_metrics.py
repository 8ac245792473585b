"""TOFU metrics (fastunlearn.evals.tofu): NLLs, truth ratio, probability, ROUGE-L, KS, harmonic mean, evaluate_tofu."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastunlearn.data.qa import QAPair, encode_qa
from fastunlearn.evals.tofu import (
    answer_nll,
    candidates_nll,
    evaluate_tofu,
    forget_quality,
    format_table,
    greedy_answers,
    harmonic_mean,
    load_tofu_sets,
    probability,
    reference_values,
    rouge_l_recall,
    save_result,
    truth_ratio,
    truth_ratio_values,
)
from tests.helpers.paths import SHARED_DATA
from tests.helpers.tiny_models import tiny_model
from tests.helpers.tofu import make_pairs, word_tokenizer

pytest.importorskip("scipy")
pytest.importorskip("rouge_score")

TOFU = SHARED_DATA / "tofu"


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt_neo")


def nll_by_hand(model, tok, question: str, answer: str) -> float:
    """The unpadded row alone, log-softmax in float64: -(1/|a|) sum_t log p(a_t | q, a_<t)."""
    ids, n_prompt = encode_qa(tok, question, answer, "plain")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()  # (T, V)
    logp = torch.log_softmax(logits, -1)
    terms = [-float(logp[t - 1, ids[t]]) for t in range(n_prompt, len(ids))]
    return sum(terms) / len(terms)


def test_answer_nll_is_the_mean_answer_token_nll_by_hand(model, tok):
    pairs = make_pairs(7, seed=1)
    got = answer_nll(model, tok, [p.question for p in pairs], [p.answer for p in pairs], template="plain",
                     batch_size=3)  # fmt: skip
    want = [nll_by_hand(model, tok, p.question, p.answer) for p in pairs]
    assert got.dtype == np.float64 and got.shape == (7,)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.ptp(want) > 0.05  # different rows, not one value


def test_answer_nll_does_not_depend_on_batch_size(model, tok):
    pairs = make_pairs(9, seed=2)
    args = (model, tok, [p.question for p in pairs], [p.answer for p in pairs])
    runs = [answer_nll(*args, template="plain", batch_size=b) for b in (1, 2, 4, 9)]
    for run in runs[1:]:
        np.testing.assert_allclose(run, runs[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["gpt_neo", "gpt2"])
def test_candidates_nll_is_answer_nll_of_each_candidate(tok, kind):
    model = tiny_model(kind)
    pairs = make_pairs(4, seed=3, k=3)
    candidates = [(p.answer, *p.perturbed_answers) for p in pairs]
    candidates[0] = ("w1", "w2", "w3", "w4")  # one-word answers: 2 tokens with eos
    got = candidates_nll(model, tok, [p.question for p in pairs], candidates, template="plain", batch_size=5)
    want = [[nll_by_hand(model, tok, p.question, a) for a in c] for p, c in zip(pairs, candidates)]
    assert got.shape == (4, 4)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="same number K"):
        candidates_nll(model, tok, ["w1", "w2"], [["w3"], ["w4", "w5"]], template="plain")


def test_truth_ratio_values_and_set_statistics_by_hand():
    base = [1.0, 2.0, 0.5]
    perturbed = [[2.0, 3.0], [1.0, 2.0], [0.5, 1.5]]  # means 2.5, 1.5, 1.0
    s = truth_ratio_values(base, perturbed)
    np.testing.assert_allclose(s, [math.exp(1.5), math.exp(-0.5), math.exp(0.5)], rtol=1e-12)
    forget = (math.exp(-1.5) + math.exp(-0.5) + math.exp(-0.5)) / 3  # min(s, 1/s)
    utility = ((1 - math.exp(-1.5)) + 0.0 + (1 - math.exp(-0.5))) / 3  # max(0, 1 - 1/s)
    assert truth_ratio(s, forget=True) == pytest.approx(forget, rel=1e-12)
    assert truth_ratio(s, forget=False) == pytest.approx(utility, rel=1e-12)
    with pytest.raises(ValueError, match="rows"):
        truth_ratio_values([1.0], perturbed)


def test_probability_plain_and_normalized_by_hand():
    answer = [0.5, 1.0]
    perturbed = [[1.0, 2.0], [0.5, 3.0]]
    assert probability(answer) == pytest.approx((math.exp(-0.5) + math.exp(-1.0)) / 2, rel=1e-12)
    rows = [math.exp(-0.5) / (math.exp(-0.5) + math.exp(-1.0) + math.exp(-2.0)),
            math.exp(-1.0) / (math.exp(-1.0) + math.exp(-0.5) + math.exp(-3.0))]  # fmt: skip
    assert probability(answer, perturbed) == pytest.approx(sum(rows) / 2, rel=1e-12)


def test_harmonic_mean_by_hand_and_against_scipy():
    from scipy.stats import hmean

    nine = [0.9, 0.5, 0.7, 0.4, 0.8, 0.6, 0.3, 0.95, 0.55]
    assert harmonic_mean(nine) == pytest.approx(9 / sum(1 / x for x in nine), rel=1e-12)
    assert harmonic_mean(nine) == pytest.approx(hmean(nine), rel=1e-12)
    assert harmonic_mean([0.5, 0.0, 0.7]) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        harmonic_mean([0.5, -0.1])


def test_forget_quality_is_the_ks_p_value():
    # Disjoint samples of 4: D = 1 and the exact two-sided p-value is 2 / C(8, 4) = 2 / 70.
    assert forget_quality([1, 2, 3, 4], [5, 6, 7, 8]) == pytest.approx(2 / 70, rel=1e-9)
    assert forget_quality([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1.0)
    from scipy.stats import ks_2samp

    a, b = np.random.default_rng(0).normal(size=30), np.random.default_rng(1).normal(0.5, size=40)
    assert forget_quality(a, b) == pytest.approx(ks_2samp(a, b).pvalue, rel=1e-12)


def test_rouge_l_recall_by_hand_and_against_rouge_score():
    from rouge_score import rouge_scorer

    refs = ["The cat sat on the mat.", "Alice writes three novels", "x"]
    gens = ["the cat on mat", "alice writing novel about cats", ""]
    got = rouge_l_recall(gens, refs)
    assert got[0] == pytest.approx(4 / 6)  # LCS "the cat on mat" of 6 reference tokens
    assert got[1] == pytest.approx(3 / 4)  # stemmed: writ(es|ing) -> write, novels -> novel; unstemmed 1/4
    assert got[2] == 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    np.testing.assert_allclose(got, [scorer.score(r, g)["rougeL"].recall for g, r in zip(gens, refs)], rtol=1e-12)


def test_greedy_answers_batched_equal_one_by_one_without_the_prompt(model, tok):
    pairs = make_pairs(5, seed=4)
    questions, answers = [p.question for p in pairs], [p.answer for p in pairs]
    batched = greedy_answers(model, tok, questions, answers, template="plain", batch_size=5, max_new_tokens=6)
    alone = [greedy_answers(model, tok, [q], [a], template="plain", batch_size=1, max_new_tokens=6)[0]
             for q, a in zip(questions, answers)]  # fmt: skip
    assert batched == alone
    for question, answer, got in zip(questions, answers, batched):
        ids, n_prompt = encode_qa(tok, question, answer, "plain")
        with torch.no_grad():  # greedy by hand, no cache
            seq = list(ids[:n_prompt])
            for _ in range(6):
                nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                seq.append(nxt)
        assert got == tok.decode(seq[n_prompt:], skip_special_tokens=True).strip()
        assert not got.startswith("Question:")
    assert any(batched)  # something was generated


def tiny_sets(n: int = 5) -> dict[str, list[QAPair]]:
    return {"forget": make_pairs(n, 10, k=3), "retain": make_pairs(n, 11, k=3),
            "real_authors": make_pairs(n, 12, k=2, paraphrase=False),
            "world_facts": make_pairs(n, 13, k=2, paraphrase=False)}  # fmt: skip


def test_evaluate_tofu_end_to_end(model, tok, tmp_path):
    sets = tiny_sets()
    retain = evaluate_tofu(tiny_model("gpt_neo", seed=1), tok, sets, max_questions=3, batch_size=2, template="plain")
    assert retain["forget_quality"] is None and len(retain["forget"]["values"]["truth_ratio_s"]) == 3
    save_result(retain, tmp_path / "retain.json")
    result = evaluate_tofu(model, tok, sets, retain_reference=tmp_path / "retain.json", max_questions=3,
                           batch_size=2, template="plain")  # fmt: skip
    assert result["retain"]["indices"] == retain["retain"]["indices"]  # the same seeded sample
    for name, pairs in sets.items():
        row, chosen = result[name], [pairs[i] for i in result[name]["indices"]]
        assert row["n"] == 3 and len(set(row["indices"])) == 3
        nll = answer_nll(model, tok, [p.question for p in chosen], [p.answer for p in chosen], template="plain")
        np.testing.assert_allclose(row["values"]["answer_nll"], nll, atol=1e-5)
        base = [p.paraphrased_answer or p.answer for p in chosen]
        np.testing.assert_allclose(row["values"]["base_nll"],
                                   answer_nll(model, tok, [p.question for p in chosen], base, template="plain"),
                                   atol=1e-5)  # fmt: skip
        assert 0 < row["probability"] < 1 and 0 <= row["rouge_l"] <= 1 and 0 <= row["truth_ratio"] <= 1
    nine = [result[n][m] for n in ("retain", "real_authors", "world_facts")
            for m in ("probability", "rouge_l", "truth_ratio")]  # fmt: skip
    assert result["model_utility"] == pytest.approx(harmonic_mean(nine), rel=1e-12)
    want = forget_quality(result["forget"]["values"]["truth_ratio_s"], retain["forget"]["values"]["truth_ratio_s"])
    assert result["forget_quality"] == pytest.approx(want, rel=1e-12)
    json.dumps(result)  # JSON-ready
    table = format_table(result, "forget01")
    assert "forget01 (3 q)" in table and "model utility" in table and "forget quality" in table


def test_evaluate_tofu_rejects_bad_sets_and_references(model, tok):
    sets = tiny_sets()
    with pytest.raises(ValueError, match="unknown set 'holdout'"):
        evaluate_tofu(model, tok, {"holdout": sets["forget"]}, template="plain")
    with pytest.raises(ValueError, match="forget set question 0 has no perturbed_answer and paraphrased_answer"):
        evaluate_tofu(model, tok, {"forget": [QAPair("w1", "w2")]}, template="plain")
    with pytest.raises(ValueError, match="no forget set values"):
        reference_values({"retain": {}})
    with pytest.raises(ValueError, match="not found"):
        reference_values("/nonexistent/retain.json")
    np.testing.assert_array_equal(reference_values([0.5, 2.0]), [0.5, 2.0])


@pytest.mark.parametrize(
    "module, call", [("rouge_score", "rouge_l_recall(['a'], ['a'])"), ("scipy", "forget_quality([1.0], [2.0])")]
)
def test_a_missing_tofu_extra_is_named(module, call):
    code = (
        "import sys\n"
        f"sys.modules[{module!r}] = None\n"
        "from fastunlearn.evals.tofu import forget_quality, rouge_l_recall\n"
        "try:\n"
        f"    {call}\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'pip install "fastunlearn[tofu]"' in out.stdout and repr(module) in out.stdout, out.stdout


@pytest.mark.skipif(not TOFU.is_dir(), reason="../shared/data/tofu is absent")
def test_load_tofu_sets_reads_the_real_files():
    sets = load_tofu_sets(TOFU, "forget01")
    assert {k: len(v) for k, v in sets.items()} == {"forget": 40, "retain": 400, "real_authors": 100,
                                                    "world_facts": 117}  # fmt: skip
    assert all(len(p.perturbed_answers) == 5 and p.paraphrased_answer for p in sets["forget"])
    assert all(len(p.perturbed_answers) == 3 and p.paraphrased_answer is None for p in sets["world_facts"])
    with pytest.raises(ValueError, match="no forget02.json"):
        load_tofu_sets(TOFU, "forget02")
