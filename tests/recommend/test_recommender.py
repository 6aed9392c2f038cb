"""A trained run loaded as a Recommender: the evaluation's scores, checked folders, two-stage recommendations."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import xkern
from xkern.data.cli import load_domains
from xkern.data.encoding import PromptEncoder
from xkern.data.metrics import metrics_from_ranks, pessimistic_ranks
from xkern.data.negatives import build_candidates
from xkern.errors import FormatError, InputError, InputKeyError, NotFoundError
from xkern.recipes import load_lm
from xkern.serve import PrefixLikelihoodScorer
from xkern.serve.runs import RUN_FILE, base_entry, base_fingerprint, read_run, write_run


@pytest.fixture(scope="module")
def rec(lora_run):
    return xkern.load_recommender(lora_run)


@pytest.fixture(scope="module")
def tools():
    return load_domains("synthetic", ["Tools"])["Tools"]


@pytest.fixture(scope="module")
def reference(lora_run, tools):
    """The evaluation's scorer on an independent load of the same base and adapter."""
    model, tok = load_lm("tiny", [tools], torch.float32, None, 0)
    model.load_adapter(Path(lora_run) / "adapter", "lora")
    return PrefixLikelihoodScorer(model, PromptEncoder(tok, "Tools", 5), tools.titles, "lora")


def test_rank_scores_equal_the_evaluation_scorer(rec, reference, tools):
    users, hists, _ = tools.examples("test")
    hist, cands = hists[0], list(range(10, 25))
    ranking = rec.rank([tools.item_ids[i] for i in hist], [tools.titles[i] for i in cands])  # ids and titles
    ref = reference([hist], np.array([cands]))[0]
    got = {s.item: s.score for s in ranking.items}
    assert [got[tools.item_ids[c]] for c in cands] == ref.tolist()  # the same computation, to the bit
    assert [s.score for s in ranking.items] == sorted(ref.tolist(), reverse=True)  # best first
    assert ranking.items[0].title == tools.titles[cands[int(np.argmax(ref))]]


def test_calibrated_scores_equal_the_evaluations_pmi_mode(lora_run, reference, tools):
    rec = xkern.load_recommender(lora_run, calibrate=True)
    hist, cands = tools.examples("test")[1][4], list(range(3, 15))
    pmi = PrefixLikelihoodScorer(reference.model, reference.enc, tools.titles, "lora", calibrate=True)
    got = {s.item: s.score for s in rec.rank(hist, cands).items}
    assert [got[tools.item_ids[c]] for c in cands] == pmi([hist], np.array([cands]))[0].tolist()


def test_rank_batch_reproduces_the_runs_own_evaluation(rec, lora_run, tools):
    """The metrics train-lora wrote (its scorer, its candidates) come back from rank_batch's scores."""
    summary = json.loads((Path(lora_run) / "summary.json").read_text())["test_lora"]
    cands = build_candidates(tools, "test", 29, "uniform", 0, 6)
    rankings = rec.rank_batch(cands.histories, cands.items.tolist())
    scores = np.array([[{s.item: s.score for s in r.items}[tools.item_ids[c]] for c in row]
                       for r, row in zip(rankings, cands.items.tolist(), strict=True)])
    m = metrics_from_ranks(pessimistic_ranks(scores, cands.target), (1, 3, 10))
    assert {k: m[k] for k in ("HR@1", "HR@10", "NDCG@10")} == pytest.approx(
        {k: summary[k] for k in ("HR@1", "HR@10", "NDCG@10")}, abs=1e-9)
    one = rec.rank(cands.histories[2], cands.items[2].tolist())
    assert [s.score for s in one.items] == pytest.approx([s.score for s in rankings[2].items], abs=1e-4)


def test_unknown_items_are_named_and_nothing_is_scored(rec):
    with pytest.raises(InputKeyError, match="'no such thing'.*'SYN-Tools-99999'"):
        rec.rank(["no such thing", "SYN-Tools-99999"], [0, 1])
    with pytest.raises(InputKeyError, match="candidates: 1 item"):
        rec.rank([0], [1, 10**6])
    with pytest.raises(InputError, match="twice"):
        rec.rank([0], [1, 1])
    with pytest.raises(InputError, match="at least one"):
        rec.rank([0], [])
    with pytest.raises(InputError, match="k must be"):
        rec.recommend([0], k=0)


def test_recommend_reranks_the_retrievers_top_n(rec, tools):
    from xkern.data.baselines import PopularityScorer

    hist = tools.examples("test")[1][3]
    r = rec.recommend(hist, k=5, top_n=12)
    assert r.retriever == "popularity" and not r.fallback and len(r.items) == 5
    pool = np.setdiff1d(np.arange(tools.n_items), hist)
    pop = PopularityScorer(tools.train, tools.n_items)([hist], pool[None])[0]
    top = pool[np.argsort(-pop, kind="stable")[:12]]
    ids = [tools.item_ids[i] for i in top]
    assert {s.item for s in r.items} <= set(ids) and not {s.item for s in r.items} & {tools.item_ids[i] for i in hist}
    full = rec.rank(hist, top.tolist())  # the model's order of the same 12, cut at 5
    assert [s.item for s in r.items] == [s.item for s in full.items[:5]]
    markov = rec.recommend(hist, k=5, top_n=12, retriever="item-markov")
    assert markov.retriever == "item-markov"


