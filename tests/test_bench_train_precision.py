"""bench/bench_train_precision.py end to end on the tiny model and synthetic data: both dtypes train, the JSON
the docs table reads has every field, and its comparisons are computed from the two loss curves."""

import json

import pytest

from tests.helpers import load_script


def test_the_precision_bench_writes_both_curves_and_their_comparison(tmp_path):
    bench = load_script("bench/bench_train_precision.py")
    out = tmp_path / "precision.json"
    bench.main(["--data", "synthetic", "--model", "tiny", "--steps", "12", "--tail", "4", "--batch-size", "4",
                "--threads", "1", "--out", str(out)])
    doc = json.loads(out.read_text())
    b, f = doc["runs"]["bfloat16"], doc["runs"]["float32"]
    assert len(b["losses"]) == len(f["losses"]) == 12 and all(isinstance(v, float) for v in b["losses"])
    assert doc["tail_mean_difference"] == pytest.approx(sum(b["losses"][-4:]) / 4 - sum(f["losses"][-4:]) / 4)
    pairs = zip(b["losses"], f["losses"], strict=True)
    assert doc["max_step_difference"] == pytest.approx(max(abs(x - y) for x, y in pairs))
    assert doc["within_noise"] == (abs(doc["tail_mean_difference"]) <= doc["tail_mean_noise"])
    assert b["train_tokens_per_s"] > 0 and doc["speedup_bf16"] > 0
