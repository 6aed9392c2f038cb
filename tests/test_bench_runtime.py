"""Smoke test of bench/bench_runtime.py on a tiny random Llama: it runs, writes the JSON, and agrees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_runtime.py"
TINY = ["--model", "tiny", "--device", "cpu", "--batch", "8", "--adapters", "4", "--seq", "16", "--train-batch", "2",
        "--repeats", "1", "--warmup", "0", "--rounds", "1"]


def _run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "runtime.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, *extra, "--out", str(out)], capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| config |" in proc.stdout
    return json.loads(out.read_text())


def test_tiny_run_has_every_row_and_logits_agree(tmp_path):
    data = _run(tmp_path, "--in-process", "--gen-prompt", "8", "--gen-tokens", "4")
    rows = {(r["config"], r["dtype"]): r for r in data["rows"]}
    configs = {"fwd_xkern", "fwd_peft_mixed", "fwd_peft_dense", "train_xkern", "train_peft", "gen_xkern", "gen_peft"}
    if data["environment"]["bnb_cpu_bf16_fast_path"]:
        configs.add("fwd_peft_mixed_exact")
    assert set(rows) == {(c, d) for c in configs for d in ("float32", "bfloat16")}
    for r in rows.values():
        assert r["median_ms"] > 0 and r["tokens_per_s"] > 0 and r["peak_mb"] > 0 and r["weight_mb"] > 0
    assert rows[("fwd_xkern", "float32")]["tokens"] < 8 * 16  # some requests are left-padded
    assert rows[("gen_xkern", "float32")]["tokens"] == 8 * 4  # new tokens of every request
    assert rows[("fwd_xkern", "float32")]["adapter_mb"] > 0
    for (name, dtype), r in rows.items():
        if name not in ("fwd_xkern", "train_xkern", "gen_xkern"):
            assert r["xkern_speedup"] > 0, (name, dtype)
        if r["section"] == "forward":
            assert 0 < r["fraction_of_gemm_rate"]
    gemm = data["config"]["gemm"]
    assert gemm["float32"]["gflops_per_s"] > 0 and gemm["bfloat16"]["gflops_per_s"] > 0
    f32, bf16 = data["summary"]["float32"], data["summary"]["bfloat16"]
    # same NF4 bytes and adapter files on both sides: float32 logits agree (the bnb bf16 CPU path is looser)
    assert f32["max_abs_logit"] > 0.1
    assert f32["max_abs_logit_diff"] < 1e-4
    assert f32["first_loss_abs_diff"] < 1e-4
    assert f32["generated_tokens_equal_fraction"] == 1.0  # greedy tokens of the same model
    # bf16: one bf16 product per term on both sides, roundings differ: close, not equal
    assert bf16["max_abs_logit_diff"] < 0.1 * bf16["max_abs_logit"]
    assert bf16["first_loss_abs_diff"] < 0.05
    for part in (f32, bf16):
        assert part["forward_fastest_baseline"] in {c for c, _ in rows} and part["forward_speedup_vs_fastest"] > 0
    for key in ("torch", "transformers", "peft", "bitsandbytes", "cpu_count"):
        assert key in data["environment"]
    assert data["config"]["batch"] == 8 and data["config"]["adapter_names"] == ["a0", "a1", "a2", "a3"]


@pytest.mark.slow
def test_child_process_reports_its_own_peak(tmp_path):
    data = _run(tmp_path, "--configs", "fwd_xkern", "--dtypes", "float32")
    (row,) = data["rows"]
    assert row["config"] == "fwd_xkern" and data["config"]["isolation"] == "one subprocess per run"
    assert row["peak_mb"] >= row["rss_after_load_mb"] * 0.9
