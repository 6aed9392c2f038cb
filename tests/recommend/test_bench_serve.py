"""bench/bench_serve.py on a handful of requests: rank_batch against rank, both server modes at two loads,
the README's lines timed, and the machine recorded."""

from __future__ import annotations

import json

from tests.helpers import load_script


def test_bench_serve_records_rank_batch_both_modes_and_the_machine(two_domain_runs, tmp_path):
    bench = load_script("bench/bench_serve.py")
    out = tmp_path / "serve.json"
    args = [a for r in two_domain_runs for a in ("--run", r)]
    assert bench.main([*args, "--clients", "1,3", "--requests", "6", "--seconds", "60", "--users", "4",
                       "--repeats", "1", "--threads", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rb = doc["rank_batch"]
    assert rb["users"] == 4 and len(rb["runs"]) == 2 and rb["max_abs_score_difference"] < 1e-3
    assert rb["batched_seconds"] > 0 and rb["one_at_a_time_seconds"] > 0
    one, batched = doc["modes"]["one-at-a-time"], doc["modes"]["batched"]
    for mode in (one, batched):
        assert set(mode["loads"]) == {"1", "3"} and mode["peak"]["clients"] in (1, 3)
        assert all(r["answered"] == 6 and r["statuses"] == {"200": 6} for r in mode["loads"].values())
    assert max(r["batch_size_max"] for r in one["loads"].values()) == 1 and one["config"]["max_batch_size"] == 1
    assert batched["config"]["batch_wait_ms"] > 0
    assert all(r["latency_ms_p99"] >= r["latency_ms_p50"] > 0 for r in batched["loads"].values())
    assert set(doc["readme"]["seconds"]) == {"xkern train-lora", "xkern.load_recommender", "rec.rank (first call)",
                                             "rec.recommend", "xkern recommend"}
    assert doc["machine"]["cpu"] and len(doc["machine"]["load_average_after"]) == 3
