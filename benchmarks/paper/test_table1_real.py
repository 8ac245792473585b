"""benchmarks/paper/table1_real.py without the model: --help, the skip without data, the resume plan, and the
report's choice of cells and verdicts on made-up rows. Run by .ci/run with ``pytest benchmarks/paper``."""

import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SCRIPT = HERE / "table1_real.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_help_and_clean_skip_without_data(tmp_path):
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    for option in ("--gpu-scale", "--forget-size", "--cells", "--lr-factors", "--threads", "--workers"):
        assert option in result.stdout
    missing, out = tmp_path / "no-tdec", tmp_path / "out"
    result = _run("--data", str(missing), "--out", str(out), "--cache", str(tmp_path / "cache"))
    assert result.returncode == 0 and "skipped" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_plan_and_gpu_scale():
    import table1_real

    args = table1_real.parse_args([])
    todo = table1_real.plan(args)
    main = [t for t in todo if t[0].name in table1_real.MAIN]
    assert len(main) == 5 * 2 and {t[1] for t in main} == {("lm_extraction_32_0", 0), ("lm_extraction_32_1", 1)}
    controls = [t for t in todo if t[0].name not in table1_real.MAIN]
    assert len(controls) == 2 and {t[1] for t in controls} == {("lm_extraction_32_0", 0)}
    assert all(t[2] == table1_real.LR_GRID for t in todo)  # "LoRA + IHL at a tuned lr" is LoRA + IHL's own grid
    gpu = table1_real.parse_args(["--gpu-scale"])
    assert (gpu.seq_len, gpu.forget_size, len(gpu.forget_sets)) == (200, 32, 3)
    assert len(table1_real.cells(gpu)) == 6 and gpu.design != args.design
    with pytest.raises(SystemExit):
        table1_real.parse_args(["--forget-size", "17"])


def _row(method, cell, factor, success, epochs, wiki=100.0, pile=200.0, acc=0.2):
    return {"method": method, "forget_set": cell[0], "seed": cell[1], "lr_factor": factor, "success": success,
            "epochs": epochs, "utility": {"wikitext": wiki, "pile": pile}, "lambada_acc": acc,
            "seconds": 60.0}  # fmt: skip


def test_cells_and_verdicts():
    from table1_real_report import chosen, verdicts

    grid = {m: (1.0, 2.0) for m in ("FILA + IHL", "LoRA + GD", "LoRA + IHL", "GA", "GD")}
    a, b = ("s0", 0), ("s1", 1)
    rows = [
        _row("FILA + IHL", a, 1.0, True, 6, wiki=90), _row("FILA + IHL", b, 1.0, True, 7, wiki=95),
        _row("LoRA + GD", a, 1.0, False, 10), _row("LoRA + GD", a, 2.0, True, 4),  # x2: slower than x1 at 6
        _row("LoRA + GD", b, 1.0, False, 10), _row("LoRA + GD", b, 2.0, False, 10),  # never
        _row("LoRA + IHL", a, 1.0, True, 5), _row("LoRA + IHL", b, 1.0, True, 9),  # faster on a: (b) fails
        _row("GA", a, 1.0, True, 3, wiki=300), _row("GD", a, 1.0, True, 3, wiki=120, acc=0.1),
        _row("GA", b, 1.0, False, 10),  # unfinished cell: x2 not tried yet, left out
    ]  # fmt: skip
    picked = chosen(rows, grid)
    by = {(r["method"], r["forget_set"]): r for r in picked}
    assert ("GA", "s1") not in by
    assert by[("LoRA + GD", "s0")]["lr_factor"] == 2.0 and by[("LoRA + GD", "s0")]["grid_epochs"] == 14
    assert not by[("LoRA + GD", "s1")]["success"]
    v = verdicts(picked, {"utility": {"wikitext": 100.0, "pile": 200.0}})
    assert v["b_fewer_epochs_than_LoRA + GD"]["holds"] and v["b_fewer_epochs_than_LoRA + GD"]["cells"] == 2
    assert not v["b_fewer_epochs_than_LoRA + IHL"]["holds"] and v["b_fewer_epochs_than_LoRA + IHL"]["fila_wins"] == 1
    c = v["c_less_utility_harm_than_GA_GD"]
    assert c["FILA + IHL"]["wikitext"] == pytest.approx(0.925) and not c["holds"]  # Pile ratio equal: not less


def test_report_only_rewrites_the_table_from_runs_jsonl(tmp_path):
    import json

    import table1_real

    args = table1_real.parse_args(["--out", str(tmp_path), "--methods", "GA"])
    extra = {"design": args.design, "ma_before": 0.96, "el_before": 0.9, "ma": 0.4, "el": 0.01, "params_percent": 100.0,
             "criterion": {"ma": 0.48, "el": 0.03}, "curve": [0.9, 0.4], "continuation": {"greedy": "x"}}  # fmt: skip
    rows = [{**_row("GA", cell, 1.0, True, 2), **extra} for cell in table1_real.cells(args)]
    rows.append({**rows[0], "design": "an earlier design", "epochs": 99})  # ignored
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = {"design": args.design, "memorization": {"steps": 20}, "utility": {"wikitext": 100.0, "pile": 200.0},
              "lambada_acc": 0.25, "continuations": {"lm_extraction_32_0": {"truth": "t", "greedy": "g"}},
              "pretrained": {"utility": {"wikitext": 50.0, "pile": 300.0}, "lambada_acc": 0.3}}  # fmt: skip
    (tmp_path / "before.json").write_text(json.dumps(before))
    assert table1_real.main(["--out", str(tmp_path), "--methods", "GA", "--report-only"]) == 0
    table = (tmp_path / "table1.md").read_text()
    assert "| GA | 2 | ×1 | 100.00 | 2.0 ± 0.0 | 2.0 ± 0.0 |" in table
    released = "| SmolLM2 as released (not memorized) | – | – | – | – | – | | | 50.0 (0.50) | 300.0 (1.50) | 0.300 |"
    assert released in table
    assert "PARTIAL" not in table and (tmp_path / "table1.png").stat().st_size > 1000


def test_an_unfinished_cell_counts_once_it_cannot_beat_fila():
    from table1_real_report import chosen, verdicts

    grid = {"FILA + IHL": (1.0, 2.0), "LoRA + IHL": (1.0, 2.0, 5.0)}
    rows = [_row("FILA + IHL", ("s0", 0), 1.0, True, 9), _row("LoRA + IHL", ("s0", 0), 1.0, False, 10),
            _row("FILA + IHL", ("s1", 1), 2.0, True, 3), _row("LoRA + IHL", ("s1", 1), 1.0, False, 10)]  # fmt: skip
    picked = chosen(rows, grid)
    assert {r["method"] for r in picked} == {"FILA + IHL"}  # LoRA's cells are still open
    v = verdicts(picked, {"utility": {"wikitext": 100.0, "pile": 200.0}}, rows)["b_fewer_epochs_than_LoRA + IHL"]
    assert v == {"holds": True, "cells": 1, "fila_wins": 1}  # s1: LoRA may still meet it at x2 in < 3 epochs
