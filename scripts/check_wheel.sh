#!/usr/bin/env bash
# The package as a user installs it: build a wheel, install it with its runtime extras (engine, tofu, hf, gguf) into a clean venv
# (the pinned versions of constraints.txt), and run scripts/wheel_smoke.py from a directory outside the checkout.
# Needs .venv from scripts/setup.sh (the wheel's C++ extension is built against its torch).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
.venv/bin/python -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps -w "$WORK/dist" .
python3 -m venv "$WORK/venv"
PIP=("$WORK/venv/bin/python" -m pip install -q --disable-pip-version-check -c "$ROOT/constraints.txt")
"${PIP[@]}" torch
WHEEL=$(ls "$WORK"/dist/fastunlearn-*.whl)
"${PIP[@]}" "$WHEEL[engine,tofu,hf,gguf]"
mkdir "$WORK/smoke"
cd "$WORK/smoke"
"$WORK/venv/bin/python" "$ROOT/scripts/wheel_smoke.py" "$ROOT" "$WORK/smoke"
