"""XCrossModel bookkeeping, scoring, training and the ``train-xcross`` command on a tiny NF4 Llama."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

import xkern
from tests.helpers import tiny_model
from xkern.data.synthetic import SyntheticConfig, make_synthetic
from xkern.data.tokenizer import word_tokenizer
from xkern.xcross import XCrossModel, candidate_examples, pool_hidden, train, train_adapter_scorer
from xkern.xcross.model import adapter_fingerprint


@pytest.fixture(scope="module")
def domains():
    return make_synthetic(SyntheticConfig(n_users=80, n_themes=4, n_tiers=2, items_per_cell=4, seed=0))


@pytest.fixture(scope="module")
def tokenizer(domains):
    from xkern.data.prompts import pointwise_prompt

    texts = [t for d in domains.values() for t in d.titles]
    texts += [pointwise_prompt(["x"], "y", d) for d in domains] + [str(i) for i in range(20)]
    return word_tokenizer(texts)


def _model(tokenizer, n_adapters: int = 2):
    base = tiny_model("llama", seed=3, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    xm = xkern.load_model(base, dtype=torch.float32, progress=False)
    for i in range(n_adapters):
        xm.add_adapter(f"a{i}", r=4, seed=i, init_lora_weights=False)
    return xm


def test_init_trainable_and_frozen(tokenizer):
    xm = _model(tokenizer, 3)
    xc = XCrossModel(xm, ["a0", "a1", "a2"], bias=True)
    n, d, layers = 3, 64, 2
    assert len(xc.w_concat) == layers and all(p.shape == (2 * n * (n - 1), n * d) for p in xc.w_concat)
    assert all(torch.count_nonzero(p) == 0 for p in [*xc.w_concat, *xc.integrator_bias])
    torch.testing.assert_close(xc.w.detach(), torch.full((3,), 1 / 3))
    counts = xc.num_trainable()
    assert counts["integrators"] == layers * (12 * 3 * 64 + 12)
    assert counts["head"] == 64 * 64 + 64 + 64 + 1 and counts["w"] == 3
    # the base and the adapters are not X-Cross parameters
    own = {id(p) for p in xc.parameters()}
    assert own == {id(p) for p in xc.trainable_parameters()}
    assert not own & {id(p) for p in xm.parameters()}


def test_errors(tokenizer):
    xm = _model(tokenizer)
    with pytest.raises(KeyError, match="not loaded"):
        XCrossModel(xm, ["a0", "nope"])
    with pytest.raises(ValueError, match="distinct"):
        XCrossModel(xm, ["a0", "a0"])
    with pytest.raises(ValueError, match="pooling"):
        XCrossModel(xm, ["a0", "a1"], pooling="max")
    with pytest.raises(ValueError, match="set_domain"):
        XCrossModel(xm, ["a0", "a1"]).score([[1]], np.array([[1, 2]]))


def test_pool_hidden():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])  # right- and left-padded rows
    torch.testing.assert_close(pool_hidden(h, mask, "first"), h[:, 0])
    torch.testing.assert_close(pool_hidden(h, mask, "last"), torch.stack([h[0, 1], h[1, 3]]))
    torch.testing.assert_close(pool_hidden(h, mask, "mean"), torch.stack([h[0, :2].mean(0), h[1, 1:].mean(0)]))


def test_score_matches_forward_and_is_batch_invariant(domains, tokenizer):
    xm = _model(tokenizer)
    data = domains["Tools"]
    xc = XCrossModel(xm, ["a0", "a1"], tokenizer=tokenizer, titles=data.titles, domain=data.name, max_history=3)
    with torch.no_grad():
        for p in xc.w_concat:
            p.normal_(0, 0.02)
    users, hists, targets = data.examples("test")
    hists = hists[:3]
    cands = np.array([[targets[i], 1, 2, 3, 4] for i in range(3)])
    s = xc.score(hists, cands, batch_size=4)
    assert s.shape == (3, 5) and s.dtype == torch.float32
    torch.testing.assert_close(xc.score(hists, cands, batch_size=15), s, atol=1e-5, rtol=1e-5)
    ids, mask = xc.encoder.encode(hists, cands)
    with torch.no_grad():
        torch.testing.assert_close(xc(ids, mask).view(3, 5), s, atol=1e-5, rtol=1e-5)
    # the prompt is the pointwise cross-encoder text of xkern.data.prompts
    from xkern.data.prompts import pointwise_prompt, titles_of

    text = pointwise_prompt(titles_of(hists[0], data.titles), data.titles[1], data.name, 3)
    assert xc.encoder.pair_ids(hists[0], 1) == list(tokenizer(text)["input_ids"])


def test_save_load_roundtrip_and_refusals(tokenizer, tmp_path):
    xm = _model(tokenizer, 3)
    xc = XCrossModel(xm, ["a0", "a1"], bias=True, beta=0.5)
    with torch.no_grad():
        for p in xc.trainable_parameters():
            p.normal_(0, 0.02)
    path = xc.save(tmp_path / "xc")
    cfg = json.loads((path / "xcross_config.json").read_text())
    assert cfg["adapters"] == ["a0", "a1"] and cfg["beta"] == 0.5 and cfg["bias"] is True
    from safetensors.torch import load_file

    saved = load_file(str(path / "xcross.safetensors"))
    assert sum(t.numel() for t in saved.values()) == xc.num_trainable()["total"]  # exactly the trainable ones
    back = XCrossModel.load(path, xm)
    ids = torch.randint(3, 50, (3, 6))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), xc(ids))
    with pytest.raises(ValueError, match="refusing"):
        XCrossModel.load(path, xm, adapters=["a0", "a2"])
    with pytest.raises(ValueError, match="refusing"):
        XCrossModel(xm, ["a1", "a0"], bias=True).load_state(path)
    with pytest.raises(ValueError, match="refusing"):
        XCrossModel(xm, ["a0", "a2"], bias=True).load_state(path)
    # same names, other weights: refused by the fingerprint
    fp = adapter_fingerprint(xm, "a1")
    xm.delete_adapter("a1")
    xm.add_adapter("a1", r=4, seed=99, init_lora_weights=False)
    assert adapter_fingerprint(xm, "a1") != fp
    with pytest.raises(ValueError, match="other weights"):
        XCrossModel.load(path, xm)
    XCrossModel.load(path, xm, strict_fingerprint=False)


def test_candidate_examples(domains):
    data = domains["Toys"]
    ex = candidate_examples(data, "train", n_neg=5, seed=1, epoch=0)
    ex_again = candidate_examples(data, "train", n_neg=5, seed=1, epoch=0)
    ex_next = candidate_examples(data, "train", n_neg=5, seed=1, epoch=1)
    assert len(ex) == len(data.train)
    user = sorted(data.train)[0]
    h, items, t = ex[0]
    assert items[t] == data.train[user][-1] and h == data.train[user][:-1]
    assert not set(np.delete(items, t).tolist()) & data.user_items(user)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(ex, ex_again, strict=True))
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(ex, ex_next, strict=True))  # fresh negatives


def test_train_updates_only_xcross_params_and_improves(domains, tokenizer, tmp_path):
    xm = _model(tokenizer)
    data = domains["Tools"]
    xc = XCrossModel(xm, ["a0", "a1"], tokenizer=tokenizer, max_history=3)
    frozen = {k: v.clone() for k, v in xm.state_dict().items()}
    res = train(xc, data, n_neg=3, epochs=3, batch_size=8, lr=1e-2, max_train_users=32, max_val_users=24,
                val_neg=4, progress=False, output_dir=tmp_path / "run")
    assert res.steps > 0 and res.val[0]["step"] == 0
    assert res.best_val_loss == min(v["loss"] for v in res.val)
    assert res.best_val_loss < res.val[0]["loss"]  # the head alone learns something on the synthetic data
    for k, v in xm.state_dict().items():
        assert torch.equal(v, frozen[k]), k  # base and adapters untouched
    assert any(torch.count_nonzero(p) > 0 for p in xc.w_concat)
    assert all(not p.requires_grad for p in [*xm.parameters(), *xc.parameters()])
    # the best state was restored: validating again gives the best loss
    from xkern.xcross.train import validate

    val = candidate_examples(data, "val", 4, 0, -1, None)[:24]
    assert validate(xc, val)["loss"] == pytest.approx(res.best_val_loss, abs=1e-5)
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert log["trainable"]["total"] == res.n_trainable
    back = XCrossModel.load(tmp_path / "run" / "xcross", xm)
    torch.testing.assert_close(back.w, xc.w)
    # the learning curve of this run, as `xkern plot runs/.../train_log.json` draws it
    from xkern.plot import learning_curve, plot_files

    curve = learning_curve(log)
    assert [v for _, v in curve["train loss"]] == pytest.approx(res.train_loss)
    assert curve["val loss"] == [(v["step"], pytest.approx(v["loss"])) for v in res.val]
    assert {"val mrr", "val hr@1"} <= set(curve)
    png = plot_files([tmp_path / "run" / "train_log.json"], tmp_path / "png")[0]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_early_stopping(domains, tokenizer):
    xm = _model(tokenizer)
    xc = XCrossModel(xm, ["a0", "a1"], tokenizer=tokenizer, max_history=3)
    res = train(xc, domains["Tools"], n_neg=2, epochs=50, batch_size=8, lr=3.0, max_train_users=16,
                max_val_users=16, val_neg=3, eval_every=1, patience=2, progress=False)
    assert res.stopped_early and res.steps < 100
    assert len(res.val) - 1 - [v["step"] for v in res.val].index(res.best_step) == 2


def test_train_adapter_scorer_trains_lora_and_head(domains, tokenizer):
    xm = _model(tokenizer, 0)
    xm.add_adapter("t", r=4, seed=0)
    before = [p.clone() for p in xm.adapter_parameters("t")]
    xc, res = train_adapter_scorer(xm, "t", domains["Tools"], tokenizer, max_history=3, n_neg=2, max_steps=2,
                                   batch_size=4, max_val_users=8, extra_lr=1e-2, progress=False)
    assert xc.n_streams == 1 and len(xc.w_concat) == 0
    assert res.n_trainable == xc.num_trainable()["total"] + sum(p.numel() for p in before)
    assert any(not torch.equal(a, b) for a, b in zip(before, xm.adapter_parameters("t"), strict=True))


def test_w_concat_lr_zero_freezes_the_integrators_and_trains_the_rest(domains, tokenizer, tmp_path):
    """w_concat_lr=0: W_concat stays as it was while w and the biases move, and the run's log counts only
    what it trained; a separate W_concat rate reaches its own optimizer group; negative rates are refused."""
    xm = _model(tokenizer)
    xc = XCrossModel(xm, ["a0", "a1"], bias=True, tokenizer=tokenizer, max_history=3)
    with torch.no_grad():
        for q in xc.w_concat:
            q.normal_(0, 1e-2)
    w_before = [q.clone() for q in xc.w_concat]
    rest_before = [q.clone() for q in (*xc.integrator_bias, xc.w)]
    res = train(xc, domains["Tools"], n_neg=2, max_steps=3, batch_size=4, lr=1e-2, w_concat_lr=0.0,
                max_train_users=16, max_val_users=8, val_neg=3, keep_best=False, progress=False,
                output_dir=tmp_path / "run")  # keep_best off: the last state, whatever validation says
    assert all(torch.equal(a, b) for a, b in zip(w_before, xc.w_concat, strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(rest_before, (*xc.integrator_bias, xc.w), strict=True))
    counts = xc.num_trainable()
    n_w = sum(q.numel() for q in xc.w_concat)
    assert res.n_trainable == counts["total"] - n_w
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert log["trainable"]["total"] == counts["total"] - n_w and log["trainable"]["frozen_w_concat"] == n_w

    rest_trained = [q.clone() for q in (*xc.integrator_bias, xc.w)]
    # W_concat's own rate: Adam moves it by ~1e-2 per step, the rest by ~1e-9
    train(xc, domains["Tools"], n_neg=2, max_steps=2, batch_size=4, lr=1e-9, w_concat_lr=1e-2, max_train_users=16,
          max_val_users=8, keep_best=False, progress=False)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(w_before, xc.w_concat, strict=True))
    assert all(torch.allclose(a, b, rtol=0, atol=1e-7) for a, b in zip(rest_trained, (*xc.integrator_bias, xc.w),
                                                                        strict=True))
    with pytest.raises(ValueError, match="w_concat_lr"):
        train(xc, domains["Tools"], max_steps=1, w_concat_lr=-1.0, progress=False)


def test_cli_train_xcross(domains, tokenizer, tmp_path):
    from xkern.xcross.cli import register

    xm = _model(tokenizer)
    model_dir = tmp_path / "base"
    base = tiny_model("llama", seed=3, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    base.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    xm = xkern.load_model(model_dir, dtype=torch.float32, progress=False)
    for i in range(2):
        xm.add_adapter(f"a{i}", r=4, seed=i, init_lora_weights=False)
        xm.save_adapter(f"a{i}", tmp_path / f"a{i}")
    parser = argparse.ArgumentParser(prog="xkern")
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args(["train-xcross", "--model", str(model_dir), "--adapter", f"a0={tmp_path / 'a0'}",
                              "--adapter", f"a1={tmp_path / 'a1'}", "--data", "synthetic", "--target", "Tools",
                              "--max-train-users", "16", "--max-steps", "2", "--batch-size", "4", "--n-neg", "2",
                              "--max-val-users", "8", "--max-history", "3", "--eval-users", "4", "--bias",
                              "--out", str(out), "--no-progress"])
    assert args.func(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metrics"]["n_users"] == 4 and 0 <= metrics["metrics"]["HR@10"] <= 1
    back = XCrossModel.load(out / "xcross", xm)
    assert back.has_bias and back.adapters == ["a0", "a1"]
    with pytest.raises(SystemExit):
        parser.parse_args(["train-xcross", "--model", "m", "--adapter", "no-equals-sign", "--target", "Tools"])


def test_interrupted_training_resumes_to_the_same_result(domains, tokenizer, tmp_path):
    """X-Cross's checkpoint (integrators, w, head, the co-trained LoRA, optimizer, position, best state); the
    resumed half may recompute activations where the first did not (a memory setting, not part of the run)."""
    def run(out, stop_after=None, grad_checkpointing=False):
        xm = _model(tokenizer)
        xc = XCrossModel(xm, ["a0", "a1"], tokenizer=tokenizer, max_history=3)
        res = train(xc, domains["Tools"], n_neg=3, max_steps=6, batch_size=4, lr=1e-2, max_train_users=32,
                    max_val_users=8, val_neg=3, eval_every=1, patience=None, keep_best=True, progress=False,
                    output_dir=out, extra_params=xm.adapter_parameters("a1"), extra_lr=1e-2, stop_after=stop_after,
                    grad_checkpointing=grad_checkpointing)
        return xm, xc, res

    xm_one, xc_one, whole = run(tmp_path / "whole")
    _, _, first = run(tmp_path / "cut", stop_after=3)
    assert first.steps == 3
    state = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3 and state["optimizer_keys"] == "index"  # the LoRA lives outside the X-Cross module
    xm_two, xc_two, second = run(tmp_path / "cut", grad_checkpointing=True)  # a fresh process's, resumed
    assert second.steps == 6
    assert [v["step"] for v in second.val] == [v["step"] for v in whole.val]
    np.testing.assert_allclose([v["loss"] for v in second.val], [v["loss"] for v in whole.val], rtol=1e-5)
    assert second.best_step == whole.best_step
    for a, b in zip(xc_two.trainable_parameters(), xc_one.trainable_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for a, b in zip(xm_two.adapter_parameters("a1"), xm_one.adapter_parameters("a1"), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(xm_two.adapter_parameters("a1"),
                                                     _model(tokenizer).adapter_parameters("a1"), strict=True))


def test_activation_checkpointing_trains_the_same(domains, tokenizer):
    """--grad-checkpointing reaches X-Cross's base (it was ignored before): same steps, same integrators."""
    runs = []
    for on in (False, True):
        xm = _model(tokenizer)
        xc = XCrossModel(xm, ["a0", "a1"], tokenizer=tokenizer, max_history=3)
        during = []
        res = train(xc, domains["Tools"], n_neg=3, max_steps=3, batch_size=4, lr=1e-2, max_train_users=16,
                    max_val_users=4, val_neg=3, progress=False, grad_checkpointing=on, keep_best=False,
                    extra_params=xm.adapter_parameters("a1"), extra_lr=1e-2,
                    callback=lambda step, loss, hf=xm.model, seen=during: seen.append(hf.is_gradient_checkpointing))
        assert during == [on] * 3 and not xm.model.is_gradient_checkpointing  # on while training only
        runs.append((res, [p.detach().clone() for p in [*xc.trainable_parameters(), *xm.adapter_parameters("a1")]]))
    np.testing.assert_allclose(runs[0][0].train_loss, runs[1][0].train_loss, rtol=1e-5)
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_rms_integrator_norm_reads_scale_free_hidden_states(tokenizer, tmp_path):
    """integrator_norm='rms': z = W [h_1; ..; h_n] / rms(token), the mixing of h itself unchanged."""
    from xkern.ops import xcross_integrate

    xm = _model(tokenizer)
    xc = XCrossModel(xm, ["a0", "a1"], tokenizer=tokenizer, max_history=3, integrator_norm="rms")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in xc.w_concat:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    hook = xc._make_hook(0, 2)
    h = torch.randn(2 * 3, 5, xc.hidden_size, generator=g)
    h[:, 0] *= 1000.0  # a "massive activation" token
    out = hook(None, (), h)
    # the definition, written out: z from the RMS-normalized token, mixing applied to h
    hv = h.reshape(2, 3, 5, -1)
    s = hv.pow(2).mean(dim=(0, -1), keepdim=True).add(1e-6).sqrt()
    z = torch.einsum("pk,ntk->ntp", xc.w_concat[0], torch.cat([hv[0] / s[0], hv[1] / s[0]], dim=-1))
    zd, zi = z[..., :2], z[..., 2:]
    want = torch.stack([hv[0] + zd[..., 0:1] * hv[1] + zi[..., 0:1] * (hv[0] - hv[1]),
                        hv[1] + zd[..., 1:2] * hv[0] + zi[..., 1:2] * (hv[1] - hv[0])]).reshape(h.shape)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(hook(None, (), h * 7.0), out * 7.0, rtol=1e-4, atol=1e-2)  # z does not scale with h
    plain = xcross_integrate(hv, xc.w_concat[0], 1.0, 1.0).reshape(h.shape)
    assert not torch.allclose(plain, out, rtol=1e-2)  # and it is not the paper's form
    with torch.no_grad():
        for p in xc.w_concat:
            p.zero_()
    torch.testing.assert_close(hook(None, (), h), h)  # zero-initialized integrators: the streams pass unchanged
    with pytest.raises(ValueError, match="integrator_norm"):
        XCrossModel(xm, ["a0", "a1"], integrator_norm="layer")
    xc.save(tmp_path / "xc")
    assert XCrossModel.load(tmp_path / "xc", xm).integrator_norm == "rms"
    with pytest.raises(ValueError, match="integrator_norm"):  # weights trained with one form refuse the other
        XCrossModel(xm, ["a0", "a1"]).load_state(tmp_path / "xc")


