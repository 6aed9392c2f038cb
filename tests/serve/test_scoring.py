"""Prefix-KV candidate scoring against independent (prompt, candidate) scoring, and listwise generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xkern.data.encoding import PromptEncoder
from xkern.serve import (
    LikelihoodScorer,
    ListwiseGenerationScorer,
    PrefixLikelihoodScorer,
    match_title,
    normalize_title,
    prefill,
)
from xkern.serve.generate import greedy_decode
from xkern.serve.scoring import length_batches, token_logprobs


def _batch(domain, n_users=5, n_cands=7):
    users = sorted(domain.train)[:n_users]
    hist = [domain.train[u][: 1 + i % 4] for i, u in enumerate(users)]  # prompts of different lengths
    rng = np.random.default_rng(0)
    cands = np.stack([rng.permutation(domain.n_items)[:n_cands] for _ in users])  # titles of 3-5 words
    return hist, cands


@pytest.mark.parametrize("adapter", ["a", "__base__"])
def test_prefix_scores_equal_independent_scores(lm, domain, adapter):
    model, tok = lm
    enc = PromptEncoder(tok, domain.name, max_history=5)
    hist, cands = _batch(domain)
    ref = LikelihoodScorer(model, enc, domain.titles, adapter, batch_size=11)(hist, cands)
    for user_batch, row_batch, budget in [(1, 64, 2048), (2, 5, 2048), (5, 64, 2048), (5, 64, 9)]:
        got = PrefixLikelihoodScorer(model, enc, domain.titles, adapter, user_batch, row_batch,
                                     token_budget=budget)(hist, cands)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
    assert np.all(ref < 0) and np.ptp(ref) > 1.0  # non-trivial scores


def test_length_batches_cover_every_row_once_within_the_budget():
    lengths = [3, 9, 1, 0, 7, 7, 2, 12, 5]
    batches = length_batches(lengths, token_budget=20, max_rows=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3 and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 20)
    firsts = [lengths[b[0]] for b in batches]
    assert firsts == sorted(firsts, reverse=True)  # longest first: rows of a batch have nearly one length
    assert length_batches([40, 2], token_budget=10, max_rows=8) == [[0], [1]]  # a row longer than the budget


def test_token_logprobs_equal_log_softmax_in_float32():
    logits = torch.randn(3, 5, 50).bfloat16()
    target = torch.randint(0, 50, (3, 5))
    ref = torch.log_softmax(logits.float(), -1).gather(-1, target[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, target, chunk=4), ref, rtol=0, atol=1e-6)


def test_calibrated_scores_are_the_likelihood_minus_the_empty_history_likelihood(lm, domain):
    """calibrate=True: log p(title | user's prompt) - log p(title | empty-history prompt), the prior
    scored independently here; repeated items (across users and within a row) are scored once."""
    model, tok = lm
    enc = PromptEncoder(tok, domain.name, max_history=5)
    hist, cands = _batch(domain)
    cands[1, :3] = cands[0, :3]  # items shared between users
    cands[2, 1] = cands[2, 0]  # and repeated within a row
    raw = LikelihoodScorer(model, enc, domain.titles, "a", batch_size=11)(hist, cands)
    empty = LikelihoodScorer(model, enc, domain.titles, "a", batch_size=11)([[] for _ in hist], cands)
    sc = PrefixLikelihoodScorer(model, enc, domain.titles, "a", 2, 5, calibrate=True)
    np.testing.assert_allclose(sc.prior(cands), empty, rtol=1e-5, atol=1e-4)
    assert len(sc._prior) == len(np.unique(cands))
    np.testing.assert_allclose(sc(hist, cands), raw - empty, rtol=1e-5, atol=1e-4)
    assert np.ptp(empty) > 1.0 and not np.allclose(raw, empty, atol=1e-2)  # both parts are real

def test_prefix_scoring_mixed_adapters_per_user(lm, domain):
    """One prefill + one continuation batch with a different adapter per user = each user alone."""
    from xkern.serve import score_continuations

    model, tok = lm
    enc = PromptEncoder(tok, domain.name, max_history=5)
    hist, cands = _batch(domain, 4, 3)
    names = ["a", "b", "__base__", "a"]
    prompts = [enc.prompt([domain.titles[i] for i in h]) for h in hist]
    conts = [[enc.title(domain.titles[i]) for i in row] for row in cands.tolist()]
    mixed = score_continuations(model, prefill(model, prompts, names), conts, names, row_batch=5)
    for k, name in enumerate(names):
        alone = LikelihoodScorer(model, enc, domain.titles, name)(hist[k:k + 1], cands[k:k + 1])[0]
        np.testing.assert_allclose(mixed[k], alone, rtol=1e-5, atol=1e-4)


def test_greedy_decode_matches_transformers_generate(lm, domain):
    model, tok = lm
    enc = PromptEncoder(tok, domain.name, max_history=5)
    hist, _ = _batch(domain, 3)
    prompts = [enc.prompt([domain.titles[i] for i in h]) for h in hist]
    texts = greedy_decode(model, prefill(model, prompts, "a"), _NoStop(tok), "a", max_new_tokens=6)
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                         eos_token_id=None, pad_token_id=tok.pad_token_id, adapter_names="a")
    ref = [tok.decode(row[width:].tolist(), skip_special_tokens=True) for row in out]
    assert texts == ref


class _NoStop:
    """The tokenizer without EOS, and no newline in its vocabulary: decoding runs max_new_tokens."""

    def __init__(self, tok):
        self.tok, self.eos_token_id = tok, None

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_title_matching():
    titles = ["Red Drill Pro", "Blue Saw, Mini Set", "red drill"]
    assert match_title("  Red drill PRO\nsomething else", titles) == 0
    assert match_title('2. "blue saw , mini set."', titles) == 1
    assert match_title("\n\nred   drill", titles) == 2
    assert match_title("green hammer", titles) is None
    assert match_title("", titles) is None
    assert normalize_title("Kit ( blue )") == "kit (blue)"


def test_listwise_scorer_exact_and_fallback(lm, domain, monkeypatch):
    import xkern.serve.generate as gen

    model, tok = lm
    enc = PromptEncoder(tok, domain.name, max_history=5)
    hist, cands = _batch(domain, 4, 6)
    fallback = PrefixLikelihoodScorer(model, enc, domain.titles, "a")
    fb = fallback(hist, cands)
    # generation writes candidate 3's title for users 0 and 2, nonsense for users 1 and 3
    fake = [domain.titles[cands[0, 3]].upper() + "\n", "no such item", domain.titles[cands[2, 3]], "zzz"]
    monkeypatch.setattr(gen, "greedy_decode", lambda *a, **k: list(fake))
    sc = ListwiseGenerationScorer(model, enc, domain.titles, "a", user_batch=4, fallback_scorer=fallback)
    got = sc(hist, cands)
    assert sc.stats == {"users": 4, "exact": 2, "fallback": 2}
    assert sc.last["matched"] == [3, -1, 3, -1]
    np.testing.assert_allclose(got[[1, 3]], fb[[1, 3]])  # fallback rows: the likelihood ranking as is
    assert np.argmax(got[0]) == 3 and np.argmax(got[2]) == 3
    for u in (0, 2):  # the other candidates keep their likelihood order
        others = [j for j in range(6) if j != 3]
        assert list(np.argsort(-got[u, others])) == list(np.argsort(-fb[u, others]))


def test_listwise_scorer_real_generation(lm, domain):
    """Without a fallback scorer, titles are scored after the listwise prompt itself (its own prefix)."""
    from xkern.data.prompts import listwise_prompt

    model, tok = lm
    enc = PromptEncoder(tok, domain.name, max_history=5)
    hist, cands = _batch(domain, 3, 5)
    sc = ListwiseGenerationScorer(model, enc, domain.titles, "b", max_history=5, user_batch=2, max_new_tokens=4)
    got = sc(hist, cands)
    assert sc.stats["users"] == 3 and sc.stats["exact"] + sc.stats["fallback"] == 3 and len(sc.last["texts"]) == 3

    def listwise_ids(h, c):
        text = listwise_prompt(h, c, domain.name, 5)
        return list(tok(text, add_special_tokens=True)["input_ids"])

    ref = PrefixLikelihoodScorer(model, enc, domain.titles, "b", prompt_fn=listwise_ids)(hist, cands)
    for u in range(3):
        if sc.stats["exact"] == 0:
            np.testing.assert_allclose(got[u], ref[u], rtol=1e-5, atol=1e-4)
