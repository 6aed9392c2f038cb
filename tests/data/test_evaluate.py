"""Evaluation harness, baseline scorers and the demo's method list."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from xkern.data.baselines import ItemTransitionScorer, PopularityScorer, TokenTransitionScorer, title_tokens
from xkern.data.evaluate import evaluate_scorer, format_table, score_candidates, write_report
from xkern.data.negatives import build_candidates
from xkern.data.synthetic import SyntheticConfig
from xkern.demo.core import DemoConfig, Method, default_methods, demo_table, run_demo


def _oracle(cands):
    """Scores 1 for each user's true item: looks the target up by the history (unique here)."""
    truth = {tuple(h): int(t) for h, t in zip(cands.histories, cands.target_items, strict=True)}
    return lambda hist, cand: np.asarray(
        [[float(c == truth[tuple(h)]) for c in row] for h, row in zip(hist, cand, strict=True)]
    )


def test_harness_oracle_and_batching(tiny_domain):
    cands = build_candidates(tiny_domain, "test", n_neg=10, seed=0)
    m = evaluate_scorer(_oracle(cands), cands, ks=(1,), batch_size=1)
    assert m["HR@1"] == 1.0 and m["MRR"] == 1.0 and m["n_users"] == 2
    pop = PopularityScorer(tiny_domain.train, tiny_domain.n_items)
    assert np.array_equal(
        score_candidates(pop, cands, batch_size=1), score_candidates(pop, cands, batch_size=64)
    )


def test_harness_rejects_bad_scores(tiny_domain):
    cands = build_candidates(tiny_domain, "test", n_neg=10, seed=0)
    with pytest.raises(ValueError, match="shape"):
        score_candidates(lambda h, c: np.zeros((len(h), 3)), cands)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_scorer(lambda h, c: np.full(np.shape(c), np.nan), cands)


def test_harness_accepts_torch_scores(tiny_domain):
    torch = pytest.importorskip("torch")
    cands = build_candidates(tiny_domain, "test", n_neg=10, seed=0)
    oracle = _oracle(cands)
    m = evaluate_scorer(lambda h, c: torch.from_numpy(oracle(h, c)).to(torch.bfloat16), cands)
    assert m["HR@1"] == 1.0


def test_popularity_scores_are_train_counts(tiny_domain):
    pop = PopularityScorer(tiny_domain.train, tiny_domain.n_items)
    # train: [0,1,2,3], [1,2,4], [2,5,6,7] -> item 2: 3, item 1: 2, item 0: 1, item 9: 0
    assert pop([[0]], np.array([[2, 1, 0, 9]])).tolist() == [[3.0, 2.0, 1.0, 0.0]]


def test_item_transition_hand_computed():
    # window 1: after 0 comes 1 twice and 2 once -> P(1|0) = 2/3, P(2|0) = 1/3
    s = ItemTransitionScorer({0: [0, 1], 1: [0, 1], 2: [0, 2]}, n_items=4, window=1, pop_weight=0.0)
    assert s([[3, 0]], np.array([[1, 2, 3]]))[0] == pytest.approx([2 / 3, 1 / 3, 0.0])


def test_token_ppmi_hand_computed():
    titles = ["red ball", "blue ball", "red kite"]
    m = TokenTransitionScorer(window=1).fit([[0, 1], [0, 2]], titles)
    # pairs: (red ball -> blue ball), (red ball -> red kite); n_pairs = 2
    # count(red -> red) = 1; left(red) = 2; right(red) = 1 -> PMI = log(1 * 2 / (2 * 1)) = 0
    assert m.ppmi("red", "red") == 0.0
    # count(ball -> kite) = 1; left(ball) = 2; right(kite) = 1 -> log(1) = 0; blue: same
    # count(red -> blue) = 1, left(red) = 2, right(blue) = 1 -> 0 as well: every word pair is independent
    assert m.ppmi("red", "blue") == 0.0
    m2 = TokenTransitionScorer(window=1).fit([[0, 2], [1, 1]], titles)
    # pairs: (red ball -> red kite), (blue ball -> blue ball): count(red->red)=1, left(red)=1, right(red)=1
    assert m2.ppmi("red", "red") == pytest.approx(math.log(2))
    assert m2.ppmi("red", "blue") == 0.0  # never seen
    bound = m2.for_domain(titles)
    # history [0] (red, ball); candidate 2 (red, kite): mean over 4 word pairs of PPMI
    expect = sum(m2.ppmi(u, v) for u in title_tokens(titles[0]) for v in title_tokens(titles[2])) / 4
    assert bound([[0]], np.array([[2, 1]]))[0, 0] == pytest.approx(expect)
    assert expect > 0


