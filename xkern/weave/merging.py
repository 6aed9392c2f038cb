"""Merging WeaveRec's adapters and serving the merge: exact (rank sum r_i), SVD (rank r), or folded.

- :func:`merge_loaded`: the task-arithmetic merge (``xkern.adapters.merge``) of adapters loaded in
  a model, added back as one adapter.
- ``mode="exact"``: one adapter of rank ``sum r_i`` through the core op (no approximation);
  ``mode="svd"``: the best rank-``rank`` approximation (the cost of one adapter); ``mode="fold"``:
  :func:`folded` adds the merged delta into the NF4 base weights (re-quantized) for the duration of
  a ``with`` block, served as ``"__base__"`` by the plain NF4 kernel.
- :func:`simplex_grid` and :func:`select_weights`: the merge weights chosen on the validation split
  by a grid over the simplex.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from xkern.adapters import LoraAdapter, fold, merge
from xkern.adapters.peft_format import BASE
from xkern.errors import InputError

MODES = ("exact", "svd", "fold")


def merged_adapter(model: Any, names: Sequence[str], weights: Sequence[float] | None = None,
                   method: str = "linear", rank: int | None = None, **kwargs: Any) -> LoraAdapter:
    """The merge (``xkern.adapters.merge``) of adapters ``names`` of ``model``; ``None`` weights: uniform."""
    return merge([model.get_adapter(n) for n in names], weights, method, rank=rank, **kwargs)


def merge_loaded(model: Any, name: str, names: Sequence[str], weights: Sequence[float] | None = None,
                 mode: str = "exact", rank: int | None = None, method: str = "linear",
                 replace: bool = True, **kwargs: Any) -> str:
    """Merge adapters ``names`` of ``model`` and add the result as adapter ``name``; returns ``name``.

    ``mode``: ``exact`` (rank ``sum r_i``) or ``svd`` (rank ``rank``, default ``max r_i``); for
    ``fold`` use :func:`folded`. ``replace``: delete an existing adapter ``name`` first.
    """
    if mode not in ("exact", "svd"):
        raise InputError(f"mode must be 'exact' or 'svd' here (fold: use weave.folded), got {mode!r}")
    if mode == "svd" and rank is None:
        rank = max(model.get_adapter(n).modules[m].rank for n in names for m in model.get_adapter(n).modules)
    adapter = merged_adapter(model, names, weights, method, rank if mode == "svd" else None, **kwargs)
    if replace and name in model.list_adapters():
        model.delete_adapter(name)
    model.add_lora(name, adapter)
    return name


@contextlib.contextmanager
def folded(model: Any, adapter: LoraAdapter, weight: float = 1.0) -> Iterator[str]:
    """Fold ``adapter`` into the model's NF4 weights (re-quantized) inside the block; yields ``"__base__"``.

    The original NF4 weights are put back on exit, even after an exception.
    """
    layers = model.nf4_layers
    base = {name: layer.nf4_weight for name, layer in layers.items()}
    new = fold(base, adapter, weight)
    saved = {name: base[name] for name in adapter.modules}
    try:
        for name in adapter.modules:
            layers[name].set_nf4_weight(new[name])
        yield BASE
    finally:
        for name, w in saved.items():
            layers[name].set_nf4_weight(w)


def simplex_grid(n: int, step: float) -> list[tuple[float, ...]]:
    """All weight vectors of ``n`` non-negative multiples of ``step`` summing to 1 (``1/step`` an integer)."""
    if n < 1:
        raise InputError("need at least one weight")
    k = round(1.0 / step)
    if k < 1 or abs(k * step - 1.0) > 1e-9:
        raise InputError(f"step must divide 1 (1/step an integer), got {step}")
    out = []
    for combo in itertools.product(range(k + 1), repeat=n - 1):
        if sum(combo) <= k:
            parts = (*combo, k - sum(combo))
            out.append(tuple(p / k for p in parts))
    return sorted(out, reverse=True)


def select_weights(score: Callable[[tuple[float, ...]], float], n: int, step: float = 0.25,
                   prefer: Sequence[float] | None = None) -> tuple[tuple[float, ...], list[dict[str, Any]]]:
    """Grid search over the simplex: the weights with the highest ``score(weights)``.

    Ties go to the weights closest to ``prefer`` (default uniform), then to the first in grid order.
    Returns ``(best, table)`` with one ``{"weights", "score"}`` row per grid point.
    """
    grid = simplex_grid(n, step)
    ref = np.full(n, 1.0 / n) if prefer is None else np.asarray(prefer, dtype=np.float64)
    table = [{"weights": list(w), "score": float(score(w))} for w in grid]
    best = max(range(len(grid)), key=lambda i: (table[i]["score"], -float(np.abs(np.asarray(grid[i]) - ref).sum()),
                                                -i))
    return grid[best], table


def select_merge_weights(model: Any, names: Sequence[str], evaluate: Callable[[str], float], step: float = 0.25,
                         method: str = "linear", scratch: str = "weave-select",
                         **merge_kwargs: Any) -> tuple[tuple[float, ...], list[dict[str, Any]]]:
    """:func:`select_weights` over merges of ``names``: each grid point merged exactly into adapter
    ``scratch`` and scored by ``evaluate(adapter_name)`` (e.g. NDCG@10 on validation candidates)."""
    adapters = [model.get_adapter(n) for n in names]

    def score(w: tuple[float, ...]) -> float:
        if scratch in model.list_adapters():
            model.delete_adapter(scratch)
        model.add_lora(scratch, merge(adapters, list(w), method, **merge_kwargs))
        try:
            return float(evaluate(scratch))
        finally:
            model.delete_adapter(scratch)

    return select_weights(score, len(names), step)
