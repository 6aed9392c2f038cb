"""The `xkern` command on tiny configurations (fast): demo, data, eval, plot, --help everywhere."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from xkern.cli import main

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG"


@pytest.mark.parametrize(
    "argv",
    [[], ["demo"], ["data"], ["data", "stats"], ["data", "convert"], ["data", "synth"], ["eval"], ["plot"],
     ["train-lora"], ["train-xcross"], ["weave"], ["recommend"], ["serve"]],
)
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    assert "usage: xkern" in capsys.readouterr().out


def test_train_lora_needs_a_domain(capsys):
    with pytest.raises(SystemExit):
        main(["train-lora"])
    assert "--domain" in capsys.readouterr().err


def test_train_lora_on_synthetic_lowers_validation_loss(tmp_path, capsys):
    out = tmp_path / "lora"
    rc = main(["train-lora", "--data", "synthetic", "--domain", "Tools", "--train-domains", "Tools,Toys",
               "--model", "tiny", "--epochs", "1", "--lr", "1e-2", "--batch-size", "32", "--max-train-users", "300",
               "--max-val-users", "60", "--eval-users", "20", "--out", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "validation loss" in text and "HR@10" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_domains"] == ["Tools", "Toys"] and summary["train_examples"] == 600
    assert summary["val_loss_after"] < summary["val_loss_before"]
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "train_log.json").is_file()
    assert summary["test_lora"]["n_users"] == 20


def test_train_lora_continues_a_trained_adapter_on_random_positions(tmp_path, capsys):
    """--init-adapter starts where another run ended (its validation loss is this run's start), the start is part
    of the run's identity, and --positions random draws each epoch's targets anew."""
    common = ["train-lora", "--data", "synthetic", "--domain", "Tools", "--model", "tiny", "--lr", "1e-2",
              "--batch-size", "16", "--max-train-users", "48", "--max-val-users", "16", "--no-progress"]
    assert main([*common, "--epochs", "1", "--out", str(tmp_path / "first")]) == 0
    first = json.loads((tmp_path / "first" / "summary.json").read_text())
    more = [*common, "--epochs", "2", "--positions", "random", "--save-every", "1",
            "--init-adapter", str(tmp_path / "first" / "adapter"), "--out", str(tmp_path / "second")]
    assert main([*more, "--max-steps", "4"]) == 0  # stops within epoch 2: a checkpoint to resume
    second = json.loads((tmp_path / "second" / "summary.json").read_text())
    assert second["val_loss_before"] == pytest.approx(first["val_loss_after"], rel=1e-4)
    assert second["recipe"]["positions"] == "random" and second["train_examples"] == first["train_examples"]
    state = json.loads((tmp_path / "second" / "checkpoint" / "state.json").read_text())
    assert len(state["identity"]["init_adapter"]) == 33  # its config's and weights' digests
    capsys.readouterr()
    other = [*more[:-4], "--init-adapter", str(tmp_path / "second" / "checkpoint" / "adapter"), *more[-2:]]
    assert main(other) != 0  # another starting adapter is another run: refused, not resumed
    assert "differs in init_adapter" in capsys.readouterr().err
    assert main(more) == 0
    assert json.loads((tmp_path / "second" / "summary.json").read_text())["resumed_from_step"] == 4
    assert main([*common, "--r", "4", "--init-adapter", str(tmp_path / "first" / "adapter"), "--out",
                 str(tmp_path / "third")]) != 0
    assert "another rank" in capsys.readouterr().err


def test_demo_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--users", "60", "--fractions", "0.5,1", "--out", str(out), "--no-progress", "--plot",
               "--extra", "none"])
    assert rc == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("method"))
    assert header.split() == ["method", "fraction", "HR@1", "HR@3", "HR@10", "NDCG@3", "NDCG@10", "MRR"]
    assert "item-markov" in text and "token-markov-src" in text
    res = json.loads((out / "results.json").read_text())
    assert res["kind"] == "xkern-demo" and res["config"]["synthetic"]["n_users"] == 60
    assert res["rows"][0]["n_users"] == 12  # 20% of 60 test users
    methods = {r["method"] for r in res["rows"]}
    assert "lora-target" in methods and not methods & {"xcross", "weave-merge"}  # --extra none
    assert (out / "metrics.png").read_bytes()[:4] == PNG_MAGIC


def test_eval_synthetic_writes_report(tmp_path, capsys):
    out = tmp_path / "e.json"
    rc = main(
        [
            "eval",
            "--data",
            "synthetic",
            "--domain",
            "Tools",
            "--scorer",
            "popularity",
            "random",
            "--max-users",
            "50",
            "--out",
            str(out),
            "--no-progress",
            "--seed",
            "4",
        ]
    )
    assert rc == 0
    rep = json.loads(out.read_text())
    assert [r["scorer"] for r in rep["results"]] == ["popularity", "random"]
    assert rep["seed"] == 4 and rep["results"][0]["n_users"] == 50
    assert rep["environment"]["xkern"] and rep["environment"]["python"]
    assert "popularity" in capsys.readouterr().out


def _raw_files(tmp: Path) -> tuple[Path, Path]:
    rev, meta = tmp / "Cat.jsonl.gz", tmp / "meta_Cat.jsonl"
    lines = [
        json.dumps({"user_id": f"u{u}", "parent_asin": f"p{(u + k) % 6}", "timestamp": 1000 * (u * 10 + k)})
        for u in range(12)
        for k in range(4)
    ]
    with gzip.open(rev, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    meta.write_text(
        "\n".join(json.dumps({"parent_asin": f"p{i}", "title": f"Thing {i}"}) for i in range(6)) + "\n"
    )
    return rev, meta


def test_data_convert_stats_eval_plot(tmp_path, capsys):
    rev, meta = _raw_files(tmp_path)
    root = tmp_path / "proc"
    assert (
        main(
            [
                "data",
                "convert",
                "--release",
                "2023",
                "--reviews",
                str(rev),
                "--meta",
                str(meta),
                "--out",
                str(root / "Cat"),
                "--k-core",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    assert main(["data", "stats", "--data", str(root), "--json"]) == 0
    out = capsys.readouterr().out
    stats = json.loads(out[out.index("[") :])
    assert stats[0]["domain"] == "Cat" and stats[0]["items"] == 6
    assert stats[0]["users_train"] + stats[0]["users_val"] + stats[0]["users_test"] == 12
    report = tmp_path / "cat.json"
    assert (
        main(
            [
                "eval",
                "--data",
                str(root),
                "--domain",
                "Cat",
                "--n-neg",
                "1",
                "--ks",
                "1",
                "--out",
                str(report),
                "--no-progress",
            ]
        )
        == 0
    )
    assert main(["plot", str(report), "--out", str(tmp_path / "png")]) == 0
    assert (tmp_path / "png" / "cat.png").read_bytes()[:4] == PNG_MAGIC


def test_data_convert_reports_bad_line(tmp_path, capsys):
    rev, meta = _raw_files(tmp_path)
    with gzip.open(rev, "at", encoding="utf-8") as f:
        f.write("{broken\n")
    rc = main(
        [
            "data",
            "convert",
            "--release",
            "2023",
            "--reviews",
            str(rev),
            "--meta",
            str(meta),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    assert rc == 2
    assert f"{rev}:49" in capsys.readouterr().err


def test_data_synth(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path), "--users", "30", "--domains", "Toys,Tools"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Tools", "Toys"]
    assert main(["data", "stats", "--data", str(tmp_path), "--domain", "Toys"]) == 0
    assert "Toys" in capsys.readouterr().out


def test_plot_bench_records_tolerantly(tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(
        json.dumps(
            [
                {
                    "name": "nf4_lora",
                    "shape": [4096, 4096],
                    "M": 1,
                    "n_adapters": 4,
                    "ms": 0.05,
                    "bnb_peft_ms": 0.2,
                },
                {"name": "nf4_lora", "M": 16, "ms": 0.07, "baseline_loop": 0.4, "note": "x"},
                {"name": "broken", "ms": None},
                "not a record",
            ]
        )
    )
    assert main(["plot", str(bench), "--out", str(tmp_path / "png")]) == 0
    assert (tmp_path / "png" / "bench.png").read_bytes()[:4] == PNG_MAGIC
    (tmp_path / "junk.json").write_text(json.dumps({"a": 1}))
    assert main(["plot", str(tmp_path / "junk.json"), "--out", str(tmp_path)]) == 2


def test_module_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "xkern.cli", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert r.returncode == 0 and "demo" in r.stdout and "eval" in r.stdout


def test_eval_real_tools(real_data_root, tmp_path):
    out = tmp_path / "tools.json"
    assert (
        main(
            [
                "eval",
                "--data",
                str(real_data_root),
                "--domain",
                "Tools",
                "--scorer",
                "popularity",
                "random",
                "--max-users",
                "400",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    res = {r["scorer"]: r for r in json.loads(out.read_text())["results"]}
    assert res["popularity"]["HR@10"] > res["random"]["HR@10"]
    assert 0.2 < res["random"]["HR@10"] < 0.47  # 10/30 expected; 400 users


def test_demo_refuses_unknown_extra_rows(capsys):
    assert main(["demo", "--users", "30", "--extra", "xcross,bogus", "--no-progress"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_demo_runs_xcross_and_weave_rows_by_default(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--users", "60", "--fractions", "1", "--max-eval-users", "12", "--no-progress",
               "--out", str(out)])
    assert rc == 0
    rows = {r["method"] for r in json.loads((out / "results.json").read_text())["rows"]}
    assert {"lora-target", "xcross", "weave-hybrid-Toys", "weave-merge"} <= rows



def test_version_and_per_command_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("xkern ")
    for argv, words in ((["demo", "--bogus-flag"], ["xkern demo", "unrecognized arguments: --bogus-flag"]),
                        (["demo", "--fractions", "0"], ["xkern demo", "fractions must lie in (0, 1]"]),
                        (["demo", "--fractions", "0.5,1.5"], ["fractions must lie in (0, 1]"]),
                        (["demo", "--extra", "xcross", "--no-models"], ["--no-models", "use one"]),
                        (["train-lora", "--domain", "Tools", "--lr", "fast"],
                         ["xkern train-lora", "--lr takes a float"])):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2, argv
        assert all(w in err for w in words), (argv, err)
        assert "usage: xkern " + argv[0] in err  # the command's own usage line
