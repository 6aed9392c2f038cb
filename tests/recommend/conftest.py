"""Trained runs the recommender tests load: tiny LoRAs on synthetic data, trained once per session."""

from __future__ import annotations

import pytest

from xkern.cli import main

LORA = ["train-lora", "--data", "synthetic", "--model", "tiny", "--dtype", "float32", "--max-steps", "2",
        "--lr", "1e-2", "--batch-size", "8", "--max-train-users", "16", "--max-val-users", "4", "--no-progress"]


def train_lora_run(out, *extra: str) -> str:
    assert main([*LORA, *extra, "--out", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory):
    """A train-lora run on Tools that also ranked 6 test users (its summary holds the evaluation's metrics)."""
    return train_lora_run(tmp_path_factory.mktemp("runs") / "tools", "--domain", "Tools", "--eval-users", "6")


@pytest.fixture(scope="session")
def two_domain_runs(tmp_path_factory):
    """Two runs over one tiny base (built from Tools and Toys) whose targets differ: one server, two domains."""
    root = tmp_path_factory.mktemp("runs2")
    return [train_lora_run(root / name, "--train-domains", "Tools,Toys", "--domain", name)
            for name in ("Tools", "Toys")]
