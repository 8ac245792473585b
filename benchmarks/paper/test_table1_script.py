"""benchmarks/paper/table1.py as a user runs it: --help, and a clean skip when the TDEC data folder is absent.
Run by .ci/run as its own pytest session (``pytest benchmarks/paper``)."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "table1.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_options():
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    for option in ("--scale", "--data", "--out", "--cache"):
        assert option in result.stdout


def test_absent_data_folder_skips_with_a_clear_message(tmp_path):
    missing, out = tmp_path / "no-such-tdec", tmp_path / "out"
    result = _run("--data", str(missing), "--out", str(out), "--cache", str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stderr and str(missing) in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_results_go_to_benchmarks_results():
    """The default --out of every paper script is its folder under benchmarks/results, where its results are."""
    sys.path.insert(0, str(SCRIPT.parent))
    import table1
    import table1_real
    import tofu

    results = SCRIPT.parents[1] / "results"
    assert table1.parse_args([]).out == results / "table1-small"
    assert table1.parse_args(["--scale", "full"]).out == results / "table1-full"
    assert table1_real.parse_args([]).out == results / "table1-real"
    assert tofu.parse_args(["--data", "tofu"]).out == results / "tofu"
    for name in ("table1-small", "table1-real", "tofu"):
        assert (results / name / "README.md").is_file(), f"benchmarks/results/{name} lost its README"
