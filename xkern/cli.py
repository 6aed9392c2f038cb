"""The `xkern` command: demo (quickstart), data, eval, plot, train-lora, train-xcross, weave.

Subcommands import their modules lazily so `xkern --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xkern.errors import XkernError


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def _fractions(text: str) -> tuple[float, ...]:
    values = _floats(text)
    bad = [v for v in values if not 0.0 < v <= 1.0]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"fractions must lie in (0, 1], got {text!r}")
    return values


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _extra_rows(text: str) -> tuple[str, ...]:
    return () if text.strip().lower() == "none" else _names(text)


def _data_root_help() -> str:
    from xkern.data.domain import DATA_ENV, default_data_root

    found = default_data_root()
    return (f"root of processed domain folders, or 'synthetic' (default: ${DATA_ENV}, else the workplace's "
            f"amazon-xcross folder beside a source checkout; here: {found if found is not None else 'none'})")


def _synthetic_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("synthetic data")
    g.add_argument(
        "--domains",
        type=_names,
        default=("Toys", "Sports", "Tools"),
        help="comma-separated synthetic domains (Toys,Sports,Tools,Kitchen,Books,Garden)",
    )
    g.add_argument("--users", type=int, default=1000, help="users per domain before the split (default 1000)")
    g.add_argument("--themes", type=int, default=8, help="latent themes shared by all domains (<= 10)")
    g.add_argument("--tiers", type=int, default=4, help="tiers per theme (<= 5)")
    g.add_argument("--items-per-cell", type=int, default=8, help="products per (theme, tier), <= 8")


def _synthetic_config(args: argparse.Namespace):
    from xkern.data.synthetic import SyntheticConfig

    return SyntheticConfig(
        domains=args.domains,
        n_users=args.users,
        n_themes=args.themes,
        n_tiers=args.tiers,
        items_per_cell=args.items_per_cell,
        seed=args.seed,
    )


# ----------------------------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    import time

    from xkern.data.evaluate import write_report
    from xkern.demo.core import DemoConfig, row_line, run_demo
    from xkern.threads import free_cores, use_free_cores

    start = time.perf_counter()
    cores = args.threads if args.threads is not None else free_cores()
    workers = 2 if cores >= 2 and not args.no_models else 1
    threads = use_free_cores(max(1, cores // workers))
    cfg = DemoConfig(
        synthetic=_synthetic_config(args),
        target=args.target,
        fractions=args.fractions,
        n_neg=args.n_neg,
        seed=args.seed,
        max_eval_users=args.max_eval_users,
        lm=not args.no_models,
        extra=args.extra,
        profile="full" if args.full else "quick",
    )
    from tqdm.auto import tqdm

    print(f"xkern demo ({cfg.profile} profile; {cores} free core{'s' if cores > 1 else ''}: {workers} process"
          f"{'es' if workers > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}): target "
          f"{cfg.target or cfg.synthetic.domains[-1]}, {cfg.n_neg + 1} candidates per test user; rows as they finish")
    print(row_line())
    result = run_demo(cfg, progress=not args.no_progress, on_row=lambda row: tqdm.write(row_line(row)),
                      workers=workers, threads=threads)
    result["threads"] = threads
    result["free_cores"] = cores
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    path = write_report(out / "results.json", result)
    print(f"\n{result['rows'][0]['n_users']} test users; wrote {path}  ({result['wall_seconds']:.1f} s since start)")
    if args.plot:
        from xkern.plot import metric_rows, plot_metrics

        png = plot_metrics(metric_rows(result), out / "metrics.png", title=f"demo: target {result['target']}")
        print(f"wrote {png}")
    return 0


# ----------------------------------------------------------------------------------------------- train-lora


def cmd_train_lora(args: argparse.Namespace) -> int:
    from xkern.recipes import LoraRecipe, train_lora_on_domains
    from xkern.train.loop import TrainConfig, config_from_args

    recipe = LoraRecipe(
        model=args.model, r=args.r, lora_alpha=args.alpha if args.alpha is not None else 2.0 * args.r,
        target_modules=args.target_modules or None, objective=args.objective,
        train=config_from_args(TrainConfig, args, seed=args.seed, progress=not args.no_progress),
        max_train_users=args.max_train_users, max_val_users=args.max_val_users, max_per_user=args.per_user,
        max_history=args.max_history, eval_users=args.eval_users, dtype=args.dtype, device=args.device)
    target = _load_domain(args, args.domain)
    train_names = args.train_domains or (args.domain,)
    train_domains = [target if n == args.domain else _load_domain(args, n) for n in train_names]
    summary = train_lora_on_domains(recipe, train_domains, target, args.out)
    if summary["world_size"] > 1 and int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun rank 0 alone reports
    print(f"trained on {','.join(summary['train_domains'])}: {summary['train_examples']} examples, "
          f"{summary['steps']} steps, {summary['trainable_parameters']:,} trainable parameters")
    print(f"{summary['target']} validation loss ({summary['val_examples']} examples): "
          f"{summary['val_loss_before']:.4f} -> {summary['val_loss_after']:.4f}")
    for key in ("test_base", "test_lora"):
        if key in summary:
            m = summary[key]
            print(f"{key}: HR@1 {m['HR@1']:.4f}  HR@10 {m['HR@10']:.4f}  NDCG@10 {m['NDCG@10']:.4f}  "
                  f"({m['n_users']} users)")
    print(f"adapter (PEFT format): {summary['adapter_dir']}\nsummary: {Path(args.out) / 'summary.json'}")
    return 0


# ----------------------------------------------------------------------------------------------- env


def env_report() -> dict:
    """Versions, threads, and which backend runs each op on this machine's devices (and why the others do not)."""
    import platform

    import torch

    from xkern._version import __version__
    from xkern.ops import report
    from xkern.ops.backends import cpu_native

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ext = cpu_native.extension()
    return {
        "xkern": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cpu_isa": ext.isa() if ext is not None else None,
        "cpu_isas": ext.supported_isas() if ext is not None else [],
        "backends": {d: report(d) for d in devices},
    }


