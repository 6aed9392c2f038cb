"""X-Cross with the likelihood score (decoders): one stream is exactly the LoRA's own likelihood scorer;
training the integrators and w lowers the validation loss; save/load keeps the mode; encoders refuse it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import xkern
from tests.helpers import tiny_model
from xkern.data.encoding import PromptEncoder
from xkern.data.synthetic import SyntheticConfig, make_synthetic
from xkern.data.tokenizer import word_tokenizer
from xkern.serve import LikelihoodScorer
from xkern.xcross import XCrossModel, train


@pytest.fixture(scope="module")
def setup():
    from xkern.data.prompts import next_item_prompt, pointwise_prompt

    domains = make_synthetic(SyntheticConfig(n_users=80, n_themes=4, n_tiers=2, items_per_cell=4, seed=0))
    texts = [t for d in domains.values() for t in d.titles]
    texts += [pointwise_prompt(["x"], "y", d) for d in domains] + [next_item_prompt(["x"], d) for d in domains]
    texts += [str(i) for i in range(20)]
    tok = word_tokenizer(texts)
    base = tiny_model("llama", seed=3, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    xm = xkern.load_model(base, dtype=torch.float32, progress=False)
    for i in range(2):
        xm.add_adapter(f"a{i}", r=4, seed=i, init_lora_weights=False)
    return domains["Tools"], tok, xm


def test_one_stream_scores_exactly_as_the_adapters_likelihood_scorer(setup):
    data, tok, xm = setup
    xc = XCrossModel(xm, ["a1"], scoring="likelihood", tokenizer=tok, titles=data.titles, domain=data.name,
                     max_history=3)
    assert xc.num_trainable()["head"] == 0
    hist = [list(s[:-1]) for s in list(data.test.values())[:4]]
    cands = np.array([[s[-1], 0, 1, 2, 3] for s in list(data.test.values())[:4]])
    ref = LikelihoodScorer(xm, PromptEncoder(tok, data.name, 3), data.titles, "a1")(hist, cands)
    got = xc.score(hist, cands).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_training_the_mix_lowers_the_validation_loss_and_survives_save_load(setup, tmp_path):
    data, tok, xm = setup
    xc = XCrossModel(xm, ["a0", "a1"], scoring="likelihood", tokenizer=tok, max_history=3)
    res = train(xc, data, n_neg=3, epochs=2, batch_size=8, lr=1e-2, max_train_users=32, max_val_users=16,
                val_neg=4, progress=False, output_dir=tmp_path / "run")
    assert res.best_val_loss < res.val[0]["loss"]
    back = XCrossModel.load(tmp_path / "run" / "xcross", xm, tokenizer=tok, titles=data.titles, domain=data.name)
    assert back.scoring == "likelihood"
    hist, cands = [[0, 1, 2]], np.array([[3, 4, 5]])
    xc.set_domain(data.titles, data.name)
    torch.testing.assert_close(back.score(hist, cands), xc.score(hist, cands))


def test_encoders_and_missing_labels_are_refused(setup):
    data, tok, xm = setup
    bert = xkern.load_model(tiny_model("bert", seed=0), dtype=torch.float32, progress=False)
    bert.add_adapter("e", r=4)
    with pytest.raises(ValueError, match="needs a decoder"):
        XCrossModel(bert, ["e"], scoring="likelihood")
    with pytest.raises(ValueError, match="scoring must be"):
        XCrossModel(xm, ["a0"], scoring="lm")
    xc = XCrossModel(xm, ["a0"], scoring="likelihood", tokenizer=tok, titles=data.titles, domain=data.name)
    ids, mask, labels = xc.encode([([0, 1], 2)])
    assert labels is not None and (labels != -100).any()
    with pytest.raises(ValueError, match="needs labels"):
        xc(ids, mask)


def test_mean_reduce_divides_each_title_by_its_token_count(setup):
    data, tok, xm = setup
    kw = dict(scoring="likelihood", tokenizer=tok, titles=data.titles, domain=data.name, max_history=3)
    total, mean = XCrossModel(xm, ["a0", "a1"], **kw), XCrossModel(xm, ["a0", "a1"], likelihood_reduce="mean", **kw)
    pairs = [(list(s[:-1]), int(c)) for s in list(data.test.values())[:3] for c in (s[-1], 0, 5)]
    ids, mask, labels = total.encode(pairs)
    n_tokens = (labels[:, 1:] != -100).sum(1).float()
    assert (n_tokens > 1).any()  # titles of several tokens, so the two reductions differ
    with torch.no_grad():
        torch.testing.assert_close(mean(ids, mask, labels), total(ids, mask, labels) / n_tokens)
    with pytest.raises(ValueError, match="likelihood_reduce"):
        XCrossModel(xm, ["a0"], likelihood_reduce="max", **kw)


@pytest.mark.parametrize("norm,reduce", [("none", "sum"), ("rms", "mean")])
def test_shared_prefix_scores_equal_one_forward_per_pair(setup, norm, reduce):
    """Prefix sharing (each user's prompt once through the n streams, its KV cache reused for every
    candidate) gives the scores of one full forward per (history, candidate) pair, with integrators on."""
    data, tok, xm = setup
    xc = XCrossModel(xm, ["a0", "a1", "__base__"], scoring="likelihood", integrator_norm=norm,
                     likelihood_reduce=reduce, bias=True, tokenizer=tok, titles=data.titles, domain=data.name,
                     max_history=3)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in [*xc.w_concat, *xc.integrator_bias]:
            p.normal_(0, 0.05)
        xc.w.copy_(torch.tensor([0.5, 0.3, 0.4]))
    seqs = list(data.test.values())[:5]
    hist = [list(s[:-1])[-k:] for s, k in zip(seqs, (1, 3, 2, 4, 1), strict=True)]  # prompts of different lengths
    cands = np.array([[s[-1], 0, 5, 9, 13, 17, 21] for s in seqs])
    full = xc.score(hist, cands, batch_size=16, prefix_sharing=False)
    for batch in (7, 16, 64):  # one user per prefill; two; all five
        torch.testing.assert_close(xc.score(hist, cands, batch_size=batch), full, rtol=1e-4, atol=1e-4)
    assert full.std(dim=1).min() > 0  # the candidates are told apart: not a constant


def test_calibrated_score_subtracts_each_titles_empty_history_score(setup):
    """score(calibrate=True) = score - title_prior, and title_prior is the score after an empty history
    (computed here by one forward per pair), under the same mean reduction; head scoring refuses it."""
    data, tok, xm = setup
    xc = XCrossModel(xm, ["a0", "a1"], scoring="likelihood", integrator_norm="rms", likelihood_reduce="mean",
                     tokenizer=tok, titles=data.titles, domain=data.name, max_history=3)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in xc.w_concat:
            p.normal_(0, 0.05)
    seqs = list(data.test.values())[:3]
    hist = [list(s[:-1])[-2:] for s in seqs]
    cands = np.array([[s[-1], 0, 5, 9, 13] for s in seqs])
    empty = xc.score([[] for _ in seqs], cands, batch_size=16, prefix_sharing=False)
    torch.testing.assert_close(xc.title_prior(cands), empty, rtol=1e-4, atol=1e-4)
    calibrated = xc.score(hist, cands, batch_size=16, calibrate=True)
    torch.testing.assert_close(calibrated, xc.score(hist, cands, batch_size=16) - empty, rtol=1e-4, atol=1e-4)
    assert calibrated.abs().max() > 1e-3
    with pytest.raises(ValueError, match="likelihood"):
        XCrossModel(xm, ["a0"], tokenizer=tok, titles=data.titles, domain=data.name).score(hist, cands,
                                                                                          calibrate=True)


@pytest.mark.parametrize("calibrate", [False, True])
def test_packed_training_rows_give_the_scores_and_gradients_of_one_row_per_pair(setup, calibrate):
    """example_loss packs each example's prompt with all its candidates' titles (a block mask, positions
    restarted after the prompt): its scores, loss and the integrators' gradients are those of one row per
    (history, candidate) pair, for prompts of different lengths, repeated candidates and sum and mean titles."""
    from xkern.xcross.train import candidate_examples, example_loss

    data, tok, xm = setup
    for reduce in ("mean", "sum"):
        xc = XCrossModel(xm, ["a0", "a1"], scoring="likelihood", integrator_norm="rms", likelihood_reduce=reduce,
                         bias=True, tokenizer=tok, titles=data.titles, domain=data.name, max_history=3)
        with torch.no_grad():
            torch.manual_seed(5)
            for p in [*xc.w_concat, *xc.integrator_bias]:
                p.normal_(0, 0.05)
        batch = candidate_examples(data, "train", 3, 0, 0, None)[:5]
        batch[1] = (batch[1][0], batch[0][1].copy(), batch[0][2])  # the same candidates as another example
        assert len({len(h) for h, _, _ in batch}) > 1
        grads = []
        for packed in (False, True):
            xc.zero_grad()
            loss, scores = example_loss(xc, batch, calibrate=calibrate, packed=packed)
            loss.backward()
            grads.append([p.grad.clone() for p in [*xc.w_concat, *xc.integrator_bias, xc.w]])
            if not packed:
                ref_loss, ref_scores = loss.detach(), scores.detach()
        torch.testing.assert_close(scores.detach(), ref_scores, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-4, atol=1e-4)
        for got, ref in zip(*grads, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-5)
        assert ref_scores.std(dim=1).min() > 0 and max(float(g.abs().max()) for g in grads[0]) > 0
    rows = xc.pack([(batch[0][0], batch[0][1])])
    title = xc.encoder.prompts.title(data.titles[int(batch[0][1][0])])
    prompt = xc.encoder.prompt_ids(batch[0][0])
    assert rows.input_ids.shape[1] < len(batch[0][1]) * (len(prompt) + len(title))  # the prompt is there once


@pytest.mark.parametrize("calibrate", [False, True])
def test_prefix_shared_validation_equals_one_row_per_pair(setup, calibrate):
    """validate() scores each history's prompt once for its candidates; its loss, per-example losses, MRR and
    HR@1 are those of one full row per (history, candidate) pair (the training loss's scores), with the
    integrators on and prompts of different lengths, in batches that split a user's candidates."""
    from xkern.xcross.train import candidate_examples, validate

    data, tok, xm = setup
    xc = XCrossModel(xm, ["a0", "a1"], scoring="likelihood", integrator_norm="rms", likelihood_reduce="mean",
                     bias=True, tokenizer=tok, titles=data.titles, domain=data.name, max_history=3)
    with torch.no_grad():
        torch.manual_seed(4)
        for p in [*xc.w_concat, *xc.integrator_bias]:
            p.normal_(0, 0.05)
    val = candidate_examples(data, "val", 4, 0, -1, None)[:12]
    assert len({len(h) for h, _, _ in val}) > 1
    xc.train()
    ref = validate(xc, val, batch_size=7, calibrate=calibrate, prefix_sharing=False)
    got = validate(xc, val, batch_size=7, calibrate=calibrate)
    assert xc.training  # the mode is given back
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-4, atol=1e-4)
    assert got["loss"] == pytest.approx(ref["loss"], abs=1e-4)
    assert (got["mrr"], got["hr@1"]) == pytest.approx((ref["mrr"], ref["hr@1"]))
    assert np.std(ref["losses"]) > 1e-3  # examples told apart: not a constant


