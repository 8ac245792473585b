"""SmolLM2's download and cache live in ``fastunlearn.demo.smollm2``; ``fastunlearn.models.real_model`` stays the
documented entry point, importing the demo layer only when called. (The download itself: tests/test_models.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

from fastunlearn import models
from fastunlearn.demo import smollm2


def test_importing_models_does_not_import_the_demo_layer():
    code = "import sys, fastunlearn.models\nprint(sorted(m for m in sys.modules if m.startswith('fastunlearn.demo')))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_models_real_model_is_the_demo_layers(monkeypatch):
    calls = []
    monkeypatch.setattr(smollm2, "real_model", lambda *args: calls.append(args) or ("model", "tokenizer"))
    assert models.real_model("cache", "bfloat16", "cpu") == ("model", "tokenizer")
    assert models.real_model() == ("model", "tokenizer")
    assert calls == [("cache", "bfloat16", "cpu"), (None, "float32", None)]
