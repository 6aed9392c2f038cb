"""The quickstart's model rows: LoRA adapters on a tiny NF4 Llama, trained and scored end to end."""

from __future__ import annotations

import numpy as np
import pytest

from xkern.data.examples import candidate_examples, causal_lm_examples, next_item_pairs
from xkern.data.synthetic import SyntheticConfig, make_synthetic
from xkern.demo.core import DemoConfig, run_demo
from xkern.demo.lm import LMDemo, LMDemoConfig
from xkern.serve import LikelihoodScorer


@pytest.fixture(scope="module")
def domains():
    return make_synthetic(SyntheticConfig(n_users=120))


def test_next_item_pairs_and_examples(domains):
    tools = domains["Tools"]
    pairs = next_item_pairs(tools, "train", max_per_user=2)
    assert len(pairs) == 2 * sum(1 for s in tools.train.values() if len(s) >= 3) + sum(
        1 for s in tools.train.values() if len(s) == 2)
    user, hist, tgt = pairs[1]
    assert tools.train[user][: len(hist)] == hist and tools.train[user][len(hist)] == tgt
    lm = LMDemo(domains, LMDemoConfig())
    enc = lm.encoder("Tools")
    ex = causal_lm_examples(enc, tools, "train", 1)[0]
    n_prompt = sum(1 for lab in ex["labels"] if lab == -100)
    assert ex["input_ids"][n_prompt:] == ex["labels"][n_prompt:] and ex["labels"][-1] == lm.tokenizer.eos_token_id
    assert lm.tokenizer.unk_token_id not in ex["input_ids"]  # the word vocabulary covers prompts and titles
    cand = candidate_examples(enc, tools, "val", n_neg=4, seed=0)[0]
    assert len(cand["candidates"]) == 5 and 0 <= cand["target"] < 5


def test_likelihood_scorer_matches_one_sequence_at_a_time(domains):
    lm = LMDemo(domains, LMDemoConfig())
    lm.model.add_adapter("x", r=4, init_lora_weights=False, seed=1)
    tools = domains["Tools"]
    hist = [tools.train[u] for u in sorted(tools.train)[:3]]
    cands = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    batched = LikelihoodScorer(lm.model, lm.encoder("Tools"), tools.titles, "x", batch_size=4)(hist, cands)
    single = LikelihoodScorer(lm.model, lm.encoder("Tools"), tools.titles, "x", batch_size=1)(hist, cands)
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-4)
    assert batched.shape == (3, 3) and np.all(batched < 0)


def test_demo_lora_rows_learn(domains):
    cfg = DemoConfig(synthetic=SyntheticConfig(n_users=120), fractions=(1.0,), max_eval_users=60,
                     lm_config=LMDemoConfig(epochs=2), extra=())
    res = run_demo(cfg, progress=False)
    by = {r["method"]: r for r in res["rows"]}
    assert {"lora-target", "lora-Toys", "lora-Sports"} <= set(by)
    assert set(res["lm"]["adapters"]) == {"tgt-1", "src-Toys", "src-Sports"}
    chance = np.log(res["lm"]["vocab"])  # a uniform next-token guess
    for name, info in res["lm"]["adapters"].items():
        assert info["final_loss"] < 0.75 * chance, name
    assert by["lora-target"]["HR@10"] > by["random"]["HR@10"]


