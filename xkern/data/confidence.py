"""How sure a ranking table is: per-user bootstrap confidence intervals and paired comparisons.

Every row of a table is ranked on the same users and candidates, so two rows are compared *paired*:
the bootstrap resamples users once and measures both rows on the same resample, which cancels the
variance that comes from which users happen to be in the test set. Intervals are percentile
bootstrap intervals over users (95% by default); ``n_boot`` and ``seed`` make them reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from xkern.data.metrics import to_numpy
from xkern.errors import InputError

METRICS = ("HR@1", "HR@10", "NDCG@10", "MRR")


def per_user(ranks: Any, metric: str) -> np.ndarray:
    """One user's value of ``metric`` (``HR@k``, ``NDCG@k``, ``MRR``) from 0-based pessimistic ranks."""
    r = to_numpy(ranks, np.float64)
    if r.ndim != 1 or r.size == 0:
        raise InputError(f"ranks must be a non-empty 1-D array, got shape {r.shape}")
    if metric == "MRR":
        return 1.0 / (r + 1.0)
    name, _, k = metric.partition("@")
    if not k.isdigit() or name not in ("HR", "NDCG"):
        raise InputError(f"unknown metric {metric!r} (HR@k, NDCG@k, MRR)")
    hit = r < int(k)
    return hit.astype(np.float64) if name == "HR" else hit / np.log2(r + 2.0)


def _resamples(n_users: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_users, size=(n_boot, n_users))


def bootstrap_metrics(ranks: Any, metrics: Sequence[str] = METRICS, n_boot: int = 2000, seed: int = 0,
                      level: float = 0.95) -> dict[str, list[float]]:
    """``{metric: [mean, ci_low, ci_high]}``: the mean over users and its percentile bootstrap interval."""
    r = to_numpy(ranks, np.float64)
    idx = _resamples(r.size, n_boot, seed)
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    out = {}
    for m in metrics:
        values = per_user(r, m)
        means = values[idx].mean(axis=1)
        out[m] = [float(values.mean()), float(np.quantile(means, lo_q)), float(np.quantile(means, hi_q))]
    return out


def paired_comparison(ranks_a: Any, ranks_b: Any, metric: str = "HR@10", n_boot: int = 2000, seed: int = 0,
                      level: float = 0.95) -> dict[str, float]:
    """Row A minus row B on the same users: the mean difference, its paired bootstrap interval, and
    ``p``: the two-sided bootstrap p-value (twice the share of resamples on the other side of zero)."""
    a, b = to_numpy(ranks_a, np.float64), to_numpy(ranks_b, np.float64)
    if a.shape != b.shape:
        raise InputError(f"paired rows need the same users: {a.shape} vs {b.shape} ranks")
    diff = per_user(a, metric) - per_user(b, metric)
    return {"metric": metric, **paired_mean_difference(diff, n_boot, seed, level), "n_users": int(diff.size)}


def paired_mean_difference(diff: Any, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Per-unit differences (A - B on the same users or examples): their mean, its percentile bootstrap
    interval, and ``p``, the two-sided bootstrap p-value (twice the share of resamples on the other side of zero)."""
    diff = to_numpy(diff, np.float64)
    means = diff[_resamples(diff.size, n_boot, seed)].mean(axis=1)
    mean = float(diff.mean())
    if np.all(diff == 0):
        p = 1.0
    else:
        other_side = np.mean(means <= 0) if mean > 0 else np.mean(means >= 0)
        p = float(min(1.0, 2 * other_side))
    return {"diff": mean, "ci_low": float(np.quantile(means, (1 - level) / 2)),
            "ci_high": float(np.quantile(means, 1 - (1 - level) / 2)), "p": p}


def quality_row(method: str, ranks: Any, *, target: str, sources: Sequence[str] = (), fraction: float | str = "-",
                trainable_params: int = 0, val_loss_start: float | None = None, val_loss_best: float | None = None,
                n_boot: int = 2000, seed: int = 0, **extra: Any) -> dict[str, Any]:
    """One row of the quality results format (every row of bench/results/quality-*.json): metrics as
    ``[mean, ci_low, ci_high]``."""
    r = to_numpy(ranks, np.int64)
    return {"method": method, "target": target, "sources": list(sources), "fraction": fraction,
            "n_users": int(r.size), "trainable_params": int(trainable_params), "val_loss_start": val_loss_start,
            "val_loss_best": val_loss_best, "metrics": bootstrap_metrics(r, n_boot=n_boot, seed=seed),
            "ranks": r.tolist(), **extra}


def paired_table(rows: Sequence[Mapping[str, Any]], metric: str = "HR@10", n_boot: int = 2000,
                 seed: int = 0) -> list[dict[str, Any]]:
    """Every pair of rows (that carry ``ranks`` of the same users) compared on ``metric``."""
    out = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if len(a["ranks"]) != len(b["ranks"]):
                continue
            out.append({"a": a["method"], "a_fraction": a.get("fraction"), "b": b["method"],
                        "b_fraction": b.get("fraction"),
                        **paired_comparison(a["ranks"], b["ranks"], metric, n_boot, seed)})
    return out
