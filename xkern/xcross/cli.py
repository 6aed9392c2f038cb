"""``xkern train-xcross``: train X-Cross over saved PEFT adapters on one domain, optionally evaluate.

Registered from here (``register(subparsers)``) with the shared flags of :mod:`xkern.commands`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

from xkern.commands import data_options, model_options, out_option, run_options
from xkern.errors import InputError


def _adapter_spec(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PEFT_ADAPTER_DIR, got {text!r}")
    return name, path


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``train-xcross`` subcommand to an ``xkern`` subparsers object."""
    from xkern.train.loop import add_config_arguments
    from xkern.xcross.train import XCrossTrainConfig

    p = subparsers.add_parser(
        "train-xcross",
        parents=[run_options(), data_options(), model_options(None), out_option("output directory", "runs/xcross")],
        help="train X-Cross (integrators, w, head) over saved LoRA adapters",
        description="Load an NF4 base and n saved PEFT adapters (one stream each), train X-Cross's "
        "integrators, stream weights and scoring head on a domain's training users (cross-entropy over "
        "the positive and K negatives, early stopping on its validation users), save them, and "
        "optionally evaluate on the test users (1 positive + n-neg negatives).",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument("--adapter", action="append", type=_adapter_spec, required=True, metavar="NAME=DIR",
                   help="a PEFT adapter directory, one stream (repeat for each; order = stream order)")
    p.add_argument("--target", required=True, help="domain to train on, e.g. Tools")
    p.add_argument("--fraction", type=float, default=1.0, help="fraction of training users (nested, seeded)")
    add_config_arguments(p.add_argument_group("training"), XCrossTrainConfig,
                         skip=("extra_lr", "score_batch_size", "seed"))
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--bias", action="store_true", help="integrator bias")
    p.add_argument("--pooling", choices=("auto", "first", "last", "mean", "candidate"), default="auto",
                   help="head scoring: what the head reads ('candidate': the mean over the candidate's tokens)")
    p.add_argument("--integrator-norm", choices=("none", "rms"), default="none",
                   help="'rms': the integrators read each token's hidden states divided by their RMS (stable on "
                        "bases with massive activations, such as SmolLM2); 'none': the paper's form (default)")
    p.add_argument("--likelihood-reduce", choices=("sum", "mean"), default="sum",
                   help="--scoring likelihood: a candidate's score is the sum (default) or the mean of its title "
                        "tokens' log-probabilities")
    p.add_argument("--scoring", choices=("head", "likelihood"), default="head",
                   help="head: pooled state + trained scoring head (any base); likelihood (decoders): the title's "
                   "log-likelihood under the frozen LM head on the mixed streams, which starts from the source "
                   "LoRAs' next-item skill")
    p.add_argument("--max-history", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--eval-users", type=int, default=0, help="evaluate on the first N test users (0: skip, -1: all)")
    p.add_argument("--eval-neg", type=int, default=29)
    p.add_argument("--overwrite", action="store_true",
                   help="start over: discard a checkpoint in --out (by default a run resumes its own checkpoint "
                        "and refuses another run's, naming what differs)")
    p.set_defaults(func=cmd_train_xcross)
    return p


def _tokenizer(model_path: str, tokenizer: str | None):
    from xkern.nn.pretrained import load_tokenizer

    return load_tokenizer(tokenizer or model_path)


def write_xcross_run(args: argparse.Namespace, out: Path, data, dtype: str) -> None:
    """``run.json`` beside ``xcross/``: the base, the stream adapters (where they are, with their digests) and the
    domain, for ``xkern.load_recommender``."""
    from xkern.serve.runs import ADAPTER_FILES, base_entry, catalogue_digest, data_entry, files_entry, write_run
    from xkern.xcross.model import CONFIG_NAME, WEIGHTS_NAME

    tokenizer = str(Path(args.tokenizer).resolve()) if args.tokenizer else None
    write_run(out, {
        "command": "train-xcross", "domain": data.name,
        "base": base_entry(args.model, dtype, tokenizer=tokenizer),
        "data": data_entry(args.data, args.seed, args.val_frac, args.mode),
        "catalogue": catalogue_digest(data.titles, data.item_ids),
        "adapters": {name: files_entry(path, ADAPTER_FILES, out) for name, path in args.adapter},
        "scorer": {"kind": "xcross", "files": files_entry(out / "xcross", (CONFIG_NAME, WEIGHTS_NAME), out),
                   "max_history": args.max_history},
    })


def xcross_options(args: argparse.Namespace) -> dict:
    """What of ``train-xcross``'s options makes its X-Cross model (the streams, the mixing, the scoring, the
    prompt), as ``XCrossModel``'s keyword arguments: the model before training is a function of these alone."""
    return {"adapters": [n for n, _ in args.adapter], "beta": args.beta, "gamma": args.gamma,
            "pooling": args.pooling, "bias": args.bias, "integrator_norm": args.integrator_norm,
            "likelihood_reduce": args.likelihood_reduce, "scoring": args.scoring, "max_history": args.max_history,
            "max_tokens": args.max_tokens}


def build_xcross(args: argparse.Namespace, xm, tokenizer, data):
    """The X-Cross model ``train-xcross`` trains, at its initial state (integrators zero, streams weighted
    equally), from the command's options over the adapters already loaded in ``xm``; ``data`` sets the
    titles and the prompt's domain."""
    from xkern.xcross import XCrossModel

    return XCrossModel(xm, **xcross_options(args), tokenizer=tokenizer, titles=data.titles, domain=data.name)


def cmd_train_xcross(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from xkern.data.cli import load_domain
    from xkern.data.domain import check_usable
    from xkern.data.evaluate import write_report
    from xkern.data.splits import subsample_train
    from xkern.nn import load_model, resolve_dtype
    from xkern.nn.pretrained import resolve
    from xkern.train.loop import config_from_args
    from xkern.xcross import evaluate, train
    from xkern.xcross.train import XCrossTrainConfig

    names = [n for n, _ in args.adapter]
    if len(set(names)) != len(names):
        raise InputError(f"adapter names must be distinct, got {names}")
    data = load_domain(args, args.target)  # refused before the model loads when it cannot be used
    check_usable(data, titles=True, candidates=args.eval_neg + 1)
    model_path = resolve(args.model)
    dtype, _ = resolve_dtype(args.dtype, args.device)
    xm = load_model(model_path, dtype=dtype, device=args.device, progress=not args.no_progress)
    for name, path in args.adapter:
        xm.load_adapter(path, name)
    tok = _tokenizer(model_path, args.tokenizer)
    data = replace(data, train=subsample_train(data.train, args.fraction, args.seed))
    xc = build_xcross(args, xm, tok, data)
    out = Path(args.out)
    config = config_from_args(XCrossTrainConfig, args, seed=args.seed, progress=not args.no_progress)
    from xkern.train.checkpoint import RunLock, discard

    identity = {"command": "train-xcross", "model": args.model, "dtype": str(dtype).removeprefix("torch."),
                "fraction": args.fraction, "max_history": args.max_history, "max_tokens": args.max_tokens}
    with RunLock(out) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext():
        if args.overwrite:
            discard(out / "checkpoint")
        res = train(xc, data, output_dir=out, config=config, identity=identity)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun rank 0 alone reports and writes
    counts = xc.num_trainable()
    if rank == 0:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)  # the pairs of the steps this call ran, over its seconds
        pairs = (res.steps - res.start_step) * config.batch_size * (1 + config.n_neg) * world
        rate = f"{pairs / res.seconds:.1f} (history, candidate) pairs/s" if res.seconds else "-"
        print(f"trained X-Cross over {names} on {data.name}: {res.steps} steps, {res.n_train_examples} examples, "
              f"best val loss {res.best_val_loss} at step {res.best_step}"
              f"{' (early stop)' if res.stopped_early else ''}, {counts['total']:,} trainable parameters, "
              f"{str(dtype).removeprefix('torch.')}, {rate} ({len(names)} streams each)")
        write_xcross_run(args, out, data, str(dtype).removeprefix("torch."))
        print(f"wrote {out / 'xcross'}")
    if args.eval_users:  # every rank scores its share of the test users
        max_users = None if args.eval_users < 0 else args.eval_users
        m = evaluate(xc, data, "test", args.eval_neg, args.seed, max_users, progress=not args.no_progress,
                     distributed=True)
        if rank == 0:
            path = write_report(out / "metrics.json", {"kind": "xkern-train-xcross", "adapters": names,
                                                        "target": data.name, "metrics": m, "trainable": counts,
                                                        "config": {k: v for k, v in vars(args).items()
                                                                   if k != "func"}})
            print(json.dumps(m))
            print(f"wrote {path}")
    return 0
