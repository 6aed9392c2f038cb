"""bench/gpu_check.sh --dry-run: every step of the GPU run runs on the CPU at toy sizes, under the GPU image's
conditions (bitsandbytes cannot be imported), so the one GPU run a task may get cannot be lost to the script."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[2]


def _blocked_bitsandbytes(tmp_path: Path) -> Path:
    """A folder that, first on PYTHONPATH, makes ``import bitsandbytes`` fail as it does on the GPU image."""
    blocker = tmp_path / "no-bitsandbytes" / "bitsandbytes"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('bitsandbytes is not installed on the GPU image')\n")
    return blocker.parent


def test_gpu_check_dry_run_writes_every_result_without_bitsandbytes(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, XKERN_WHEELS=str(tmp_path / "no-wheels"),
               PYTHONPATH=str(_blocked_bitsandbytes(tmp_path)))
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench-lora-linear.json", "bench-runtime.json", "bench-serve.json", "bench-xcross.json",
                     "gpu-check-summary.json"]
    summary = json.loads((out / "gpu-check-summary.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    assert set(steps) == {"env", "wheels", "build", "pytest_gpu", "bench_lora_linear", "bench_runtime",
                          "bench_xcross", "bench_serve", "quality_gpu"}
    assert steps["quality_gpu"]["rc"] == 0 and "rank  lora-1.0" in steps["quality_gpu"]["log_tail"]
    assert "not installed on the GPU image" in steps["env"]["log_tail"]  # the blocker was in force
    assert summary["ok"] and summary["dry_run"], [s for s in summary["steps"] if s["rc"]]
    assert steps["wheels"]["skipped"] and not steps["pytest_gpu"]["skipped"]
    # every named test file collected without bitsandbytes; on the CPU its gpu tests skip, one line each
    assert summary["pytest_gpu"] and summary["pytest_gpu_counts"] == {"skipped": len(summary["pytest_gpu"])}
    named = {t["test"].split("::")[0] for t in summary["pytest_gpu"]}
    assert {"tests/ops/test_cuda_backend.py", "tests/ops/test_xcross_integrate.py"} <= named
    assert "error" not in steps["pytest_gpu"]["log_tail"].lower(), steps["pytest_gpu"]["log_tail"]
    lora = json.loads((out / "bench-lora-linear.json").read_text())
    assert lora["records"] and all(r["triton_max_err"] < 1e-4 and r["triton_us"] > 0 for r in lora["records"])
    runtime = json.loads((out / "bench-runtime.json").read_text())
    assert runtime["rows"][0]["config"] == "decode_step_eager" and runtime["rows"][0]["median_ms"] > 0
    assert json.loads((out / "bench-xcross.json").read_text())["rows"]
    assert json.loads((out / "bench-serve.json").read_text())["rank_batch"]["batched_users_per_s"] > 0


def test_step_limits_add_up_to_the_budget_with_a_minute_to_spare():
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    budget = int(re.search(r"XKERN_GPU_CHECK_BUDGET:-(\d+)", script).group(1))
    limits = {}
    for name, limit in re.findall(r"^\s*step (\w+) (\d+) ", script, flags=re.M):
        limits[name] = max(limits.get(name, 0), int(limit))  # dry-run and real branches: the larger counts
    assert sum(limits.values()) == budget - 60, limits
    assert load_script("bench/gpu_check_summary.py").STEP_LIMITS == limits  # the summary reports the same limits
    assert "gpu_compile_check" not in script  # CI compiles the kernels; the GPU's minutes are for what needs it


def test_the_summary_survives_a_run_cut_short(tmp_path):
    """A killed pytest leaves a half-written last line and no step record: the summary still lists what ended."""
    summary = load_script("bench/gpu_check_summary.py")
    log = tmp_path / "build.log"
    log.write_text("compiling...\n")
    (tmp_path / "steps.tsv").write_text(f"env\t0\t3\t{tmp_path / 'missing.log'}\nbuild\t124\t120\t{log}\n")
    (tmp_path / "tests.jsonl").write_text(
        json.dumps({"test": "suite_a::t1", "outcome": "passed"}) + "\n"
        + json.dumps({"test": "suite_a::t2", "outcome": "failed"}) + "\n" + '{"test": "suite_a::t3", "outc')
    out = tmp_path / "summary.json"
    summary.main(["--steps", str(tmp_path / "steps.tsv"), "--tests", str(tmp_path / "tests.jsonl"),
                  "--out", str(out), "--start", "0", "--budget", "480"])
    doc = json.loads(out.read_text())
    assert [s["step"] for s in doc["steps"]] == ["env", "build"] and doc["steps"][1]["rc"] == 124
    assert doc["steps"][1]["log_tail"] == "compiling...\n"
    assert doc["pytest_gpu_counts"] == {"passed": 1, "failed": 1} and not doc["ok"]