def cmd_env(args: argparse.Namespace) -> int:
    info = env_report()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"xkern {info['xkern']}  python {info['python']}  torch {info['torch']}  threads {info['threads']}")
    if info["cpu_isa"]:
        print(f"native CPU kernels: {info['cpu_isa']} (this CPU runs {', '.join(info['cpu_isas'])})")
    for device, rows in info["backends"].items():
        for r in rows:
            state = f"active, #{r['default_rank']} by default" if r["usable"] and r["default_rank"] else (
                "usable on request" if r["usable"] else f"off: {r['why_not']}")
            print(f"  {device:<5} {r['backend']:<7} {state}")
    return 0


# ----------------------------------------------------------------------------------------------- data


def _load_domain(args: argparse.Namespace, domain: str):
    from xkern.data.domain import load_processed

    if args.data == "synthetic":  # the demo's default domains, same seed
        from xkern.data.synthetic import DOMAIN_NOUNS, SyntheticConfig, make_synthetic

        if domain not in DOMAIN_NOUNS:
            raise ValueError(f"unknown synthetic domain {domain!r} ({', '.join(DOMAIN_NOUNS)})")
        domains = tuple(dict.fromkeys([*SyntheticConfig().domains, domain]))
        return make_synthetic(SyntheticConfig(domains=domains, seed=args.seed))[domain]
    return load_processed(args.data, domain, val_frac=args.val_frac, seed=args.seed, mode=args.mode)


def _domains_in(root: str) -> list[str]:
    if root == "synthetic":
        return ["Toys", "Sports", "Tools"]
    from xkern.errors import NotFoundError

    folder = Path(root)
    if not folder.is_dir():
        raise NotFoundError(f"data folder not found: {folder}")
    return sorted(p.name for p in folder.iterdir() if (p / "train.json").exists())


