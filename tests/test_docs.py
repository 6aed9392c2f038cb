"""Every results table in docs/ and the README is generated from a committed JSON and matches it."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tables():
    spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "bench" / "docs_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_blocks_match_their_json():
    tables = _tables()
    stale = {str(p.relative_to(ROOT)): s for p in tables.DOCS if (s := tables.update(p, write=False))}
    assert not stale, f"docs differ from bench/results (run python bench/docs_tables.py): {stale}"


def test_the_quickstart_and_benchmark_tables_are_generated_blocks():
    tables = _tables()
    found = {m.group("name") for p in tables.DOCS for m in tables.BLOCK.finditer(p.read_text())}
    assert {"quickstart-quick", "quickstart-full", "lora-linear-cpu-targets", "lora-linear-cpu-table"} <= found
    assert found <= set(tables.BLOCKS)
