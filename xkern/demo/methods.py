"""What a row of the quickstart table is: a :class:`Method` that builds a scorer from a :class:`DemoContext`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xkern.data.domain import DomainData
from xkern.data.evaluate import Scorer


@dataclass
class DemoContext:
    """What a method may train on: the target domain (its `train` already cut to `fraction`; `val`
    for model selection, never `test`) and the full source domains."""

    target: DomainData
    sources: list[DomainData]
    fraction: float
    seed: int
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Method:
    name: str
    build: Callable[[DemoContext], Scorer]
    description: str = ""
    uses_target_train: bool = True  # False: result does not depend on the fraction
    # rows of one group share trained state (an adapter another row trains) and run in one process, in
    # order; with several workers, rows of the "sources" group run in a second process (see run_demo)
    group: str = "main"
