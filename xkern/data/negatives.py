"""Candidate lists: the target plus sampled negatives, identical for every model.

Each user's negatives come from a generator derived from a stable hash of (seed, domain, split,
user) -- not Python's `hash()`, which is salted per process for strings -- so the candidates do not
depend on evaluation order, batch size, the set of users evaluated or the process. The target's
position within the list is drawn from the same generator (no position leak for listwise prompts).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xkern.data.domain import DomainData
from xkern.errors import InputError

STRATEGIES = ("uniform", "popularity")


def user_rng(seed: int, *keys: Any) -> np.random.Generator:
    """numpy Generator seeded by blake2b of repr((seed, *keys)): stable across runs and machines."""
    digest = hashlib.blake2b(repr((int(seed), *keys)).encode("utf-8"), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def sample_uniform(n_items: int, exclude: set[int], n: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct items drawn uniformly from range(n_items) minus `exclude`."""
    allowed_count = n_items - len({i for i in exclude if 0 <= i < n_items})
    if allowed_count < n:
        raise InputError(f"only {allowed_count} items outside the user's sequence, need {n} negatives")
    if allowed_count < 4 * n:  # dense exclusion: enumerate the allowed items
        allowed = np.setdiff1d(np.arange(n_items), np.fromiter(exclude, np.int64, len(exclude)))
        return rng.choice(allowed, size=n, replace=False)
    out: list[int] = []
    seen = set(exclude)
    while len(out) < n:  # rejection sampling: cheap when the user's sequence is small
        for i in rng.integers(0, n_items, size=2 * (n - len(out))).tolist():
            if i not in seen:
                seen.add(i)
                out.append(i)
                if len(out) == n:
                    break
    return np.asarray(out, dtype=np.int64)


def sample_popularity(
    weights: np.ndarray, exclude: set[int], n: int, rng: np.random.Generator, alpha: float = 1.0
) -> np.ndarray:
    """n distinct items with probability proportional to weight**alpha, outside `exclude`.
    Items of zero weight are used (uniformly) only when too few items have positive weight."""
    w = np.asarray(weights, dtype=np.float64) ** alpha
    w[np.fromiter(exclude, np.int64, len(exclude))] = 0.0
    positive = np.flatnonzero(w > 0)
    if len(positive) >= n:
        return rng.choice(len(w), size=n, replace=False, p=w / w.sum())
    rest = sample_uniform(len(w), set(exclude) | set(positive.tolist()), n - len(positive), rng)
    return np.concatenate([rng.permutation(positive), rest])


@dataclass
class CandidateSet:
    """items[u] = candidate item indices of user u (target included once at column target[u])."""

    domain: str
    split: str
    users: np.ndarray
    histories: list[list[int]]
    items: np.ndarray
    target: np.ndarray
    config: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.users)

    @property
    def target_items(self) -> np.ndarray:
        return self.items[np.arange(len(self.users)), self.target]

    def subset(self, index: Sequence[int] | np.ndarray) -> CandidateSet:
        idx = np.asarray(index, dtype=np.int64)
        return CandidateSet(
            self.domain,
            self.split,
            self.users[idx],
            [self.histories[i] for i in idx.tolist()],
            self.items[idx],
            self.target[idx],
            dict(self.config),
        )


def build_candidates(
    data: DomainData,
    split: str = "test",
    n_neg: int = 29,
    strategy: str = "uniform",
    seed: int = 0,
    max_users: int | None = None,
) -> CandidateSet:
    """Target + `n_neg` negatives per evaluation user of `split`; negatives avoid every item of the
    user's sequence in this domain. `max_users` keeps the first users in ascending user order."""
    if strategy not in STRATEGIES:
        raise InputError(f"unknown negative strategy {strategy!r} ({', '.join(STRATEGIES)})")
    users, histories, targets = data.examples(split)
    if max_users is not None:
        users, histories, targets = users[:max_users], histories[:max_users], targets[:max_users]
    if not users:
        raise InputError(f"{data.name}/{split}: no evaluation users")
    counts = np.asarray(data.item_counts(), dtype=np.float64) if strategy == "popularity" else None
    items = np.empty((len(users), n_neg + 1), dtype=np.int64)
    target_col = np.empty(len(users), dtype=np.int64)
    for row, (u, tgt) in enumerate(zip(users, targets, strict=True)):
        rng = user_rng(seed, data.name, split, int(u))
        exclude = data.user_items(u) | {tgt}
        if counts is None:
            neg = sample_uniform(data.n_items, exclude, n_neg, rng)
        else:
            neg = sample_popularity(counts, exclude, n_neg, rng)
        pos = int(rng.integers(0, n_neg + 1))
        items[row] = np.insert(neg, pos, tgt)
        target_col[row] = pos
    return CandidateSet(
        domain=data.name,
        split=split,
        users=np.asarray(users, dtype=np.int64),
        histories=histories,
        items=items,
        target=target_col,
        config={"n_neg": n_neg, "strategy": strategy, "seed": seed},
    )