def test_calibrated_training_loss_scores_are_the_pmi_scores_and_train(setup, tmp_path):
    """example_loss(calibrate=True): the scores it takes the cross-entropy of are score(calibrate=True), the
    gradient reaches the integrators through both terms, the loss can be fitted on a fixed batch, train()
    runs and logs it, and head scoring refuses it."""
    from xkern.xcross.train import example_loss

    data, tok, xm = setup
    xc = XCrossModel(xm, ["a0", "a1"], scoring="likelihood", integrator_norm="rms", likelihood_reduce="mean",
                     tokenizer=tok, titles=data.titles, domain=data.name, max_history=3)
    with torch.no_grad():
        torch.manual_seed(2)
        for p in xc.w_concat:
            p.normal_(0, 0.05)
    seqs = list(data.test.values())[:3]
    batch = [(list(s[:-1])[-2:], np.array([s[-1], 0, 5, 9]), 0) for s in seqs]
    hist, cands = [b[0] for b in batch], np.stack([b[1] for b in batch])
    loss, scores = example_loss(xc, batch, calibrate=True)
    torch.testing.assert_close(scores.detach(), xc.score(hist, cands, batch_size=16, calibrate=True),
                               rtol=1e-4, atol=1e-4)
    _, raw = example_loss(xc, batch)
    assert (scores - raw).abs().max() > 1e-3  # the prior is subtracted, not zero
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in xc.w_concat)
    # the calibrated loss falls on a fixed batch (its gradient is the loss's: it can be fitted)
    opt = torch.optim.Adam(xc.trainable_parameters(), lr=1e-1)
    start = float(loss.detach())
    for _ in range(20):
        opt.zero_grad()
        step_loss = example_loss(xc, batch, calibrate=True)[0]
        step_loss.backward()
        opt.step()
    assert float(example_loss(xc, batch, calibrate=True)[0].detach()) < 0.8 * start
    res = train(xc, data, n_neg=3, epochs=1, batch_size=8, lr=1e-3, max_train_users=16, max_val_users=8,
                val_neg=4, progress=False, calibrate=True, output_dir=tmp_path / "pmi")
    log = json.loads((tmp_path / "pmi" / "train_log.json").read_text())
    assert log["config"]["calibrate"] and len(res.val) >= 2 and np.isfinite(res.best_val_loss)
    head = XCrossModel(xm, ["a0"], tokenizer=tok, titles=data.titles, domain=data.name)
    with pytest.raises(ValueError, match="likelihood"):
        example_loss(head, batch, calibrate=True)
    with pytest.raises(ValueError, match="likelihood"):
        train(head, data, calibrate=True, max_train_users=4, progress=False)


def test_causal_lm_face_is_refused_for_head_scoring(setup):
    data, tok, xm = setup
    with pytest.raises(ValueError, match="likelihood"):
        XCrossModel(xm, ["a0", "a1"], tokenizer=tok).causal_lm()
