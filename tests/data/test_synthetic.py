"""The embedded synthetic generator: deterministic, sized as configured, learnable, transferable."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from xkern.data.baselines import RandomScorer, TokenTransitionScorer
from xkern.data.evaluate import evaluate_scorer
from xkern.data.negatives import build_candidates
from xkern.data.synthetic import DOMAIN_NOUNS, THEMES, TIERS, SyntheticConfig, make_synthetic

CFG = SyntheticConfig(n_users=300)


@pytest.fixture(scope="module")
def domains():
    return make_synthetic(CFG)


def _theme(cfg: SyntheticConfig, item: int) -> int:
    return item // (cfg.n_tiers * cfg.items_per_cell)


def test_deterministic():
    a, b = make_synthetic(CFG), make_synthetic(CFG)
    c = make_synthetic(SyntheticConfig(n_users=300, seed=1))
    for name in a:
        assert (
            a[name].train == b[name].train
            and a[name].test == b[name].test
            and a[name].titles == b[name].titles
        )
    assert a["Tools"].train != c["Tools"].train


def test_sizes_and_titles(domains):
    assert list(domains) == ["Toys", "Sports", "Tools"]
    for name, d in domains.items():
        assert d.n_items == 8 * 4 * 8
        assert len(d.test) == 60 and len(d.val) == 24 and len(d.train) == 216  # 20% test, 10% of the rest
        assert all(5 <= len(s) <= 12 for s in [*d.train.values(), *d.test.values()])
        assert len(set(d.titles)) == d.n_items
        for i in (0, 37, 255):  # item grid: theme-major, then tier, then product
            theme, tier = i // 32, (i // 8) % 4
            assert THEMES[theme] in d.titles[i] and f"{TIERS[tier]} edition" in d.titles[i]
            assert DOMAIN_NOUNS[name][i % 8] in d.titles[i]


def test_sequential_structure(domains):
    for d in domains.values():
        pairs = [(a, b) for s in d.train.values() for a, b in zip(s, s[1:], strict=False)]
        same = np.mean([_theme(CFG, a) == _theme(CFG, b) for a, b in pairs])
        assert same > 0.6  # 1/8 by chance


def test_tastes_shared_across_domains(domains):
    # the same user index draws from the same taste in every domain
    toys, tools = domains["Toys"].train, domains["Tools"].train

    def top(seq):
        return Counter(_theme(CFG, i) for i in seq).most_common(1)[0][0]

    users = sorted(toys.keys() & tools.keys())
    agree = np.mean([top(toys[u]) == top(tools[u]) for u in users])
    shifted = np.mean(
        [top(toys[u]) == top(tools[v]) for u, v in zip(users, users[1:] + users[:1], strict=True)]
    )
    # two draws from a Dirichlet(0.3) taste over 8 themes agree with p ~ 0.38; unrelated users ~ 1/8
    assert agree > 0.25 and agree > 2 * shifted


def test_source_only_model_transfers_to_target(domains):
    cands = build_candidates(domains["Tools"], "test", seed=0)
    model = TokenTransitionScorer()
    for name in ("Toys", "Sports"):  # never sees a Tools item or a Tools noun
        model.fit(domains[name].train.values(), domains[name].titles)
    transfer = evaluate_scorer(model.for_domain(domains["Tools"].titles), cands)
    chance = evaluate_scorer(RandomScorer(0), cands)
    assert transfer["HR@1"] > 0.2 > 0.1 > chance["HR@1"]
    assert transfer["NDCG@10"] > chance["NDCG@10"] + 0.25


def test_bad_config():
    with pytest.raises(ValueError, match="unknown synthetic domain"):
        SyntheticConfig(domains=("Cars",))
    with pytest.raises(ValueError):
        SyntheticConfig(n_themes=11)
