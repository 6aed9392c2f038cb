"""Ready-made LoRA training on recommendation data (what ``xkern train-lora`` runs).

Loads a model (a directory, a ``.gguf`` file, ``smollm2`` / ``minilm`` for the packaged weights, or
``tiny``: the quickstart's small Llama over a word tokenizer), builds next-item examples from the
training users of one or more domains, trains a LoRA with :func:`xkern.train.train_lora`, and
reports validation loss before and after (and, optionally, ranking metrics on test users).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from xkern.adapters.peft_format import BASE
from xkern.commands import data_options, model_options, names, out_option, rank, run_options
from xkern.data.domain import DomainData
from xkern.data.examples import POSITIONS
from xkern.distributed import dist_setup
from xkern.errors import InputError
from xkern.fileio import atomic_write_text
from xkern.train.loop import DrawnData, TrainConfig


@dataclass
class LoraRecipe:
    """What ``xkern train-lora`` trains: the model, the adapter, the data, and the loop's :class:`TrainConfig`."""

    model: str = "tiny"
    r: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] | None = None
    objective: str = "causal_lm"
    train: TrainConfig = field(default_factory=TrainConfig)
    max_train_users: int | None = None
    fraction: float = 1.0  # of the target domain's training users (nested, seeded: the same users as train-xcross)
    max_val_users: int | None = 200
    max_per_user: int = 1
    positions: str = "last"  # which of a user's positions are targets: the last, or random ones drawn per epoch
    init_adapter: str | None = None  # start from this trained adapter (PEFT folder) instead of PEFT's init
    max_history: int = 5
    n_neg: int = 4  # negatives per example for the "candidates" objective
    eval_users: int = 0  # > 0: also rank 1 positive + 29 negatives for that many test users
    dtype: str = "auto"  # see xkern.nn.resolve_dtype: bf16 where the hardware multiplies it natively
    device: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return self.train.seed


