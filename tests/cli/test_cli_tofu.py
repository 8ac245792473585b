"""``fastunlearn eval --tofu DIR``: the table, --json, a saved retain reference, and one-line errors (exit 2)."""

from __future__ import annotations

import json

import pytest

from fastunlearn import cli
from tests.helpers.tiny_models import tiny_model
from tests.helpers.tofu import make_pairs, word_tokenizer

pytest.importorskip("scipy")
pytest.importorskip("rouge_score")


def _records(pairs, paraphrase: bool) -> list[dict]:
    return [{"question": p.question, "answer": p.answer, "perturbed_answer": list(p.perturbed_answers),
             **({"paraphrased_answer": p.paraphrased_answer} if paraphrase else {})} for p in pairs]  # fmt: skip


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A TOFU-like directory (JSON lists and JSON lines, as the real files) and two saved tiny models."""
    root = tmp_path_factory.mktemp("cli-tofu")
    tofu = root / "tofu"
    tofu.mkdir()
    (tofu / "forget01.json").write_text(json.dumps(_records(make_pairs(4, 20), True)))
    (tofu / "retain_perturbed.json").write_text(json.dumps(_records(make_pairs(4, 21), True)))
    for name, seed in (("real_authors_perturbed", 22), ("world_facts_perturbed", 23)):
        lines = [json.dumps(r) for r in _records(make_pairs(4, seed, k=2, paraphrase=False), False)]
        (tofu / f"{name}.json").write_text("\n".join(lines) + "\n")
    for name, seed in (("model", 0), ("retain", 1)):
        tiny_model("gpt_neo", seed).save_pretrained(root / name)
        word_tokenizer().save_pretrained(root / name)
    return root


def test_eval_tofu_prints_the_table_and_reuses_a_saved_retain_reference(ws, capsys):
    retain_json, out_json = ws / "retain.json", ws / "out.json"
    argv = ["eval", "--model", str(ws / "retain"), "--tofu", str(ws / "tofu"), "--tofu-max-questions", "3",
            "--tofu-batch-size", "2", "--json", str(retain_json)]  # fmt: skip
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    assert "forget01 (3 q)" in table and "(no retain reference)" in table and "model utility" in table
    argv = ["eval", "--model", str(ws / "model"), "--tofu", str(ws / "tofu"), "--tofu-max-questions", "3",
            "--tofu-batch-size", "2", "--retain-model", str(retain_json), "--json", str(out_json)]  # fmt: skip
    assert cli.main(argv) == 0
    saved = json.loads(out_json.read_text())
    assert saved["forget_split"] == "forget01" and 0 <= saved["forget_quality"] <= 1
    assert f"{saved['forget_quality']:.4f}" in capsys.readouterr().out
    argv[argv.index(str(retain_json))] = str(ws / "retain")  # the retain model itself: the same reference
    assert cli.main(argv[:-2]) == 0
    assert f"forget quality{saved['forget_quality']:>22.4f}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tofu", "/nonexistent/tofu"], "TOFU directory not found: /nonexistent/tofu"),
        (["--forget-split", "forget05"], "has no forget05.json"),
        (["--retain-model", "/nonexistent/retain.json"], "retain reference file /nonexistent/retain.json not found"),
        (["--set", "a=b.txt"], "--tofu runs alone"),
    ],
)
def test_eval_tofu_errors_are_one_line_and_exit_2(ws, capsys, flags, message):
    argv = ["eval", "--model", str(ws / "model"), "--tofu", str(ws / "tofu"), *flags]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