def cmd_data_stats(args: argparse.Namespace) -> int:
    import json

    from xkern.data.evaluate import format_table

    domains = list(args.domain) or _domains_in(args.data)
    if not domains:
        from xkern.errors import NotFoundError

        raise NotFoundError(f"no domain folders (with train.json) under {args.data}")
    rows = [_load_domain(args, d).stats() for d in domains]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        cols = [
            "domain",
            "users_train",
            "users_val",
            "users_test",
            "items",
            "interactions",
            "mean_seq_len",
            "min_seq_len",
            "max_seq_len",
            "density",
            "titled_items",
        ]
        print(format_table(rows, cols, floatfmt="{:.4g}"))
    return 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    import json

    from xkern.data.amazon import load_release, write_domain_folder

    raw = load_release(
        args.reviews,
        args.meta,
        args.release,
        k_core=args.k_core,
        dedup=args.dedup,
        require_title=not args.keep_untitled,
        max_words=args.max_words,
        max_len=args.max_len,
        on_error="skip" if args.skip_bad_lines else "raise",
        progress=not args.no_progress,
    )
    if not raw.sequences:
        from xkern.errors import InputError

        raise InputError("nothing left after filtering (try a smaller --k-core)")
    out = write_domain_folder(raw, args.out, test_frac=args.test_frac, seed=args.seed)
    print(json.dumps(raw.stats))
    print(f"wrote {out}")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from xkern.data.synthetic import write_synthetic

    for p in write_synthetic(args.out, _synthetic_config(args)):
        print(f"wrote {p}")
    return 0


# ----------------------------------------------------------------------------------------------- eval


def cmd_eval(args: argparse.Namespace) -> int:
    import time

    from xkern.data.baselines import make_scorer
    from xkern.data.confidence import paired_table, quality_row
    from xkern.data.evaluate import format_table, score_candidates, write_report
    from xkern.data.metrics import metrics_from_ranks, pessimistic_ranks
    from xkern.data.negatives import build_candidates

    start, load_start = time.perf_counter(), os.getloadavg()[0]
    data = _load_domain(args, args.domain)
    sources = [_load_domain(args, d) for d in args.sources]
    cands = build_candidates(data, args.split, args.n_neg, args.negatives, args.seed, args.max_users)
    from xkern.distributed import dist_setup

    rank, world = dist_setup()  # under torchrun: each rank scores a share of the users
    results, rows, timing = [], [], {}
    for name in args.scorer:
        t0 = time.perf_counter()
        scorer = make_scorer(name, data, seed=args.seed, sources=sources)
        t1 = time.perf_counter()
        scores = score_candidates(scorer, cands, args.batch_size, progress=not args.no_progress, desc=name,
                                  distributed=world > 1)
        timing[name] = {"fit_seconds": round(t1 - t0, 2), "score_seconds": round(time.perf_counter() - t1, 2)}
        ranks = pessimistic_ranks(scores, cands.target)  # once, for the table and the intervals
        results.append({"scorer": name, **metrics_from_ranks(ranks, args.ks), "n_users": len(cands)})
        fit = scorer.summary() if hasattr(scorer, "summary") else {}
        rows.append(quality_row(name, ranks, target=data.name,
                                sources=list(args.sources), trainable_params=fit.get("trainable_params", 0),
                                val_loss_start=fit.get("val_loss_start"), val_loss_best=fit.get("val_loss_best"),
                                n_boot=args.n_boot, seed=args.seed, split=args.split))
    cols = ["scorer", *(f"HR@{k}" for k in args.ks), *(f"NDCG@{k}" for k in args.ks), "MRR", "n_users"]
    out = Path(args.out) if args.out else Path("runs") / "eval" / f"{data.name}-{args.split}.json"
    config = {k: v for k, v in vars(args).items() if k not in ("func", "no_progress")}
    payload = {
        "kind": "xkern-eval",
        "domain": data.name,
        "split": args.split,
        "seed": args.seed,
        "config": config,
        "data_stats": data.stats(),
        "results": results,
        "rows": rows,
        "paired": paired_table(rows, "HR@10", n_boot=args.n_boot, seed=args.seed),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "world_size": world,
        "timing": timing,
    }
    if rank != 0:  # one writer, one printer
        return 0
    path = write_report(out, payload)  # before printing: a closed pipe must not cost the results
    print(f"{data.name} / {args.split}: {len(cands)} users x {args.n_neg + 1} candidates ({args.negatives})")
    print(format_table(results, cols))
    print("\n95% bootstrap intervals over users:")
    ci = [{"scorer": r["method"], **{m: f"{v[0]:.4f} [{v[1]:.4f}, {v[2]:.4f}]" for m, v in r["metrics"].items()}}
          for r in rows]
    print(format_table(ci, ["scorer", *rows[0]["metrics"]]))
    print(f"\nwrote {path}")
    return 0


