"""Evaluation harness: run any scorer over a CandidateSet, compute metrics, write a JSON report.

A scorer is any callable `scorer(histories, candidates) -> scores` with `histories` a list of B item
index lists (oldest first) and `candidates` an int array [B, C] of item indices; it returns [B, C]
scores (numpy, list or torch tensor), higher = more likely. Neural models of later issues plug in
through the same contract, so every model is measured on identical candidates and code.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from xkern.data.metrics import metrics_from_ranks, pessimistic_ranks, to_numpy
from xkern.data.negatives import CandidateSet
from xkern.errors import InputError, InputTypeError
from xkern.fileio import atomic_write_text


class Scorer(Protocol):
    def __call__(self, histories: Sequence[Sequence[int]], candidates: np.ndarray) -> Any: ...


def score_candidates(
    scorer: Scorer, cands: CandidateSet, batch_size: int = 256, progress: bool = False, desc: str = "scoring",
    distributed: bool = False,
) -> np.ndarray:
    """scores [U, C] for every user of `cands`, in batches (tqdm bar when progress=True).

    ``distributed``: under ``torchrun``, each rank scores a contiguous share of the users and the
    shares are gathered in order, so every rank returns the scores one process would; a scorer with
    ``skip_rows(n, c)`` (the random baseline) first skips the rows before its share.
    """
    from tqdm import tqdm

    from xkern.distributed import dist_setup, gather_rows, shard_range

    rank, world = dist_setup() if distributed else (0, 1)
    n, c = cands.items.shape
    mine = shard_range(n, rank, world)
    if world > 1 and mine.start and hasattr(scorer, "skip_rows"):
        scorer.skip_rows(mine.start, c)
    out = np.empty((len(mine), c), dtype=np.float64)
    starts = range(mine.start, mine.stop, batch_size)
    for s in tqdm(starts, desc=desc, unit="batch", disable=not progress or rank != 0, leave=False):
        e = min(s + batch_size, mine.stop)
        batch = to_numpy(scorer(cands.histories[s:e], cands.items[s:e]), np.float64)
        if batch.shape != (e - s, c):
            raise InputError(f"scorer returned shape {batch.shape}, expected {(e - s, c)}")
        out[s - mine.start:e - mine.start] = batch
    return gather_rows(out, world)


def evaluate_scorer(
    scorer: Scorer,
    cands: CandidateSet,
    ks: Sequence[int] = (1, 3, 10),
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "scoring",
    distributed: bool = False,
) -> dict[str, float]:
    """Metrics of `scorer` on `cands` (see evaluate_ranking) plus n_users and seconds.

    ``distributed``: under ``torchrun`` the users are split across ranks (see score_candidates); every
    rank returns the metrics one process gives.
    """
    t0 = time.perf_counter()
    ranks = rank_candidates(scorer, cands, batch_size, progress, desc, distributed=distributed)
    result: dict[str, float] = dict(metrics_from_ranks(ranks, ks))
    result["n_users"] = len(cands)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def rank_candidates(scorer: Scorer, cands: CandidateSet, batch_size: int = 256, progress: bool = False,
                    desc: str = "scoring", distributed: bool = False) -> np.ndarray:
    """Each user's 1-based rank of the target under ``scorer`` (ties count against it), for the callers
    that keep per-user ranks (bootstrap intervals, paired comparisons) as well as the metrics."""
    scores = score_candidates(scorer, cands, batch_size, progress, desc, distributed=distributed)
    return pessimistic_ranks(scores, cands.target)


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Versions for reports, without importing torch."""
    from xkern._version import __version__

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "torch": _version("torch"),
        "xkern": __version__,
        "argv": list(sys.argv),
    }


def write_report(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` + environment as indented JSON (parents created)."""
    data = {**payload, "environment": environment(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return atomic_write_text(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (set, frozenset, tuple)):
        return list(x)
    if isinstance(x, Path):
        return str(x)
    raise InputTypeError(f"not JSON serializable: {type(x).__name__}")


def format_table(rows: list[dict[str, Any]], columns: Sequence[str], floatfmt: str = "{:.4f}") -> str:
    """Plain-text table with aligned columns (numbers right-aligned)."""
    cells = [[c for c in columns]]
    for row in rows:
        line = []
        for c in columns:
            v = row.get(c, "")
            line.append(floatfmt.format(v) if isinstance(v, float) else str(v))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    numeric = [all(isinstance(row.get(c), (int, float)) for row in rows) and rows for c in columns]

    def fmt(line: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(line, widths, numeric, strict=True)
        )

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(cells[0]), sep, *(fmt(r) for r in cells[1:])]).rstrip()
