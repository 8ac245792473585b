#!/usr/bin/env bash
# The prepared GPU check: on a CUDA machine with no network, build the extension, run the test suite
# (CUDA tests included), sweep the IHL kernels' launch configs, and run the benchmarks.
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# Writes into OUT_DIR: build.log, tests_cuda.log (+ the 2-GPU run of tests/test_distributed.py when the
# machine has 2+ GPUs; otherwise the console says it could not run), tests.log, sweep.json, bench.json, targets.json, bench.log
# (at most 8 files come back from the lent GPU machine: tee the console into the eighth).
# About 6-7 minutes on one H200 (4 min when it held only the IHL benchmarks; the Fisher, low-rank and LoRA
# benchmarks have not run on a GPU yet): give the run a 9-minute limit. Each step runs even if an earlier one failed;
# the exit status is non-zero if any step failed.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python3}
status=0
step() { local name=$1; shift; echo "=== $name ($(date +%T))"; "$@" || { echo "!!! $name failed"; status=1; }; }

step env bash -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'"
echo "=== build ($(date +%T))"
if ! $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -20 "$OUT/build.log"; echo "!!! build failed; installing without the C++ extension"; status=1
  FASTUNLEARN_SKIP_CSRC_BUILD=1 $PY -m pip install --no-build-isolation --no-deps -e . >> "$OUT/build.log" 2>&1
fi
step import $PY -c 'import fastunlearn as f; print("csrc", f.has_csrc(), "triton", f.has_triton())'
pytest_to() { local log=$1; shift; $PY -m pytest -q -p no:cacheprovider -rs "$@" 2>&1 | tee "$OUT/$log" | tail -25; return "${PIPESTATUS[0]}"; }
step cuda-tests pytest_to tests_cuda.log tests/test_cuda.py
step all-tests pytest_to tests.log tests --ignore=tests/test_cuda.py
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$gpus" -ge 2 ]; then  # DDP / FSDP2 / Fisher / FILA over NCCL, two processes against one (appended)
  step two-gpus bash -c "FASTUNLEARN_TEST_DIST_DEVICE=cuda $PY -m pytest -q -p no:cacheprovider -rs tests/test_distributed.py 2>&1 | tee -a '$OUT/tests_cuda.log' | tail -15; exit \${PIPESTATUS[0]}"
else
  echo "=== two-gpus: NOT RUN - this machine has $gpus GPU(s); the two-process run needs 2 (the CPU/gloo two-process tests ran above)"
fi
if grep -q "Fatal Python error" "$OUT/tests.log"; then  # a crash in native code: show where
  step crash-backtrace timeout 120 cuda-gdb -batch -ex run -ex bt --args $PY -m pytest -x -q -p no:cacheprovider \
    "$(grep -o 'tests/[a-z_]*\.py' "$OUT/tests.log" | tail -1)"
fi
step profile timeout 120 $PY benchmarks/profile_ihl.py
step sweep timeout 120 $PY benchmarks/sweep_ihl_blocks.py --out "$OUT/sweep.json"
step bench bash -c "FASTUNLEARN_BENCH_SUMMARY='$OUT/targets.json' timeout 420 $PY -m pytest benchmarks/bench_ihl.py benchmarks/bench_fisher.py benchmarks/bench_lowrank.py benchmarks/bench_lora.py -p no:cacheprovider --benchmark-json='$OUT/bench.json' --benchmark-columns=median,min,max --benchmark-sort=name -q -rs 2>&1 | tee '$OUT/bench.log' | tail -80; exit \${PIPESTATUS[0]}"
echo "=== done ($(date +%T)), status $status"
exit $status
