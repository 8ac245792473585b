"""TOFU's protocol in evaluate_tofu and ``eval --tofu``: the first rows of each set (ds_size 300), greedy answers
bounded by prompt + answer = max_length tokens (200), TOFU's Phi-1.5 format (the ``Answer:`` tag scored, the
answer generated after ``Question: {q}\\n``), and a retain reference that must match the evaluation."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPTNeoConfig, GPTNeoForCausalLM, PreTrainedTokenizerFast

from fastunlearn import cli
from fastunlearn.data.qa import IGNORE_INDEX, QAPair, encode_qa
from fastunlearn.evals.tofu import (
    MAX_LENGTH,
    MAX_QUESTIONS,
    answer_nll,
    evaluate_tofu,
    format_table,
    greedy_answers,
    new_tokens,
    question_indices,
    reference_values,
    save_result,
)

pytest.importorskip("scipy")
pytest.importorskip("rouge_score")

VOCAB = 64
WORDS = [f"w{i}" for i in range(VOCAB - 4)]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace-split words: <eos>=0 (also padding), <unk>=1, "Question:"=2, "Answer:"=3, then w0 ... w59."""
    vocab = {"<eos>": 0, "<unk>": 1, "Question:": 2, "Answer:": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")


def tiny_lm(seed: int, positions: int = 64) -> GPTNeoForCausalLM:
    torch.manual_seed(seed)
    config = GPTNeoConfig(
        vocab_size=VOCAB, max_position_embeddings=positions, hidden_size=32, num_layers=2, num_heads=2,
        attention_types=[[["global"], 2]], window_size=positions, intermediate_size=64, embed_dropout=0.0,
        attention_dropout=0.0, resid_dropout=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPTNeoForCausalLM(config).eval()


def make_pairs(n: int, seed: int, k: int = 3, paraphrase: bool = True) -> list[QAPair]:
    rng = np.random.default_rng(seed)

    def text(lo, hi):
        return " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), int(rng.integers(lo, hi))))

    return [QAPair(text(2, 5), text(1, 6), text(1, 6) if paraphrase else None, tuple(text(1, 6) for _ in range(k)))
            for _ in range(n)]  # fmt: skip


def tiny_sets(n: int = 5) -> dict[str, list[QAPair]]:
    return {"forget": make_pairs(n, 10), "retain": make_pairs(n, 11), "real_authors": make_pairs(n, 12, 2, False),
            "world_facts": make_pairs(n, 13, 2, False)}  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_lm(0)


class Exploding(torch.nn.Module):
    """A model that must not run: the checks come first."""

    config = None

    def forward(self, *args, **kwargs):
        raise AssertionError("the model ran before the checks")


# ---------------------------------------------------------------------------------------------------------
# which questions, how long the answers
# ---------------------------------------------------------------------------------------------------------
def test_defaults_are_tofus():
    defaults = inspect.signature(evaluate_tofu).parameters
    assert defaults["max_questions"].default == MAX_QUESTIONS == 300
    assert defaults["max_length"].default == MAX_LENGTH == 200 and defaults["max_new_tokens"].default is None
    assert question_indices(400, 300).tolist() == list(range(300))  # forget10 / retain_perturbed: the first 300
    assert question_indices(117, 300).tolist() == list(range(117)) and len(question_indices(40, None)) == 40


def test_answer_bounds():
    assert new_tokens(30, None, 200) == 170 and new_tokens(30, 10, 200) == 10 and new_tokens(30, 50, None) == 50
    assert new_tokens(250, None, 200) == 1  # a prompt at the bound still gets one token


def test_greedy_answers_end_where_prompt_and_answer_reach_max_length(model, tok):
    """Each row as HF's generate(max_length=L) of that prompt alone (what TOFU's call does for one row), whatever
    the batch: the longest-allowed row sets the batch's budget, every row is cut to its own."""
    questions = [" ".join(WORDS[: 2 + (i % 5)]) for i in range(7)]
    got = greedy_answers(model, tok, questions, template="tofu-phi", batch_size=3, max_new_tokens=None, max_length=12)
    for question, answer in zip(questions, got):
        prompt = tok(f"Question: {question}\n", return_tensors="pt")["input_ids"]
        alone = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_length=12, do_sample=False,
                               pad_token_id=0, eos_token_id=0)  # fmt: skip
        assert answer == tok.decode(alone[0, prompt.shape[1] :], skip_special_tokens=True).strip()
    with pytest.raises(ValueError, match="needs max_new_tokens or max_length"):
        greedy_answers(model, tok, questions, template="tofu-phi", max_new_tokens=None)


def test_tofu_phi_scores_the_answer_tag_like_tofus_batch_loss(model, tok):
    """L(a) = TOFU's get_batch_loss / number of labelled tokens, its labels masking only ``Question: {q}\\n``."""
    pairs = make_pairs(4, 3)
    got = answer_nll(model, tok, [p.question for p in pairs], [p.answer for p in pairs], template="tofu-phi")
    for value, pair in zip(got, pairs):
        ids = tok(f"Question: {pair.question}\nAnswer: {pair.answer}")["input_ids"] + [0]
        labels = torch.tensor(ids)
        labels[: len(tok(f"Question: {pair.question}\n")["input_ids"])] = IGNORE_INDEX
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].double()
        nll = F.cross_entropy(logits, labels[1:], ignore_index=IGNORE_INDEX, reduction="sum")
        assert value == pytest.approx(float(nll) / int((labels != IGNORE_INDEX).sum()), abs=1e-5)
    plain = answer_nll(model, tok, [p.question for p in pairs], [p.answer for p in pairs], template="plain")
    assert not np.allclose(got, plain)  # the Answer: tag is in one and not the other
    ids, n_prompt = encode_qa(tok, "w1 w2", "w3", "tofu-phi")
    assert tok.convert_ids_to_tokens(ids[n_prompt:]) == ["Answer:", "w3", "<eos>"]