def test_candidate_pooling_reads_only_the_candidate_part(domains, tokenizer):
    """pooling='candidate': the head reads the w-mix of the streams' mean over the candidate's tokens only."""
    xm = _model(tokenizer)
    data = domains["Tools"]
    xc = XCrossModel(xm, ["a0", "a1"], pooling="candidate", tokenizer=tokenizer, titles=data.titles,
                     domain=data.name, max_history=3)
    with torch.no_grad():
        for p in xc.w_concat:
            p.normal_(0, 0.02)
        xc.w.copy_(torch.tensor([0.3, 0.9]))
    _, hists, _ = data.examples("test")
    pairs = [(hists[0], 1), (hists[1][:1], 2), (hists[2], 3)]  # histories of different lengths: padding
    ids, mask, span = xc.encode(pairs)
    for i, (h, c) in enumerate(pairs):  # the span is exactly the candidate part, before the closing tokens
        row = xc.encoder.pair_ids(h, c)
        cand = xc.encoder.candidate_ids(c)
        on = span[i].nonzero().flatten().tolist()
        assert [row[j] for j in on] == cand and on[-1] == len(row) - len(xc.encoder.tail_ids) - 1
    with torch.no_grad():
        hidden = xc.stream_hidden(ids, mask).float()  # [n, N, T, d]
        m = span[None, :, :, None].float()
        pooled = (hidden * m).sum(2) / m.sum(2)
        expected = xc.head((xc.w[:, None, None] * pooled).sum(0))
        torch.testing.assert_close(xc(ids, mask, span), expected, atol=1e-5, rtol=1e-5)
        other = pool_hidden(hidden.reshape(-1, *hidden.shape[2:]), mask.repeat(2, 1), "mean")
        assert not torch.allclose(xc.head((xc.w[:, None, None] * other.view(2, 3, -1)).sum(0)), expected)
    with pytest.raises(ValueError, match="candidate mask"):
        xc(ids, mask)
    xc.score(hists[:2], np.array([[1, 2], [3, 4]]))  # the scoring path builds the mask itself
