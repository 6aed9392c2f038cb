"""WeaveRec: mixing, training, merging + serving, weight selection, the CLI and the demo rows."""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import pytest
import torch

from tests.helpers import tiny_lm, titled_domain
from xkern.adapters import load_adapter
from xkern.weave import (
    CompletionLM,
    folded,
    merge_loaded,
    merged_adapter,
    mix_domains,
    select_merge_weights,
    select_weights,
    simplex_grid,
    train,
)
from xkern.weave.data import domain_examples

# ---- mixing ---------------------------------------------------------------------------------------


def test_mix_domains_equal_amounts_and_reproducible():
    target = [("t", i) for i in range(10)]
    sources = {"A": [("A", i) for i in range(25)], "B": [("B", i) for i in range(6)]}
    mixes = mix_domains(target, sources, seed=3)
    assert set(mixes) == {"A", "B"}
    assert sum(x[0] == "t" for x in mixes["A"]) == 10 and sum(x[0] == "A" for x in mixes["A"]) == 10
    assert sum(x[0] == "t" for x in mixes["B"]) == 6 and sum(x[0] == "B" for x in mixes["B"]) == 6
    assert len(set(mixes["A"])) == 20  # drawn without replacement
    assert mixes == mix_domains(target, sources, seed=3)  # reproducible
    assert mixes["A"] != mix_domains(target, sources, seed=4)["A"]
    # shuffled: the target examples are not all first
    assert [x[0] for x in mixes["A"]] != ["t"] * 10 + ["A"] * 10
    # a source's mix does not depend on the other sources
    assert mix_domains(target, {"A": sources["A"]}, seed=3)["A"] == mixes["A"]
    # list form and per_domain
    lst = mix_domains(target, [sources["A"]], per_domain=4, seed=3)
    assert len(lst) == 1 and len(lst[0]) == 8 and sum(x[0] == "t" for x in lst[0]) == 4
    with pytest.raises(ValueError, match="only 6 available"):
        mix_domains(target, sources, per_domain=8)


def test_domain_examples_formats():
    d = titled_domain()
    _, tok = tiny_lm([d])
    nxt = domain_examples(tok, d, "next_item", 5)
    lst = domain_examples(tok, d, "listwise", 5, n_candidates=6)
    both = domain_examples(tok, d, "both", 5, n_candidates=6)
    assert len(nxt) == len(lst) == len([u for u, s in d.train.items() if len(s) >= 2]) and len(both) == 2 * len(nxt)
    for a, b in zip(nxt, lst, strict=True):  # same completion (next title + EOS), longer listwise prompt
        na, nb = sum(x == -100 for x in a["labels"]), sum(x == -100 for x in b["labels"])
        assert a["input_ids"][na:] == b["input_ids"][nb:] and a["labels"][-1] == tok.eos_token_id
        assert nb > na
    text = tok.decode(lst[0]["input_ids"])
    assert "Candidate items" in text and "6 ." in text  # the numbered candidates (word tokenizer spacing)
    assert len(domain_examples(tok, d, "next_item", 5, max_examples=5)) == 5


def test_completion_lm_equals_causal_lm():
    from xkern.train import CausalLM

    d = titled_domain()
    model, tok = tiny_lm([d])
    model.add_adapter("x", r=4, init_lora_weights=False, seed=0)
    ex = domain_examples(tok, d, "both", 5, n_candidates=4)[:6]
    pad = tok.pad_token_id
    with torch.no_grad():
        ref = CausalLM().loss(model, CausalLM().collate(ex, pad), "x")
        got = CompletionLM().loss(model, CompletionLM().collate(ex, pad), "x")
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)


# ---- training -------------------------------------------------------------------------------------


