"""`xkern weave` under torchrun (gloo): 2 processes with half the batch each train, merge and evaluate what
1 process with the whole batch does; users are split across ranks for scoring, rank 0 alone writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARGS = ["weave", "--data", "synthetic", "--model", "tiny", "--train-users", "16", "--eval-users", "13",
        "--val-users", "6", "--select-step", "0.5", "--max-steps", "3", "--lr", "1e-2", "--speed-users", "0",
        "--rows", "target-only,weave-merge", "--no-progress"]


def test_two_processes_give_the_single_process_table(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    runs = {"one": [sys.executable, "-m", "xkern.cli", *ARGS, "--batch-size", "4"],
            "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571",
                    "-m", "xkern.cli", *ARGS, "--batch-size", "2"]}
    results = {}
    for name, cmd in runs.items():
        out = tmp_path / name / "results.json"
        proc = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True, timeout=400,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("wrote ") == 1  # one report, from rank 0
        results[name] = json.loads(out.read_text())
    one, two = results["one"], results["two"]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["n_eval_users"] == one["n_eval_users"] == 13  # 7 + 6 users per rank, gathered
    for name in one["adapters"]:  # the same global batch, so the same training losses
        assert two["adapters"][name]["steps"] == one["adapters"][name]["steps"] == 3
        assert two["adapters"][name]["final_loss"] == pytest.approx(one["adapters"][name]["final_loss"], rel=1e-4)
    assert [r["method"] for r in two["rows"]] == [r["method"] for r in one["rows"]]
    for a, b in zip(two["rows"], one["rows"], strict=True):
        for k in ("HR@1", "HR@10", "NDCG@10", "MRR"):
            assert a[k] == pytest.approx(b[k], abs=1e-6), (a["method"], a["mode"], k)
        if a["mode"] == "listwise":  # counted per rank, summed
            assert (a["exact"], a["fallback"]) == (b["exact"], b["fallback"])
            assert a["exact"] + a["fallback"] == 13
    assert two["selection"]["best"] == one["selection"]["best"]
