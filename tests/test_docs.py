"""Every results table in docs/ and the README is generated from a committed JSON and matches it."""

import json
from pathlib import Path

from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


def _tables():
    return load_script("bench/docs_tables.py")


def test_generated_blocks_match_their_json():
    tables = _tables()
    stale = {str(p.relative_to(ROOT)): s for p in tables.DOCS if (s := tables.update(p, write=False))}
    assert not stale, f"docs differ from bench/results (run python bench/docs_tables.py): {stale}"


def test_the_quickstart_and_benchmark_tables_are_generated_blocks():
    tables = _tables()
    found = {m.group("name") for p in tables.DOCS for m in tables.BLOCK.finditer(p.read_text())}
    assert {"quickstart-quick", "quickstart-full", "lora-linear-cpu-targets", "lora-linear-cpu-table"} <= found
    assert found <= set(tables.BLOCKS)


def _hr10(name: str) -> dict[tuple[str, str], float]:
    rows = json.loads((ROOT / "bench" / "results" / name).read_text())["rows"]
    return {(r["method"], str(r["fraction"])): r["HR@10"] for r in rows}


def test_the_quickstart_prose_holds_for_both_profiles():
    """docs/quickstart.md's sentences under the quick-vs-full table, checked against the two runs."""
    for profile in ("quick", "full"):
        hr = _hr10(f"quickstart-{profile}.json")
        popularity, markov = hr[("popularity", "1.0")], hr[("item-markov", "1.0")]
        for method in ("lora-target", "weave-hybrid-Toys", "weave-hybrid-Sports", "weave-merge"):
            assert hr[(method, "1.0")] > popularity + 0.2, (profile, method)
            assert abs(hr[(method, "1.0")] - markov) < 0.08, (profile, method)
        assert hr[("lora-Toys", "-")] > popularity + 0.2, profile
        assert (hr[("lora-Sports", "-")] > popularity + 0.03) == (profile == "full"), profile
        for fraction in ("0.25", "1.0"):
            assert hr[("xcross", fraction)] > popularity + 0.15, (profile, fraction)
        assert hr[("xcross", "0.25")] > hr[("lora-target", "0.25")] + 0.15, profile
        assert hr[("xcross", "1.0")] < hr[("lora-target", "1.0")], profile
        quarter = [v for (m, f), v in hr.items() if f == "0.25" and m not in ("popularity", "item-markov",
                                                                               "token-markov", "xcross")]
        assert max(quarter) - min(quarter) < 0.06 and abs(sum(quarter) / len(quarter) - popularity) < 0.05, profile
        runs = json.loads((ROOT / "bench" / "results" / f"quickstart-{profile}.json").read_text())["lm"]["adapters"]
        assert all(v["best_step"] == 0 for k, v in runs.items() if k.startswith("xcross")), profile
        trained = {v["trainable"]["total"] for k, v in runs.items() if k.startswith("xcross")}
        assert trained == {1026} and "1,026" in (ROOT / "docs" / "quickstart.md").read_text(), trained


def _ranks(name: str) -> dict[str, list[int]]:
    rows = json.loads((ROOT / "bench" / "results" / name).read_text())["rows"]
    return {r["method"]: r["ranks"] for r in rows}


