"""The test tree cannot shadow an installed distribution.

pytest (prepend import mode) puts on ``sys.path`` the first folder above each test file that has no
``__init__.py``. If any test folder lacked one, its name would become a top-level module and could
hide a real package of that name: ``tests/kernels`` once hid the ``kernels`` distribution that
transformers imports, and the suite failed to collect.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _test_folders() -> list[Path]:
    return sorted({p.parent for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts})


def test_every_test_folder_is_a_package_under_tests():
    missing = [str(d.relative_to(TESTS.parent)) for d in _test_folders() if not (d / "__init__.py").is_file()]
    assert not missing, f"add __init__.py to {missing}: without it pytest puts the folder on sys.path"


def test_tests_is_the_only_top_level_name_and_it_is_ours():
    top_level = {d.relative_to(TESTS.parent).parts[0] for d in _test_folders()}
    assert top_level == {"tests"}
    owners = importlib.metadata.packages_distributions().get("tests")
    assert not owners, f"installed distributions {owners} ship a top-level 'tests' that ours would shadow"
    spec = importlib.util.find_spec("tests")
    assert spec is not None and Path(spec.origin).resolve() == TESTS / "__init__.py"


def test_no_installed_distribution_is_shadowed_by_a_test_module():
    """What a test imports as ``tests.x`` must never be reachable as plain ``x``."""
    installed = set(importlib.metadata.packages_distributions())
    for folder in _test_folders():
        for entry in folder.iterdir():
            name = entry.stem if entry.suffix == ".py" else entry.name
            spec = importlib.util.find_spec(name) if name.isidentifier() and name not in installed else None
            if spec is None or spec.origin is None:
                continue
            assert not Path(spec.origin).resolve().is_relative_to(TESTS), (
                f"{entry} is importable as top-level {name!r}")