def test_train_target_and_hybrids(tmp_path):
    t, s1, s2 = titled_domain("Tools"), titled_domain("Toys", offset=5), titled_domain("Sports", offset=9)
    model, tok = tiny_lm([t, s1, s2])
    out = train(model, t, [s1, s2], tokenizer=tok, fmt="next_item", r=4, lora_alpha=8, seed=0, lr=1e-2,
                batch_size=8, max_steps=2, progress=False, output_dir=tmp_path)
    assert out.target == "weave-target" and out.hybrids == {"Toys": "weave-hybrid-Toys",
                                                             "Sports": "weave-hybrid-Sports"}
    n_t = out.logs["weave-target"]["examples"]
    assert out.logs["weave-hybrid-Toys"]["examples"] == 2 * n_t  # equal amounts of target and source
    for name in out.names:
        assert out.logs[name]["steps"] == 2
        saved = load_adapter(out.paths[name])  # PEFT format on disk
        live = model.get_adapter(name)
        for m, w in live.modules.items():
            assert torch.equal(saved.modules[m].A, w.A) and torch.equal(saved.modules[m].B, w.B)
    # fresh initialization each (same seed -> same A at start), then different data -> different adapters
    a_t = model.get_adapter("weave-target").modules
    a_h = model.get_adapter("weave-hybrid-Toys").modules
    m0 = sorted(a_t)[0]
    assert not torch.equal(a_t[m0].B, a_h[m0].B)


# ---- merging and serving --------------------------------------------------------------------------


def _dense_reference(hf_copy, model, deltas):
    """A plain transformers model whose NF4-targeted weights are dequant(W) + delta (float32)."""
    mods = dict(hf_copy.named_modules())
    with torch.no_grad():
        for name, layer in model.nf4_layers.items():
            w = layer.nf4_weight.dequantize(torch.float32)
            if name in deltas:
                w = w + deltas[name]
            mods[name].weight.copy_(w)
    return hf_copy


def _logits(model, ids, adapter):
    with torch.no_grad():
        return model(input_ids=ids, adapter_names=adapter).logits


def test_merged_adapter_served_by_core_op_matches_dense_exact_delta():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    ref_model = copy.deepcopy(hf)
    from xkern.nn import load_model

    model = load_model(hf, dtype=torch.float32, progress=False)
    model.add_adapter("t", r=4, lora_alpha=8, init_lora_weights=False, seed=1)
    model.add_adapter("h1", r=2, lora_alpha=4, init_lora_weights=False, seed=2)
    model.add_adapter("h2", r=4, lora_alpha=4, init_lora_weights=False, seed=3)
    names, w = ["t", "h1", "h2"], [0.5, 0.3, 0.2]
    deltas = {m: sum(wi * model.nf4_layers[m].delta_weight(n) for n, wi in zip(names, w, strict=True))
              for m in model.nf4_layers}
    dense = _dense_reference(ref_model, model, deltas)
    ids = torch.randint(0, 64, (3, 9))
    with torch.no_grad():
        ref = dense(input_ids=ids).logits
    merge_loaded(model, "exact", names, w)
    assert {model.nf4_layers[m].rank("exact") for m in model.nf4_layers} == {10}  # rank sum r_i
    exact = _logits(model, ids, "exact")
    assert (exact - ref).abs().max() < 1e-4 * ref.abs().max()
    # mixed batch: the merge next to the base in one call = each alone
    mixed = _logits(model, ids, ["exact", "__base__", "exact"])
    assert torch.allclose(mixed[0], exact[0], atol=1e-5) and torch.allclose(mixed[1], _logits(model, ids, None)[1],
                                                                             atol=1e-5)
    # SVD to rank 4 approximates, rank 10 is exact again
    merge_loaded(model, "svd4", names, w, mode="svd", rank=4)
    merge_loaded(model, "svd10", names, w, mode="svd", rank=10)
    err4 = (_logits(model, ids, "svd4") - exact).abs().max()
    err10 = (_logits(model, ids, "svd10") - exact).abs().max()
    assert err10 < 1e-4 and err4 > 10 * err10
    # folded: re-quantized into NF4, served as the base; the weights come back afterwards
    base_before = _logits(model, ids, None)
    with folded(model, merged_adapter(model, names, w)) as served:
        assert served == "__base__"
        fold_logits = _logits(model, ids, served)
    assert torch.equal(_logits(model, ids, None), base_before)
    fold_err = (fold_logits - exact).abs().max()
    base_err = (base_before - exact).abs().max()
    assert fold_err < base_err  # closer to the exact merge than the base is, but not exact (re-quantized)


