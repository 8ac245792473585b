#!/usr/bin/env bash
# Set up fastunlearn in a virtual environment (default .venv; VENV=path to choose another).
# Reuses the environment's torch if it has one (keep your CUDA build); otherwise installs the
# CPU build torch==2.13.0. Builds the C++ extension against that torch, then installs the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --disable-pip-version-check --upgrade pip
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q setuptools wheel ninja pybind11
"$PY" -m pip install -q --no-build-isolation -e ".[dev]"
"$PY" -m fastunlearn info
