"""evaluate_ranking against hand-computed ranks and against RecBole's formulas (re-derived here)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xkern.data.metrics import evaluate_ranking, pessimistic_ranks


def test_single_user_hand_computed():
    # target (col 2, score 0.5) is beaten only by 0.9 -> 0-based rank 1
    m = evaluate_ranking([[0.9, 0.1, 0.5, 0.3]], [2], ks=(1, 3))
    assert m["HR@1"] == 0.0
    assert m["HR@3"] == 1.0
    assert m["NDCG@1"] == 0.0
    assert m["NDCG@3"] == pytest.approx(1 / math.log2(3))
    assert m["MRR"] == pytest.approx(0.5)
    assert set(m) == {"HR@1", "HR@3", "NDCG@1", "NDCG@3", "MRR"}


def test_top_rank_gives_ones():
    m = evaluate_ranking([[0.1, 2.0, -1.0]], [1], ks=(1,))
    assert m == {"HR@1": 1.0, "NDCG@1": 1.0, "MRR": 1.0}


def test_ties_count_against_target():
    # all equal: every other candidate ties the target -> rank C-1 = 2
    assert pessimistic_ranks([[0.5, 0.5, 0.5]], [0]).tolist() == [2]
    # 1.0 beats it, one 0.5 ties it, 0.2 is below -> rank 2
    m = evaluate_ranking([[1.0, 0.5, 0.5, 0.2]], [1], ks=(1, 3))
    assert m["HR@1"] == 0.0 and m["HR@3"] == 1.0
    assert m["NDCG@3"] == pytest.approx(0.5)  # 1/log2(2+2)
    assert m["MRR"] == pytest.approx(1 / 3)


def test_constant_scorer_gets_worst_rank():
    m = evaluate_ranking(np.zeros((4, 30)), [0, 5, 17, 29], ks=(1, 10))
    assert m["HR@10"] == 0.0
    assert m["MRR"] == pytest.approx(1 / 30)


def test_k_larger_than_candidates():
    # ranks 0, 2 (C = 3): K = 10 covers every candidate
    scores = [[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]]
    m = evaluate_ranking(scores, [0, 2], ks=(10,))
    assert m["HR@10"] == 1.0
    assert m["NDCG@10"] == pytest.approx((1.0 + 1 / math.log2(4)) / 2)
    assert m["MRR"] == pytest.approx((1 + 1 / 3) / 2)


def test_mean_over_users():
    scores = [[0.2, 0.9, 0.1], [0.7, 0.3, 0.5], [0.0, 0.0, 1.0]]
    # ranks: user0 target col0 (0.2 < 0.9) -> 1; user1 col0 -> 0; user2 col1 ties col0, below col2 -> 2
    assert pessimistic_ranks(scores, [0, 0, 1]).tolist() == [1, 0, 2]
    m = evaluate_ranking(scores, [0, 0, 1], ks=(1, 2))
    assert m["HR@1"] == pytest.approx(1 / 3)
    assert m["HR@2"] == pytest.approx(2 / 3)
    assert m["NDCG@2"] == pytest.approx((1 / math.log2(3) + 1.0) / 3)
    assert m["MRR"] == pytest.approx((1 / 2 + 1 + 1 / 3) / 3)


def test_infinite_scores_are_allowed():
    assert pessimistic_ranks([[-np.inf, 0.0, np.inf]], [1]).tolist() == [1]
    assert pessimistic_ranks([[-np.inf, -np.inf]], [0]).tolist() == [1]


@pytest.mark.parametrize("bad_col", [0, 1])
def test_nan_is_an_error(bad_col):
    scores = np.array([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    scores[1, bad_col] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate_ranking(scores, [0, 0])


@pytest.mark.parametrize(
    "scores,target",
    [
        ([0.1, 0.2], [0]),
        ([[0.1, 0.2]], [0, 1]),
        ([[0.1, 0.2]], [2]),
        ([[0.1, 0.2]], [-1]),
        (np.zeros((0, 3)), []),
    ],
)
def test_shape_and_range_errors(scores, target):
    with pytest.raises(ValueError):
        evaluate_ranking(scores, target)


def test_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3]], dtype=torch.bfloat16)
    m = evaluate_ranking(scores, torch.tensor([2]), ks=(1, 3))
    assert m["HR@3"] == 1.0 and m["MRR"] == pytest.approx(0.5)


# --- RecBole's formulas, re-derived independently ------------------------------------------------
# RecBole (recbole/evaluator/metrics.py) works on `pos_index` [U, K] (is the item at 1-based rank
# i+1 a positive?) and `pos_len` (positives per user):
#   Hit@K  = 1 if any(pos_index[:, :K])
#   MRR@K  = 1 / (first positive 1-based rank) if it is <= K else 0
#   NDCG@K = DCG@K / IDCG@K, DCG = sum_i pos_index[i] / log2(i + 2) (i 0-based = log2(rank + 1)),
#            IDCG = sum_{i < min(pos_len, K)} 1 / log2(i + 2)
# A pessimistic full sort (target after every candidate with an equal score) gives pos_index.


def _recbole_metrics(scores: np.ndarray, target: np.ndarray, k: int) -> dict[str, float]:
    u, c = scores.shape
    is_pos = np.zeros((u, c), dtype=bool)
    is_pos[np.arange(u), target] = True
    # sort by score descending; among equal scores non-positives (0) come before the positive (1)
    order = np.lexsort((is_pos.astype(int), -scores), axis=1)
    pos_index = np.take_along_axis(is_pos, order, axis=1)[:, :k]
    pos_len = is_pos.sum(axis=1)
    hit = (np.cumsum(pos_index, axis=1)[:, -1] > 0).astype(float)
    mrr = np.zeros(u)
    for row in range(u):
        idx = int(np.argmax(pos_index[row]))
        if pos_index[row, idx]:
            mrr[row] = 1.0 / (idx + 1)
    ranks_1based = np.arange(1, k + 1)
    discounts = 1.0 / np.log2(ranks_1based + 1)
    idcg_table = np.cumsum(discounts)
    idcg = idcg_table[np.minimum(pos_len, k) - 1]
    dcg = np.where(pos_index, discounts, 0.0).sum(axis=1)
    return {"hit": hit.mean(), "mrr": mrr.mean(), "ndcg": (dcg / idcg).mean()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_recbole_formulas(seed):
    rng = np.random.default_rng(seed)
    u, c = 200, 30
    scores = np.round(rng.random((u, c)), 1)  # coarse rounding -> many ties
    target = rng.integers(0, c, size=u)
    ks = (1, 3, 5, 10, 30)
    ours = evaluate_ranking(scores, target, ks=ks)
    for k in ks:
        ref = _recbole_metrics(scores, target, k)
        assert ours[f"HR@{k}"] == pytest.approx(ref["hit"], abs=1e-12)
        assert ours[f"NDCG@{k}"] == pytest.approx(ref["ndcg"], abs=1e-12)
    # RecBole's MRR is truncated at K; with K = C it is the untruncated MRR
    assert ours["MRR"] == pytest.approx(_recbole_metrics(scores, target, c)["mrr"], abs=1e-12)
