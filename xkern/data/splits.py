"""Train / validation / test splits of user sequences.

Two protocols: leave-one-out (each user contributes to all three splits; last item = test target,
second-last = validation target) and by-user (disjoint users, as in amazon-xcross). For by-user
data the validation users are carved out of the training users with a seeded draw, because model
selection must never look at test users.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from xkern.errors import InputError

Sequences = dict[int, list[int]]


@dataclass
class Split:
    """train: training sequences; val/test: evaluation sequences (last item = target)."""

    train: Sequences
    val: Sequences
    test: Sequences


def leave_one_out(sequences: Sequences, min_len: int = 3) -> Split:
    """test = full sequence, val = sequence without its last item, train = without the last two.

    Users with fewer than `min_len` (>= 3) items cannot give all three and go to train only.
    """
    if min_len < 3:
        raise InputError("leave-one-out needs min_len >= 3 (two targets and a history)")
    train: Sequences = {}
    val: Sequences = {}
    test: Sequences = {}
    for u in sorted(sequences):
        seq = list(sequences[u])
        if len(seq) < min_len:
            if seq:
                train[u] = seq
            continue
        train[u] = seq[:-2]
        val[u] = seq[:-1]
        test[u] = seq
    return Split(train, val, test)


def carve_users(users: list[int], frac: float, seed: int) -> set[int]:
    """A seeded `frac` of `users` (at least one when frac > 0 and there are >= 2 users)."""
    if not 0.0 <= frac < 1.0:
        raise InputError(f"fraction must be in [0, 1), got {frac}")
    pool = sorted(users)
    if frac == 0.0 or len(pool) < 2:
        return set()
    n = min(max(1, round(frac * len(pool))), len(pool) - 1)
    perm = np.random.default_rng(seed).permutation(len(pool))
    return {pool[i] for i in perm[:n]}


def by_user(train: Sequences, test: Sequences, val_frac: float = 0.1, seed: int = 0) -> Split:
    """Keep the given train/test users; validation = a seeded `val_frac` of train users (with >= 2
    items), whose last item is the validation target; those users leave the training set."""
    overlap = train.keys() & test.keys()
    if overlap:
        raise InputError(f"by-user split: {len(overlap)} users are in both train and test")
    eligible = [u for u, s in train.items() if len(s) >= 2]
    val_users = carve_users(eligible, val_frac, seed)
    new_train = {u: list(s) for u, s in sorted(train.items()) if u not in val_users}
    val = {u: list(train[u]) for u in sorted(val_users)}
    return Split(new_train, val, {u: list(s) for u, s in sorted(test.items()) if len(s) >= 2})


def split_users(sequences: Sequences, test_frac: float = 0.2, seed: int = 0) -> tuple[Sequences, Sequences]:
    """Split users into (train, test) sequences by a seeded draw (used to build by-user folders)."""
    test_users = carve_users(list(sequences), test_frac, seed)
    train = {u: s for u, s in sorted(sequences.items()) if u not in test_users}
    test = {u: s for u, s in sorted(sequences.items()) if u in test_users}
    return train, test


def sample_users(users: Sequence[int], n: int, rng: np.random.Generator | int) -> list[int]:
    """``n`` of ``users`` (all of them when ``n >= len(users)``), sorted: the first ``n`` of a seeded permutation.

    The one user-sampling rule of xkern: for one generator, a smaller sample is a prefix-subset of a
    larger one (0.25 of the users lie inside 0.5). ``rng``: a seed (``np.random.default_rng(seed)``)
    or a generator keyed by purpose (``user_rng(seed, "weave-users", domain)``), so that samples
    drawn for different purposes do not depend on each other.
    """
    users = sorted(users)
    if n >= len(users):
        return users
    gen = np.random.default_rng(rng) if isinstance(rng, (int, np.integer)) else rng
    perm = gen.permutation(len(users))
    return sorted(users[i] for i in perm[: max(int(n), 0)])


def subsample_train(train: Sequences, fraction: float, seed: int = 0) -> Sequences:
    """A seeded `fraction` of training users; nested (0.25 is a subset of 0.5) for a fixed seed."""
    if not 0.0 < fraction <= 1.0:
        raise InputError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return dict(train)
    keep = sample_users(list(train), max(1, round(fraction * len(train))), seed)
    return {u: train[u] for u in keep}
