"""Every repository path that code comments, docstrings and docs cite exists (a glob matches at least one file)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a path of this repository: a top-level folder of ours, then path characters, ending in a known extension; not
# preceded by a path character (torch/csrc/... is torch's, not ours)
CITED = re.compile(r"(?<![\w/.-])((?:xkern|tests|bench|csrc|docs|examples)/[\w./*-]+?"
                   r"\.(?:py|md|cpp|h|cu|cuh|sh|json|toml))(?![\w*])")
SOURCES = ("xkern", "csrc", "bench", "examples", "tests", "docs")
SUFFIXES = {".py", ".md", ".cpp", ".h", ".cu", ".cuh", ".sh", ".toml"}


def _files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "pyproject.toml", ROOT / "setup.py"]
    for top in SOURCES:
        files += [p for p in (ROOT / top).rglob("*") if p.suffix in SUFFIXES and p.is_file()]
    return files


def test_cited_repository_paths_exist():
    missing = []
    for path in _files():
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for cited in CITED.findall(line):
                if not any(ROOT.glob(cited)):
                    missing.append(f"{path.relative_to(ROOT)}:{lineno}: {cited}")
    assert not missing, "cited paths that do not exist:\n" + "\n".join(missing)


def test_the_pattern_finds_paths_and_skips_foreign_ones():
    assert CITED.findall("see xkern/ops/registry.py and docs/*.md, not torch/csrc/utils/pybind.h") == [
        "xkern/ops/registry.py", "docs/*.md"]