# ----------------------------------------------------------------------------------------------- plot


def cmd_plot(args: argparse.Namespace) -> int:
    from xkern.plot import plot_files

    paths = list(args.files)
    if not paths:
        paths = [p for p in [Path("runs/demo/results.json")] if p.exists()]
        paths += sorted(Path("bench/results").glob("*.json")) if Path("bench/results").is_dir() else []
    if not paths:
        from xkern.errors import InputError

        raise InputError("nothing to plot (give JSON files, or run `xkern demo` first)")
    for png in plot_files(paths, args.out, args.metrics):
        print(f"wrote {png}")
    return 0


# ----------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from xkern._version import __version__
    from xkern.train.loop import TrainConfig, add_config_arguments

    parser = argparse.ArgumentParser(prog="xkern", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"xkern {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also accepted after the command)")
    parser.add_argument("--allow-download", action="store_true",
                        help="let --model name a Hugging Face hub repo (xkern reads models from disk only otherwise; "
                        "also accepted after the command)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--seed", type=int, default=0, help="seed for splits, negatives and data (default 0)")
    common.add_argument("--no-progress", action="store_true", help="hide progress bars")

    p = sub.add_parser(
        "demo",
        parents=[common],
        help="quickstart: synthetic domains -> baselines -> table",
        description="Generate the synthetic domains, evaluate every method on the target domain's "
        "test candidates for each target-data fraction, print the table, write JSON.",
    )
    _synthetic_args(p)
    p.add_argument("--target", default=None, help="target domain (default: the last of --domains)")
    p.add_argument(
        "--fractions",
        type=_fractions,
        default=(0.25, 1.0),
        help="comma-separated fractions of target training users (default 0.25,1.0)",
    )
    p.add_argument("--n-neg", type=int, default=29, help="negatives per user (default 29: 30 candidates)")
    p.add_argument("--max-eval-users", type=int, default=None, help="evaluate only the first N test users")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--plot", action="store_true", help="also write metrics.png")
    p.add_argument("--no-models", action="store_true",
                   help="baselines only: skip the rows that train adapters on the tiny NF4 Llama (seconds instead "
                   "of minutes)")
    p.add_argument("--full", action="store_true",
                   help="the longer version: LoRAs 3 epochs, X-Cross 8 epochs (minutes instead of a minute)")
    p.add_argument("--threads", type=int, default=None,
                   help="cores to use (default: those free when the demo starts); 2 or more run the model rows "
                   "in two processes")
    p.add_argument("--extra", type=_extra_rows, default=("xcross", "weave"),
                   help="comma-separated model rows beyond the LoRA rows: xcross (X-Cross over the source LoRAs), "
                   "weave (WeaveRec hybrid LoRAs and merge); default both, 'none' for the LoRA rows only")
    p.set_defaults(func=cmd_demo)

    data_common = argparse.ArgumentParser(add_help=False)
    data_common.add_argument("--data", default=None, help=_data_root_help())
    data_common.add_argument(
        "--mode",
        choices=("by-user", "loo"),
        default="by-user",
        help="split: the folder's by-user split (default) or leave-one-out",
    )
    data_common.add_argument(
        "--val-frac",
        type=float,
        default=0.1,
        help="by-user: fraction of train users held out for validation (default 0.1)",
    )

    p = sub.add_parser("data", help="inspect or convert datasets", description="Inspect or convert datasets.")
    dsub = p.add_subparsers(dest="action", metavar="ACTION")
    dsub.required = True
    q = dsub.add_parser(
        "stats",
        parents=[common, data_common],
        help="statistics of processed domain folders",
        description="Statistics of processed domain folders (all domains under --data by default).",
    )
    q.add_argument("--domain", action="append", default=[], help="domain folder name (repeatable)")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.set_defaults(func=cmd_data_stats)
    q = dsub.add_parser(
        "convert",
        parents=[common],
        help="raw Amazon release files -> processed folder",
        description="Convert one category of a raw Amazon release (2014, 2018, 2023; gzip or "
        "plain) into the processed per-domain folder format (split by user).",
    )
    q.add_argument("--release", required=True, choices=("2014", "2018", "2023"))
    q.add_argument(
        "--reviews",
        required=True,
        help="review file (reviews_<Cat>_5.json.gz, <Cat>_5.json.gz, <Cat>.jsonl.gz)",
    )
    q.add_argument("--meta", default=None, help="metadata file with titles (meta_<Cat>.json(l).gz)")
    q.add_argument("--out", required=True, help="output domain folder")
    q.add_argument("--k-core", type=int, default=5, help="iterative k-core on users and items (default 5)")
    q.add_argument(
        "--dedup",
        choices=("pair", "exact", "none"),
        default="pair",
        help="pair: first interaction per (user, item); exact: drop identical records (default pair)",
    )
    q.add_argument("--max-words", type=int, default=8, help="truncate titles to N words (default 8)")
    q.add_argument("--max-len", type=int, default=None, help="keep each user's N most recent items")
    q.add_argument(
        "--test-frac", type=float, default=0.2, help="fraction of users in test.json (default 0.2)"
    )
    q.add_argument("--keep-untitled", action="store_true", help="keep items without a title (default: drop)")
    q.add_argument("--skip-bad-lines", action="store_true", help="skip malformed lines instead of failing")
    q.set_defaults(func=cmd_data_convert)
    q = dsub.add_parser(
        "synth",
        parents=[common],
        help="write the synthetic domains as processed folders",
        description="Write the embedded synthetic domains as processed folders.",
    )
    _synthetic_args(q)
    q.add_argument("--out", required=True, help="output root (one folder per domain)")
    q.set_defaults(func=cmd_data_synth)

    from xkern.data.baselines import SCORERS

    p = sub.add_parser(
        "eval",
        parents=[common, data_common],
        help="evaluate baseline scorers on a domain",
        description="Evaluate scorers on a domain's candidates (target + negatives) and write JSON.",
    )
    p.add_argument("--domain", required=True, help="domain folder name, e.g. Tools")
    p.add_argument(
        "--scorer",
        nargs="+",
        choices=SCORERS,
        default=["popularity", "random"],
        help="one or more scorers (default: popularity random)",
    )
    p.add_argument(
        "--sources",
        type=_names,
        default=(),
        help="comma-separated source domains whose training data token-markov also learns from",
    )
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--negatives", choices=("uniform", "popularity"), default="uniform")
    p.add_argument("--n-neg", type=int, default=29, help="negatives per user (default 29)")
    p.add_argument("--ks", type=_ints, default=(1, 3, 10), help="cut-offs (default 1,3,10)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-users", type=int, default=None, help="evaluate only the first N users")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for the intervals (default 2000)")
    p.add_argument("--out", default=None, help="output JSON (default runs/eval/<domain>-<split>.json)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "train-lora",
        parents=[common, data_common],
        help="train a LoRA adapter on next-item prediction",
        description="Train one LoRA (PEFT format) on the next-item task of one or more domains over an NF4 "
        "base, report validation loss before/after and optionally ranking metrics on test users.",
    )
    p.add_argument("--model", default="tiny",
                   help="model directory, .gguf file, 'smollm2' / 'minilm' (packaged weights) or 'tiny' "
                   "(small random Llama over a word tokenizer; default)")
    p.add_argument("--domain", required=True, help="target domain: validation (and test) users come from it")
    p.add_argument("--train-domains", type=_names, default=None,
                   help="comma-separated domains to train on (default: --domain)")
    p.add_argument("--out", default="runs/train-lora", help="output directory (default runs/train-lora)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2 r)")
    p.add_argument("--target-modules", type=_names, default=None,
                   help="comma-separated module-name suffixes (default: every NF4 layer)")
    p.add_argument("--objective", choices=("causal_lm", "candidates"), default="causal_lm")
    add_config_arguments(p.add_argument_group("training loop"), TrainConfig, skip=("seed",))
    p.add_argument("--max-train-users", type=int, default=None, help="sample this many training users per domain")
    p.add_argument("--max-val-users", type=int, default=200, help="validation users (default 200)")
    p.add_argument("--per-user", type=int, default=1, help="training positions per user sequence (default 1)")
    p.add_argument("--max-history", type=int, default=5, help="history titles in the prompt (default 5)")
    p.add_argument("--eval-users", type=int, default=0, help="also rank 30 candidates for N test users")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", default=None, help="cpu or cuda (default: where the model loads)")
    p.set_defaults(func=cmd_train_lora)

    p = sub.add_parser(
        "plot",
        help="plot demo/eval metrics, learning curves (train_log.json) and benchmark JSON as PNG",
        description="Plot demo/eval results (metrics across methods and data fractions) and "
        "benchmark JSON (bench/results/*.json) as PNG files.",
    )
    p.add_argument(
        "files", nargs="*", help="JSON files (default: runs/demo/results.json and bench/results/*.json)"
    )
    p.add_argument("--out", default="runs/plots", help="output directory (default runs/plots)")
    p.add_argument("--metrics", type=_names, default=("HR@10", "NDCG@10"), help="metrics to plot")
    p.set_defaults(func=cmd_plot)

    from xkern.weave.cli import register as register_weave
    from xkern.xcross.cli import register as register_xcross

    register_xcross(sub)
    register_weave(sub)
    _register_env(sub)
    return parser


