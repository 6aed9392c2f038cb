"""`xkern eval` under torchrun: users split across ranks give exactly the single-process metrics and ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xkern.distributed import shard_range

REPO = Path(__file__).resolve().parents[2]


def test_shards_cover_every_item_once_in_order():
    for n in (0, 1, 5, 51, 52):
        for world in (1, 2, 3, 8):
            ranges = [shard_range(n, r, world) for r in range(world)]
            assert [i for r in ranges for i in r] == list(range(n))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    with pytest.raises(ValueError, match="not in a world"):
        shard_range(5, 2, 2)


def test_two_processes_give_the_single_process_results(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    args = ["eval", "--data", "synthetic", "--domain", "Tools", "--max-users", "51", "--no-progress",
            "--scorer", "random", "popularity", "item-markov", "--n-boot", "200"]
    one = subprocess.run([sys.executable, "-m", "xkern.cli", *args, "--out", str(tmp_path / "one.json")], env=env,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29537", "-m", "xkern.cli", *args, "--out", str(tmp_path / "two.json")], env=env,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert a["results"] == b["results"]  # 51 users: ranks of 26 and 25, the random baseline included
    for ra, rb in zip(a["rows"], b["rows"], strict=True):
        assert ra["ranks"] == rb["ranks"] and ra["metrics"] == rb["metrics"]
    assert two.stdout.count("wrote ") == 1  # rank 0 alone prints and writes
