"""Likelihood scoring at scale on real data: seconds per user, and what bf16 and title caps change in the ranking.

Three measurements on the first ``--users`` test users of ``--target`` (1 + 29 uniform candidates, seed 0;
SmolLM2-135M on an NF4 base; every user's prompt runs once and its KV cache serves the 30 titles):

* ``speed``: seconds per user of a LoRA row (one adapter, r 16 on every linear, random non-zero B: the
  cost does not depend on the weights) and of X-Cross over two such sources (likelihood scoring, two
  streams mixed after every block), in each of ``--dtypes``;
* ``precision``: the base model's ranks at bf16 and at float32 on the same ``--compare-users`` users,
  HR@10 and MRR each with a paired 95% bootstrap interval of the difference (the same model; only the
  arithmetic differs);
* ``title_cap``: the same in bf16 with each candidate title cut to ``--title-cap`` tokens against the
  full titles (<= 32 tokens): what a cap saves in time and costs in ranking quality.

    python bench/bench_scoring.py --data ../shared/data/amazon-xcross --target Tools

Writes ``bench/results/<date>-scoring-cpu.json`` (the table in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from xkern.ops.backends.cpu_native import cpu_model

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(model: str, dtype: torch.dtype, sources: int):
    import xkern
    from xkern.nn.pretrained import load_tokenizer, resolve

    path = resolve(model)
    xm = xkern.load_model(path, dtype=dtype, progress=False)
    for i in range(sources):
        xm.add_adapter(f"s{i}", r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False, seed=10 + i)
    return xm, load_tokenizer(path)


def timed_ranks(scorer, cands) -> tuple[np.ndarray, float]:
    from xkern.data.metrics import pessimistic_ranks

    scorer(cands.histories[:1], cands.items[:1])  # warm-up: the kernels' first calls, the tokenizer caches
    t0 = time.perf_counter()
    scores = np.asarray(scorer(cands.histories, cands.items))
    return pessimistic_ranks(scores, cands.target), time.perf_counter() - t0


def lora_scorer(xm, tok, data, adapter: str, title_cap: int):
    from xkern.data.encoding import PromptEncoder
    from xkern.serve import PrefixLikelihoodScorer

    enc = PromptEncoder(tok, data.name, max_history=5, max_title_tokens=title_cap)
    return PrefixLikelihoodScorer(xm, enc, data.titles, adapter=adapter), enc


def tokens_per_user(enc, data, cands) -> float:
    from xkern.data.prompts import titles_of

    prompt = sum(len(enc.prompt(titles_of(h, data.titles))) for h in cands.histories)
    titles = sum(len(enc.title(data.titles[i] or "")) for row in cands.items for i in row)
    return (prompt + titles) / len(cands.histories)


def metrics(ranks: np.ndarray, n_boot: int) -> dict:
    from xkern.data.confidence import bootstrap_metrics

    return {k: [round(float(x), 4) for x in v] for k, v in bootstrap_metrics(ranks, ("HR@10", "MRR"), n_boot).items()}


def paired(a: np.ndarray, b: np.ndarray, n_boot: int) -> dict:
    from xkern.data.confidence import paired_comparison

    return {m: paired_comparison(a, b, m, n_boot) for m in ("HR@10", "MRR")}


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="processed domain folders (default: XKERN_DATA)")
    ap.add_argument("--target", default="Tools")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--users", type=int, default=200, help="users of the speed rows")
    ap.add_argument("--compare-users", type=int, default=500, help="users of the precision and title-cap rows")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="compute dtypes of the speed rows")
    ap.add_argument("--title-cap", type=int, default=12)
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: speed, precision, title_cap")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from xkern.data.domain import load_processed, require_data_root
    from xkern.data.negatives import build_candidates
    from xkern.xcross import XCrossModel

    data = load_processed(require_data_root(args.data), args.target, seed=0)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    out = {"kind": "xkern-scoring-bench", "domain": data.name, "model": args.model, "cpu": cpu_model(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "date": dt.date.today().isoformat(),
           "load_average_start": os.getloadavg()[0], "candidates": 30, "max_history": 5,
           "command": "python bench/bench_scoring.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    t_start = time.perf_counter()
    if "speed" not in skip:
        cands = build_candidates(data, "test", 29, "uniform", 0, args.users)
        out["speed"] = []
        for name in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
            xm, tok = load(args.model, getattr(torch, name), sources=2)
            scorer, enc = lora_scorer(xm, tok, data, "s0", 32)
            _, seconds = timed_ranks(scorer, cands)
            out["speed"].append({"row": "lora", "dtype": name, "users": args.users, "seconds": seconds,
                                 "s_per_user": seconds / args.users,
                                 "tokens_per_user": tokens_per_user(enc, data, cands),
                                 "load_average": os.getloadavg()[0]})
            print(out["speed"][-1], flush=True)
            xc = XCrossModel(xm, ["s0", "s1"], scoring="likelihood", likelihood_reduce="mean", integrator_norm="rms",
                             tokenizer=tok)
            xc.set_domain(data.titles, data.name, tokenizer=tok, max_history=5)
            _, seconds = timed_ranks(xc.scorer(), cands)
            out["speed"].append({"row": "xcross-2", "dtype": name, "users": args.users, "seconds": seconds,
                                 "s_per_user": seconds / args.users, "streams": 2, "load_average": os.getloadavg()[0]})
            print(out["speed"][-1], flush=True)
            del xm, xc
    if not {"precision", "title_cap"} <= skip:
        cands = build_candidates(data, "test", 29, "uniform", 0, args.compare_users)
        ranks, seconds = {}, {}
        runs = [("bfloat16", 32)]
        if "precision" not in skip:
            runs.append(("float32", 32))
        if "title_cap" not in skip:
            runs.append(("bfloat16", args.title_cap))
        for name, cap in runs:
            xm, tok = load(args.model, getattr(torch, name), sources=0)
            scorer, _ = lora_scorer(xm, tok, data, "__base__", cap)
            ranks[(name, cap)], seconds[(name, cap)] = timed_ranks(scorer, cands)
            print(name, cap, seconds[(name, cap)], flush=True)
            del xm
        full = ("bfloat16", 32)
        if "precision" not in skip:
            f32 = ("float32", 32)
            out["precision"] = {"users": args.compare_users, "model": "the base model (no adapter), likelihood",
                                "bfloat16": metrics(ranks[full], args.n_boot),
                                "float32": metrics(ranks[f32], args.n_boot),
                                "bfloat16_minus_float32": paired(ranks[full], ranks[f32], args.n_boot),
                                "seconds": {"bfloat16": seconds[full], "float32": seconds[f32]},
                                "same_rank_fraction": float(np.mean(ranks[full] == ranks[f32]))}
        if "title_cap" not in skip:
            cap = ("bfloat16", args.title_cap)
            out["title_cap"] = {"users": args.compare_users, "cap_tokens": args.title_cap,
                                "full": metrics(ranks[full], args.n_boot), "capped": metrics(ranks[cap], args.n_boot),
                                "capped_minus_full": paired(ranks[cap], ranks[full], args.n_boot),
                                "seconds": {"full": seconds[full], "capped": seconds[cap]}}
    out["wall_seconds"] = time.perf_counter() - t_start
    out["load_average_end"] = os.getloadavg()[0]
    path = args.out or ROOT / "bench" / "results" / f"{dt.date.today()}-scoring-cpu.json"
    path.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
