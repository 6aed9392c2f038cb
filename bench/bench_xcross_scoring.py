"""Likelihood X-Cross scoring cost on a real decoder: one forward per (user, candidate) pair against a
shared prefix (each user's prompt once through the n streams, its KV cache reused for the candidates).

SmolLM2-135M-Instruct (the packaged GGUF, NF4 base), n = 2 LoRA adapters (r 16, random weights: the cost
does not depend on their values) as X-Cross streams with random integrators, the data's test users
(history + 30 candidates: the target and 29 uniform negatives). Reported per user: seconds with and
without prefix sharing (interleaved, median of ``--reps``), their ratio, the one-adapter prefix scorer
(``xkern.serve.PrefixLikelihoodScorer``) for the cost of n streams against one, and the largest
difference between the two X-Cross scorings (they compute the same scores).

``--train-steps N`` also times N training steps (forward and backward of ``example_loss``, batch
``--train-batch`` x (1 + 1) candidates, PMI, activation checkpointing as the full-scale runs train) with
one row per pair and with packed rows (:meth:`XCrossModel.pack`), and compares their losses and gradients.

``--val-users N`` also times X-Cross training's validation (``xkern.xcross.train.validate``: the first N
validation users, 1 + ``--val-neg`` candidates, PMI scores as ``--calibrate`` trains them) with one row
per (user, candidate) pair and with prefix sharing, and compares their per-example losses.

    OMP_NUM_THREADS=2 python bench/bench_xcross_scoring.py --data ../shared/data/amazon-xcross
    python bench/bench_xcross_scoring.py --data ../shared/data/amazon-xcross --dtype bfloat16 --users 2 --reps 1 \
        --val-users 16 --train-steps 4 --out bench/results/xcross-validation-cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="processed domain folders root (or XKERN_DATA)")
    p.add_argument("--target", default="Tools")
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--max-history", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64, help="pairs per forward (both ways)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--val-users", type=int, default=0, help="also time validate() on this many validation users")
    p.add_argument("--val-neg", type=int, default=9)
    p.add_argument("--train-steps", type=int, default=0, help="also time this many training steps both ways")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "xcross-scoring-cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import xkern
    from xkern.data.domain import load_processed, require_data_root
    from xkern.data.encoding import PromptEncoder
    from xkern.data.evaluate import write_report
    from xkern.data.negatives import build_candidates
    from xkern.nn.pretrained import load_tokenizer, smollm2_gguf
    from xkern.serve import PrefixLikelihoodScorer
    from xkern.xcross import XCrossModel

    load_start = os.getloadavg()[0]
    data = load_processed(require_data_root(args.data), args.target)
    cands = build_candidates(data, "test", 29, "uniform", 0, args.users)
    hists = [list(h) for h in cands.histories]
    path = smollm2_gguf()
    xm = xkern.load_model(str(path), dtype=getattr(torch, args.dtype), progress=False)
    tok = load_tokenizer(path)
    for i in range(2):
        xm.add_adapter(f"s{i}", r=16, lora_alpha=32, seed=i, init_lora_weights=False)
    xc = XCrossModel(xm, ["s0", "s1"], scoring="likelihood", integrator_norm="rms", likelihood_reduce="mean",
                     tokenizer=tok, titles=data.titles, domain=data.name, max_history=args.max_history)
    torch.manual_seed(0)
    with torch.no_grad():
        for w in xc.w_concat:
            w.normal_(0, 1e-3)  # at 1e-2 the random mix already wrecks the model (scores double)
    one = PrefixLikelihoodScorer(xm, PromptEncoder(tok, data.name, args.max_history), data.titles, "s0",
                                 user_batch=max(1, args.batch_size // 30), row_batch=args.batch_size)
    cases = {
        "xcross_per_pair": lambda: xc.score(hists, cands.items, args.batch_size, prefix_sharing=False),
        "xcross_shared_prefix": lambda: xc.score(hists, cands.items, args.batch_size, prefix_sharing=True),
        "one_adapter_shared_prefix": lambda: one(hists, cands.items),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    outputs = {}
    for _ in range(args.reps):
        for name, fn in cases.items():
            t = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - t)
    per_user = {k: statistics.median(v) / len(hists) for k, v in times.items()}
    diff = float((outputs["xcross_per_pair"] - outputs["xcross_shared_prefix"]).abs().max())
    prompt_tokens = [len(xc.encoder.prompts.prompt([data.titles[i] for i in h])) for h in hists]
    title_tokens = [len(xc.encoder.prompts.title(data.titles[int(c)])) for row in cands.items for c in row]
    report = {
        "kind": "xcross-scoring", "base": "SmolLM2-135M-Instruct (NF4)", "dtype": args.dtype, "streams": 2,
        "target": data.name,
        "users": len(hists), "candidates": int(cands.items.shape[1]), "max_history": args.max_history,
        "batch_size": args.batch_size, "reps": args.reps, "threads": torch.get_num_threads(),
        "mean_prompt_tokens": float(np.mean(prompt_tokens)), "mean_title_tokens": float(np.mean(title_tokens)),
        "seconds_per_user": per_user, "times": times,
        "speedup_shared_prefix": per_user["xcross_per_pair"] / per_user["xcross_shared_prefix"],
        "xcross_vs_one_adapter": per_user["xcross_shared_prefix"] / per_user["one_adapter_shared_prefix"],
        "max_abs_score_difference": diff,
        "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }
    if args.val_users:
        report["validation"] = time_validation(xc, data, args)
    if args.train_steps:
        report["training"] = time_training(xc, data, args)
    for k, v in per_user.items():
        print(f"{k:<28} {v:.3f} s/user")
    print(f"shared prefix: {report['speedup_shared_prefix']:.2f}x faster; 2 streams / 1 adapter "
          f"{report['xcross_vs_one_adapter']:.2f}x; max |score difference| {diff:.2e}")
    print(f"wrote {write_report(args.out, report)}")
    return 0


def time_validation(xc, data, args: argparse.Namespace) -> dict:
    """validate() of the first ``--val-users`` validation users, one row per pair against prefix sharing."""
    from xkern.xcross.train import candidate_examples, validate

    val = candidate_examples(data, "val", args.val_neg, 0, -1, None)[:args.val_users]
    out: dict = {"users": len(val), "candidates": args.val_neg + 1, "calibrate": True, "seconds": {}}
    losses = {}
    for name, shared in (("per_pair", False), ("shared_prefix", True)):
        t = time.perf_counter()
        losses[name] = validate(xc, val, args.batch_size, calibrate=True, prefix_sharing=shared)["losses"]
        out["seconds"][name] = round(time.perf_counter() - t, 2)
    out["speedup_shared_prefix"] = round(out["seconds"]["per_pair"] / out["seconds"]["shared_prefix"], 2)
    out["mean_loss"] = {k: round(float(np.mean(v)), 5) for k, v in losses.items()}
    out["max_abs_loss_difference"] = float(np.max(np.abs(np.subtract(losses["per_pair"], losses["shared_prefix"]))))
    print(f"validate(), {len(val)} users x {args.val_neg + 1} candidates, PMI: {out['seconds']} -> "
          f"{out['speedup_shared_prefix']}x; mean loss {out['mean_loss']}; max |loss difference| "
          f"{out['max_abs_loss_difference']:.2e}")
    return out


def time_training(xc, data, args: argparse.Namespace) -> dict:
    """Forward + backward of ``example_loss`` on the same training batches, one row per pair against packed."""
    from xkern.train.loop import _grad_checkpointing
    from xkern.xcross.train import candidate_examples, example_loss

    for p in xc.model.parameters():
        p.requires_grad_(False)
    params = [q for q in xc.trainable_parameters() if q.requires_grad]
    ex = candidate_examples(data, "train", 1, 0, 0, None)[:args.train_steps * args.train_batch]
    batches = [ex[i:i + args.train_batch] for i in range(0, len(ex), args.train_batch)]
    out: dict = {"steps": len(batches), "batch": args.train_batch, "candidates": 2, "calibrate": True,
                 "grad_checkpointing": True, "seconds_per_step": {}}
    losses, grads = {}, {}
    xc.train()
    with _grad_checkpointing(xc.model.model, True):
        for name, packed in (("per_pair", False), ("packed", True)):
            t = time.perf_counter()
            losses[name], grads[name] = [], []
            for batch in batches:
                for q in params:
                    q.grad = None
                loss = example_loss(xc, batch, calibrate=True, packed=packed)[0]
                loss.backward()
                losses[name].append(float(loss.detach()))
                grads[name].append(torch.cat([q.grad.flatten().float() for q in params]))
            out["seconds_per_step"][name] = round((time.perf_counter() - t) / len(batches), 2)
    out["speedup_packed"] = round(out["seconds_per_step"]["per_pair"] / out["seconds_per_step"]["packed"], 2)
    out["max_abs_loss_difference"] = float(np.max(np.abs(np.subtract(losses["per_pair"], losses["packed"]))))
    out["max_relative_gradient_difference"] = max(
        float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(grads["packed"], grads["per_pair"],
                                                                           strict=True))
    print(f"training step, {args.train_batch} examples x 2 candidates, PMI: {out['seconds_per_step']} s -> "
          f"{out['speedup_packed']}x; max |loss difference| {out['max_abs_loss_difference']:.2e}, max relative "
          f"gradient difference {out['max_relative_gradient_difference']:.2e}")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
