"""``xkern demo``: the quickstart, registered from here (``register(subparsers)``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from xkern.commands import names, out_option, run_options
from xkern.data.cli import synthetic_config, synthetic_options


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


def _extra_rows(text: str) -> tuple[str, ...]:
    return () if text.strip().lower() == "none" else names(text)


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
        synthetic=synthetic_config(args),
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


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``demo`` to the ``xkern`` command."""
    parents = [run_options(), synthetic_options(), out_option("output directory", "runs/demo")]
    p = sub.add_parser("demo", parents=parents,
                       help="quickstart: synthetic domains -> baselines -> table",
                       description="Generate the synthetic domains, evaluate every method on the target domain's "
                       "test candidates for each target-data fraction, print the table, write JSON. --threads: "
                       "cores to use (default: those free when the demo starts); 2 or more run the model rows "
                       "in two processes.")
    p.add_argument("--target", default=None, help="target domain (default: the last of --domains)")
    p.add_argument("--fractions", type=_fractions, default=(0.25, 1.0),
                   help="comma-separated fractions of target training users (default 0.25,1.0)")
    p.add_argument("--n-neg", type=int, default=29, help="negatives per user (default 29: 30 candidates)")
    p.add_argument("--max-eval-users", type=int, default=None, help="evaluate only the first N test users")
    p.add_argument("--plot", action="store_true", help="also write metrics.png")
    p.add_argument("--no-models", action="store_true",
                   help="baselines only: skip the rows that train adapters on the tiny NF4 Llama (seconds instead "
                   "of minutes)")
    p.add_argument("--full", action="store_true",
                   help="the longer version: LoRAs 3 epochs, X-Cross 8 epochs (minutes instead of a minute)")
    p.add_argument("--extra", type=_extra_rows, default=("xcross", "weave"),
                   help="comma-separated model rows beyond the LoRA rows: xcross (X-Cross over the source LoRAs), "
                   "weave (WeaveRec hybrid LoRAs and merge); default both, 'none' for the LoRA rows only")
    p.set_defaults(func=cmd_demo)
