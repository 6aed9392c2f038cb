"""What ``xkern weave`` and ``xkern train-xcross`` write is served with the scores their own evaluation gave."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import xkern
from xkern.cli import main
from xkern.data.cli import load_domains
from xkern.data.encoding import PromptEncoder
from xkern.data.metrics import pessimistic_ranks
from xkern.data.negatives import build_candidates
from xkern.errors import InputError, NotFoundError
from xkern.serve import PrefixLikelihoodScorer

WEAVE = ["weave", "--data", "synthetic", "--target", "Tools", "--sources", "Toys", "--modes", "likelihood",
         "--train-users", "16", "--synthetic-users", "80", "--eval-users", "4", "--val-users", "4",
         "--speed-users", "0", "--max-steps", "2", "--batch-size", "4", "--no-progress"]


@pytest.fixture(scope="module")
def weave_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("weave")
    assert main([*WEAVE, "--rows", "weave-merge", "--save-adapters", str(root / "adapters"),
                 "--out", str(root / "run" / "results.json")]) == 0
    return root / "run"


def test_a_weave_run_serves_its_merge_with_the_scores_of_its_evaluation(weave_run):
    from xkern.weave.experiment import WeaveConfig, load_lm, load_saved_adapters
    from xkern.weave.merging import merge_loaded

    manifest = json.loads((weave_run / "run.json").read_text())
    assert manifest["scorer"]["merge"]["of"] == ["target", "hybrid-Toys"]
    rec = xkern.load_recommender(weave_run)
    tools = rec.domain()
    result = json.loads((weave_run / "results.json").read_text())
    row = next(r for r in result["rows"] if r["method"] == "weave-merge" and r["mode"] == "likelihood")
    cands = build_candidates(tools, "test", 29, "uniform", 0, 4)
    rankings = rec.rank_batch(cands.histories, cands.items.tolist())
    scores = np.array([[{s.item: s.score for s in r.items}[tools.item_ids[c]] for c in row_]
                       for r, row_ in zip(rankings, cands.items.tolist(), strict=True)])
    assert pessimistic_ranks(scores, cands.target).tolist() == row["ranks"]
    # an independent load of the base, the saved LoRAs and their merge: the same scores, to the bit
    cfg = WeaveConfig(target="Tools", sources=("Toys",), synthetic_users=80)
    domains = load_domains("synthetic", ["Toys", "Tools"], synthetic_users=80)
    model, tok, _ = load_lm(cfg, domains)
    load_saved_adapters(model, Path(weave_run).parent / "adapters", ["target", "hybrid-Toys"])
    merge_loaded(model, "weave-merge", ["target", "hybrid-Toys"])
    ref = PrefixLikelihoodScorer(model, PromptEncoder(tok, "Tools", 5), tools.titles, "weave-merge")
    hist, items = cands.histories[0], cands.items[:1]
    one = {s.item: s.score for s in rec.rank(hist, items[0].tolist()).items}
    assert [one[tools.item_ids[c]] for c in items[0]] == ref([hist], items)[0].tolist()


def test_a_weave_run_without_saved_adapters_says_what_to_do(tmp_path):
    assert main([*WEAVE, "--rows", "target-only", "--out", str(tmp_path / "results.json")]) == 0
    with pytest.raises(NotFoundError, match="--save-adapters"):
        xkern.load_recommender(tmp_path)


@pytest.fixture(scope="module")
def xcross_run(tmp_path_factory):
    from tests.helpers import tiny_model
    from xkern.data.prompts import pointwise_prompt
    from xkern.data.tokenizer import word_tokenizer

    root = tmp_path_factory.mktemp("xcross")
    tools = load_domains("synthetic", ["Tools"])["Tools"]
    tok = word_tokenizer(tools.titles + [pointwise_prompt(tools.titles[:3], tools.titles[3], "Tools")]
                         + [str(i) for i in range(20)])
    base = tiny_model("llama", seed=3, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    xm = xkern.load_model(root / "base", dtype=torch.float32, progress=False)
    for i in range(2):
        xm.add_adapter(f"a{i}", r=4, seed=i, init_lora_weights=False)
        xm.save_adapter(f"a{i}", root / f"a{i}")
    assert main(["train-xcross", "--model", str(root / "base"), "--adapter", f"a0={root / 'a0'}",
                 "--adapter", f"a1={root / 'a1'}", "--data", "synthetic", "--target", "Tools", "--dtype", "float32",
                 "--max-train-users", "16", "--max-steps", "2", "--batch-size", "4", "--n-neg", "2",
                 "--max-val-users", "8", "--max-history", "3", "--out", str(root / "run"), "--no-progress"]) == 0
    return root


def test_an_xcross_run_ranks_with_its_own_scorer(xcross_run):
    from xkern.nn.pretrained import load_tokenizer
    from xkern.xcross import XCrossModel

    rec = xkern.load_recommender(xcross_run / "run")
    tools = rec.domain()
    xm = xkern.load_model(xcross_run / "base", dtype=torch.float32, progress=False)
    for a in ("a0", "a1"):
        xm.load_adapter(xcross_run / a, a)
    xc = XCrossModel.load(xcross_run / "run" / "xcross", xm, tokenizer=load_tokenizer(xcross_run / "base"),
                          titles=tools.titles, domain="Tools")
    hist, cands = [3, 8, 9, 11], [1, 2, 5, 7]
    ref = xc.scorer()([hist[-3:]], np.array([cands]))[0]
    got = rec.rank(hist, cands)
    assert got.history_dropped == 1
    assert [{s.item: s.score for s in got.items}[tools.item_ids[c]] for c in cands] == ref.tolist()
    mixed = rec.rank_batch([hist, [2]], [cands, [4, 6, 8, 10]])  # two users, one X-Cross call
    assert [s.score for s in mixed[0].items] == pytest.approx([s.score for s in got.items], abs=1e-5)
    del rec, xm, xc
    with pytest.raises(InputError, match="calibrate needs likelihood scoring"):  # a head has no title prior
        xkern.load_recommender(xcross_run / "run", calibrate=True)


def test_an_xcross_runs_stream_adapter_moved_away_is_named(xcross_run, tmp_path):
    moved = shutil.move(str(xcross_run / "a1"), str(tmp_path / "a1"))
    try:
        with pytest.raises(NotFoundError, match="a1/adapter_config.json not found .*adapter 'a1'"):
            xkern.load_recommender(xcross_run / "run")
    finally:
        shutil.move(moved, str(xcross_run / "a1"))
