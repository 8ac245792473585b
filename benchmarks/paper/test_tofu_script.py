"""benchmarks/paper/tofu.py (TOFU on the real model) without running it: --help, its defaults (TOFU's protocol on a
20-author subset), a clean skip when the data folder is absent, which pairs it takes (with the real files when
they are here), the evaluation copy, the estimate's counts, and the table and Figure 5 from runs.jsonl records."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "tofu.py"
TOFU = HERE.parents[2] / "shared" / "data" / "tofu"
sys.path.insert(0, str(HERE))
import tofu  # noqa: E402
import tofu_estimate  # noqa: E402
import tofu_report  # noqa: E402


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_options():
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    for option in ("--data", "--estimate", "--retain-authors", "--max-questions", "--max-length", "--batch-size",
                   "--ranks", "--workers", "--cache"):  # fmt: skip
        assert option in result.stdout


def test_absent_data_folder_skips_with_a_clear_message(tmp_path):
    missing, out = tmp_path / "no-such-tofu", tmp_path / "out"
    result = _run("--data", str(missing), "--out", str(out), "--cache", str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stderr and str(missing) in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_defaults_are_the_papers_protocol_on_the_subset(tmp_path):
    args = tofu.parse_args(["--data", str(tmp_path)])
    assert (args.split, args.forget_pairs, args.retain_authors) == ("forget01", None, 18)
    assert (args.max_questions, args.max_length, args.template, args.eval_dtype) == (300, 200, "tofu-phi", "bfloat16")
    assert (args.epochs, args.batch_size, args.lr, args.ft_epochs, args.ft_batch) == (5, 32, 2e-4, 5, 32)
    assert args.ranks == [8, 32, 4, 16] and args.methods == ["GA", "GD", "IHL", "FILA + IHL", "NPO"]
    assert tofu.jobs(args)[:5] == [(m, 8) for m in args.methods] and tofu.jobs(args)[5] == ("GA", 32)
    assert {m.params for m in tofu.METHODS.values()} == {"lora", "fila"}  # Figure 5: adapters for every method
    assert tofu.run_key(args, "GA", 8) != tofu.run_key(args, "GA", 32) != tofu.run_key(args, "GD", 32)
    with pytest.raises(SystemExit):
        tofu.parse_args(["--data", str(tmp_path), "--batch-size", "0"])


@pytest.mark.skipif(not TOFU.is_dir(), reason="../shared/data/tofu is absent")
def test_the_subset_is_forget01_and_18_retain_authors():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "[EOS]": 1}, unk_token="[UNK]"))  # counts only
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")
    args = tofu.parse_args(["--data", str(TOFU)])
    data = tofu.load_data(args, tokenizer)
    evaluated = {"forget": 40, "retain": 300, "real_authors": 100, "world_facts": 117}  # TOFU's first 300 of each
    assert data["sizes"] == {"forget": 40, "retain": 360, "eval": evaluated}
    assert len(data["target"]) == 400 and len(data["eval"]["retain"]) == 360  # 18 authors' retain_perturbed rows
    trained = json.loads((TOFU / "retain99.json").read_text())[:360]
    assert [p.question for p in data["eval"]["retain"]] == [r["question"] for r in trained]
    cost = tofu_estimate.evaluation_cost(args, data, tokenizer, {"score_tok_s": 100.0, "gen_step_s": 0.1})
    assert cost["questions"] == 557 and cost["worst_steps"] >= cost["typical_steps"] > 0
    assert cost["typical_s"] == pytest.approx(cost["scored_tokens"] / 100 + 0.1 * cost["typical_steps"])


def test_eval_copy_merges_the_adapters_into_a_bfloat16_copy():
    from transformers import GPT2Config, GPT2LMHeadModel

    from fastunlearn.lora.layer import inject_lora, lora_layers

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    inject_lora(model, ["c_attn"], rank=2, alpha=4.0)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_b)  # a trained adapter
    ids = torch.randint(0, 32, (2, 8))
    copy = tofu.eval_copy(model, "bfloat16")
    assert next(copy.parameters()).dtype == torch.bfloat16 and all(m.merged for m in lora_layers(copy).values())
    assert not any(m.merged for m in lora_layers(model).values())  # the training model is untouched
    with torch.no_grad():
        torch.testing.assert_close(copy(ids).logits.float(), model(ids).logits, rtol=0.05, atol=0.05)


def _record(method: str, rank: int, fq: list, mu: list) -> dict:
    values = {"forget_quality": 0.01, "model_utility": 0.4, "forget_probability": 0.9, "forget_rouge_l": 0.8}
    return {
        "split": "forget01", "method": method, "rank": rank, "lr": 2e-4, "trainable_percent": 1.5, "train_s": 10.0,
        "hook_s": 20.0, "sizes": {"forget": 40, "retain": 360, "eval": {"forget": 40}},
        "settings": {"split": "forget01", "retain_authors": 18, "ft_epochs": 5, "ft_lr": 2e-4, "ft_batch": 32,
                     "template": "tofu-phi"},
        "eval_settings": {"max_questions": 300, "max_length": 200, "eval_dtype": "bfloat16", "template": "tofu-phi"},
        "retain_model": {**values, "forget_quality": None}, "target_model": values,
        "trajectory": [{"epoch": e, "forget_quality": q, "model_utility": u} for e, (q, u) in enumerate(zip(fq, mu))],
    }  # fmt: skip


def test_table_and_figure_5_from_records(tmp_path):
    runs = [_record("GA", 8, [0.01, 1e-5], [0.4, 0.1]), _record("FILA + IHL", 8, [0.01, 0.3], [0.4, 0.38]),
            _record("IHL", 32, [0.01, 0.2], [0.4, 0.39])]  # fmt: skip
    runs.append(_record("GA", 8, [0.01, 2e-5], [0.4, 0.2]))  # a later record of a run replaces the earlier one
    tofu_report.write_outputs(tmp_path, runs)
    text = (tmp_path / "tofu.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith(("| GA", "| FILA", "| IHL"))]
    assert rows[0].startswith("| GA r8 | 1.50% | 0.0002 | 1 | 2.000e-05 | 0.2000 |")  # rank 8 first, GA first
    assert rows[1].startswith("| FILA + IHL r8 |") and rows[2].startswith("| IHL r32 |")
    assert "| GA r8 | 0.010 / 0.400 | 2.00e-05 / 0.200 |" in text
    assert "the first 300 questions of each set" in text and "prompt + answer = 200 tokens" in text
    assert (tmp_path / "tofu.png").read_bytes()[:4] == b"\x89PNG"
    json.dumps(runs)  # the records are JSON (runs.jsonl)
