"""lm-eval downstream evaluation (``fastunlearn.evals.downstream`` and ``eval --lm-eval-tasks``) on a tiny random
GPT-Neo with a character-level tokenizer, offline: two local tasks (tests/evals/lm_eval_tiny) whose scores are
recomputed here from the model's log-likelihoods, unknown and unavailable tasks, and a missing lm-eval."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from fastunlearn import cli
from fastunlearn.evals import downstream
from tests.helpers.tiny_models import VOCAB, tiny_model

pytest.importorskip("lm_eval")

TASK_DIR = Path(__file__).parent / "lm_eval_tiny"
TINY_TASKS = ["fastunlearn_tiny_mc", "fastunlearn_tiny_lambada"]
CHARS = " abcdefghijklmnopqrstuvwxyz0123456789.,'-"


def char_tokenizer():
    """One token per character (a BPE without merges), ``<eos>`` = 0 as the tiny model's eos."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    assert len(vocab) <= VOCAB
    tokenizer = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")


@pytest.fixture(scope="module")
def include_dir(tmp_path_factory):
    """Copies of the tiny task YAMLs with absolute data_files (datasets resolves relative ones against the
    current directory)."""
    import yaml

    out = tmp_path_factory.mktemp("lm_eval_tasks")
    for src in TASK_DIR.glob("*.yaml"):
        config = yaml.safe_load(src.read_text())
        files = config["dataset_kwargs"]["data_files"]
        config["dataset_kwargs"]["data_files"] = {split: str(TASK_DIR / name) for split, name in files.items()}
        (out / src.name).write_text(yaml.safe_dump(config))
    return out


def go_offline(mp: pytest.MonkeyPatch, cache: Path) -> None:
    """No hub and an empty datasets cache. The libraries read HF_HUB_OFFLINE when imported, so the constants
    they read it into are patched too."""
    import datasets
    import huggingface_hub

    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))


@pytest.fixture(scope="module")
def evaluated(include_dir, one_thread):
    """(model, tokenizer, result) of the two tiny tasks and hellaswag, offline; the model comes in training mode."""
    model, tokenizer = tiny_model("gpt_neo").train(), char_tokenizer()
    with pytest.MonkeyPatch.context() as mp:
        go_offline(mp, include_dir / "datasets-cache")
        with pytest.warns(UserWarning, match="hellaswag not run"):
            result = downstream.evaluate_downstream(
                model, tokenizer, [*TINY_TASKS, "hellaswag"], include_path=include_dir, batch_size=4
            )
    return model, tokenizer, result


def loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log p(continuation | context) and whether greedy decoding gives the continuation."""
    ctx, cont = tokenizer(context).input_ids, tokenizer(continuation).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1 : -1].log_softmax(-1)
    target = torch.tensor(cont)
    return float(logits.gather(1, target[:, None]).sum()), bool((logits.argmax(-1) == target).all())


def read_jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASK_DIR / name).read_text().splitlines()]


def test_scores_match_an_independent_computation(evaluated):
    model, tokenizer, result = evaluated
    acc = acc_norm = 0
    docs = read_jsonl("tiny_mc.jsonl")
    for doc in docs:
        lls = [loglikelihood(model, tokenizer, doc["question"], " " + c)[0] for c in doc["choices"]]
        norm = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
        acc += max(range(len(lls)), key=lls.__getitem__) == doc["label"]
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == doc["label"]
    mc = result.metrics["fastunlearn_tiny_mc"]
    assert mc["acc"].value == pytest.approx(acc / len(docs), abs=1e-12)
    assert mc["acc_norm"].value == pytest.approx(acc_norm / len(docs), abs=1e-12)
    p = acc / len(docs)
    assert mc["acc"].stderr == pytest.approx(math.sqrt(p * (1 - p) / (len(docs) - 1)))

    scored = []
    for doc in read_jsonl("tiny_lambada.jsonl"):
        context, word = doc["text"].rsplit(" ", 1)
        scored.append(loglikelihood(model, tokenizer, context, " " + word))
    lambada = result.metrics["fastunlearn_tiny_lambada"]
    assert lambada["perplexity"].value == pytest.approx(math.exp(-sum(ll for ll, _ in scored) / len(scored)))
    assert lambada["acc"].value == pytest.approx(sum(greedy for _, greedy in scored) / len(scored))


def test_result_structure_and_unavailable_task(evaluated):
    model, _, result = evaluated
    assert model.training  # put back in the mode it came in
    assert set(result.metrics) == set(TINY_TASKS)
    assert set(result.metrics["fastunlearn_tiny_mc"]) == {"acc", "acc_norm"}
    assert set(result.metrics["fastunlearn_tiny_lambada"]) == {"perplexity", "acc"}
    assert result.metrics["fastunlearn_tiny_lambada"]["perplexity"].higher_is_better is False
    assert result.n_samples == {"fastunlearn_tiny_mc": 12, "fastunlearn_tiny_lambada": 8}
    assert list(result.unavailable) == ["hellaswag"]
    assert "Rowan/hellaswag" in result.unavailable["hellaswag"]
    table = result.to_markdown()
    assert "| fastunlearn_tiny_mc | acc ↑ |" in table and "| fastunlearn_tiny_lambada | perplexity ↓ |" in table
    assert "- hellaswag: ConnectionError" in table and "HF_DATASETS_OFFLINE=1" in table
    assert json.loads(json.dumps(result.to_dict()))["unavailable"] == result.unavailable


def test_no_available_task_raises_naming_each(monkeypatch, tmp_path):
    go_offline(monkeypatch, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"hellaswag \(ConnectionError.*copa \(ConnectionError.*include_path"):
        downstream.evaluate_downstream(tiny_model("gpt_neo"), char_tokenizer(), ["hellaswag", "copa"])


def test_script_only_dataset_is_unavailable_but_other_runtime_errors_propagate(monkeypatch, include_dir):
    """datasets >= 4 refuses Hub datasets that need a loading script (pubmedqa's): reported, not fatal."""
    load = downstream._load

    def refuse(name: str, message: str):
        def fake(manager, task):
            if task == name:
                raise RuntimeError(message)
            return load(manager, task)

        monkeypatch.setattr(downstream, "_load", fake)

    model, tokenizer = tiny_model("gpt_neo"), char_tokenizer()
    tasks, kwargs = ["fastunlearn_tiny_mc", "fastunlearn_tiny_lambada"], {"include_path": include_dir, "limit": 2}
    refuse("fastunlearn_tiny_lambada", f"{downstream.SCRIPT_DATASET}, but found pubmed_qa.py")
    with pytest.warns(UserWarning, match="fastunlearn_tiny_lambada not run"):
        result = downstream.evaluate_downstream(model, tokenizer, tasks, **kwargs)
    assert set(result.metrics) == {"fastunlearn_tiny_mc"} and "pubmed_qa.py" in result.unavailable[tasks[1]]
    refuse("fastunlearn_tiny_lambada", "a broken task definition")
    with pytest.raises(RuntimeError, match="a broken task definition"):
        downstream.evaluate_downstream(model, tokenizer, tasks, **kwargs)


def test_unknown_task_names_are_listed_and_paper_tasks_registered(include_dir):
    tasks = [*downstream.PAPER_TASKS, "hellaswagg", *TINY_TASKS, "arc_easyy"]
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\): hellaswagg, arc_easyy \("):
        downstream.check_tasks(tasks, include_path=include_dir)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"limit": 0}, "limit must be"),
        ({"batch_size": 0}, "batch_size must be"),
        ({"tasks": "arc_easy"}, "tasks must be"),
        ({"include_path": "/nonexistent"}, "include_path must be a directory"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        downstream.evaluate_downstream(tiny_model("gpt_neo"), char_tokenizer(), **kwargs)


def test_missing_lm_eval_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(ImportError, match=r'pip install "fastunlearn\[lm-eval\]"'):
        downstream.evaluate_downstream(tiny_model("gpt_neo"), char_tokenizer(), ["arc_easy"])
    assert cli.main(["eval", "--model", "no-model", "--lm-eval-tasks", "paper"]) == 2
    assert 'pip install "fastunlearn[lm-eval]"' in capsys.readouterr().err


def test_cli_eval_runs_lm_eval_tasks(include_dir, tmp_path, monkeypatch, capsys, one_thread):
    go_offline(monkeypatch, tmp_path / "datasets-cache")
    tiny_model("gpt_neo").save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "heldout.txt").write_text("the cat sat on the mat today\nshe drank a cup of tea at noon\n")
    code = cli.main([
        "eval", "--model", str(tmp_path / "model"), "--set", f"heldout={tmp_path / 'heldout.txt'}", "--seq-len", "12",
        "--lm-eval-tasks", ",".join(TINY_TASKS), "--lm-eval-include", str(include_dir), "--lm-eval-limit", "3",
        "--json", str(tmp_path / "eval.json"),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "heldout" in printed and "| fastunlearn_tiny_mc | acc ↑ |" in printed
    results = json.loads((tmp_path / "eval.json").read_text())
    assert set(results["heldout"]) == {"ma", "el", "ppl"}
    assert results["lm_eval"]["n_samples"] == {"fastunlearn_tiny_mc": 3, "fastunlearn_tiny_lambada": 3}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lm-eval-tasks", "paper,hellaswagg"], "unknown lm-eval task(s): hellaswagg ("),
        ([], "nothing to evaluate"),
        (["--set", "a=a.txt", "--lm-eval-limit", "3"], "--lm-eval-include and --lm-eval-limit need --lm-eval-tasks"),
    ],
)
def test_cli_eval_user_errors_exit_2_before_loading_the_model(tmp_path, capsys, argv, message):
    assert cli.main(["eval", "--model", str(tmp_path / "no-model"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
