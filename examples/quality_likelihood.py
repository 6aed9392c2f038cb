"""Quality rows of likelihood models on real data: LoRA and X-Cross runs ranked on the same
candidates as the baselines, with 95% bootstrap intervals and paired comparisons.

The runs are made by the commands (any processed domain folders: ``--data``, ``--domain`` / ``--target``):

    xkern train-lora --data D --domain Toys --model smollm2 ... --out runs/q/src-Toys          # a source LoRA
    xkern train-lora --data D --domain Tools --model smollm2 --max-train-users K ... --out runs/q/lora-K
    xkern train-xcross --data D --target Tools --model smollm2 --scoring likelihood \\
        --integrator-norm rms --likelihood-reduce mean --adapter toys=runs/q/src-Toys/adapter \\
        --adapter sports=runs/q/src-Sports/adapter --max-train-users K ... --out runs/q/xcross-K

This script loads the base once, every LoRA run (``--lora NAME=DIR``, DIR of ``xkern train-lora``)
and every X-Cross run (``--xcross NAME=DIR``, DIR of ``xkern train-xcross``), scores the first
``--eval-users`` test users of the target (target + 29 uniform negatives, seed 0) by the mean
log-probability of each candidate title after the next-item prompt (a LoRA row is a one-stream
likelihood X-Cross, which is exactly the LoRA's own likelihood; every user's prompt runs once and its KV
cache serves the 30 candidates), ranks the baselines on exactly the same candidates, and writes the
quality results format (``bench/results/quality-<target>-likelihood.json``): per row the metrics as
``[mean, ci_low, ci_high]``, per-user ranks, trainable parameters, validation loss at the start and at
its best (from the run's logs); and paired HR@10 differences of each X-Cross row against the LoRA
rows and the baselines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _pairs(values: list[str]) -> list[tuple[str, Path]]:
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"expected NAME=DIR, got {v!r}")
        out.append((name, Path(path)))
    return out


def lora_log(run: Path) -> dict:
    """Trainable parameters, fraction info and validation losses of an ``xkern train-lora`` run."""
    summary = json.loads((run / "summary.json").read_text())
    log = json.loads((run / "train_log.json").read_text()) if (run / "train_log.json").is_file() else {}
    evals = [e["loss"] for e in log.get("eval_loss", [])]
    return {"trainable_params": summary["trainable_parameters"], "val_loss_start": summary["val_loss_before"],
            "val_loss_best": min([summary["val_loss_after"], *evals]), "train_examples": summary["train_examples"],
            "steps": summary["steps"], "val_loss_kind": "causal-LM loss of the target title (nats per token)"}


def xcross_log(run: Path) -> dict:
    log = json.loads((run / "train_log.json").read_text())
    val = log.get("val") or []
    return {"trainable_params": log["trainable"]["total"] + log.get("extra_trainable", 0),
            "val_loss_start": val[0]["loss"] if val else None, "val_loss_best": log.get("best_val_loss"),
            "train_examples": log.get("n_train_examples"), "steps": log.get("steps"),
            "val_loss_kind": "cross-entropy of the positive among its validation candidates"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="processed domain folders root (default: the workplace's data)")
    p.add_argument("--target", default="Tools")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--lora", action="append", default=[], help="NAME=DIR of an xkern train-lora run (repeat)")
    p.add_argument("--source", action="append", default=[],
                   help="NAME=DIR of an xkern train-lora run loaded as an X-Cross stream but not scored alone")
    p.add_argument("--xcross", action="append", default=[], help="NAME=DIR of an xkern train-xcross run (repeat)")
    p.add_argument("--fraction", action="append", default=[], help="NAME=FRACTION of the target's training pool")
    p.add_argument("--baselines", default="random,popularity,item-markov,sasrec")
    p.add_argument("--eval-users", type=int, default=200)
    p.add_argument("--max-history", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calibrate", action="store_true",
                   help="also a calibrated row per model, NAME+pmi: the score minus the title's score after an "
                        "empty history (domain-conditional PMI; one extra prompt per model, each item once)")
    p.add_argument("--out", default=None, help="default: bench/results/quality-<target>-likelihood.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import xkern
    from xkern.data.baselines import baseline_quality_rows
    from xkern.data.confidence import paired_comparison, quality_row
    from xkern.data.domain import load_processed, require_data_root
    from xkern.data.evaluate import score_candidates, write_report
    from xkern.data.metrics import metrics_from_ranks, pessimistic_ranks
    from xkern.data.negatives import build_candidates
    from xkern.nn.pretrained import load_tokenizer, resolve
    from xkern.xcross import XCrossModel
    from xkern.xcross.model import adapter_fingerprint

    t0, load_start = time.perf_counter(), os.getloadavg()[0]
    data = load_processed(require_data_root(args.data), args.target, seed=args.seed)
    cands = build_candidates(data, "test", 29, "uniform", args.seed, args.eval_users)
    path = resolve(args.model)
    xm = xkern.load_model(path, dtype=torch.float32, progress=False)
    tok = load_tokenizer(path)
    fractions = {n: float(f) for n, _, f in (v.partition("=") for v in args.fraction)}
    rows, timing, seen, agree = [], {}, {}, {}

    def fingerprint(xc: XCrossModel) -> str:
        """The model's identity: its streams' adapter weights and its own trained tensors."""
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps(xc.config_dict(), sort_keys=True, default=str).encode())
        for a in xc.adapters:
            h.update(adapter_fingerprint(xm, a).encode())
        for k, v in sorted(xc.state_tensors().items()):
            h.update(k.encode() + v.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()

    def add_row(name: str, xc: XCrossModel, info: dict, sources: list[str]) -> None:
        t = time.perf_counter()
        key = fingerprint(xc)
        if key in seen:  # e.g. X-Cross runs whose best validation was step 0: the same model, the same scores
            variants, info = seen[key][1], {**info, "same_model_as": seen[key][0]}
        else:
            xc.set_domain(data.titles, data.name, tokenizer=tok, max_history=args.max_history)
            scores = score_candidates(xc.scorer(args.batch_size), cands,
                                      batch_size=max(1, args.batch_size // 30 * 4), progress=True, desc=name)
            variants = {"likelihood": pessimistic_ranks(scores, cands.target)}
            if args.calibrate:
                prior = xc.title_prior(cands.items, args.batch_size).numpy()
                variants["pmi"] = pessimistic_ranks(scores - prior, cands.target)
                variants["prior"] = pessimistic_ranks(prior, cands.target)
            seen[key] = (name, variants)
        timing[name] = round(time.perf_counter() - t, 1)
        for score, ranks in variants.items():
            if score == "prior":  # kept for the agreement check below, not a model row
                continue
            method = name if score == "likelihood" else f"{name}+{score}"
            rows.append(quality_row(method, ranks, target=data.name, sources=sources,
                                    fraction=fractions.get(name, "-"), n_boot=args.n_boot, seed=args.seed,
                                    split="test", model=name, score=score, **info))
            m = metrics_from_ranks(ranks, (1, 10))
            print(f"{method}: HR@1 {m['HR@1']:.3f} HR@10 {m['HR@10']:.3f} MRR {m['MRR']:.3f} ({timing[name]} s)",
                  flush=True)
        if "prior" in variants:
            agree[name] = {s: float((variants[s] == variants["prior"]).mean()) for s in ("likelihood", "pmi")}

    for name, run in _pairs(args.source):
        xm.load_adapter(str(run / "adapter"), name)
    for name, run in _pairs(args.lora):
        xm.load_adapter(str(run / "adapter"), name)
        xc = XCrossModel(xm, [name], scoring="likelihood", likelihood_reduce="mean", tokenizer=tok)
        add_row(name, xc, lora_log(run), [])
    for name, run in _pairs(args.xcross):
        cfg = json.loads((run / "xcross" / "xcross_config.json").read_text())
        missing = [a for a in cfg["adapters"] if a not in xm.list_adapters()]
        if missing:
            raise SystemExit(f"{run}: X-Cross streams {missing} are not loaded: pass each source run as "
                             f"--lora NAME=DIR (also scored alone) or --source NAME=DIR, with the stream's name")
        xc = XCrossModel.load(run / "xcross", xm, tokenizer=tok)
        add_row(name, xc, xcross_log(run), list(cfg["adapters"]))
    rows += baseline_quality_rows(data, cands, list(filter(None, args.baselines.split(","))), args.seed, args.n_boot)

    def pair(a: dict, b: dict) -> dict:
        return {"a": a["method"], "a_fraction": a["fraction"], "b": b["method"], "b_fraction": b["fraction"],
                **paired_comparison(a["ranks"], b["ranks"], "HR@10", args.n_boot, args.seed)}

    xcross_names = {n for n, _ in _pairs(args.xcross)}
    lora_names = {n for n, _ in _pairs(args.lora)}
    refs = [r for r in rows if r["method"] in ("popularity", "sasrec")]
    paired = [pair(a, b) for a in rows if a.get("model") in xcross_names
              for b in rows if b.get("model") in lora_names and b["fraction"] == a["fraction"]
              and b["score"] == a["score"]]
    paired += [pair(a, b) for a in rows if a.get("model") in xcross_names | lora_names for b in refs]
    paired += [pair(a, b) for a in rows if a.get("score") == "pmi"
               for b in rows if b["method"] == a["model"]]  # calibrated vs raw, same model
    out = Path(args.out or ROOT / "bench" / "results" / f"quality-{data.name}-likelihood.json")
    path_out = write_report(out, {
        "kind": "xkern-quality", "domain": data.name, "split": "test", "seed": args.seed,
        "config": {"n_neg": 29, "negatives": "uniform", "n_boot": args.n_boot, "model": args.model,
                   "max_history": args.max_history, "score": "mean log-probability of the title after the prompt",
                   "pmi": "the same minus its mean log-probability after the prompt of an empty history"},
        "rows": rows, "paired": paired, "score_seconds": timing,
        "rank_agreement_with_title_prior": agree,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "machine": f"the 2-core CPU VM, {torch.get_num_threads()} torch threads",
        "command": "python examples/quality_likelihood.py " + " ".join(sys.argv[1:] if argv is None else argv)})
    print(f"wrote {path_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
