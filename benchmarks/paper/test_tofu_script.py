"""benchmarks/paper/tofu.py (TOFU on the real model) without running it: --help, the CPU and GPU sizes, a clean skip
when the data folder is absent, which pairs it takes, and its table and plot from runs.jsonl records."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "tofu.py"
sys.path.insert(0, str(HERE))
import tofu  # noqa: E402
import tofu_report  # noqa: E402


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_options():
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    for option in ("--data", "--gpu-scale", "--forget-authors", "--eval-epochs", "--lr-scale", "--cache"):
        assert option in result.stdout


def test_absent_data_folder_skips_with_a_clear_message(tmp_path):
    missing, out = tmp_path / "no-such-tofu", tmp_path / "out"
    result = _run("--data", str(missing), "--out", str(out), "--cache", str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stderr and str(missing) in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_cpu_defaults_and_gpu_scale(tmp_path):
    cpu = tofu.parse_args(["--data", str(tmp_path)])
    assert (cpu.splits, cpu.forget_authors, cpu.forget_pairs, cpu.eval_questions) == (["forget01"], 1, 10, 8)
    assert (cpu.eval_epochs, cpu.threads, cpu.ft_batch) == ([1, 3, 5], 1, 4)
    assert cpu.methods[0] == "FILA + IHL" and set(cpu.methods) == set(tofu.METHODS)
    gpu = tofu.parse_args(["--data", str(tmp_path), "--gpu-scale", "--eval-questions", "300"])
    assert gpu.splits == ["forget01", "forget05", "forget10"] and gpu.forget_authors is gpu.forget_pairs is None
    assert gpu.eval_questions == 300 and gpu.eval_epochs == [1, 2, 3, 4, 5] and gpu.max_new_tokens is None
    assert tofu.parse_args(["--data", str(tmp_path), "--epochs", "4"]).eval_epochs == [1, 3, 4]
    with pytest.raises(SystemExit):
        tofu.parse_args(["--data", str(tmp_path), "--eval-epochs", "6"])
    with pytest.raises(SystemExit):
        tofu.parse_args(["--data", str(tmp_path), "--splits", "forget02"])


def test_first_authors_takes_whole_authors():
    pairs = list(range(100))
    assert tofu.first_authors(pairs, 2) == list(range(40)) and tofu.first_authors(pairs, None) == pairs


def _record(method: str, fq: list, mu: list) -> dict:
    values = {"forget_quality": 0.01, "model_utility": 0.4, "forget_probability": 0.9, "forget_rouge_l": 0.8}
    return {
        "split": "forget01", "method": method, "lr": 1e-4, "trainable_percent": 100.0 if method == "GA" else 1.5,
        "train_s": 10.0, "hook_s": 20.0, "sizes": {"forget": 20, "retain": 40, "eval": {"forget": 8}},
        "settings": {"ft_epochs": 3, "ft_lr": 2e-4, "ft_batch": 8, "template": "plain"},
        "retain_model": {**values, "forget_quality": 1.0}, "target_model": values,
        "trajectory": [{"epoch": e, "forget_quality": q, "model_utility": u, "forget_ma": 0.5}
                       for e, (q, u) in enumerate(zip(fq, mu))],
    }  # fmt: skip


def test_table_and_plot_from_records(tmp_path):
    runs = [_record("GA", [0.01, 1e-5], [0.4, 0.1]), _record("FILA + IHL", [0.01, 0.3], [0.4, 0.38])]
    runs.append(_record("GA", [0.01, 2e-5], [0.4, 0.2]))  # a later record of a method replaces the earlier one
    runs.append({**_record("FILA + IHL", [0.01, 0.5], [0.4, 0.39]), "lr": 5e-5})  # another lr: a row of its own
    tofu_report.write_outputs(tmp_path, runs)
    text = (tmp_path / "tofu.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| GA") or line.startswith("| FILA")]
    assert rows[0].startswith("| GA (epoch 1) | 100.00% | 0.0001 | 2e-05 | 0.2000 |")  # ORDER: GA first, latest
    assert rows[1].startswith("| FILA + IHL, lr 5e-05 (epoch 1) | 1.50% | 5e-05 | 0.5000 | 0.3900 |")
    assert rows[2].startswith("| FILA + IHL, lr 0.0001 (epoch 1) | 1.50% | 0.0001 | 0.3000 | 0.3800 |")
    assert "| GA | 0.010 / 0.400 | 2e-05 / 0.200 |" in text and "| retain model (reference) | – | – | 1.0000 |" in text
    assert (tmp_path / "tofu.png").read_bytes()[:4] == b"\x89PNG"
    json.dumps(runs)  # the records are JSON (runs.jsonl)
