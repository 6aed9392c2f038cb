"""The real-run example scripts' table code, on the committed results (no model is run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    return load_script(f"examples/{name}.py")


def test_xcross_table_shows_kept_steps_and_baselines():
    xa = _load("xcross_amazon")
    log = json.loads((ROOT / "bench" / "results" / "xcross_amazon.json").read_text())
    table = xa.results_table(log).splitlines()
    body = [line for line in table if line.startswith("| ") and not line.startswith("| method")]
    assert len(body) == len(log["rows"]) + len(log["baselines"])
    for row, line in zip(log["rows"], body, strict=False):
        tr = log["training"][xa._training_key(row, log)]
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == row["method"] and float(cells[3]) == round(row["HR@10"], 3)
        assert cells[-1].startswith(f"{tr['best_step']} / {tr['steps']} ")
    assert [line.split("|")[1].split()[0] for line in body[-3:]] == ["random", "popularity", "item-markov"]


def test_committed_quality_results_follow_the_format_and_their_ranks():
    """Every bench/results/quality-*.json: the quality row format, and each metric's mean is the mean
    over the row's own per-user ranks, inside its interval; paired rows compare the same users."""
    import numpy as np

    from xkern.data.confidence import per_user

    files = sorted((ROOT / "bench" / "results").glob("quality-*.json"))
    assert files
    keys = {"method", "target", "sources", "fraction", "n_users", "trainable_params", "val_loss_start",
            "val_loss_best", "metrics"}
    for f in files:
        run = json.loads(f.read_text())
        n_users = {len(r["ranks"]) for r in run["rows"]}
        assert len(n_users) == 1, f"{f.name}: rows over different users"
        for r in run["rows"]:
            assert keys <= set(r), f"{f.name}: {r['method']} lacks {keys - set(r)}"
            assert set(r["metrics"]) == {"HR@1", "HR@10", "NDCG@10", "MRR"}
            for m, (mean, low, high) in r["metrics"].items():
                assert abs(mean - float(np.mean(per_user(r["ranks"], m)))) < 1e-9, (f.name, r["method"], m)
                assert low <= mean <= high
        methods = {r["method"] for r in run["rows"]}
        for p in run.get("paired", []):
            assert p["a"] in methods and p["b"] in methods and p["n_users"] in n_users


def test_weave_amazon_script_runs_end_to_end_and_writes_the_quality_format(tmp_path):
    """examples/weave_amazon.py on the synthetic domains and the tiny base: the run JSON, the doc block,
    and the quality file whose rows (models and baselines) rank the same users."""
    wa = _load("weave_amazon")
    doc, quality = tmp_path / "weave.md", tmp_path / "quality.json"
    assert wa.main(["--json", str(tmp_path / "run.json"), "--doc", str(doc), "--quality", str(quality),
                    "--n-boot", "50", "--data", "synthetic", "--model", "tiny", "--layers", "2",
                    "--tiny-pretrain-steps", "2", "--synthetic-users", "30", "--train-users", "6",
                    "--eval-users", "5", "--max-steps", "1", "--rows", "target-only,weave-merge",
                    "--modes", "likelihood,pmi", "--format", "next_item", "--speed-users", "0"]) == 0
    assert "<!-- weave-amazon:begin -->" in doc.read_text()
    q = json.loads(quality.read_text())
    methods = [r["method"] for r in q["rows"]]
    assert methods == ["target-only/likelihood", "target-only/pmi", "weave-merge/likelihood", "weave-merge/pmi",
                       "random", "popularity", "item-markov", "sasrec"]
    assert all(r["n_users"] == 5 and len(r["ranks"]) == 5 for r in q["rows"])
    assert {(p["a"], p["b"]) for p in q["paired"]} >= {("weave-merge/pmi", "target-only/pmi")}


