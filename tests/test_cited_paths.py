"""Every repository path that code comments, docstrings and docs cite exists (a glob matches at least one file),
and none of them cites an issue number."""

from __future__ import annotations

import re
from pathlib import Path

THIS_FILE = Path(__file__).resolve()
ROOT = THIS_FILE.parents[1]
# a path of this repository: a top-level folder of ours, then path characters, ending in a known extension; not
# preceded by a path character (torch/csrc/... is torch's, not ours)
CITED = re.compile(r"(?<![\w/.-])((?:xkern|tests|bench|csrc|docs|examples)/[\w./*-]+?"
                   r"\.(?:py|md|cpp|h|cu|cuh|sh|json|toml))(?![\w*])")
SOURCES = ("xkern", "csrc", "bench", "examples", "tests", "docs")
SUFFIXES = {".py", ".md", ".cpp", ".h", ".cu", ".cuh", ".sh", ".toml"}
PACKAGES = ("xkern", "csrc")
# a source file named from inside a package (docs say `ops/backends/cpu_native.py`): one of its subfolders first
SUBFOLDERS = sorted({d.name for top in PACKAGES for d in (ROOT / top).iterdir()
                     if d.is_dir() and not d.name.startswith(("_", "."))})
CITED_INSIDE = re.compile(r"(?<![\w/.-])((?:" + "|".join(map(re.escape, SUBFOLDERS)) + r")/[\w./*-]+?"
                          r"\.(?:py|cpp|h|cu|cuh))(?![\w*])")


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
            for cited in CITED_INSIDE.findall(line):
                if not any(any((ROOT / top).glob(f"**/{cited}")) for top in PACKAGES):
                    missing.append(f"{path.relative_to(ROOT)}:{lineno}: {cited} (inside {' or '.join(PACKAGES)})")
    assert not missing, "cited paths that do not exist:\n" + "\n".join(missing)


# "issue 17", "issues #13": not "the compiler issues 64/128-bit loads"
ISSUE_NUMBER = re.compile(r"\bissues? #?\d+(?![\w/])", re.IGNORECASE)


def test_nothing_cites_an_issue_number():
    """A reader of the repository cannot follow an issue number: the text says the reason itself."""
    cited = [f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}" for path in _files()
             for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
             if ISSUE_NUMBER.search(line) and path != THIS_FILE]  # this file's examples excepted
    assert not cited, "say the reason instead of the issue:\n" + "\n".join(cited)


def test_the_pattern_finds_paths_and_skips_foreign_ones():
    assert CITED.findall("see xkern/ops/registry.py and docs/*.md, not torch/csrc/utils/pybind.h") == [
        "xkern/ops/registry.py", "docs/*.md"]
    examples = ("as issue 17 said", "see issues #13.", "it issues 64/128-bit loads")
    assert [bool(ISSUE_NUMBER.search(t)) for t in examples] == [True, True, False]
    assert CITED_INSIDE.findall("`ops/backends/cpu_native.py` and cpu/kernels.h, not xkern/ops/checks.py") == [
        "ops/backends/cpu_native.py", "cpu/kernels.h"]
