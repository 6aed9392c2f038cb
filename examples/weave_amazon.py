"""WeaveRec on the real Amazon data (CPU, small scale): target Tools, sources Toys and Sports.

Rows: target-only LoRA, plain merge (target + source-only LoRAs), WeaveRec merge (target + hybrid
LoRAs), joint training on all data; the prediction modes (prefix-KV likelihood, its PMI calibration,
listwise generation). Writes bench/results/weave-amazon-cpu.json and the table into docs/weave.md;
``--quality PATH`` also writes the rows with bootstrap intervals, per-user ranks and paired comparisons,
beside random / popularity / item-markov / SASRec on the same candidates, in the quality results format
(bench/results/quality-<target>-weave.json).

    python examples/weave_amazon.py                  # the real run's settings (below): ~110 min on one shared core
    python examples/weave_amazon.py --train-users 300 --eval-users 200   # the larger run, for a GPU or a quiet machine

Any option of `xkern weave` can be given; the defaults here are the real run's.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from xkern.data.domain import require_data_root  # noqa: E402
from xkern.data.evaluate import write_report  # noqa: E402
from xkern.weave.cli import config_from_args, register  # noqa: E402
from xkern.weave.experiment import results_table, run_weave  # noqa: E402

DEFAULTS = ["--target", "Tools", "--sources", "Toys,Sports",
            "--model", "smollm2", "--layers", "30", "--format", "both", "--listwise-train-candidates", "5",
            "--train-users", "80", "--eval-users", "100", "--lr", "2e-3", "--epochs", "1", "--batch-size", "8",
            "--r", "8", "--lora-alpha", "16", "--speed-users", "4", "--listwise-fallback", "next_item",
            "--max-new-tokens", "24", "--threads", "2"]
BEGIN, END = "<!-- weave-amazon:begin -->", "<!-- weave-amazon:end -->"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--json", default=str(REPO / "bench" / "results" / "weave-amazon-cpu.json"))
    own.add_argument("--doc", default=str(REPO / "docs" / "weave.md"))
    own.add_argument("--quality", default=None, help="also write the quality results format here")
    own.add_argument("--n-boot", type=int, default=2000)
    paths, rest = own.parse_known_args(argv)
    parser = argparse.ArgumentParser(prog="weave_amazon", parents=[own])
    register(parser.add_subparsers(dest="command"))
    data = [] if "--data" in rest else ["--data", require_data_root(None)]  # $XKERN_DATA or the checkout's data/
    args = parser.parse_args(["--json", paths.json, "--doc", paths.doc, "--n-boot", str(paths.n_boot),
                              *(["--quality", paths.quality] if paths.quality else []), "weave", *data, *DEFAULTS,
                              *rest])
    cfg = config_from_args(args)
    result = run_weave(cfg, log=lambda *a: print(*a, flush=True))
    path = write_report(args.json, result)
    table = results_table(result, markdown=True)
    print(results_table(result))
    s = result["speed"]
    speed = (f"Prefix-KV likelihood scoring vs independent (prompt, candidate) scoring, same run, "
             f"{s['users']} users x {s['candidates']} candidates: {s['independent_s']} s -> {s['prefix_s']} s, "
             f"**{s['speedup']}x**, max score difference {s['max_abs_score_diff']:.1e}.") if s else ""
    base = baselines_line(cfg, result["n_eval_users"])
    cmd = "python examples/weave_amazon.py " + " ".join(argv)
    block = "\n".join([BEGIN, f"Command: `{cmd.strip()}` ({result['seconds'] / 60:.1f} min wall).",
                       f"Model: {result['model']}. Evaluated on the first {result['n_eval_users']} Tools test "
                       f"users (30 candidates). Training examples: {result['examples']}.", "", table, "", base, "",
                       speed, END])
    doc = Path(args.doc)
    text = doc.read_text() if doc.exists() else f"# WeaveRec\n\n{BEGIN}\n{END}\n"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text += "\n" + block + "\n"
    doc.write_text(text)
    print(f"wrote {path} and {doc}")
    if args.quality:
        print(f"wrote {write_quality(args.quality, cfg, result, cmd.strip(), args.n_boot)}")
    return 0


def write_quality(path: str, cfg, result: dict, command: str, n_boot: int) -> Path:
    """The rows in the quality results format, with the baselines (SASRec included) on the same candidates."""
    from xkern.data.baselines import baseline_quality_rows
    from xkern.data.negatives import build_candidates
    from xkern.weave.experiment import load_domains, quality_pairs, quality_rows

    data = load_domains(cfg)[cfg.target]
    cands = build_candidates(data, "test", cfg.n_neg, "uniform", cfg.seed, result["n_eval_users"])
    rows = quality_rows(result, n_boot, cfg.seed)
    rows += baseline_quality_rows(data, cands, ["random", "popularity", "item-markov", "sasrec"], cfg.seed, n_boot)
    return write_report(path, {
        "kind": "xkern-quality", "domain": cfg.target, "split": "test", "seed": cfg.seed,
        "config": {"n_neg": cfg.n_neg, "negatives": "uniform", "n_boot": n_boot, "model": cfg.model,
                   "max_history": cfg.max_history, "train_users": cfg.train_users, "val_users": result["val_users"],
                   "val_loss": "causal-LM loss of the next item's title on the target's validation users "
                               "(start: the base model)"},
        "rows": rows, "paired": quality_pairs(rows, n_boot, cfg.seed), "train_seconds": result["train_seconds"],
        "wall_seconds": result["seconds"], "command": command})


def baselines_line(cfg, n_users: int) -> str:
    """random / popularity / item-markov on exactly the candidates the rows are ranked on."""
    from xkern.data.baselines import evaluate_baselines
    from xkern.data.negatives import build_candidates
    from xkern.weave.experiment import load_domains

    data = load_domains(cfg)[cfg.target]
    rows = evaluate_baselines(data, build_candidates(data, "test", cfg.n_neg, "uniform", cfg.seed, n_users),
                              seed=cfg.seed)
    return "Baselines on the same candidates (no model): " + "; ".join(
        f"{b['scorer']} HR@1 {b['HR@1']:.3f}, HR@10 {b['HR@10']:.3f}, NDCG@10 {b['NDCG@10']:.3f}" for b in rows) + "."


if __name__ == "__main__":
    sys.exit(main())