def test_shipped_tiny_base_is_the_quickstart_pretraining(tmp_path, monkeypatch):
    """The package ships the quickstart's pretrained tiny base under its key; a fresh pretraining gives it."""
    import torch
    from safetensors.torch import load_file

    from xkern.data.synthetic import SyntheticConfig, make_synthetic
    from xkern.data.tokenizer import word_tokenizer
    from xkern.train import tiny

    domains = make_synthetic(SyntheticConfig())
    cfg = tiny.TinyLMConfig()
    key = tiny.pretrain_key(word_tokenizer(tiny._vocab_texts(list(domains.values()), cfg.max_history)), domains, cfg)
    shipped = tiny.ASSET_DIR / f"{key}.safetensors"
    assert shipped.is_file(), "the quickstart's pretrained base is not shipped: run xkern.train.tiny.write_asset"
    monkeypatch.setenv("XKERN_CACHE", str(tmp_path))
    fresh = tiny.build_tiny_lm(domains, cfg, cache=False)
    loaded = tiny.build_tiny_lm(domains, cfg)  # from the asset
    assert not list(tmp_path.rglob("*.safetensors"))  # nothing pretrained, nothing cached
    # the same pretraining up to float summation order (thread counts differ between runs)
    assert len(fresh.pretrain_loss) == len(loaded.pretrain_loss)
    torch.testing.assert_close(torch.tensor(fresh.pretrain_loss), torch.tensor(loaded.pretrain_loss),
                               rtol=1e-4, atol=1e-5)
    a, b = fresh.model.state_dict(), loaded.model.state_dict()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
        else:  # NF4 codes: a weight within float noise of a code midpoint may round the other way
            assert int((a[k] != b[k]).sum()) <= max(2, a[k].numel() // 1000), k
    assert "lm_head.weight" in load_file(str(shipped))  # dense weights, quantized to NF4 on load


def test_two_worker_processes_give_the_single_process_table():
    """Rows start from their own seeds, so splitting them over two processes changes no number."""
    from xkern.data.synthetic import SyntheticConfig
    from xkern.demo.core import DemoConfig, run_demo
    from xkern.demo.xcross import XCrossDemoConfig
    from xkern.train.tiny import TinyLMConfig

    cfg = DemoConfig(synthetic=SyntheticConfig(n_users=120), fractions=(1.0,), max_eval_users=20,
                     lm_config=LMDemoConfig(base=TinyLMConfig(hidden_size=32, pretrain_steps=3), epochs=0.3,
                                            eval_batch_size=64),
                     xcross_config=XCrossDemoConfig(epochs=0.3, max_val_users=8, score_batch_size=64))
    seen = []
    one = run_demo(cfg, progress=False, workers=1)
    two = run_demo(cfg, progress=False, workers=2, on_row=lambda row: seen.append(row["method"]))
    assert two["workers"] == 2 and one["workers"] == 1
    metrics = ("HR@1", "HR@10", "NDCG@10", "MRR")
    assert [(r["method"], r["fraction"]) for r in one["rows"]] == [(r["method"], r["fraction"]) for r in two["rows"]]
    for a, b in zip(one["rows"], two["rows"], strict=True):
        assert {k: a[k] for k in metrics} == {k: b[k] for k in metrics}, a["method"]
    assert sorted(seen) == sorted(r["method"] for r in two["rows"])  # every row reported as it finished
    assert {"src-Toys", "tgt-1"} <= set(two["lm"]["adapters"])  # both processes' adapters described


def test_random_target_positions_are_drawn_per_epoch_and_cover_the_sequences(domains):
    tools = domains["Tools"]
    positions = {u: set(range(1, len(s))) for u, s in tools.train.items()}

    def targets(epoch: int, k: int = 1) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for user, hist, tgt in next_item_pairs(tools, "train", k, positions="random", seed=3, epoch=epoch):
            assert tools.train[user][: len(hist)] == hist and tools.train[user][len(hist)] == tgt
            out.setdefault(user, []).append(len(hist))
        return out

    first = targets(0)
    assert first == targets(0)  # seeded: a resumed run redraws the same examples
    assert all(len(v) == 1 and v[0] in positions[u] for u, v in first.items())
    assert len(first) == sum(1 for p in positions.values() if p)  # every epoch the same count, one per user
    assert any(first[u] != targets(1)[u] for u in first)
    seen = {u: set() for u in first}
    for epoch in range(100):  # a sequence of <= 19 positions misses one with probability < 19 * 0.95**100 = 0.01
        for u, v in targets(epoch).items():
            seen[u].update(v)
    assert sum(seen[u] == positions[u] for u in first) >= 0.95 * len(first)  # over epochs, whole sequences
    two = targets(0, 2)
    assert all(len(v) == min(2, len(positions[u])) and len(set(v)) == len(v) for u, v in two.items())
    last = next_item_pairs(tools, "train", 1)
    assert [len(h) for u, h, _ in last] == [len(tools.train[u]) - 1 for u, _, _ in last]
    with pytest.raises(ValueError, match="positions"):
        next_item_pairs(tools, "train", 1, positions="first")
