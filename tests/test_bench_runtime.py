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
    data = _run(tmp_path, "--in-process")
    rows = {r["config"]: r for r in data["rows"]}
    expected = {"fwd_xkern", "fwd_peft_mixed", "fwd_peft_loop", "train_xkern", "train_peft"}
    if data["environment"]["bnb_cpu_bf16_fast_path"]:
        expected.add("fwd_peft_mixed_exact")
    assert set(rows) == expected
    for r in rows.values():
        assert r["median_ms"] > 0 and r["tokens_per_s"] > 0 and r["peak_mb"] > 0 and r["weight_mb"] > 0
    assert rows["fwd_xkern"]["tokens"] < 8 * 16  # some requests are left-padded
    assert rows["fwd_xkern"]["adapter_mb"] > 0
    for name in expected - {"fwd_xkern", "train_xkern"}:
        assert rows[name]["xkern_speedup"] > 0
    summary = data["summary"]
    # same NF4 bytes and adapter files on both sides: float32 logits agree (the bnb bf16 CPU path is looser)
    assert summary["max_abs_logit"] > 0.1
    assert summary["max_abs_logit_diff"] < 1e-4
    assert rows["fwd_peft_loop"]["max_abs_logit_diff_vs_xkern"] < 0.05
    assert summary["first_loss_abs_diff"] < 1e-4
    for key in ("torch", "transformers", "peft", "bitsandbytes", "cpu_count"):
        assert key in data["environment"]
    assert data["config"]["batch"] == 8 and data["config"]["adapter_names"] == ["a0", "a1", "a2", "a3"]


@pytest.mark.slow
def test_child_process_reports_its_own_peak(tmp_path):
    data = _run(tmp_path, "--configs", "fwd_xkern")
    (row,) = data["rows"]
    assert row["config"] == "fwd_xkern" and data["config"]["isolation"] == "one subprocess per run"
    assert row["peak_mb"] >= row["rss_after_load_mb"] * 0.9
