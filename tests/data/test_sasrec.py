"""SASRec baseline: causal, padding-blind, deterministic, and it learns the synthetic target."""

import numpy as np
import torch

from xkern.data.baselines import make_scorer
from xkern.data.evaluate import evaluate_scorer
from xkern.data.negatives import build_candidates
from xkern.data.sasrec import SASRec, SASRecConfig, SASRecScorer, fit_sasrec
from xkern.data.synthetic import SyntheticConfig, make_synthetic


def _model(seed=0):
    torch.manual_seed(seed)
    return SASRec(50, SASRecConfig(hidden=16, blocks=2, heads=2, dropout=0.0)).eval()


def test_a_position_sees_only_its_past_and_padding_changes_nothing():
    model = _model()
    with torch.no_grad():
        h = model(model.batch([[1, 2, 3, 4, 5]]))
        changed = model(model.batch([[1, 2, 3, 9, 5]]))
        torch.testing.assert_close(h[:, :3], changed[:, :3])  # positions before the change are untouched
        assert not torch.allclose(h[:, 3:], changed[:, 3:])
        alone = model(model.batch([[7, 8]]))[:, -1]
        padded = model(model.batch([[7, 8], [1, 2, 3, 4, 5, 6]]))[0, -1]
        torch.testing.assert_close(alone[0], padded, atol=1e-6, rtol=1e-5)
        assert torch.isfinite(model(model.batch([[], [3]]))).all()


def test_it_learns_the_synthetic_target_and_is_deterministic():
    data = make_synthetic(SyntheticConfig())["Tools"]
    cands = build_candidates(data, "test", 29, "uniform", 0, None)
    cfg = SASRecConfig(epochs=12, seed=0)
    fit = fit_sasrec(data, cfg)
    assert fit.val_loss_best < fit.val_loss_start - 0.5
    sasrec = evaluate_scorer(SASRecScorer(fit), cands)
    popularity = evaluate_scorer(make_scorer("popularity", data), cands)
    assert sasrec["HR@10"] > popularity["HR@10"] + 0.15
    again = SASRecScorer(fit_sasrec(data, SASRecConfig(epochs=2, seed=0)))
    once = SASRecScorer(fit_sasrec(data, SASRecConfig(epochs=2, seed=0)))
    hist, items = cands.histories[:8], cands.items[:8]
    np.testing.assert_array_equal(again(hist, items), once(hist, items))
