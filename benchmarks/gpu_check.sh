#!/usr/bin/env bash
# The prepared GPU check: on a CUDA machine with no network, build the extension, run the CUDA tests, and time
# what has not been measured on a GPU yet, within one time budget.
#
#   bash benchmarks/gpu_check.sh OUT_DIR          # GPU_CHECK_BUDGET_S=1080 by default (480 with GPU_CHECK_JOB=0)
#
# Writes 8 files into OUT_DIR (tee the console into a ninth):
# build.log, tests_cuda.log, bench.json (every pytest-benchmark run merged), targets.json (the target
# summaries), bench.log, real_shape.json, profile.log, gpu-7b.json (the whole job, per phase).
#
# Steps, expected time on one H200 (each capped so the whole script ends within GPU_CHECK_BUDGET_S; a step
# that would start with under 15 s left is skipped and reported; each step runs even if an earlier one failed;
# the exit status is non-zero if any step failed or was skipped):
#   env + build (C++ extension, ninja)              ~1.5 min
#   cuda-tests: tests/ops/test_cuda.py + the CUDA tests of test_logprob / test_validation                ~1 min
#   bench-ihl: fastunlearn + eager at the three shapes, test_targets_cuda (copy timed in the same run) ~40 s
#   bench-fisher: Triton / torch / loop / vmap, peak extra CUDA memory, targets     ~30 s
#   real-shape: benchmarks/ops/gpu_real_shape.py (SmolLM2-135M shape, RANDOM weights)   ~1 min
#   bench-lowrank: gpt-neo-125m set + llama-7b (4 providers, full SVD extrapolated from one layer per shape) ~1.5 min
#   bench-lora, profile (back-to-back IHL kernel timings)                           ~30 s
#   job-7b: benchmarks/job_real_model.py gpu-7b: a whole FILA + IHL job at Llama-2-7B's shape (RANDOM bf16
#           weights), 32 x 200 forget tokens, rank 16, 5 epochs, per-phase split; target <= 10 min, never run
#           yet (GPU_CHECK_JOB=0 leaves it out)                                  <= 10 min
# Left out, to fit ~8 min: the full CPU test suite (CI runs it on every change; the CUDA-touching tests
# are selected above), the Triton block sweep (run 2026-11-28; its result is the autotune list in
# kernels/ihl.py) and torch.compile of the eager IHL (timed 2026-11-28, README; each graph costs a compile).
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export FASTUNLEARN_BENCH_SUMMARY="$OUT/targets.json"
PY=${PYTHON:-python3}
JOB=${GPU_CHECK_JOB:-1}
BUDGET=${GPU_CHECK_BUDGET_S:-$([ "$JOB" = 1 ] && echo 1080 || echo 480)}
SCRATCH=$(mktemp -d)
status=0
# step NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, time left), or skip it when under 15 s are left
step() {
  local name=$1 want=$2; shift 2
  local left=$((BUDGET - SECONDS)); local limit=$((want < left ? want : left))
  if [ "$left" -lt 15 ]; then echo "!!! $name SKIPPED: ${left}s of the ${BUDGET}s budget left"; status=1; return; fi
  echo "=== $name ($(date +%T), ${SECONDS}s in, limit ${limit}s)"
  timeout "$limit" bash -c '"$@"' "$name" "$@"; local rc=$?  # bash -c: the exported functions run too
  if [ "$rc" -ne 0 ]; then echo "!!! $name failed (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out'))"; status=1; fi
}
pytest_to() { local log=$1; shift; $PY -m pytest -q -p no:cacheprovider -rs "$@" 2>&1 | tee -a "$OUT/$log" | tail -25; return "${PIPESTATUS[0]}"; }
bench() {  # bench NAME pytest-args...: one benchmark module, its own JSON (merged into bench.json at the end)
  local name=$1; shift
  pytest_to bench.log "$@" --benchmark-json="$SCRATCH/$name.json" \
    --benchmark-columns=median,min,max --benchmark-sort=name
}

export PY OUT SCRATCH
export -f pytest_to bench
step env 30 bash -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'"
echo "=== build ($(date +%T))"
if ! timeout 240 $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -20 "$OUT/build.log"; echo "!!! build failed; installing without the C++ extension"; status=1
  FASTUNLEARN_SKIP_CSRC_BUILD=1 timeout 60 $PY -m pip install --no-build-isolation --no-deps -e . >> "$OUT/build.log" 2>&1
fi
step import 30 $PY -c 'import fastunlearn as f; print("csrc", f.has_csrc(), "triton", f.has_triton())'
step cuda-tests 120 pytest_to tests_cuda.log tests/ops/test_cuda.py tests/ops/test_logprob.py tests/ops/test_validation.py -k "cuda or device_mismatch"
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$gpus" -ge 2 ]; then  # DDP / FSDP2 / Fisher / FILA over NCCL, two processes against one (appended)
  FASTUNLEARN_TEST_DIST_DEVICE=cuda step two-gpus 120 pytest_to tests_cuda.log tests/engine/test_distributed.py
else
  echo "=== two-gpus: NOT RUN - this machine has $gpus GPU(s); the two-process run needs 2"
fi
step bench-ihl 90 bench ihl benchmarks/ops/bench_ihl.py -k "not compiled"
step bench-fisher 60 bench fisher benchmarks/ops/bench_fisher.py
step real-shape 120 $PY benchmarks/ops/gpu_real_shape.py --out "$OUT/real_shape.json"
step bench-lowrank 150 bench lowrank benchmarks/ops/bench_lowrank.py
step bench-lora 45 bench lora benchmarks/ops/bench_lora.py
step profile 40 bash -c "$PY benchmarks/ops/profile_ihl.py 2>&1 | tee '$OUT/profile.log' | tail -20; exit \${PIPESTATUS[0]}"
if [ "$JOB" = 1 ]; then
  step job-7b 600 $PY benchmarks/job_real_model.py gpu-7b --out "$OUT"
fi
$PY - "$SCRATCH" "$OUT/bench.json" <<'PYEOF'
import json, pathlib, sys
runs = {p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))}
pathlib.Path(sys.argv[2]).write_text(json.dumps(runs, indent=1))
print("bench.json:", {k: len(v.get("benchmarks", [])) for k, v in runs.items()})
PYEOF
rm -rf "$SCRATCH"
echo "=== done ($(date +%T), ${SECONDS}s), status $status"
exit $status
