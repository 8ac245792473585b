"""benchmarks/paper/durability_report.py on made-up steps: the summary table's margins, the EL_10 named where it is
the value above its limit, the relearning probe's rise and share back, and the memorized model's row. Run by
.ci/run with ``pytest benchmarks/paper``."""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CELL = ["lm_extraction_32_0", 0]


def _v(ma, el):
    return {"ma": ma, "el": el}


def _write(steps: Path, name: str, value: dict) -> None:
    steps.mkdir(parents=True, exist_ok=True)
    (steps / f"{name}-lm_extraction_32_0-s0.json").write_text(json.dumps(value))


def _steps(out: Path) -> None:
    steps = out / "steps"
    limits = {"float": _v(0.48, 0.02), "q4_1": _v(0.50, 0.006)}
    _write(steps, "before-memorized", {
        "cell": CELL, "utility": {"pile": 100.0},
        "values": {k: {"forget": _v(0.97, 0.9), "heldout": v} for k, v in limits.items()},
    })  # fmt: skip
    _write(steps, "scored-memorized", {"cell": CELL, "forget": _v(0.98, 0.97), "heldout": _v(0.47, 0.02)})
    _write(steps, "run-fila-ihl", {"method": "FILA + IHL", "cell": CELL, "lr_factor": 1.0, "epochs": 13,
                                   "success": True, "ma": 0.478, "el": 0.012, "utility": {"pile": 73.0}})  # fmt: skip
    rows = [
        {"format": "float", "forget": _v(0.478, 0.012), "limit": limits["float"], "passed": True},
        {"format": "q4_1", "forget": _v(0.49, 0.033), "limit": limits["q4_1"], "passed": False},
    ]
    relearning = {"relearn": {"before": _v(0.58, 0.01), "after": _v(0.62, 0.01), "limit": _v(0.48, 0.02),
                              "passed": False},
                  "control": {"before": _v(0.40, 0.01), "after": _v(0.47, 0.02)}}  # fmt: skip
    _write(steps, "probes-fila-ihl", {"method": "FILA + IHL", "cell": CELL, "quantization": {"rows": rows},
                                      "relearning": relearning})  # fmt: skip


def test_summary_table_margins_el_and_share_back(tmp_path):
    import durability_report

    _steps(tmp_path)
    durability_report.write(tmp_path, ["FILA + IHL"], ("q4_1",))
    text = (tmp_path / "durability.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| FILA + IHL (lm_extraction_32_0:0)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "met (0.478 / 0.012)"
    # Q4_1: MA below its limit by 0.010, EL_10 above it: the EL_10 is named, the probe fails
    assert cells[4] == "0.490 (-0.010; EL_10 0.033 > 0.006) **FAILED**"
    # relearning: +0.040 of the 0.40 that unlearning removed from the scored rows (0.98 -> 0.58), control +0.070
    assert cells[6] == "0.620 (+0.040, 10% back; control +0.070) **FAILED**"
    assert cells[7] == "0.73"
    memorized = next(line for line in text.splitlines() if line.startswith("| memorized"))
    assert "0.970 (+0.470)" in memorized  # the memorized model at Q4_1 against its own held-out set
    assert (tmp_path / "durability.png").stat().st_size > 0