def load_lm(spec: str, domains: list[DomainData], dtype: torch.dtype, device: str | None,
            seed: int = 0) -> tuple[Any, Any]:
    """(XkernModel, tokenizer) for a model spec (see the module docstring)."""
    from xkern.nn import load_model
    from xkern.nn.pretrained import load_tokenizer, resolve

    if spec == "tiny":
        from xkern.train.tiny import TinyLMConfig, build_tiny_lm

        lm = build_tiny_lm({d.name: d for d in domains}, TinyLMConfig(seed=seed))
        if device is not None:
            lm.model.to(device)
        return lm.model, lm.tokenizer
    path = resolve(spec, also_known=("tiny",))
    tok = load_tokenizer(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = load_model(path, dtype=dtype, device=device, progress=True)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def cap_users(data: DomainData, split: str, n: int | None, seed: int) -> DomainData:
    if n is None:
        return data
    from dataclasses import replace

    from xkern.data.splits import sample_users

    seqs = data.split(split)
    keep = sample_users(list(seqs), n, seed)
    return replace(data, **{split: {u: seqs[u] for u in keep}})


def _fingerprint(examples: list[dict[str, Any]]) -> str:
    """A short hash of the training examples (their tokens, in order): another user list is another run."""
    h = hashlib.blake2b(digest_size=8)
    for e in examples:
        h.update(json.dumps(e, sort_keys=True).encode())
    return f"{len(examples)} examples, {h.hexdigest()}"


def _tokens_per_second(examples: list[dict[str, Any]], cfg: Any, steps: int, seconds: float) -> float | None:
    """Training tokens per second: the examples' mean length times the examples of the steps this call ran
    (all processes), over its seconds (validations included)."""
    if not seconds or not examples:
        return None
    lengths = [len(e["input_ids"]) if "input_ids" in e else len(e["prompt_ids"]) * len(e["candidates"])
               + sum(len(c) for c in e["candidates"]) for e in examples]
    _, world = dist_setup()
    return round(sum(lengths) / len(lengths) * cfg.batch_size * cfg.grad_accum * world * steps / seconds, 1)


def train_lora_on_domains(recipe: LoraRecipe, train_domains: list[DomainData], target: DomainData,
                          out_dir: str | Path, adapter: str = "lora") -> dict[str, Any]:
    """Train one LoRA on the training users of ``train_domains``; validate (loss) on ``target``'s val users."""
    from xkern.data.encoding import PromptEncoder
    from xkern.data.examples import candidate_examples, causal_lm_examples
    from xkern.train import evaluate_loss, train_lora

    t0 = time.perf_counter()
    out = Path(out_dir)  # made once the inputs have passed every check (a refused run leaves nothing)
    from xkern.nn import resolve_dtype

    dtype, _ = resolve_dtype(recipe.dtype, recipe.device)
    all_domains = list({d.name: d for d in [*train_domains, target]}.values())
    model, tok = load_lm(recipe.model, all_domains, dtype, recipe.device, recipe.seed)

    def make(enc: PromptEncoder, d: DomainData, split: str, epoch: int = 0) -> list[dict[str, Any]]:
        if recipe.objective == "causal_lm":
            return causal_lm_examples(enc, d, split, recipe.max_per_user, recipe.positions, recipe.seed, epoch)
        return candidate_examples(enc, d, split, recipe.n_neg, recipe.seed, recipe.max_per_user, recipe.positions,
                                  epoch)

    train_sets = [(PromptEncoder(tok, d.name, recipe.max_history), cap_users(d, "train", recipe.max_train_users,
                                                                               recipe.seed)) for d in train_domains]

    def draw(epoch: int) -> list[dict[str, Any]]:
        return [ex for enc, d in train_sets for ex in make(enc, d, "train", epoch)]

    train = draw(0)
    val_data = cap_users(target, "val", recipe.max_val_users, recipe.seed)
    val = make(PromptEncoder(tok, target.name, recipe.max_history), val_data, "val")
    if not train or not val:
        raise InputError(f"no training ({len(train)}) or validation ({len(val)}) examples")
    model.add_adapter(adapter, r=recipe.r, lora_alpha=recipe.lora_alpha,
                      target_modules=list(recipe.target_modules) if recipe.target_modules else None, seed=recipe.seed)
    identity = {"command": "train-lora", "model": recipe.model, "dtype": str(dtype).removeprefix("torch."),
                "data": [d.meta.get("source", d.name) for d in train_domains], "target": target.name,
                "objective": recipe.objective, "max_train_users": recipe.max_train_users,
                "max_per_user": recipe.max_per_user, "max_history": recipe.max_history,
                "train_examples": _fingerprint(train)}
    if recipe.positions != "last":  # absent at the default, so runs checkpointed before the option resume
        identity["positions"] = recipe.positions
    if recipe.init_adapter is not None:
        from xkern.adapters.peft_format import load_adapter as read_adapter
        from xkern.serve.runs import ADAPTER_FILES, sha256_file

        model.set_adapter_weights(adapter, read_adapter(recipe.init_adapter), f"--init-adapter {recipe.init_adapter}")
        identity["init_adapter"] = "-".join(sha256_file(Path(recipe.init_adapter) / f)[:16] for f in ADAPTER_FILES)
    before = evaluate_loss(model, adapter, val, recipe.objective, recipe.train.batch_size)
    out.mkdir(parents=True, exist_ok=True)
    data = DrawnData(lambda e: train if e == 0 else draw(e), recipe.seed) if recipe.positions == "random" else train
    res = train_lora(model, adapter, data, objective=recipe.objective, eval_dataset=val, output_dir=out,
                     config=recipe.train, identity=identity)
    summary: dict[str, Any] = {
        "recipe": asdict(recipe), "train_domains": [d.name for d in train_domains], "target": target.name,
        "train_examples": len(train), "val_examples": len(val), "val_loss_before": before,
        "val_loss_after": res.final_eval_loss, "steps": res.steps, "train_seconds": round(res.seconds, 1),
        "train_seconds_total": res.seconds_total, "resumed_from_step": res.start_step,
        "trainable_parameters": sum(p.numel() for p in model.adapter_parameters(adapter)),
        "adapter_dir": str(out / "adapter"), "dtype": str(dtype).removeprefix("torch."),
        "train_tokens_per_s": _tokens_per_second(train, recipe.train, res.steps - res.start_step, res.seconds),
    }
    if recipe.eval_users > 0:
        from xkern.data.evaluate import evaluate_scorer
        from xkern.data.negatives import build_candidates
        from xkern.serve import LikelihoodScorer, PrefixLikelihoodScorer

        cands = build_candidates(target, "test", 29, "uniform", recipe.seed, recipe.eval_users)
        enc = PromptEncoder(tok, target.name, recipe.max_history)
        for name in (BASE, adapter):  # a plain decoder shares each user's prompt KV across its candidates
            scorer = PrefixLikelihoodScorer(model, enc, target.titles, name) if model.supports_logits_at else \
                LikelihoodScorer(model, enc, target.titles, name, batch_size=max(recipe.train.batch_size, 30))
            summary[f"test_{'base' if name == BASE else 'lora'}"] = evaluate_scorer(
                scorer, cands, (1, 3, 10), batch_size=8, progress=recipe.train.progress, desc=name)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    rank, summary["world_size"] = dist_setup()
    if rank == 0:  # under torchrun every rank holds the same summary; one writes it
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


# --------------------------------------------------------------------------------------------- the command

def cmd_train_lora(args: argparse.Namespace) -> int:
    from xkern.data.cli import load_domain
    from xkern.train.loop import TrainConfig, config_from_args

    recipe = LoraRecipe(
        model=args.model, r=args.r, lora_alpha=args.alpha if args.alpha is not None else 2.0 * args.r,
        target_modules=args.target_modules or None, objective=args.objective,
        train=config_from_args(TrainConfig, args, seed=args.seed, progress=not args.no_progress),
        max_train_users=args.max_train_users, fraction=args.fraction, max_val_users=args.max_val_users,
        max_per_user=args.per_user, positions=args.positions, init_adapter=args.init_adapter,
        max_history=args.max_history, eval_users=args.eval_users, dtype=args.dtype,
        device=args.device)
    from dataclasses import replace

    from xkern.data.domain import check_usable
    from xkern.data.splits import subsample_train

    target = load_domain(args, args.domain)
    target = replace(target, train=subsample_train(target.train, args.fraction, args.seed))
    train_names = args.train_domains or (args.domain,)
    train_domains = [target if n == args.domain else load_domain(args, n) for n in train_names]
    ranked = 30 if args.eval_users else (recipe.n_neg + 1 if args.objective == "candidates" else None)
    for d in {d.name: d for d in [*train_domains, target]}.values():  # before the model loads or anything trains
        check_usable(d, titles=True, candidates=ranked)
    from xkern.train.checkpoint import RunLock, discard
    from xkern.train.trainer import CHECKPOINT_DIR

    lock = RunLock(args.out) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext()
    with lock:
        if args.overwrite:
            discard(Path(args.out) / CHECKPOINT_DIR)
        summary = train_lora_on_domains(recipe, train_domains, target, args.out)
    if summary["world_size"] > 1 and int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun rank 0 alone reports
    write_lora_run(args, recipe, [*train_domains, target], target, summary["dtype"])
    print(f"trained on {','.join(summary['train_domains'])}: {summary['train_examples']} examples, "
          f"{summary['steps']} steps, {summary['trainable_parameters']:,} trainable parameters, {summary['dtype']}, "
          f"{summary['train_tokens_per_s']} training tokens/s")
    print(f"{summary['target']} validation loss ({summary['val_examples']} examples): "
          f"{summary['val_loss_before']:.4f} -> {summary['val_loss_after']:.4f}")
    for key in ("test_base", "test_lora"):
        if key in summary:
            m = summary[key]
            print(f"{key}: HR@1 {m['HR@1']:.4f}  HR@10 {m['HR@10']:.4f}  NDCG@10 {m['NDCG@10']:.4f}  "
                  f"({m['n_users']} users)")
    print(f"adapter (PEFT format): {summary['adapter_dir']}\nsummary: {Path(args.out) / 'summary.json'}")
    return 0


def write_lora_run(args: argparse.Namespace, recipe: LoraRecipe, domains: list[DomainData], target: DomainData,
                   dtype: str) -> None:
    """``run.json`` beside the adapter: what ``xkern.load_recommender`` needs to serve this run (the tiny base is
    rebuilt from the same domains, in the same order, and seed)."""
    from xkern.serve.runs import ADAPTER_FILES, base_entry, catalogue_digest, data_entry, files_entry, write_run

    out = Path(args.out)
    write_run(out, {
        "command": "train-lora", "domain": target.name,
        "base": base_entry(recipe.model, dtype, seed=recipe.seed, domains=list(dict.fromkeys(d.name for d in domains))),
        "data": data_entry(args.data, args.seed, args.val_frac, args.mode),
        "catalogue": catalogue_digest(target.titles, target.item_ids),
        "adapters": {"lora": files_entry(out / "adapter", ADAPTER_FILES, out)},
        "scorer": {"kind": "likelihood", "adapter": "lora", "max_history": recipe.max_history},
    })


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train-lora`` to the ``xkern`` command."""
    from xkern.train.loop import TrainConfig, add_config_arguments

    p = sub.add_parser("train-lora", parents=[run_options(), data_options(), model_options("tiny"),
                                              out_option("output directory", "runs/train-lora")],
                       help="train a LoRA adapter on next-item prediction",
                       description="Train one LoRA (PEFT format) on the next-item task of one or more domains over "
                       "an NF4 base, report validation loss before/after and optionally ranking metrics on test users.")
    p.add_argument("--domain", required=True, help="target domain: validation (and test) users come from it")
    p.add_argument("--train-domains", type=names, default=None,
                   help="comma-separated domains to train on (default: --domain)")
    p.add_argument("--r", type=rank, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2 r)")
    p.add_argument("--target-modules", type=names, default=None,
                   help="comma-separated module-name suffixes (default: every NF4 layer)")
    p.add_argument("--objective", choices=("causal_lm", "candidates"), default="causal_lm")
    add_config_arguments(p.add_argument_group("training loop"), TrainConfig, skip=("seed",))
    p.add_argument("--max-train-users", type=int, default=None, help="sample this many training users per domain")
    p.add_argument("--fraction", type=float, default=1.0,
                   help="train on this fraction of --domain's training users (nested, seeded: the users "
                        "train-xcross --fraction takes)")
    p.add_argument("--max-val-users", type=int, default=200, help="validation users (default 200)")
    p.add_argument("--per-user", type=int, default=1, help="training positions per user sequence (default 1)")
    p.add_argument("--positions", choices=POSITIONS, default="last",
                   help="which positions of a user's sequence are targets: the last --per-user ones, or as many "
                        "drawn at random anew each epoch (so that epochs cover whole sequences) (default last)")
    p.add_argument("--init-adapter", default=None, metavar="DIR",
                   help="start from this trained adapter (PEFT folder; same modules, --r and --alpha) instead of "
                        "PEFT's initialization: another epoch of a finished run, as a run of its own")
    p.add_argument("--max-history", type=int, default=5, help="history titles in the prompt (default 5)")
    p.add_argument("--eval-users", type=int, default=0, help="also rank 30 candidates for N test users")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: discard a checkpoint in --out (by default a run resumes its own checkpoint "
                        "and refuses another run's, naming what differs)")
    p.set_defaults(func=cmd_train_lora)