def test_format_table_aligns():
    t = format_table([{"m": "a", "x": 0.5}, {"m": "long", "x": 0.25}], ["m", "x"])
    lines = t.splitlines()
    assert lines[0] == "m          x"
    assert lines[2] == "a     0.5000" and lines[3] == "long  0.2500"


def test_write_report_has_versions(tmp_path):
    p = write_report(
        tmp_path / "sub" / "r.json", {"seed": 3, "config": {"a": np.int64(2)}, "x": np.arange(2)}
    )
    obj = json.loads(p.read_text())
    assert obj["seed"] == 3 and obj["config"] == {"a": 2} and obj["x"] == [0, 1]
    assert {"python", "torch", "xkern", "numpy"} <= obj["environment"].keys()


def test_demo_methods_share_candidates_and_fractions():
    seen = {}

    def recorder(name):
        def build(ctx):
            seen.setdefault(name, []).append(len(ctx.target.train))

            def score(hist, cand):
                seen.setdefault(name + ":cands", []).append(np.array(cand))
                return np.zeros(np.shape(cand))

            return score

        return build

    cfg = DemoConfig(synthetic=SyntheticConfig(n_users=100), fractions=(0.5, 1.0))
    res = run_demo(cfg, methods=[Method("a", recorder("a")), Method("b", recorder("b"))], progress=False)
    assert seen["a"] == [36, 72] == seen["b"]  # 100 users -> 80 train -> 72 after validation carve-out
    assert all(np.array_equal(x, y) for x, y in zip(seen["a:cands"], seen["b:cands"], strict=True))
    assert [(r["method"], r["fraction"]) for r in res["rows"]] == [
        ("a", 0.5),
        ("a", 1.0),
        ("b", 0.5),
        ("b", 1.0),
    ]
    assert res["rows"][0]["HR@10"] == 0.0  # constant scores: pessimistic ties
    with pytest.raises(ValueError, match="duplicate"):
        run_demo(cfg, methods=[Method("a", recorder("a"))] * 2, progress=False)


def test_default_demo_is_learnable():
    res = run_demo(DemoConfig(synthetic=SyntheticConfig(n_users=200), fractions=(1.0,), lm=False), progress=False)
    by = {r["method"]: r for r in res["rows"]}
    assert [m.name for m in default_methods()] == list(by)
    assert by["item-markov"]["HR@1"] > by["popularity"]["HR@1"] > 0
    assert by["token-markov-src"]["NDCG@10"] > by["random"]["NDCG@10"] + 0.2
    table = demo_table(res)
    assert "token-markov-src" in table and "NDCG@10" in table.splitlines()[1]


def test_evaluate_baselines_ranks_the_given_candidates():
    from xkern.data.baselines import evaluate_baselines
    from xkern.data.synthetic import make_synthetic

    data = make_synthetic(SyntheticConfig(n_users=200, domains=("Tools",)))["Tools"]
    cands = build_candidates(data, "test", n_neg=29, seed=3, max_users=25)
    rows = evaluate_baselines(data, cands, ("random", "popularity", "item-markov"), seed=3)
    assert [r["scorer"] for r in rows] == ["random", "popularity", "item-markov"]
    assert all(r["n_users"] == 25 for r in rows)
    pop = evaluate_scorer(PopularityScorer(data.train, data.n_items), cands, ks=(1, 10))
    assert rows[1]["HR@10"] == pop["HR@10"] and rows[1]["NDCG@10"] == pop["NDCG@10"]
    assert rows[2]["MRR"] > rows[0]["MRR"]  # the synthetic data has item-to-item structure
