"""Bootstrap intervals and paired comparisons of ranking rows (xkern.data.confidence)."""

import numpy as np
import pytest

from xkern.data.confidence import bootstrap_metrics, paired_comparison, paired_table, per_user, quality_row
from xkern.data.metrics import metrics_from_ranks


def test_per_user_values_average_to_the_table_metrics():
    ranks = np.random.default_rng(0).integers(0, 30, 500)
    table = metrics_from_ranks(ranks, ks=(1, 10))
    for m in ("HR@1", "HR@10", "NDCG@10", "MRR"):
        assert per_user(ranks, m).mean() == pytest.approx(table[m])
    with pytest.raises(ValueError, match="unknown metric"):
        per_user(ranks, "AUC")


def test_intervals_cover_the_true_rate_at_about_their_level():
    """HR@10 of users hit with probability 0.4: the 95% interval covers 0.4 in about 95% of test sets."""
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(200):
        ranks = np.where(rng.random(300) < 0.4, 0, 20)
        mean, lo, hi = bootstrap_metrics(ranks, ("HR@10",), n_boot=500, seed=trial)["HR@10"]
        assert lo <= mean <= hi
        covered += lo <= 0.4 <= hi
    assert 0.89 <= covered / 200 <= 0.99


def test_paired_comparison_sees_a_small_difference_that_unpaired_intervals_hide():
    rng = np.random.default_rng(2)
    base = rng.integers(0, 30, 400)
    better = base.copy()
    better[rng.choice(400, 20, replace=False)] = 0  # 20 users moved to rank 0: +~3 points HR@10 at most
    a, b = bootstrap_metrics(better, ("HR@10",))["HR@10"], bootstrap_metrics(base, ("HR@10",))["HR@10"]
    assert a[1] < b[2]  # the two unpaired intervals overlap
    cmp = paired_comparison(better, base, "HR@10")
    assert cmp["diff"] > 0 and cmp["ci_low"] > 0 and cmp["p"] < 0.05
    same = paired_comparison(base, base, "HR@10")
    assert same == {"metric": "HR@10", "diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p": 1.0, "n_users": 400}
    with pytest.raises(ValueError, match="same users"):
        paired_comparison(base, base[:10])


def test_quality_rows_and_their_paired_table():
    rng = np.random.default_rng(3)
    rows = [quality_row(name, rng.integers(0, 30, 100), target="Tools", sources=["Toys"], fraction=f)
            for name, f in (("a", 1.0), ("b", 0.25), ("c", "-"))]
    assert set(rows[0]) >= {"method", "target", "sources", "fraction", "n_users", "trainable_params",
                            "val_loss_start", "val_loss_best", "metrics"}
    assert set(rows[0]["metrics"]) == {"HR@1", "HR@10", "NDCG@10", "MRR"}
    assert all(len(v) == 3 for v in rows[0]["metrics"].values())
    table = paired_table(rows)
    assert [(t["a"], t["b"]) for t in table] == [("a", "b"), ("a", "c"), ("b", "c")]


def test_baseline_quality_rows_rank_the_given_candidates_like_evaluate_scorer(tiny_domain):
    from xkern.data.baselines import baseline_quality_rows, make_scorer
    from xkern.data.evaluate import evaluate_scorer
    from xkern.data.negatives import build_candidates

    cands = build_candidates(tiny_domain, "test", 5, "uniform", 0, None)
    rows = baseline_quality_rows(tiny_domain, cands, ["random", "popularity"], seed=0, n_boot=50)
    assert [r["method"] for r in rows] == ["random", "popularity"]
    for r in rows:
        expected = evaluate_scorer(make_scorer(r["method"], tiny_domain, seed=0), cands, (1, 10))
        assert r["n_users"] == len(cands) and r["target"] == "Tiny" and r["trainable_params"] == 0
        for m in ("HR@1", "HR@10", "NDCG@10", "MRR"):
            assert r["metrics"][m][0] == pytest.approx(expected[m])