def _register_env(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("env", help="versions and which backends run the ops here",
                       description="Print versions, threads, the native CPU kernels' instruction set, and for "
                       "each device which backend runs the ops (and why the others do not).")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_env)


class _QuietPipe(io.TextIOBase):
    """stdout that stops writing, without a traceback, once the reader has gone (``xkern eval | head -1``).

    The command goes on and finishes its files; later writes go nowhere.
    """

    def __init__(self, stream: Any) -> None:
        self._stream, self.broken = stream, False

    def _close(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError, ValueError):  # also the interpreter's flush at exit goes nowhere
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self._stream.write(text)
                if "\n" in text:
                    self._stream.flush()
            except BrokenPipeError:
                self._close()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._close()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._stream.encoding


def _take_flag(argv: list[str], flag: str) -> bool:
    """Remove ``flag`` from anywhere in ``argv`` (before the command or after it); whether it was there."""
    found = flag in argv
    argv[:] = [a for a in argv if a != flag]
    return found


def _check_before_work(args: argparse.Namespace) -> None:
    """What can be checked from the arguments alone, before any data or model is loaded."""
    if getattr(args, "data", "synthetic") is None:
        from xkern.data.domain import require_data_root

        args.data = require_data_root(None)
    model = getattr(args, "model", None)
    if isinstance(model, str) and not (model == "tiny" and args.command in ("train-lora", "weave")):
        from xkern.nn.pretrained import resolve

        resolve(model, also_known=("tiny",) if args.command in ("train-lora", "weave") else ())
    for _, adapter_dir in getattr(args, "adapter", None) or ():
        from xkern.adapters.peft_format import read_config

        read_config(adapter_dir)


