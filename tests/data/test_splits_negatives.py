"""Splits, negative sampling (determinism, exclusion, distribution) and prompt templates."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from xkern.data import prompts
from xkern.data.negatives import build_candidates, sample_popularity, sample_uniform, user_rng
from xkern.data.splits import by_user, leave_one_out, split_users, subsample_train

REPO = Path(__file__).resolve().parents[2]


def test_leave_one_out():
    s = leave_one_out({0: [1, 2, 3, 4], 1: [5, 6], 2: [7, 8, 9]})
    assert s.train == {0: [1, 2], 1: [5, 6], 2: [7]}
    assert s.val == {0: [1, 2, 3], 2: [7, 8]}
    assert s.test == {0: [1, 2, 3, 4], 2: [7, 8, 9]}


def test_by_user_carve_out():
    train = {u: [u, u + 1, u + 2] for u in range(30)}
    train[99] = [5]  # too short to validate on: never chosen
    test = {100: [1, 2], 101: [3]}
    s = by_user(train, test, val_frac=0.1, seed=7)
    assert len(s.val) == 3 and 99 not in s.val
    assert s.val.keys().isdisjoint(s.train.keys())
    assert s.val.keys() | s.train.keys() == train.keys()
    assert s.test == {100: [1, 2]}  # a 1-item test user has no history
    assert by_user(train, test, 0.1, seed=7).val == s.val
    assert by_user(train, test, 0.1, seed=8).val != s.val
    with pytest.raises(ValueError, match="both train and test"):
        by_user({1: [1, 2]}, {1: [1, 2]})


def test_split_users_and_subsample_are_nested_and_seeded():
    seqs = {u: [u] for u in range(50)}
    tr, te = split_users(seqs, test_frac=0.2, seed=1)
    assert len(te) == 10 and len(tr) == 40 and tr.keys().isdisjoint(te.keys())
    quarter, half = subsample_train(tr, 0.25, seed=2), subsample_train(tr, 0.5, seed=2)
    assert len(quarter) == 10 and len(half) == 20
    assert quarter.keys() <= half.keys()
    assert subsample_train(tr, 1.0) == tr


def test_user_rng_is_stable_and_keyed():
    a = user_rng(0, "Tools", "test", 5).integers(0, 1 << 30, size=4)
    assert np.array_equal(a, user_rng(0, "Tools", "test", 5).integers(0, 1 << 30, size=4))
    for other in [
        (1, "Tools", "test", 5),
        (0, "Toys", "test", 5),
        (0, "Tools", "val", 5),
        (0, "Tools", "test", 6),
    ]:
        assert not np.array_equal(a, user_rng(*other).integers(0, 1 << 30, size=4))


@pytest.mark.parametrize("n_items", [12, 1000])  # dense (enumerate) and sparse (rejection) paths
def test_sample_uniform_excludes_and_is_uniform(n_items):
    rng = np.random.default_rng(0)
    exclude = {0, 1, 2}
    counts = Counter()
    trials = 3000 if n_items == 12 else 300
    for _ in range(trials):
        s = sample_uniform(n_items, exclude, 3, rng)
        assert len(set(s.tolist())) == 3 and not exclude & set(s.tolist())
        counts.update(s.tolist())
    if n_items == 12:  # 9 allowed items, each expected 3000 * 3 / 9 = 1000 times
        assert set(counts) == set(range(3, 12))
        assert all(850 < c < 1150 for c in counts.values())
    with pytest.raises(ValueError, match="only 2 items"):
        sample_uniform(5, {0, 1, 2}, 3, rng)


def test_sample_popularity():
    rng = np.random.default_rng(0)
    w = np.array([0.0, 0.0, 1000.0, 1.0, 1.0, 1.0, 0.0])
    draws = [sample_popularity(w, {3}, 2, rng).tolist() for _ in range(500)]
    assert all(3 not in d and 0 not in d and 1 not in d and 6 not in d for d in draws)
    assert sum(2 in d for d in draws) == 500  # 1000 vs 1: item 2 is drawn essentially always
    # fewer positive-weight items than needed: fill uniformly from the rest
    d = sample_popularity(np.array([0.0, 5.0, 0.0, 0.0]), {3}, 3, rng).tolist()
    assert sorted(d) == [0, 1, 2]


def test_candidates_exclude_user_items_and_hold_target(tiny_domain):
    c = build_candidates(tiny_domain, "test", n_neg=10, seed=0)
    assert c.items.shape == (2, 11)
    assert c.users.tolist() == [10, 11]
    assert c.target_items.tolist() == [12, 1]
    assert c.histories == [[0, 2, 11], [13, 14]]
    for row, u in enumerate(c.users.tolist()):
        negs = set(np.delete(c.items[row], c.target[row]).tolist())
        assert len(negs) == 10
        assert not negs & set(tiny_domain.test[u])


def test_candidates_deterministic_and_order_independent(tiny_domain):
    a = build_candidates(tiny_domain, "test", n_neg=10, seed=0)
    b = build_candidates(tiny_domain, "test", n_neg=10, seed=0, max_users=1)  # a subset of users
    assert np.array_equal(a.items[:1], b.items) and np.array_equal(a.target[:1], b.target)
    c = build_candidates(tiny_domain, "test", n_neg=10, seed=1)
    assert not np.array_equal(a.items, c.items)


def test_target_position_is_spread():
    from xkern.data.domain import DomainData

    d = DomainData("P", 100, ["t"] * 100, {}, {}, {u: [u % 50, 50 + u % 50] for u in range(300)})
    c = build_candidates(d, "test", n_neg=29, seed=0)
    assert len(set(c.target.tolist())) > 25  # 300 draws over 30 positions


def test_candidates_identical_across_processes(tmp_path):
    code = (
        "from xkern.data.synthetic import SyntheticConfig, make_synthetic;"
        "from xkern.data.negatives import build_candidates;"
        "d = make_synthetic(SyntheticConfig(domains=('Tools',), n_users=40))['Tools'];"
        "print(build_candidates(d, 'test', seed=3).items.sum(axis=1).tolist())"
    )
    outs = []
    for hashseed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        r = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
        )
        outs.append(r.stdout)
    assert outs[0] == outs[1] and outs[0].strip()


def test_popularity_negatives_prefer_popular(tiny_domain):
    c = build_candidates(tiny_domain, "test", n_neg=5, strategy="popularity", seed=0)
    # only items 0..7 have training counts; user 11's sequence has 1: negatives come from 7 items,
    # never from the 32 items nobody trained on
    negs = set(np.delete(c.items[1], c.target[1]).tolist())
    assert len(negs) == 5 and negs <= {0, 2, 3, 4, 5, 6, 7}
    with pytest.raises(ValueError, match="unknown negative strategy"):
        build_candidates(tiny_domain, "test", strategy="hard")


def test_prompts_history_order_and_truncation():
    titles = [f"T{i}" for i in range(20)]
    text = prompts.history_block(titles, domain="Tools")
    lines = text.splitlines()
    assert lines[0] == "A customer bought these Tools items, oldest first:"
    assert lines[1:] == [f"{n}. T{i}" for n, i in enumerate(range(5, 20), start=1)]  # 15 most recent
    p = prompts.pointwise_prompt(["a", ""], "cand")
    assert "2. (untitled item)" in p and "Candidate item: cand" in p
    lw = prompts.listwise_prompt(["h"], ["x", "y", "z"])
    assert lw.splitlines()[-4:] == ["1. x", "2. y", "3. z", prompts.LISTWISE_INSTRUCTION]
    assert prompts.next_item_prompt(["h"]).endswith("The customer's next purchase is:")
    assert prompts.titles_of([1, 0], ["a", ""]) == ["(untitled item)", "a"]
