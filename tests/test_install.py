"""Installed and imported as a user does: nothing of the checkout shadows another project's top-level name.

The checkout's ``kernels/`` folder is ``fastunlearn.kernels``; the top-level name ``kernels`` belongs to the PyPI
project that transformers imports from its model code. These run from the repository root, where the folder is
first on ``sys.path`` (``python -c``, ``python -m``, ``torchrun -m``)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def pypi_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def from_root(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_top_level_kernels_from_the_repository_root_is_never_the_checkouts_folder():
    out = from_root("import kernels; print(kernels.__file__)")
    if pypi_kernels_installed():
        assert out.returncode == 0, out.stderr
        assert Path(out.stdout.strip()).resolve().parent != ROOT / "kernels", out.stdout
    else:
        assert out.returncode == 1 and "ModuleNotFoundError: No module named 'kernels'" in out.stderr, out.stderr
    out = from_root("import kernels.ihl")  # the checkout's kernel modules never load under that name
    assert out.returncode == 1 and "ModuleNotFoundError" in out.stderr, out.stderr


@pytest.mark.skipif(not pypi_kernels_installed(), reason="needs the PyPI project 'kernels' (transformers >= 5.25)")
def test_transformers_model_code_and_fastunlearn_kernels_import_together_from_the_repository_root():
    out = from_root(
        "import transformers.models.llama.modeling_llama, fastunlearn.kernels, fastunlearn.kernels.ihl, kernels\n"
        "print(fastunlearn.kernels.ihl.__name__, hasattr(kernels, 'CUDAProperties'))"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["fastunlearn.kernels.ihl", "True"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_m_fastunlearn_unlearn_from_the_repository_root(tmp_path):
    """The README's torchrun line, run from a checkout's root: 2 processes (gloo) on a tiny model."""
    from tests.helpers.tiny_models import tiny_model, word_tokenizer

    words = [f"w{i}" for i in range(40)]
    tiny_model("gpt_neo").save_pretrained(tmp_path / "model")
    word_tokenizer(words).save_pretrained(tmp_path / "model")
    for name, n in (("forget", 4), ("retain", 8)):
        rows = [" ".join(words[(7 * i + 3 * j) % 40] for j in range(12)) for i in range(n)]
        (tmp_path / f"{name}.txt").write_text("\n".join(rows) + "\n")
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fastunlearn",
        "unlearn", "--model", str(tmp_path / "model"), "--forget", str(tmp_path / "forget.txt"), "--retain",
        str(tmp_path / "retain.txt"), "--seq-len", "12", "--rank", "2", "--stop", "epochs", "--max-epochs", "1",
        "--micro-batch-size", "2", "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    done = subprocess.run(argv, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert len(log["tasks"][0]["epochs"]) == 1
