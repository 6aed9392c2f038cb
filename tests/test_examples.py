"""The real-run example scripts' table code, on the committed results (no model is run)."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    return load_script(f"examples/{name}.py")


def test_xcross_table_shows_kept_steps_and_baselines():
    xa = _load("xcross_amazon")
    log = json.loads((ROOT / "bench" / "results" / "xcross_amazon.json").read_text())
    table = xa.results_table(log).splitlines()
    body = [line for line in table if line.startswith("| ") and not line.startswith("| method")]
    assert len(body) == len(log["rows"]) + len(log["baselines"])
    for row, line in zip(log["rows"], body, strict=False):
        tr = log["training"][xa._training_key(row, log)]
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == row["method"] and float(cells[3]) == round(row["HR@10"], 3)
        assert cells[-1].startswith(f"{tr['best_step']} / {tr['steps']} ")
    assert [line.split("|")[1].split()[0] for line in body[-3:]] == ["random", "popularity", "item-markov"]
