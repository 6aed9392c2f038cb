"""bench/gpu_check.sh --dry-run: every step of the GPU run runs on the CPU at toy sizes, so the script cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_writes_every_result(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, XKERN_WHEELS=str(tmp_path / "no-wheels"))
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench-lora-linear.json", "bench-runtime.json", "bench-xcross.json", "gpu-check-summary.json",
                     "gpu-compile-check.json"]
    assert len(files) <= 8  # what comes back from the GPU machine
    summary = json.loads((out / "gpu-check-summary.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    assert set(steps) == {"env", "wheels", "build", "compile_check", "pytest_gpu", "bench_lora_linear",
                          "bench_runtime", "bench_xcross"}
    assert summary["ok"] and summary["dry_run"], [s for s in summary["steps"] if s["rc"]]
    assert steps["wheels"]["skipped"] and not steps["pytest_gpu"]["skipped"]
    assert "gpu" in steps["pytest_gpu"]["log_tail"] or "collected" in steps["pytest_gpu"]["log_tail"]
    lora = json.loads((out / "bench-lora-linear.json").read_text())
    assert lora["records"] and all(r["triton_max_err"] < 1e-4 and r["triton_us"] > 0 for r in lora["records"])
    runtime = json.loads((out / "bench-runtime.json").read_text())
    assert runtime["rows"][0]["config"] == "decode_step_eager" and runtime["rows"][0]["median_ms"] > 0
    compiled = json.loads((out / "gpu-compile-check.json").read_text())
    assert len(compiled["records"]) == 2 and all(r["compiles"] for r in compiled["records"])
    assert json.loads((out / "bench-xcross.json").read_text())["rows"]