def test_the_xcross_lr_prose_holds():
    """docs/xcross.md's reading of the lr 1e-5 models against the step-0 mix, checked on the per-user ranks."""
    import numpy as np

    trained, step0 = _ranks("quality-Tools-likelihood-lr.json"), _ranks("quality-Tools-likelihood.json")
    assert trained["popularity"] == step0["popularity"]  # the same users and candidates

    def diff(a: str, b: str, k: int) -> int:  # users gained in the top k (a minus b)
        return int((np.asarray(trained[a]) < k).sum() - (np.asarray(step0[b]) < k).sum())

    assert diff("xcross-80-lr1e-5", "xcross-80", 10) == 4 and diff("xcross-80-lr1e-5", "xcross-80", 1) == -1
    assert diff("xcross-80-pmi-lr1e-5", "xcross-80", 10) == 1 and diff("xcross-80-pmi-lr1e-5", "xcross-80", 1) == 0
    rows = {r["method"]: r for r in json.loads((ROOT / "bench/results/quality-Tools-likelihood-lr.json").read_text())[
        "rows"]}
    gains = [round(rows[n]["val_loss_start"] - rows[n]["val_loss_best"], 3)
             for n in ("xcross-80-lr1e-5", "xcross-80-pmi-lr1e-5")]
    assert gains == [0.011, 0.006]
    bias = {r["method"]: r for r in json.loads((ROOT / "bench/results/quality-Tools-likelihood-bias.json")
                                               .read_text())["rows"]}
    assert bias["popularity"]["ranks"] == step0["popularity"]
    name = "xcross-80-pmi-bias-lr3e-3"
    assert round(bias[name]["val_loss_start"] - bias[name]["val_loss_best"], 3) == 0.013
    assert bias[name]["trainable_params"] == 122
    pmi = np.asarray(bias[f"{name}+pmi"]["ranks"])
    assert (pmi == 0).sum() == 14 and round(float((1 / (pmi + 1)).mean()), 3) == 0.233  # HR@1 0.117
    assert bias["sasrec"]["metrics"]["HR@1"][0] == (pmi == 0).mean()
    from xkern.data.confidence import paired_comparison
    for metric in ("HR@1", "MRR"):
        d = paired_comparison(pmi, step0["xcross-80+pmi"], metric)
        assert d["ci_low"] < 0 < d["ci_high"], metric
    text = (ROOT / "docs" / "xcross.md").read_text()
    assert "HR@10 rises by 0.033 over step 0" in text and "(0.011, 0.006 and 0.013 nats)" in text
    assert "(+0.017 HR@1, +0.011 MRR)" in text


def test_the_weave_listwise_prose_holds():
    """docs/weave.md's reading of listwise generation, checked on the per-user ranks and counts."""
    import numpy as np

    from xkern.data.confidence import paired_comparison

    listwise = {r["method"]: r for r in json.loads(
        (ROOT / "bench/results/quality-Tools-weave-listwise.json").read_text())["rows"]}
    likelihood = _ranks("quality-Tools-weave.json")
    assert listwise["popularity"]["ranks"] == likelihood["popularity"]  # the same users and candidates
    exact = {m: listwise[f"{m}/listwise"]["exact"] for m in ("weave-merge", "joint", "target-only")}
    assert exact == {"weave-merge": 96, "joint": 97, "target-only": 65}
    merge = np.asarray(listwise["weave-merge/listwise"]["ranks"])
    assert (merge == 0).mean() == (np.asarray(listwise["random"]["ranks"]) == 0).mean() == 4 / 120
    mrr = paired_comparison(merge, likelihood["weave-merge/likelihood"], "MRR")
    assert mrr["ci_high"] < 0  # below its own likelihood mode
    vs_target = paired_comparison(merge, listwise["target-only/listwise"]["ranks"], "HR@10")
    assert round(vs_target["diff"], 3) == -0.042 and vs_target["ci_high"] < 0
    text = (ROOT / "docs" / "weave.md").read_text()
    assert "for 96-97 of 120 users (the target-only LoRA 65)" in text and "HR@1 falls to random" in text


def test_the_full_table_names_where_each_row_ran_and_not_the_last_machine():
    """A training resumed from another machine's checkpoint is named by its last invocation's CPU as such, and a
    row that recorded no CPU is not credited to the machine that last wrote the table."""
    tables = _tables()
    assert tables._where_trained({"cpu": "AMD EPYC", "seconds": 300.0, "seconds_last_invocation": 290.0},
                                 "Intel") == "AMD EPYC"
    assert tables._where_trained({"seconds": 8680.9, "seconds_last_invocation": 5587.5}, "Intel") \
        == "Intel for its last 1.55 h, the rest in earlier invocations"
    run = json.loads((ROOT / "bench/results/quality-Tools-full.json").read_text())
    unrecorded = [r["method"] for r in run["rows"] if not r.get("rank_cpu") and r.get("score") != "pmi"]
    assert unrecorded, "the committed table has rows ranked before the CPU was recorded"
    assert f"a CPU the row did not record ({', '.join(unrecorded)})" in tables.quality_tools_full()