def test_evaluate_tofu_takes_the_first_rows_and_names_its_settings(model, tok):
    sets = tiny_sets(6)
    result = evaluate_tofu(model, tok, sets, max_questions=4, max_length=20, batch_size=3, template="tofu-phi")
    assert all(result[name]["indices"] == [0, 1, 2, 3] for name in sets)
    assert result["settings"] == {"max_questions": 4, "selection": "first rows", "max_length": 20,
                                  "max_new_tokens": None, "template": "tofu-phi", "batch_size": 3}  # fmt: skip
    table = format_table(result)
    assert "the first 4 questions of each set" in table and "prompt + answer <= 20 tokens" in table
    assert "TOFU: the first 300" in table


# ---------------------------------------------------------------------------------------------------------
# the retain reference must match
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def retain_result(tok):
    return evaluate_tofu(tiny_lm(1), tok, {"forget": tiny_sets()["forget"]}, max_questions=3, max_length=16,
                         template="tofu-phi")  # fmt: skip


def test_a_matching_reference_gives_the_forget_quality(model, tok, retain_result, tmp_path):
    save_result(retain_result, tmp_path / "retain.json")
    result = evaluate_tofu(model, tok, tiny_sets(), retain_reference=tmp_path / "retain.json", max_questions=3,
                           max_length=24, template="tofu-phi")  # another max_length: generation only  # fmt: skip
    assert 0 <= result["forget_quality"] <= 1 and result["forget"]["digest"] == retain_result["forget"]["digest"]


@pytest.mark.parametrize(
    "change, options, message",
    [
        (None, {"max_questions": 4}, r"match this evaluation: forget questions: the first 3 vs the first 4 here$"),
        (None, {"template": "plain"}, r"match this evaluation: template 'tofu-phi' vs 'plain' here$"),
        ("texts", {}, r"match this evaluation: forget question texts differ \(another forget split or file\)$"),
        ("old", {}, r"match this evaluation: it records no forget-set indices, digest and template .* again$"),
        ("bare", {"max_questions": 4}, r"^retain_reference has 3 values but this evaluation scores 4 forget"),
    ],
)
def test_a_mismatched_reference_is_refused_before_the_model_runs(tok, retain_result, change, options, message):
    sets = tiny_sets()
    reference = json.loads(json.dumps(retain_result))
    if change == "texts":
        sets["forget"] = make_pairs(5, 99)
    elif change == "old":
        del reference["forget"]["digest"]
    elif change == "bare":
        reference = reference["forget"]["values"]["truth_ratio_s"]
    kwargs = {"max_questions": 3, "template": "tofu-phi", **options}
    with pytest.raises(ValueError, match=message):
        evaluate_tofu(Exploding(), tok, sets, retain_reference=reference, **kwargs)
    assert len(reference_values(reference)) == 3  # without an evaluation to match: the values alone


# ---------------------------------------------------------------------------------------------------------
# eval --tofu
# ---------------------------------------------------------------------------------------------------------
def _records(pairs, paraphrase: bool) -> list[dict]:
    return [{"question": p.question, "answer": p.answer, "perturbed_answer": list(p.perturbed_answers),
             **({"paraphrased_answer": p.paraphrased_answer} if paraphrase else {})} for p in pairs]  # fmt: skip


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("tofu-protocol")
    tofu = root / "tofu"
    tofu.mkdir()
    sets = tiny_sets(4)
    for name, file, paraphrase in (("forget", "forget01", True), ("retain", "retain_perturbed", True),
                                   ("real_authors", "real_authors_perturbed", False),
                                   ("world_facts", "world_facts_perturbed", False)):  # fmt: skip
        (tofu / f"{file}.json").write_text(json.dumps(_records(sets[name], paraphrase)))
    tiny_lm(0).save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    return root


@pytest.fixture(scope="module")
def saved(ws):
    """``eval --tofu --json`` of the model: what a later evaluation's ``--retain-model`` may name; its stdout."""
    out = ws / "retain.json"
    argv = ["eval", "--model", str(ws / "model"), "--tofu", str(ws / "tofu"), "--template", "tofu-phi",
            "--tofu-max-questions", "3", "--tofu-max-length", "24", "--json", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    return out


def test_eval_tofu_template_and_bounds_reach_the_json(saved):
    result = json.loads(saved.read_text())
    assert result["settings"]["template"] == "tofu-phi" and result["settings"]["max_length"] == 24
    assert result["forget"]["indices"] == [0, 1, 2] and "the first 3 questions" in format_table(result)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--template", "tofu-llama2"], "template 'tofu-phi' vs 'tofu-llama2' here"),
        (["--template", "tofu-phi", "--tofu-max-questions", "4"], "forget questions: the first 3 vs the first 4"),
        (["--tofu-max-length", "0"], "--tofu-max-length 0 needs --tofu-max-new-tokens"),
        (["--tofu-max-new-tokens", "0"], "--tofu-max-new-tokens must be >= 1"),
    ],
)
def test_eval_tofu_refuses_a_mismatched_reference_before_loading_the_model(ws, saved, capsys, flags, message):
    capsys.readouterr()  # the fixture's table
    argv = ["eval", "--model", str(ws / "no-such-model"), "--tofu", str(ws / "tofu"), "--tofu-max-questions", "3",
            "--retain-model", str(saved), *flags]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
