"""Scoring users across processes on one CPU machine: `xkern eval` alone and under `torchrun
--nproc_per_node 2`, on the same users and scorers; checks the metrics agree and records the times.

    python bench/bench_sharded_eval.py      # writes bench/results/sharded-eval-cpu.json

Each process runs one thread. Fitting a scorer is not sharded (every rank fits the same one); the
scoring of users is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "sharded-eval-cpu.json"
ARGS = ["eval", "--data", str((ROOT / ".." / "shared" / "data" / "amazon-xcross").resolve()), "--domain", "Tools",
        "--scorer", "item-markov", "token-markov", "--no-progress", "--n-boot", "200"]


def run(procs: int, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    launch = [sys.executable, "-m", "xkern.cli"] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", "29561",
         "-m", "xkern.cli"]
    start = time.perf_counter()
    proc = subprocess.run([*launch, *ARGS, "--out", str(out)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    report = json.loads(out.read_text())
    return {"processes": procs, "command_seconds": round(wall, 1), "timing": report["timing"],
            "results": report["results"], "n_users": report["results"][0]["n_users"]}


def main() -> int:
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run(p, Path(tmp) / f"{p}.json") for p in (1, 2)]
    same = runs[0]["results"] == runs[1]["results"]
    OUT.write_text(json.dumps({"machine": "2-core CPU VM", "command": "xkern " + " ".join(ARGS[:1] + ARGS[3:]),
                               "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
                               "identical_metrics": same, "runs": runs}, indent=2) + "\n")
    for r in runs:
        print(r["processes"], "process(es):", r["command_seconds"], "s;", json.dumps(r["timing"]))
    print(f"identical metrics: {same}; wrote {OUT}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