def _where(args: argparse.Namespace) -> str:
    """The command, and under ``torchrun`` which process of the job says it."""
    command = " ".join(filter(None, (args.command, getattr(args, "action", None))))
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"{command} (rank {os.environ.get('RANK', '?')} of {world})" if world > 1 else command


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _take_flag(argv, "--debug") or os.environ.get("XKERN_DEBUG", "0") == "1"
    if _take_flag(argv, "--allow-download"):
        os.environ["XKERN_ALLOW_DOWNLOAD"] = "1"
    if os.environ.get("XKERN_ALLOW_DOWNLOAD", "0") != "1":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network unless asked, also for tokenizers and configs
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if unknown:  # the command's own usage, not the top-level one
        commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "demo" and args.no_models and args.extra != ("xcross", "weave"):
        commands["demo"].error("--extra adds model rows, --no-models removes them: use one")
    if not isinstance(sys.stdout, _QuietPipe):
        sys.stdout = _QuietPipe(sys.stdout)
    try:
        _check_before_work(args)
        return int(args.func(args) or 0)
    except (XkernError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        if debug:
            raise
        message = str(e).strip()
        print(f"xkern {_where(args)}: error: {message.splitlines()[0] if message else type(e).__name__}",
              file=sys.stderr)
        return 2
    except RuntimeError as e:  # a collective that failed because another process of the job stopped
        dist = sys.modules.get("torch.distributed")
        if debug or dist is None or not isinstance(e, getattr(dist, "DistError", ())):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"xkern {_where(args)}: error: a collective failed, most likely because another process of the job "
              f"stopped (torchrun names it); {first}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"xkern {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
