"""``xkern weave``: train WeaveRec's adapters, merge them, evaluate both prediction modes.

Registered from here (``register(subparsers)``) with the shared flags of :mod:`xkern.commands`; the
training flags come from ``TrainConfig`` with WeaveRec's defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from xkern.commands import data_options, names, out_option, rank, run_options


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``weave`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    from xkern.train.loop import TrainConfig, add_config_arguments
    from xkern.weave.experiment import MODES, ROWS, WeaveConfig

    d = WeaveConfig()
    p = subparsers.add_parser(
        "weave",
        parents=[run_options(), data_options(splits=False),
                 out_option("JSON output", "runs/weave/results.json", file=True)],
        help="WeaveRec: target + hybrid LoRAs, merged, evaluated (likelihood and listwise generation)",
        description="Train a target-only LoRA and one hybrid LoRA per source (target + source mix), merge them "
        "by task arithmetic, and evaluate the rows on the target's test candidates with both prediction modes "
        "(prefix-KV likelihood scoring, listwise generation). Prints a table and writes JSON.",
    )
    p.add_argument("--target", default=d.target, help=f"target domain (default {d.target})")
    p.add_argument("--sources", type=names, default=d.sources, help="comma-separated source domains")
    p.add_argument("--model", default=d.model,
                   help="'tiny' (random word-level Llama), 'smollm2', or a model directory / .gguf (default tiny)")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N transformer blocks")
    p.add_argument("--tiny-pretrain-steps", type=int, default=None,
                   help="--model tiny: catalog-text pretraining steps of the base (default: the quickstart's)")
    p.add_argument("--format", dest="fmt", choices=("next_item", "listwise", "both"), default=d.fmt,
                   help="training prompt format (default both)")
    p.add_argument("--train-users", type=int, default=d.train_users, help="training users sampled per domain")
    p.add_argument("--synthetic-users", type=int, default=d.synthetic_users, help="users per synthetic domain")
    p.add_argument("--max-history", type=int, default=d.max_history)
    p.add_argument("--r", type=rank, default=d.r, help="LoRA rank of every adapter")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    add_config_arguments(p.add_argument_group("training loop (every adapter)"), TrainConfig,
                         defaults=dataclasses.asdict(d.train), skip=("seed",))
    p.add_argument("--eval-users", type=int, default=d.eval_users, help="first N test users of the target")
    p.add_argument("--val-users", type=int, default=d.val_users)
    p.add_argument("--select-step", type=float, default=None,
                   help="choose merge weights on validation with this simplex step (adds row weave-merge-val)")
    p.add_argument("--rows", type=names, default=d.rows, help=f"comma-separated rows out of {','.join(ROWS)}")
    p.add_argument("--modes", type=names, default=d.modes, help=f"comma-separated, out of {','.join(MODES)}")
    p.add_argument("--speed-users", type=int, default=d.speed_users,
                   help="users for the prefix-KV vs independent scoring timing (0: skip)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--listwise-fallback", choices=("listwise", "next_item"), default=d.listwise_fallback,
                   help="listwise mode: rank candidates other than the generated one (and pick the fallback) by "
                        "their likelihood after the listwise prompt (default) or reuse the likelihood mode's scores")
    p.add_argument("--listwise-train-candidates", type=int, default=d.n_candidates_train,
                   help="candidates listed in listwise training prompts")
    p.add_argument("--save-adapters", default=None, help="directory for the trained adapters (PEFT format)")
    p.add_argument("--load-adapters", default=None,
                   help="directory of an earlier run's --save-adapters: load its adapters instead of training")
    p.set_defaults(func=cmd_weave)
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    from xkern.train.loop import TrainConfig
    from xkern.train.loop import config_from_args as train_config
    from xkern.weave.experiment import WeaveConfig

    rows = tuple(args.rows)
    if args.select_step and "weave-merge-val" not in rows:
        rows = (*rows, "weave-merge-val")
    return WeaveConfig(data=args.data, target=args.target, sources=tuple(args.sources), model=args.model,
                       layers=args.layers, tiny_pretrain_steps=args.tiny_pretrain_steps, fmt=args.fmt,
                       train_users=args.train_users,
                       synthetic_users=args.synthetic_users, max_history=args.max_history, r=args.r,
                       lora_alpha=args.lora_alpha, train=train_config(TrainConfig, args, seed=args.seed),
                       eval_users=args.eval_users, val_users=args.val_users,
                       select_step=args.select_step, rows=rows, modes=tuple(args.modes),
                       speed_users=args.speed_users, max_new_tokens=args.max_new_tokens,
                       listwise_fallback=args.listwise_fallback, n_candidates_train=args.listwise_train_candidates,
                       threads=args.threads,
                       save_adapters=args.save_adapters, load_adapters=args.load_adapters, seed=args.seed,
                       progress=not args.no_progress)


SERVED_ROWS = ("weave-merge-val", "weave-merge", "target-only", "joint", "plain-merge")  # the first trained is served


def write_weave_run(cfg: Any, result: dict[str, Any], folder: Path) -> None:
    """``run.json`` beside the results: the row a recommender serves (the WeaveRec merge when it was made) as its
    saved LoRAs and merge weights. Without ``--save-adapters`` nothing is on disk to serve, and it says so."""
    from xkern.serve.runs import ADAPTER_FILES, base_entry, catalogue_digest, data_entry, files_entry, write_run
    from xkern.weave.experiment import load_domains, row_adapters

    target = load_domains(cfg)[cfg.target]
    parts = row_adapters(cfg.rows, cfg.sources)
    row = next((r for r in SERVED_ROWS if r in parts), None)
    where = {name: info.get("path") or info.get("loaded_from") for name, info in result["adapters"].items()}
    manifest: dict[str, Any] = {
        "command": "weave", "domain": cfg.target,
        "base": base_entry(cfg.model, "float32", seed=cfg.seed, domains=[*cfg.sources, cfg.target],
                           layers=cfg.layers, tiny_pretrain_steps=cfg.tiny_pretrain_steps, max_history=cfg.max_history),
        "data": data_entry(cfg.data, cfg.seed, synthetic_users=cfg.synthetic_users),
        "catalogue": catalogue_digest(target.titles, target.item_ids), "adapters": {}}
    loras = parts.get(row, []) if row else []
    if row is None or not all(where.get(n) for n in loras):
        manifest["scorer"] = {"kind": "unsaved", "why": "the weave run saved no adapters to serve (run it with "
                                                        "--save-adapters DIR, or --load-adapters DIR)"}
    else:
        weights = (result.get("selection") or {}).get("best") if row == "weave-merge-val" else None
        manifest["adapters"] = {n: files_entry(where[n], ADAPTER_FILES, folder) for n in loras}
        manifest["scorer"] = {"kind": "likelihood", "row": row, "max_history": cfg.max_history,
                              **({"adapter": loras[0]} if len(loras) == 1 else
                                 {"merge": {"of": loras, "weights": weights}})}
    write_run(folder, manifest)


def cmd_weave(args: argparse.Namespace) -> int:
    from xkern.data.evaluate import write_report
    from xkern.weave.experiment import results_table, run_weave

    cfg = config_from_args(args)
    result = run_weave(cfg, log=print if not args.no_progress else (lambda *a, **k: None))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every rank holds the result; rank 0 writes it
        return 0
    path = write_report(Path(args.out), result)  # before printing: a closed pipe must not cost the results
    write_weave_run(cfg, result, path.parent)
    print(f"target={result['target']}  sources={','.join(result['sources'])}  users={result['n_eval_users']}  "
          f"model: {result['model']}")
    print(results_table(result))
    if result["speed"]:
        s = result["speed"]
        print(f"prefix-KV likelihood scoring: {s['speedup']}x faster than independent scoring "
              f"({s['prefix_s']} s vs {s['independent_s']} s, {s['users']} users x {s['candidates']} candidates; "
              f"max score difference {s['max_abs_score_diff']:.2e})")
    print(f"\nwrote {path}  ({result['seconds']:.1f} s)")
    return 0
