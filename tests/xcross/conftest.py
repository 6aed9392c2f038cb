"""Shared set-up of the X-Cross tests: tiny NF4 Llama / BERT checkpoints and PEFT adapters saved from them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.nn.conftest import bnb_dirs, exact_bnb, tiny_model  # noqa: F401  (bnb_dirs is a fixture)

TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
           "bert": ["query", "key", "value", "dense"]}


def save_peft_adapters(family: str, root: Path, n: int) -> dict[str, str]:
    """n PEFT adapters with non-zero B (different ranks), saved in PEFT's format."""
    peft = pytest.importorskip("peft")
    paths = {}
    for i in range(n):
        cfg = peft.LoraConfig(r=2 + 2 * i, lora_alpha=4 + i, target_modules=TARGETS[family], init_lora_weights=False)
        torch.manual_seed(200 + i)
        pm = peft.get_peft_model(tiny_model(family, seed=1), cfg)
        with torch.no_grad():  # PEFT's init_lora_weights=False B is large; keep the adapters' effect moderate
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.3)
        pm.save_pretrained(root / f"s{i}")
        paths[f"s{i}"] = str(root / f"s{i}")
    return paths


@pytest.fixture(scope="session")
def peft_adapters(tmp_path_factory) -> dict[str, dict[str, str]]:
    out = {}
    for family in ("llama", "bert"):
        out[family] = save_peft_adapters(family, tmp_path_factory.mktemp(f"xc-adapters-{family}"), 3)
    return out
