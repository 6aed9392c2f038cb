"""Fixtures of the X-Cross tests: PEFT adapters saved from tiny Llama / BERT models."""

from __future__ import annotations

import pytest

from tests.helpers import save_peft_adapters


@pytest.fixture(scope="session")
def peft_adapters(tmp_path_factory) -> dict[str, dict[str, str]]:
    out = {}
    for family in ("llama", "bert"):
        out[family] = save_peft_adapters(family, tmp_path_factory.mktemp(f"xc-adapters-{family}"), 3)
    return out
