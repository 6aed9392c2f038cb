"""Ranking metrics for the single-target candidate protocol (HR@K, NDCG@K, MRR).

Every model in xkern is compared on the same candidate lists, so the metric must not depend on how
a scorer happens to order tied scores: a tie with the target counts against the target
(pessimistic rank). A constant scorer therefore gets the worst rank, not a lucky one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from xkern.errors import InputError


def to_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """Array-like (numpy, list, torch tensor on any device/dtype) -> numpy array."""
    if hasattr(x, "detach"):  # torch tensor; imported lazily by whoever made it
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()  # bf16/fp16 have no numpy equivalent
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def pessimistic_ranks(scores: Any, target: Any) -> np.ndarray:
    """0-based rank of the target in each row: the number of OTHER candidates scoring >= it.

    scores: [U, C] (higher is better); target: [U] column index of the true item.
    Raises ValueError on NaN scores, bad shapes or out-of-range targets.
    """
    s = to_numpy(scores, np.float64)
    t = to_numpy(target)
    if s.ndim != 2:
        raise InputError(f"scores must be 2-D [users, candidates], got shape {s.shape}")
    if t.ndim != 1 or t.shape[0] != s.shape[0]:
        raise InputError(f"target must be 1-D with {s.shape[0]} entries, got shape {t.shape}")
    if s.shape[0] == 0 or s.shape[1] == 0:
        raise InputError(f"need at least one user and one candidate, got scores shape {s.shape}")
    if not np.issubdtype(t.dtype, np.integer):
        if not np.all(np.equal(np.mod(t, 1), 0)):
            raise InputError("target must hold integer candidate indices")
        t = t.astype(np.int64)
    if t.min() < 0 or t.max() >= s.shape[1]:
        raise InputError(f"target indices must lie in [0, {s.shape[1]}), got [{t.min()}, {t.max()}]")
    nan_rows = np.isnan(s).any(axis=1)
    if nan_rows.any():
        raise InputError(f"scores contain NaN (first bad row: {int(np.flatnonzero(nan_rows)[0])})")
    target_score = s[np.arange(s.shape[0]), t]
    # the target is always >= itself, hence the -1
    return (s >= target_score[:, None]).sum(axis=1) - 1


def metrics_from_ranks(ranks: Any, ks: Sequence[int] = (1, 3, 10)) -> dict[str, float]:
    """HR@k, NDCG@k (single target: 1[r<k]/log2(r+2)) and MRR (mean 1/(r+1)) from 0-based ranks."""
    r = to_numpy(ranks, np.float64)
    if r.ndim != 1 or r.size == 0:
        raise InputError(f"ranks must be a non-empty 1-D array, got shape {r.shape}")
    out: dict[str, float] = {}
    for k in ks:
        if int(k) < 1:
            raise InputError(f"k must be >= 1, got {k}")
        out[f"HR@{k}"] = float(np.mean(r < k))
    for k in ks:
        out[f"NDCG@{k}"] = float(np.mean(np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0)))
    out["MRR"] = float(np.mean(1.0 / (r + 1.0)))
    return out


def evaluate_ranking(scores: Any, target: Any, ks: Sequence[int] = (1, 3, 10)) -> dict[str, float]:
    """Mean HR@k, NDCG@k and MRR over users for scores [U, C] and target [U] (index of the true item).

    Ties with the target count against it; NaN scores raise ValueError; k may exceed C.
    """
    return metrics_from_ranks(pessimistic_ranks(scores, target), ks)
