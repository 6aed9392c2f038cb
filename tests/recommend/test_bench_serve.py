"""bench/bench_serve.py on a handful of requests: both modes answered, their batch sizes and the machine recorded."""

from __future__ import annotations

import json

from tests.helpers import load_script


def test_bench_serve_records_both_modes_and_the_machine(lora_run, tmp_path):
    bench = load_script("bench/bench_serve.py")
    out = tmp_path / "serve.json"
    assert bench.main(["--run", lora_run, "--clients", "3", "--requests", "6", "--seconds", "60",
                       "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    one, batched = doc["modes"]["one-at-a-time"], doc["modes"]["batched"]
    assert one["answered"] == batched["answered"] == 6 and one["statuses"] == {"200": 6}
    assert one["batch_size_max"] == 1 and one["config"]["max_batch_size"] == 1
    assert batched["config"]["batch_wait_ms"] > 0 and batched["latency_ms_p99"] >= batched["latency_ms_p50"] > 0
    assert doc["machine"]["cpu"] and len(doc["machine"]["load_average_after"]) == 3
