#!/usr/bin/env bash
# One prepared run for a fresh GPU machine (H200 image: Python 3.12, torch 2.11 + CUDA 13.0, Triton 3.6,
# nvcc, ninja, pybind11; no bitsandbytes, no network). Every result is a JSON file in OUT (at most 8 files).
#
#   bash bench/gpu_check.sh OUT            # on the GPU machine, from the repository root; under 8 minutes
#   bash bench/gpu_check.sh --dry-run OUT  # CPU, toy sizes: every step runs (CI: tests/kernels/test_gpu_check.py)
#
# Steps (docs/benchmarks.md lists them): 1 environment; 2 carried wheels (XKERN_WHEELS, default
# shared/wheels/*.whl) installed offline; 3 pip install -e . (builds xkern._C; dry-run: import check);
# 4 the compile check (bench/gpu_compile_check.py, all cores; dry-run: 2 compilations); 5 pytest -m gpu
# (3-minute budget; dry-run: collection only); 6 bench/gpu_bench.py lora_linear; 7 bench/gpu_bench.py
# runtime (tiny model, mixed-adapter decode step, eager + CUDA graph); 8 bench/bench_xcross.py.
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
BUDGET=${XKERN_GPU_CHECK_BUDGET:-470}  # seconds for the whole run
START=$(date +%s)
LOGS=$(mktemp -d)
STEPS="$LOGS/steps.tsv"
: > "$STEPS"
if [ "$DRY" = 1 ]; then export TRITON_INTERPRET=1; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# step NAME SECONDS CMD...: run CMD with a timeout capped by what is left of the budget; record the outcome
step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -le 5 ]; then
    printf '%s\t%s\t%s\t%s\n' "$name" "skipped" 0 "budget spent" >> "$STEPS"
    return 0
  fi
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$LOGS/$name.log" >> "$STEPS"
  echo "[gpu_check] $name: rc=$rc in $(($(date +%s) - t0)) s"
  return 0
}

step env 30 bash -c "nvidia-smi -L || true; $PY -c 'import sys, torch; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.is_available())'; $PY -c 'import triton; print(triton.__version__)'"

WHEELS=${XKERN_WHEELS:-shared/wheels}
if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  if [ "$DRY" = 1 ]; then
    step wheels 30 bash -c "ls $WHEELS/*.whl"
  else
    step wheels 60 bash -c "$PY -m pip install --no-index --no-deps $WHEELS/*.whl"
  fi
else
  printf '%s\t%s\t%s\t%s\n' wheels skipped 0 "no wheels in $WHEELS" >> "$STEPS"
fi

if [ "$DRY" = 1 ]; then
  step build 60 "$PY" -c "import xkern, xkern.ops; print(xkern.__file__)"
else
  step build 150 "$PY" -m pip install --no-build-isolation --no-deps -e .
fi

if [ "$DRY" = 1 ]; then
  step compile_check 120 env -u TRITON_INTERPRET "$PY" bench/gpu_compile_check.py --limit 2 --arch 90 \
    --out "$OUT/gpu-compile-check.json"
else
  step compile_check 60 "$PY" bench/gpu_compile_check.py --jobs "$(nproc)" --out "$OUT/gpu-compile-check.json"
fi

if [ "$DRY" = 1 ]; then
  step pytest_gpu 120 "$PY" -m pytest -m gpu --collect-only -q -p no:cacheprovider \
    --junitxml="$LOGS/pytest-gpu.xml" tests
else
  step pytest_gpu 180 "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$LOGS/pytest-gpu.xml" tests
fi

DRYFLAG=""
if [ "$DRY" = 1 ]; then DRYFLAG="--dry-run"; fi
step bench_lora_linear 90 "$PY" bench/gpu_bench.py lora_linear $DRYFLAG --out "$OUT/bench-lora-linear.json"
step bench_runtime 60 "$PY" bench/gpu_bench.py runtime $DRYFLAG --out "$OUT/bench-runtime.json"
if [ "$DRY" = 1 ]; then
  step bench_xcross 90 "$PY" bench/bench_xcross.py --device cpu --hidden 32 --layers 1 --streams 2 --reps 1 \
    --warmup 0 --decode-batch 2 --score-batch 2 --score-tokens 4 --out "$OUT/bench-xcross.json"
else
  step bench_xcross 60 "$PY" bench/bench_xcross.py --device cuda --hidden 1024 --layers 4 --streams 2,3,4 \
    --out "$OUT/bench-xcross.json"
fi

# summary: every step (rc, seconds, log tail) and the pytest results, as JSON
"$PY" - "$STEPS" "$LOGS/pytest-gpu.xml" "$OUT/gpu-check-summary.json" "$DRY" "$START" <<'EOF'
import json, sys, time, xml.etree.ElementTree as ET
from pathlib import Path
steps_file, junit, out, dry, start = sys.argv[1:6]
steps = []
for line in Path(steps_file).read_text().splitlines():
    name, rc, secs, log = line.split("\t", 3)
    tail = Path(log).read_text(errors="replace")[-3000:] if Path(log).is_file() else log
    steps.append({"step": name, "rc": None if rc == "skipped" else int(rc), "skipped": rc == "skipped",
                  "seconds": int(secs), "log_tail": tail})
tests = []
if Path(junit).is_file():
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = tag if tag != "error" else "error"
                msg = (el.get("message") or "")[:500]
                break
        else:
            msg = ""
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": msg})
doc = {"kind": "xkern-gpu-check", "dry_run": dry == "1", "wall_s": int(time.time() - int(start)), "steps": steps,
       "pytest_gpu": tests, "ok": all(s["rc"] == 0 for s in steps if not s["skipped"])}
Path(out).write_text(json.dumps(doc, indent=1) + "\n")
print(f"[gpu_check] wrote {out}: {len(steps)} steps, ok={doc['ok']}, {doc['wall_s']} s")
EOF
rm -rf "$LOGS"
