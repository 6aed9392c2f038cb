"""``xkern data`` (stats, convert, synth) and ``xkern eval``: the data commands, registered from here.

``register(subparsers)`` adds them to the ``xkern`` command with the shared flags of
:mod:`xkern.commands`; :func:`load_domain` is the one way every command loads a domain it is named.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from xkern.commands import data_options, names, out_option, run_options
from xkern.data.domain import DomainData
from xkern.errors import InputError


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def load_domains(root: str | Path, names: list[str] | tuple[str, ...], *, seed: int = 0, val_frac: float = 0.1,
                 mode: str = "by-user", synthetic_users: int | None = None) -> dict[str, DomainData]:
    """The named domains of ``root`` (a root of processed folders, or ``"synthetic"``): every command's loader.

    ``"synthetic"`` generates the embedded domains: the quickstart's three (Toys, Sports, Tools) plus any
    other named one, ``synthetic_users`` users each (default: the generator's), all from ``seed``, so a
    domain is the same data whichever command asks for it.
    """
    from xkern.data.domain import load_processed

    if str(root) == "synthetic":
        from xkern.data.synthetic import DOMAIN_NOUNS, SyntheticConfig, make_synthetic

        for n in names:
            if n not in DOMAIN_NOUNS:
                raise InputError(f"unknown synthetic domain {n!r} ({', '.join(DOMAIN_NOUNS)})")
        users = {} if synthetic_users is None else {"n_users": synthetic_users}
        domains = tuple(dict.fromkeys([*SyntheticConfig().domains, *names]))
        made = make_synthetic(SyntheticConfig(domains=domains, seed=seed, **users))
        return {n: made[n] for n in names}
    return {n: load_processed(root, n, val_frac=val_frac, seed=seed, mode=mode) for n in names}


def load_domain(args: argparse.Namespace, domain: str):
    """Domain ``domain`` of ``args.data`` with the command's split flags (``--seed``, ``--val-frac``, ``--mode``)."""
    return load_domains(args.data, [domain], seed=args.seed, val_frac=getattr(args, "val_frac", 0.1),
                        mode=getattr(args, "mode", "by-user"))[domain]


def synthetic_options() -> argparse.ArgumentParser:
    """The synthetic generator's flags (``demo``, ``data synth``)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("synthetic data")
    g.add_argument(
        "--domains",
        type=names,
        default=("Toys", "Sports", "Tools"),
        help="comma-separated synthetic domains (Toys,Sports,Tools,Kitchen,Books,Garden)",
    )
    g.add_argument("--users", type=int, default=1000, help="users per domain before the split (default 1000)")
    g.add_argument("--themes", type=int, default=8, help="latent themes shared by all domains (<= 10)")
    g.add_argument("--tiers", type=int, default=4, help="tiers per theme (<= 5)")
    g.add_argument("--items-per-cell", type=int, default=8, help="products per (theme, tier), <= 8")
    return p


def synthetic_config(args: argparse.Namespace):
    """The ``SyntheticConfig`` of :func:`synthetic_options`' flags (and ``--seed``)."""
    from xkern.data.synthetic import SyntheticConfig

    return SyntheticConfig(
        domains=args.domains,
        n_users=args.users,
        n_themes=args.themes,
        n_tiers=args.tiers,
        items_per_cell=args.items_per_cell,
        seed=args.seed,
    )



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
    rows = [load_domain(args, d).stats() for d in domains]
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

    for p in write_synthetic(args.out, synthetic_config(args)):
        print(f"wrote {p}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import time

    from xkern.data.baselines import make_scorer
    from xkern.data.confidence import paired_table, quality_row
    from xkern.data.evaluate import format_table, score_candidates, write_report
    from xkern.data.metrics import metrics_from_ranks, pessimistic_ranks
    from xkern.data.negatives import build_candidates

    start, load_start = time.perf_counter(), os.getloadavg()[0]
    from xkern.data.domain import check_usable

    data = load_domain(args, args.domain)
    check_usable(data, candidates=args.n_neg + 1)
    sources = [load_domain(args, d) for d in args.sources]
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


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``data`` (``stats``, ``convert``, ``synth``) and ``eval`` to the ``xkern`` command."""
    from xkern.data.baselines import SCORERS

    p = sub.add_parser("data", help="inspect or convert datasets", description="Inspect or convert datasets.")
    dsub = p.add_subparsers(dest="action", metavar="ACTION")
    dsub.required = True
    q = dsub.add_parser("stats", parents=[run_options(), data_options()], help="statistics of processed domain folders",
                        description="Statistics of processed domain folders (all domains under --data by default).")
    q.add_argument("--domain", action="append", default=[], help="domain folder name (repeatable)")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.set_defaults(func=cmd_data_stats)
    q = dsub.add_parser("convert", parents=[run_options(), out_option("output domain folder", required=True)],
                        help="raw Amazon release files -> processed folder",
                        description="Convert one category of a raw Amazon release (2014, 2018, 2023; gzip or "
                        "plain) into the processed per-domain folder format (split by user).")
    q.add_argument("--release", required=True, choices=("2014", "2018", "2023"))
    q.add_argument("--reviews", required=True,
                   help="review file (reviews_<Cat>_5.json.gz, <Cat>_5.json.gz, <Cat>.jsonl.gz)")
    q.add_argument("--meta", default=None, help="metadata file with titles (meta_<Cat>.json(l).gz)")
    q.add_argument("--k-core", type=int, default=5, help="iterative k-core on users and items (default 5)")
    q.add_argument("--dedup", choices=("pair", "exact", "none"), default="pair",
                   help="pair: first interaction per (user, item); exact: drop identical records (default pair)")
    q.add_argument("--max-words", type=int, default=8, help="truncate titles to N words (default 8)")
    q.add_argument("--max-len", type=int, default=None, help="keep each user's N most recent items")
    q.add_argument("--test-frac", type=float, default=0.2, help="fraction of users in test.json (default 0.2)")
    q.add_argument("--keep-untitled", action="store_true", help="keep items without a title (default: drop)")
    q.add_argument("--skip-bad-lines", action="store_true", help="skip malformed lines instead of failing")
    q.set_defaults(func=cmd_data_convert)
    q = dsub.add_parser("synth", parents=[run_options(), synthetic_options(),
                                          out_option("output root (one folder per domain)", required=True)],
                        help="write the synthetic domains as processed folders",
                        description="Write the embedded synthetic domains as processed folders.")
    q.set_defaults(func=cmd_data_synth)

    out = out_option("output JSON", default_text="runs/eval/<domain>-<split>.json", file=True)
    p = sub.add_parser("eval", parents=[run_options(), data_options(), out],
                       help="evaluate baseline scorers on a domain",
                       description="Evaluate scorers on a domain's candidates (target + negatives) and write JSON.")
    p.add_argument("--domain", required=True, help="domain folder name, e.g. Tools")
    p.add_argument("--scorer", nargs="+", choices=SCORERS, default=["popularity", "random"],
                   help="one or more scorers (default: popularity random)")
    p.add_argument("--sources", type=names, default=(),
                   help="comma-separated source domains whose training data token-markov also learns from")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--negatives", choices=("uniform", "popularity"), default="uniform")
    p.add_argument("--n-neg", type=int, default=29, help="negatives per user (default 29)")
    p.add_argument("--ks", type=_ints, default=(1, 3, 10), help="cut-offs (default 1,3,10)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-users", type=int, default=None, help="evaluate only the first N users")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for the intervals (default 2000)")
    p.set_defaults(func=cmd_eval)