def test_simplex_grid_and_select_weights():
    g = simplex_grid(3, 0.25)
    assert len(g) == 15 and all(abs(sum(x) - 1) < 1e-12 and min(x) >= 0 for x in g)
    assert (0.5, 0.25, 0.25) in g and len(set(g)) == 15
    assert simplex_grid(2, 0.5) == [(1.0, 0.0), (0.5, 0.5), (0.0, 1.0)]
    with pytest.raises(ValueError):
        simplex_grid(3, 0.3)
    best, table = select_weights(lambda w: -((w[0] - 0.5) ** 2 + (w[1] - 0.25) ** 2), 3, 0.25)
    assert best == (0.5, 0.25, 0.25) and len(table) == 15
    best, _ = select_weights(lambda w: 1.0, 3, 0.5)  # all tied: the uniform-closest point
    assert best in [(0.5, 0.5, 0.0), (0.5, 0.0, 0.5), (0.0, 0.5, 0.5)]


def test_select_merge_weights_finds_the_adapter_that_made_the_data():
    """Truth = base + adapter "good"; the merge weights that reproduce it best put everything on "good"."""
    d = titled_domain()
    model, _ = tiny_lm([d])
    model.add_adapter("good", r=4, init_lora_weights=False, seed=1)
    model.add_adapter("bad", r=4, init_lora_weights=False, seed=2)
    ids = torch.randint(3, 40, (2, 8))
    truth = _logits(model, ids, "good")

    def closeness(adapter):
        return -float((_logits(model, ids, adapter) - truth).abs().max())

    best, table = select_merge_weights(model, ["bad", "good"], closeness, step=0.25)
    assert best == (0.0, 1.0) and len(table) == 5
    assert "weave-select" not in model.list_adapters()


# ---- CLI and demo rows ----------------------------------------------------------------------------


