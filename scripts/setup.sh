#!/usr/bin/env bash
# Set up fastunlearn in a virtual environment (default .venv; VENV=path to choose another).
# Installs the versions the test suite passed with (constraints.txt); FASTUNLEARN_LATEST=1 installs the newest
# releases instead. Reuses the environment's torch if it has one (keep your CUDA build: the torch and triton pins
# are then left out); otherwise installs the CPU build torch==2.13.0. Builds the C++ extension against that
# torch, then installs the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
PIN=()
if [ "${FASTUNLEARN_LATEST:-0}" != 1 ]; then
  PINS="$VENV/fastunlearn-constraints.txt"
  if "$PY" -c "import torch" 2>/dev/null; then
    grep -vE '^(torch|triton|nvidia-[a-z0-9-]+)==' constraints.txt > "$PINS"  # your torch stays as it is
  else
    cp constraints.txt "$PINS"
  fi
  PIN=(-c "$PINS")
fi
"$PY" -m pip install -q --disable-pip-version-check "${PIN[@]}" --upgrade pip
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "${PIN[@]}" "torch==2.13.0"
"$PY" -m pip install -q "${PIN[@]}" setuptools wheel ninja pybind11
"$PY" -m pip install -q "${PIN[@]}" --no-build-isolation -e ".[dev]"
"$PY" -m fastunlearn info