def _tiny_base(root: Path) -> Path:
    """A tiny Llama and a word tokenizer over the synthetic domains' titles, saved as a model directory."""
    from tests.helpers import tiny_model
    from xkern.data.cli import load_domains
    from xkern.data.prompts import pointwise_prompt
    from xkern.data.tokenizer import word_tokenizer

    domains = load_domains("synthetic", ["Tools", "Toys"])
    titles = [t for d in domains.values() for t in d.titles]
    tok = word_tokenizer(titles + [pointwise_prompt(titles[:3], titles[3], d) for d in domains]
                         + [str(i) for i in range(20)])
    base = tiny_model("llama", seed=3, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    base.save_pretrained(root)
    tok.save_pretrained(root)
    return root


def test_quality_full_trains_skips_what_is_done_and_writes_quality_rows(tmp_path, capsys):
    """examples/quality_full.py on the synthetic domains and a tiny base: every run trained by its xkern command,
    every row ranked (raw and PMI) with the baselines on the same users and its validation change; run
    again, it trains and scores nothing and writes the same rows."""
    qf = _load("quality_full")
    base = _tiny_base(tmp_path / "base")
    out, runs, archive = tmp_path / "quality-Tools-full.json", tmp_path / "runs", tmp_path / "archive"
    argv = ["--data", "synthetic", "--target", "Tools", "--sources", "Toys", "--fractions", "0.5,1.0",
            "--model", str(base), "--runs", str(runs), "--eval-users", "6", "--n-boot", "50", "--threads", "1",
            "--out", str(out), "--no-publish", "--archive", str(archive),
            "--lora-args", "--max-steps 2 --batch-size 4 --max-val-users 6 --eval-every 1 --save-every 1",
            "--xcross-args", "--max-steps 2 --batch-size 2 --max-val-users 6 --val-neg 3 --eval-every 1 "
                             "--save-every 1 --no-grad-checkpointing"]
    assert qf.main(argv) == 0
    q = json.loads(out.read_text())
    methods = [r["method"] for r in q["rows"]]
    models = ["lora-0.5", "lora-1.0", "xcross-0.5", "xcross-1.0", "xcross-0", "weave-merge", "plain-merge", "joint",
              "lora-1.0-ep2"]
    assert methods == [m + s for m in models for s in ("", "+pmi")] + list(qf.BASELINES)
    assert q["missing_rows"] == []
    assert all(r["n_users"] == 6 for r in q["rows"])
    by = {r["method"]: r for r in q["rows"]}
    assert by["lora-0.5"]["fraction"] == 0.5 and by["xcross-1.0"]["sources"] == ["Toys"]
    # a merge's trainable parameters are its parts'; X-Cross trains its integrators only, not the sources
    assert by["weave-merge"]["trainable_params"] == by["lora-1.0"]["trainable_params"] + \
        json.loads((runs / "hybrid-Toys" / "summary.json").read_text())["trainable_parameters"]
    assert 0 < by["xcross-1.0"]["trainable_params"] < by["lora-1.0"]["trainable_params"]
    for m in models:
        if m == "xcross-0":  # X-Cross before training: nothing trained, nothing validated
            assert by[m]["trainable_params"] == by[m]["steps"] == 0 and "val_change" not in by[m]
            continue
        change = by[m]["val_change"]
        assert change["ci_low"] <= change["diff"] <= change["ci_high"] and change["n"] > 0
    assert {(p["a"], p["b"], p["metric"]) for p in q["paired"]} >= {
        ("weave-merge+pmi", "plain-merge+pmi", "HR@10"), ("xcross-0.5+pmi", "lora-1.0+pmi", "MRR"),
        ("joint", "sasrec", "HR@10"), ("xcross-1.0+pmi", "xcross-0+pmi", "MRR"), ("xcross-0", "lora-1.0", "HR@10")}
    # with one source, X-Cross before training is that source's LoRA (its one stream, weighted 1): its scores are
    # the source LoRA's mean title log-probabilities, scored here by the adapter path (the base's differ by ~1e-3);
    # a fresh ranker builds it with nothing attached yet
    ranker = qf.Ranker(qf.parse_args(argv), {})
    ranker.runs, rows = qf.plan(ranker.args, len(ranker.data.train))[:2]
    start, _ = ranker.scorer(rows["xcross-0"])
    lora, _ = ranker.scorer(qf.Row("src-Toys", "adapter", ["src-Toys"]))
    users = (ranker.cands.histories, ranker.cands.items)
    saved = json.loads((runs / "ranks" / "xcross-0.json").read_text())["scores"]
    assert np.allclose(start(*users), saved, rtol=0, atol=1e-6)
    assert np.allclose(lora(*users), saved, rtol=0, atol=1e-5)
    # its saved scores stand while its run's training options change, not when the options that make its model do
    key, trains = ranker.fingerprint(rows["xcross-0"]), ranker.runs["xcross-0.5"].argv
    trains += ["--lr", "1e-3", "--grad-checkpointing"]
    assert ranker.fingerprint(rows["xcross-0"]) == key
    trains += ["--integrator-norm", "none"]
    assert ranker.fingerprint(rows["xcross-0"]) != key
    assert json.loads((runs / "lora-0.5" / "summary.json").read_text())["recipe"]["fraction"] == 0.5
    second = json.loads((runs / "lora-1.0-ep2" / "summary.json").read_text())  # starts where lora-1.0 ended
    assert second["recipe"]["positions"] == "random" and second["recipe"]["init_adapter"] == str(runs / "lora-1.0"
                                                                                                 / "adapter")
    assert second["val_loss_before"] == pytest.approx(json.loads((runs / "lora-1.0" / "summary.json").read_text())
                                                      ["val_loss_after"], rel=1e-4)
    assert by["lora-1.0-ep2"]["trainable_params"] == by["lora-1.0"]["trainable_params"]
    assert ("lora-1.0-ep2+pmi", "lora-1.0+pmi", "HR@10") in {(p["a"], p["b"], p["metric"]) for p in q["paired"]}
    timing, lora = q["timings"]["train:lora-1.0"], json.loads((runs / "lora-1.0" / "summary.json").read_text())
    assert timing["invocations"] == 1 and timing["seconds"] == round(lora["train_seconds_total"], 1) > 0
    src = json.loads((runs / "src-Toys" / "summary.json").read_text())  # the source, reported though not ranked
    assert q["source_runs"]["src-Toys"] == {**q["source_runs"]["src-Toys"], "domain": "Toys", "steps": src["steps"],
                                            "train_examples": src["train_examples"],
                                            "val_loss_end_run": src["val_loss_after"]}
    # the GPU estimate counts every validation the commands ran (the start and each of the 2 steps) and the
    # ranking time the rows report
    est_path = tmp_path / "estimate.json"
    assert qf.main([*argv, "--estimate-gpu", "--out", str(est_path), "--table", str(out)]) == 0
    estimate = json.loads(est_path.read_text())
    est = {st["step"]: st for st in estimate["steps"]}
    trained = ["src-Toys", "lora-0.5", "lora-1.0", "xcross-0.5", "xcross-1.0", "hybrid-Toys", "joint",
               "lora-1.0-ep2"]
    assert set(est) == {f"train:{r}" for r in trained} | {f"rank:{m}" for m in models}
    for name, st in est.items():
        if name.startswith("train:"):
            assert st["validations"] == 3 and st["validation_tokens"] > 0
            assert st["flops"] > st["tokens"] * 2 * estimate["forward_flops_per_token"]
        else:
            assert st["cpu_seconds"] == pytest.approx(by[name.removeprefix("rank:")]["rank_seconds"], abs=0.1)
    logs = {p.name: p.stat().st_mtime_ns for p in runs.glob("*.log")}
    ranks = {p.name: p.stat().st_mtime_ns for p in (runs / "ranks").glob("*.json")}
    capsys.readouterr()
    assert qf.main(argv) == 0
    said = capsys.readouterr().out
    assert "[train]" not in said and said.count(" done\n") == 8
    assert {p.name: p.stat().st_mtime_ns for p in runs.glob("*.log")} == logs
    assert {p.name: p.stat().st_mtime_ns for p in (runs / "ranks").glob("*.json")} == ranks
    again = json.loads(out.read_text())
    assert [r["ranks"] for r in again["rows"]] == [r["ranks"] for r in q["rows"]]
    # a fresh machine (no runs here) restores every finished run and every row's scores from the archive, which
    # keeps no checkpoint: nothing trains, nothing is scored again, the same table
    assert not list(archive.glob("*/checkpoint")) and (archive / "lora-0.5" / "adapter").is_dir()
    shutil.rmtree(runs)
    capsys.readouterr()
    assert qf.main(argv) == 0
    said, progress = capsys.readouterr()
    assert "[train]" not in said and said.count("[restore]") == 8 and "user/s" not in progress
    assert json.loads(out.read_text())["rows"] == again["rows"]
    # a machine that has neither the runs nor the archive of a landed row keeps the table's row (its runs train
    # only where a missing row needs them); a row whose runs are here is ranked again, and where its bytes differ
    # from the landed row's (here: a row landed before rows kept them) the table says how far it moved
    shutil.rmtree(runs)
    for gone in ("lora-0.5", "hybrid-Toys", "ranks/lora-0.5.json", "ranks/weave-merge.json"):
        (shutil.rmtree if (archive / gone).is_dir() else Path.unlink)(archive / gone)
    landed = json.loads(out.read_text())
    landed["rows"] = [r for r in landed["rows"] if r.get("model") != "weave-merge"]
    for r in landed["rows"]:
        if r.get("model") == "lora-1.0":
            del r["fingerprint"]
    out.write_text(json.dumps(landed))
    capsys.readouterr()
    assert qf.main(argv) == 0
    said = capsys.readouterr().out
    assert "[train] hybrid-Toys" in said and "[train] lora-0.5" not in said
    assert "lora-0.5         landed" in said
    third = json.loads(out.read_text())
    assert third["carried_rows"] == ["lora-0.5"] and third["missing_rows"] == []
    assert [r["method"] for r in third["rows"]] == methods
    assert [r for r in third["rows"] if r.get("model") == "lora-0.5"] == [r for r in again["rows"]
                                                                            if r.get("model") == "lora-0.5"]
    assert "lora-0.5" in third["commands"] and third["timings"]["train:lora-0.5"] == again["timings"]["train:lora-0.5"]
    assert {(e["row"], e["metric"]): (e["diff"], e["same_rank_share"]) for e in third["reproduced"]} == {
        (m, metric): (0.0, 1.0) for m in ("lora-1.0", "lora-1.0+pmi") for metric in ("HR@10", "MRR")}
    assert {("weave-merge+pmi", "plain-merge+pmi", "HR@10"), ("weave-merge", "joint", "MRR")} <= \
        {(p["a"], p["b"], p["metric"]) for p in third["paired"]}
    # the GPU estimate takes a carried row's CPU times (its run and scores gone from here) from the table
    assert qf.main([*argv, "--estimate-gpu", "--out", str(est_path), "--table", str(out)]) == 0
    est = {st["step"]: st for st in json.loads(est_path.read_text())["steps"]}
    carried = next(r for r in third["rows"] if r.get("model") == "lora-0.5")
    assert (est["train:lora-0.5"]["cpu_seconds"], est["train:lora-0.5"]["cpu"]) == \
        (third["timings"]["train:lora-0.5"]["seconds"], third["timings"]["train:lora-0.5"]["cpu"])
    assert (est["rank:lora-0.5"]["cpu_seconds"], est["rank:lora-0.5"]["cpu"]) == \
        (carried["rank_seconds"], carried["rank_cpu"]) and carried["rank_seconds"] > 0
    tables = load_script("bench/docs_tables.py")  # the doc blocks render these rows and answer each claim
    tables.RESULTS = tmp_path
    table = tables.quality_tools_full()
    assert all(f"| {m} |" in table for m in methods) and "Rows still missing: none" in table
    assert f"src-Toys (Toys: {src['train_examples']:,} examples, {src['steps']:,} steps, validation " in table
    claims = tables.quality_tools_full_xcross_claims() + tables.quality_tools_full_weave()
    assert "not measured yet" not in claims and "WeaveRec's merge minus the joint model" in claims
    assert all(f"X-Cross on {f} of the Tools training users" in claims for f in ("1.0", "0.5"))
    assert all(f"What training on {f} of the Tools users added" in claims for f in ("1.0", "0.5"))
    assert "merge minus the plain merge" in claims and "merge minus the target-only LoRA" in claims


def test_a_runs_training_time_is_its_total_or_unknown(tmp_path):
    """run_info reports the total the training command kept across invocations; for a run written before that
    total existed, its one invocation's seconds, or nothing (None) once it was started more than once."""
    qf = _load("quality_full")
    out = tmp_path / "src-Toys"
    out.mkdir()
    summary = {"trainable_parameters": 10, "steps": 5, "train_examples": 40, "train_seconds": 12.0}
    (out / "summary.json").write_text(json.dumps(summary))
    run, log = qf.Run("src-Toys", "lora", [], out), tmp_path / "src-Toys.log"
    log.write_text("# 2026-12-04 10:00:00 xkern train-lora --domain Toys\nstep 1\n")
    assert qf.invocations(run, tmp_path) == 1 and qf.run_info(run, tmp_path)["train_seconds"] == 12.0
    log.write_text(log.read_text() + "# 2026-12-04 12:00:00 xkern train-lora --domain Toys\n")
    assert qf.invocations(run, tmp_path) == 2 and qf.run_info(run, tmp_path)["train_seconds"] is None
    (out / "summary.json").write_text(json.dumps({**summary, "train_seconds_total": 30.04}))
    assert qf.run_info(run, tmp_path)["train_seconds"] == 30.0


def test_xcross_runs_validate_every_50_steps_or_a_fifth_of_a_larger_run():
    """7,892 target users in batches of 8: 247 steps at 25% (every 50), 494 at 50% (every 99), 987 at 100% (every
    198); an --eval-every in --xcross-args wins."""
    import argparse

    from xkern.cli import build_parser

    qf = _load("quality_full")
    ns = argparse.Namespace(runs="runs", data="d", model="m", seed=0, threads=1, device=None, lora_args="",
                            xcross_args="", sources=["Toys", "Sports"], fractions=[0.25, 0.5, 1.0], target="Tools",
                            only=None)

    def every(name: str, xcross_args: str = "") -> int:
        runs = qf.plan(argparse.Namespace(**{**vars(ns), "xcross_args": xcross_args}), 7892)[0]
        return build_parser().parse_args(runs[name].argv).eval_every

    assert [every(f"xcross-{f}") for f in ("0.25", "0.5", "1.0")] == [50, 99, 198]
    assert every("xcross-1.0", "--eval-every 7 --batch-size 4") == 7
    assert every("xcross-1.0", "--batch-size 4") == 395  # 1,973 steps


def test_gpu_estimate_counts_every_matmul_of_the_decoder():
    """The FLOPs per token of the full-scale table's GPU estimate are 2 x the weights of every linear layer a
    token passes through (attention with grouped KV heads, the gated MLP, the LM head)."""
    import torch
    import transformers as tf

    from tests.helpers import tiny_config

    qf = _load("quality_full")
    cfg = tiny_config("llama", intermediate_size=40)
    model = tf.LlamaForCausalLM(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert qf.forward_flops_per_token(cfg) == 2 * linear
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # the k/v projections are the narrower ones


def test_unfinished_runs_and_scores_outlive_the_machine_through_the_archive(tmp_path, capsys):
    """--save-progress archives an unfinished run with its checkpoint and a row's partial scores; a machine that
    has none of them gets them back; one with a checkpoint of its own keeps it; a finished run in the archive
    replaces an unfinished one here."""
    qf = _load("quality_full")
    runs, archive = tmp_path / "runs", tmp_path / "archive"
    argv = ["--data", "synthetic", "--target", "Tools", "--sources", "Toys", "--runs", str(runs),
            "--archive", str(archive), "--out", str(tmp_path / "q.json")]
    args = qf.parse_args(argv)
    plan = qf.plan(args, 40)[0]
    (plan["joint"].out / "checkpoint").mkdir(parents=True)
    (plan["joint"].out / "checkpoint" / "state.json").write_text('{"step": 7}')
    (plan["joint"].out / ".xkern.lock").write_text("")
    (runs / "ranks").mkdir()
    (runs / "ranks" / "joint.json").write_text('{"scores": [[1.0]]}')
    assert qf.main([*argv, "--save-progress"]) == 0
    assert json.loads((archive / "joint" / "checkpoint" / "state.json").read_text()) == {"step": 7}
    assert not (archive / "joint" / ".xkern.lock").exists() and (archive / "ranks" / "joint.json").is_file()
    assert not (archive / "lora-1.0").exists()  # nothing of a run that has not started
    shutil.rmtree(runs)
    qf.restore(args, plan)
    assert json.loads((runs / "joint" / "checkpoint" / "state.json").read_text()) == {"step": 7}
    assert (runs / "ranks" / "joint.json").read_text() == '{"scores": [[1.0]]}'
    (runs / "joint" / "checkpoint" / "state.json").write_text('{"step": 9}')  # this machine went further
    qf.restore(args, plan)
    assert json.loads((runs / "joint" / "checkpoint" / "state.json").read_text()) == {"step": 9}
    (archive / "joint" / "run.json").write_text("{}")  # another machine finished it
    shutil.rmtree(archive / "joint" / "checkpoint")
    qf.restore(args, plan)
    assert plan["joint"].done and not (runs / "joint" / "checkpoint").exists()
    assert "[restore] joint" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="keeps the runs of another table"):  # Tools runs are no Toys runs
        qf.main([*argv[:3], "Toys", "--sources", "Tools", *argv[6:], "--save-progress"])