def test_weave_cli_through_register(tmp_path, capsys):
    from xkern.weave.cli import register

    parser = argparse.ArgumentParser(prog="xkern")
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "weave.json"
    args = parser.parse_args(["weave", "--data", "synthetic", "--synthetic-users", "30", "--train-users", "8",
                              "--eval-users", "4",
                              "--speed-users", "1", "--max-steps", "1", "--rows", "target-only,weave-merge",
                              "--format", "next_item", "--max-new-tokens", "3", "--tiny-pretrain-steps", "2",
                              "--modes", "likelihood,pmi,listwise", "--val-users", "5",
                              "--out", str(out), "--no-progress"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "weave-merge" in text and "prefix-KV likelihood scoring" in text
    res = json.loads(out.read_text())
    modes = ("likelihood", "pmi", "listwise")
    assert {(r["method"], r["mode"]) for r in res["rows"]} == {
        (m, mode) for m in ("target-only", "weave-merge") for mode in modes}
    assert res["speed"]["max_abs_score_diff"] < 1e-3
    assert np.isfinite(res["val_loss_base"]) and 0 < res["val_users"] <= 5
    by = {(r["method"], r["mode"]): r for r in res["rows"]}
    for r in res["rows"]:
        assert 0 <= r["HR@1"] <= r["HR@10"] <= 1 and r["n_users"] == 4
        ranks = np.asarray(r["ranks"])  # the metrics are those of the per-user ranks kept beside them
        assert r["HR@10"] == pytest.approx((ranks < 10).mean()) and r["MRR"] == pytest.approx((1 / (ranks + 1)).mean())
        assert r["val_loss"] == by[(r["method"], "likelihood")]["val_loss"] != res["val_loss_base"]
        if r["mode"] == "listwise":
            assert r["exact"] + r["fallback"] == 4
    # a merge is charged every LoRA merged into it: the target and one hybrid per source, all rank r
    assert by[("weave-merge", "pmi")]["trainable_params"] == 3 * by[("target-only", "pmi")]["trainable_params"] > 0

    from xkern.weave.experiment import quality_pairs, quality_rows
    rows = quality_rows(res, n_boot=50)
    assert [r["method"] for r in rows] == [f"{r['method']}/{r['mode']}" for r in res["rows"]]
    assert rows[0]["val_loss_start"] == res["val_loss_base"] and rows[0]["metrics"]["HR@10"][1] <= rows[0][
        "metrics"]["HR@10"][0] <= rows[0]["metrics"]["HR@10"][2]
    pairs = quality_pairs(rows, n_boot=50)
    assert {(p["a"], p["b"]) for p in pairs} == {(f"weave-merge/{m}", f"target-only/{m}") for m in modes}
    with pytest.raises(SystemExit):
        parser.parse_args(["weave", "--format", "nope"])


def test_weave_load_adapters_scores_what_the_saving_run_trained(tmp_path):
    """--load-adapters: a second run scores the first run's saved adapters, trains nothing, and ranks
    and validates exactly as the run that trained them; a missing adapter fails before any is loaded."""
    from xkern.weave.cli import register

    parser = argparse.ArgumentParser(prog="xkern")
    register(parser.add_subparsers(dest="command"))
    common = ["weave", "--data", "synthetic", "--synthetic-users", "30", "--train-users", "8", "--eval-users", "4",
              "--speed-users", "0",
              "--max-steps", "2", "--lr", "5e-2", "--rows", "target-only,weave-merge", "--format", "next_item",
              "--tiny-pretrain-steps", "2", "--modes", "likelihood", "--val-users", "5", "--no-progress"]
    saved = tmp_path / "adapters"
    runs = []
    for i, extra in enumerate((["--save-adapters", str(saved)], ["--load-adapters", str(saved)])):
        out = tmp_path / f"run{i}.json"
        args = parser.parse_args([*common, *extra, "--out", str(out)])
        assert args.func(args) == 0
        runs.append(json.loads(out.read_text()))
    first, second = runs
    assert set(second["adapters"]) == {"target", "hybrid-Toys", "hybrid-Sports"}
    assert all("loaded_from" in a and "steps" not in a for a in second["adapters"].values())
    assert all(a["steps"] == 2 for a in first["adapters"].values())
    assert [(r["method"], r["ranks"]) for r in second["rows"]] == [(r["method"], r["ranks"]) for r in first["rows"]]
    for a, b in zip(first["rows"], second["rows"], strict=True):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6) and a["val_loss"] < first["val_loss_base"]

    from xkern.weave.experiment import load_saved_adapters
    model, _ = tiny_lm([titled_domain("Tools", 20)])
    with pytest.raises(FileNotFoundError, match="joint"):
        load_saved_adapters(model, saved, ["target", "joint"])  # joint was never trained
    assert "target" not in model.adapter_configs
    model.add_adapter("hybrid-Toys", r=2)
    with pytest.raises(ValueError, match="already loaded"):
        load_saved_adapters(model, saved, ["target", "hybrid-Toys"])
    assert "target" not in model.adapter_configs


def test_weave_demo_rows():
    from xkern.data.synthetic import SyntheticConfig
    from xkern.demo.core import DemoConfig, run_demo
    from xkern.demo.lm import LMDemoConfig
    from xkern.demo.weave import weave_methods
    from xkern.train.tiny import TinyLMConfig

    cfg = DemoConfig(synthetic=SyntheticConfig(n_users=30), fractions=(1.0,), max_eval_users=6,
                     lm_config=LMDemoConfig(base=TinyLMConfig(hidden_size=32, pretrain_steps=2), epochs=0.25))
    res = run_demo(cfg, methods=weave_methods(["Toys", "Sports"], include_target=True), progress=False)
    by = {r["method"]: r for r in res["rows"]}
    assert set(by) == {"weave-target", "weave-hybrid-Toys", "weave-hybrid-Sports", "weave-merge"}
    assert set(res["lm"]["adapters"]) == {"tgt-1", "weave-hyb-Toys-1", "weave-hyb-Sports-1"}
    n_t = res["lm"]["adapters"]["tgt-1"]["examples"]
    assert res["lm"]["adapters"]["weave-hyb-Toys-1"]["examples"] == pytest.approx(2 * n_t, rel=0.2)
    assert all(np.isfinite(r["NDCG@10"]) for r in res["rows"])