def test_empty_history_gets_the_retrievers_ranking_and_says_so(rec, tools):
    r = rec.recommend([], k=4)
    counts = np.asarray(tools.item_counts(), dtype=float)
    assert r.fallback and "empty history" in r.notes[0]
    assert [s.score for s in r.items] == sorted(counts, reverse=True)[:4]


def test_a_long_history_is_cut_from_the_oldest_and_said(rec, tools):
    hist = list(range(30, 38))
    r = rec.rank(hist, [1, 2, 3])
    assert (r.history_used, r.history_dropped) == (5, 3) and "oldest 3 dropped" in r.notes[0]
    short = rec.rank(hist[3:], [1, 2, 3])
    assert [s.score for s in r.items] == [s.score for s in short.items] and not short.notes


def test_requests_change_no_weight(rec):
    before = {k: v.clone() for k, v in rec.model.state_dict().items() if torch.is_tensor(v)}
    rec.rank_batch([[1, 2], [3]], [[4, 5, 6], [7, 8]])
    rec.recommend_batch([[1, 2], []], k=3)
    after = rec.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_users_of_two_runs_share_one_forward(two_domain_runs):
    rec = xkern.load_recommender(two_domain_runs)
    assert rec.runs == ["Tools", "Toys"]
    toys = rec.domain("Toys")
    mixed = rec.rank_batch([[0, 1], [2, 3], [4]], [[5, 6, 7], [8, 9], [10, 11, 12, 13]],
                           runs=["Tools", "Toys", "Tools"])
    alone = [rec.rank([0, 1], [5, 6, 7], run="Tools"), rec.rank([2, 3], [8, 9], run="Toys")]
    for a, b in zip(mixed[:2], alone, strict=True):
        assert [s.item for s in a.items] == [s.item for s in b.items]
        assert [s.score for s in a.items] == pytest.approx([s.score for s in b.items], abs=1e-4)
    assert mixed[1].items[0].item.startswith("SYN-Toys-") and toys.name == "Toys"
    with pytest.raises(InputError, match="name one with run="):
        rec.rank([0], [1])
    with pytest.raises(InputKeyError, match="unknown run 'Garden'"):
        rec.rank([0], [1], run="Garden")


def test_runs_over_different_bases_are_refused(lora_run, two_domain_runs):
    with pytest.raises(InputError, match="different bases"):
        xkern.load_recommender([lora_run, two_domain_runs[0]])
    with pytest.raises(InputError, match="unknown retriever 'sasrec'"):
        xkern.load_recommender(lora_run, retriever="sasrec")


# ---- the folder is checked before anything loads -------------------------------------------------------

@pytest.fixture
def copy_run(lora_run, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(lora_run, dst, ignore=shutil.ignore_patterns("checkpoint*"))
    return dst


def test_a_folder_that_is_not_a_run_is_named(tmp_path):
    with pytest.raises(NotFoundError, match="run folder .*nowhere not found"):
        xkern.load_recommender(tmp_path / "nowhere")
    with pytest.raises(NotFoundError, match=f"{RUN_FILE} not found"):
        xkern.load_recommender(tmp_path)
    (tmp_path / RUN_FILE).write_text("{not json")
    with pytest.raises(FormatError, match="run.json is not JSON"):
        xkern.load_recommender(tmp_path)
    (tmp_path / RUN_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(FormatError, match="not an xkern run manifest"):
        xkern.load_recommender(tmp_path)


def test_missing_or_changed_adapter_files_are_named(copy_run):
    weights = copy_run / "adapter" / "adapter_model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(FormatError, match="adapter_model.safetensors differs"):
        xkern.load_recommender(copy_run)
    weights.unlink()
    with pytest.raises(NotFoundError, match="adapter_model.safetensors not found"):
        xkern.load_recommender(copy_run)


def test_a_changed_catalogue_is_refused(copy_run):
    m = json.loads((copy_run / RUN_FILE).read_text())
    m["catalogue"] = "0" * 20
    (copy_run / RUN_FILE).write_text(json.dumps(m))
    with pytest.raises(FormatError, match="Tools catalogue .* differs"):
        xkern.load_recommender(copy_run)


def test_a_missing_or_changed_base_on_disk_is_named(tmp_path):
    from tests.helpers import tiny_model

    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    entry = base_entry(str(base), "float32")
    assert entry["fingerprint"] == base_fingerprint(base)
    run = tmp_path / "run"
    run.mkdir()
    write_run(run, {"command": "train-xcross", "domain": "Tools", "data": {"root": "synthetic"}, "base": entry,
                    "adapters": {}, "scorer": {"kind": "likelihood"}})
    with pytest.raises(FormatError, match="names no adapters"):
        read_run(run)
    (run / "a").mkdir()
    (run / "a" / "adapter_config.json").write_text("{}")
    from xkern.serve.runs import files_entry

    m = json.loads((run / RUN_FILE).read_text())
    m["adapters"] = {"a": files_entry(run / "a", ["adapter_config.json"], run)}
    (run / RUN_FILE).write_text(json.dumps(m))
    assert read_run(run)["adapters"]["a"]["dir"] == str((run / "a").resolve())
    cfg = json.loads((base / "config.json").read_text())
    cfg["hidden_size"] += 1
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="base model .*base differs"):
        read_run(run)
    shutil.rmtree(base)
    with pytest.raises(NotFoundError, match="base model .*base not found"):
        read_run(run)
