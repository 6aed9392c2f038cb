"""Why X-Cross's encoder path does not learn on real Tools data: what was asked of it, answered.

On the NF4 all-MiniLM-L6-v2 base with no adapter (the state every LoRA starts from, since B = 0):

1. **Do pooled features differ between candidates?** For each (history, candidate) pair of a user's
   10 candidates the final hidden states are pooled three ways: ``first`` (the [CLS] token, what
   ``pooling="auto"`` picks for encoders), ``mean`` over all tokens, and ``candidate`` (mean over the
   candidate title's tokens only). Reported: the mean cosine between the candidates of one user,
   and the share of feature variance that is *between* candidates rather than between users.
2. **Can a head learn on frozen features?** The scoring head (``v^T GELU(W x + b) + c``) is trained
   alone on the pooled features of ``--train-users`` users (cross-entropy over the positive and 9
   negatives), for each pooling: training loss at the start and the end (can it fit?), validation
   loss, HR@1 and MRR on ``--val-users`` validation users, against chance (ln 10 = 2.303, HR@1 0.1,
   MRR 0.293).
3. **Is the signal there without training?** The cosine between the mean of the history's tokens and
   the mean of the candidate's tokens, in the same cross-encoded pass, as a zero-shot score.
4. **Gradient norms per parameter group** at the first step of LoRA + head training with the
   library's defaults (head, lora_A, lora_B), for each pooling.

5. **Can LoRA + head fit a fixed batch of real examples?** (``--fixed-batch``: 8 users x 5 candidates,
   AdamW, the loss per step; the trainer and the gradients are sound if it reaches ~0.)
6. **Does LoRA + head learn across users?** (``--train-runs POOLING:HEAD_LR:LORA_LR:USERS,...``: the
   library's ``train_adapter_scorer`` on that many training users, 1 + 3 candidates, batch 16, one
   epoch; validation loss / MRR every ``--eval-every`` steps, and at the end the spread of the scores
   within a user: a spread near 0 with the training loss at ln(1 + K) means the scores collapsed to a
   constant.)

Writes ``bench/results/xcross-encoder-diagnosis.json``; ``--fixed-batch`` and ``--train-runs`` add
their parts to the recorded file (``--skip-features``: only those parts).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def pooled_features(xc, examples, batch_pairs: int = 160) -> dict[str, torch.Tensor]:
    """``{pooling: [E, C, d]}`` for every example's candidates, one forward per batch of pairs."""
    from xkern.data.encoding import pad_batch

    enc = xc.encoder
    rows, spans = [], []
    for hist, cands, _ in examples:
        for c in cands:
            ids = enc.pair_ids(hist, int(c))
            cand_len = len(enc.candidate_ids(int(c)))
            rows.append(ids)
            end = len(ids) - len(enc.tail_ids)
            spans.append((end - cand_len, end))
    out: dict[str, list[torch.Tensor]] = {"first": [], "mean": [], "candidate": [], "history": []}
    with torch.no_grad():
        for s in range(0, len(rows), batch_pairs):
            ids, mask = pad_batch(rows[s:s + batch_pairs], enc.pad_id)
            hidden = xc.stream_hidden(ids, mask)[0].float()  # [B, T, d]
            m = mask.unsqueeze(-1).float()
            out["first"].append(hidden[:, 0])
            out["mean"].append((hidden * m).sum(1) / m.sum(1))
            cand = torch.zeros_like(mask, dtype=torch.float32)
            for i, (a, b) in enumerate(spans[s:s + batch_pairs]):
                cand[i, a:b] = 1
            hist = torch.zeros_like(cand)
            for i, (a, _) in enumerate(spans[s:s + batch_pairs]):
                hist[i, len(enc.head_ids):a] = 1
            cand, hist = cand.unsqueeze(-1), hist.unsqueeze(-1)
            out["candidate"].append((hidden * cand).sum(1) / cand.sum(1).clamp_min(1))
            out["history"].append((hidden * hist).sum(1) / hist.sum(1).clamp_min(1))
    n, c = len(examples), len(examples[0][1])
    return {k: torch.cat(v).view(n, c, -1) for k, v in out.items()}


def diversity(feats: torch.Tensor) -> dict[str, float]:
    """Mean cosine between one user's candidates; share of variance between candidates of a user."""
    x = F.normalize(feats, dim=-1)
    cos = x @ x.transpose(1, 2)
    c = feats.shape[1]
    off = (cos.sum((1, 2)) - c) / (c * (c - 1))
    within = feats.var(dim=1).sum(-1).mean()  # between candidates of a user
    total = feats.reshape(-1, feats.shape[-1]).var(dim=0).sum()
    return {"mean_cosine_between_candidates": float(off.mean()), "share_of_variance_between_candidates":
            float(within / total)}


def train_head(train_x, train_t, val_x, val_t, hidden: int, lr: float, epochs: int, seed: int) -> dict:
    from xkern.data.metrics import evaluate_ranking
    from xkern.xcross.model import ScoringHead

    torch.manual_seed(seed)
    head = ScoringHead(hidden)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    ce = lambda x, t: F.cross_entropy(head(x), t)  # noqa: E731
    with torch.no_grad():
        start = float(ce(train_x, train_t))
        val_start = float(ce(val_x, val_t))
    curve = []
    for epoch in range(epochs):
        perm = torch.randperm(train_x.shape[0])
        for s in range(0, len(perm), 32):
            idx = perm[s:s + 32]
            loss = ce(train_x[idx], train_t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            curve.append({"epoch": epoch + 1, "train_loss": float(ce(train_x, train_t)),
                          "val_loss": float(ce(val_x, val_t))})
    best = min(curve, key=lambda r: r["val_loss"])
    with torch.no_grad():
        m = evaluate_ranking(head(val_x).numpy(), val_t.numpy(), ks=(1, 3))
    return {"lr": lr, "train_loss_start": start, "train_loss_end": curve[-1]["train_loss"],
            "val_loss_start": val_start, "val_loss_best": best["val_loss"], "best_epoch": best["epoch"],
            "val_hr1_end": m["HR@1"], "val_hr3_end": m["HR@3"], "val_mrr_end": m["MRR"], "curve": curve}


def grad_norms(xm, tok, data, examples, pooling: str, seed: int) -> dict[str, float]:
    from xkern.xcross.model import XCrossModel
    from xkern.xcross.train import example_loss

    name = f"diag-{pooling}"
    xm.add_adapter(name, r=8, lora_alpha=16, seed=seed)
    try:
        xc = XCrossModel(xm, [name], pooling=pooling if pooling != "candidate" else "mean", tokenizer=tok,
                         titles=data.titles, domain=data.name, max_history=3, max_tokens=80)
        params = xm.train_only(name)  # what the trainer does: this adapter's A and B require grad
        loss, _ = example_loss(xc, examples)
        loss.backward()
        a = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None and p.shape[0] == 8))
        b = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None and p.shape[-1] == 8))
        head = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in xc.head.parameters()))
        return {"loss": float(loss.detach()), "head": head, "lora_A": a, "lora_B": b}
    finally:
        xm.delete_adapter(name)


def fixed_batch_fit(xm, tok, data, pooling: str, steps: int, lr: float, seed: int) -> dict:
    """LoRA + head on one fixed batch of 8 real training examples: the loss per step."""
    from xkern.xcross.model import XCrossModel
    from xkern.xcross.train import candidate_examples, example_loss

    torch.manual_seed(seed)
    name = f"fit-{pooling}"
    xm.add_adapter(name, r=8, lora_alpha=16, seed=seed)
    try:
        xc = XCrossModel(xm, [name], pooling=pooling, tokenizer=tok, titles=data.titles, domain=data.name,
                         max_history=3, max_tokens=80)
        batch = candidate_examples(data, "train", n_neg=4, seed=seed)[:8]
        opt = torch.optim.AdamW([*xc.trainable_parameters(), *xm.train_only(name)], lr=lr, weight_decay=0.0)
        losses = []
        for _ in range(steps):
            loss, _ = example_loss(xc, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(round(float(loss.detach()), 4))
        return {"pooling": pooling, "lr": lr, "examples": len(batch), "candidates": 5, "loss": losses}
    finally:
        xm.delete_adapter(name)


def training_run(xm, tok, data, spec: str, eval_every: int, seed: int) -> dict:
    """One LoRA + head training (``POOLING:HEAD_LR:LORA_LR:USERS``) and whether its scores collapsed."""
    from xkern.xcross.train import candidate_examples, train_adapter_scorer

    pooling, head_lr, lora_lr, users = spec.split(":")
    name = f"run-{pooling}"
    xm.add_adapter(name, r=8, lora_alpha=16, seed=seed)
    t0 = time.perf_counter()
    try:
        xc, res = train_adapter_scorer(xm, name, data, tok, pooling=pooling, max_history=3, max_tokens=80,
                                       max_train_users=int(users), epochs=1, batch_size=16, n_neg=3,
                                       lr=float(head_lr), extra_lr=float(lora_lr), warmup_steps=10,
                                       eval_every=eval_every, patience=None, keep_best=False, max_val_users=120,
                                       max_per_user=1, seed=seed, progress=False)
        val = candidate_examples(data, "val", 9, seed, -1, None)[:120]
        scores = xc.score([h for h, _, _ in val], [c for _, c, _ in val])
        spread = float(scores.std(dim=1).mean())
    finally:
        xm.delete_adapter(name)
    tail = res.train_loss[-20:]
    return {"pooling": pooling, "head_lr": float(head_lr), "lora_lr": float(lora_lr), "train_users": int(users),
            "steps": res.steps, "negatives": 3, "chance_train_loss": math.log(4), "val": res.val,
            "train_loss_last20_mean": sum(tail) / len(tail), "val_score_spread_within_user": spread,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str((ROOT / ".." / "shared" / "data" / "amazon-xcross").resolve()))
    p.add_argument("--target", default="Tools")
    p.add_argument("--train-users", type=int, default=240)
    p.add_argument("--val-users", type=int, default=120)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "xcross-encoder-diagnosis.json"))
    p.add_argument("--fixed-batch", action="store_true", help="add the fixed-batch fit (both poolings)")
    p.add_argument("--train-runs", default="", help="POOLING:HEAD_LR:LORA_LR:USERS,... LoRA + head trainings to add")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--skip-features", action="store_true", help="keep the recorded feature/head-only parts")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.skip_features:
        return add_training_parts(args)

    import xkern
    from xkern.adapters import BASE
    from xkern.data.domain import load_processed
    from xkern.data.evaluate import write_report
    from xkern.nn.pretrained import load_tokenizer, minilm_dir
    from xkern.xcross.model import XCrossModel
    from xkern.xcross.train import candidate_examples

    t0 = time.perf_counter()
    data = load_processed(args.data, args.target, max_words=6)
    train = candidate_examples(data, "train", n_neg=9, seed=args.seed)[: args.train_users]
    val = candidate_examples(data, "val", n_neg=9, seed=args.seed + 1)[: args.val_users]
    xm = xkern.load_model(str(minilm_dir()), dtype=torch.float32, progress=False)
    tok = load_tokenizer(minilm_dir())
    xc = XCrossModel(xm, [BASE], tokenizer=tok, titles=data.titles, domain=data.name, max_history=3, max_tokens=80)
    feats_train, feats_val = pooled_features(xc, train), pooled_features(xc, val)
    t_train = torch.tensor([t for _, _, t in train])
    t_val = torch.tensor([t for _, _, t in val])
    report: dict = {"kind": "xcross-encoder-diagnosis", "target": args.target, "train_users": len(train),
                    "val_users": len(val), "candidates": 10, "chance_loss": math.log(10),
                    "features_seconds": round(time.perf_counter() - t0, 1), "pooling": {}}
    for pooling in ("first", "mean", "candidate"):
        row = {"diversity": diversity(feats_train[pooling])}
        row["head_only"] = [train_head(feats_train[pooling], t_train, feats_val[pooling], t_val, xm.config.hidden_size,
                                       lr, args.epochs, args.seed) for lr in (1e-3, 1e-4)]
        report["pooling"][pooling] = row
        best = min(row["head_only"], key=lambda r: r["val_loss_best"])
        print(f"{pooling:<10} cos between candidates {row['diversity']['mean_cosine_between_candidates']:.4f}  "
              f"between-candidate variance {row['diversity']['share_of_variance_between_candidates']:.4f}  "
              f"head-only train loss {best['train_loss_start']:.3f} -> {best['train_loss_end']:.3f}  "
              f"val {best['val_loss_start']:.3f} -> best {best['val_loss_best']:.3f}  HR@1 {best['val_hr1_end']:.3f}  "
              f"MRR {best['val_mrr_end']:.3f}")
    from xkern.data.metrics import evaluate_ranking

    zero_shot = F.cosine_similarity(feats_val["history"], feats_val["candidate"], dim=-1)
    m = evaluate_ranking(zero_shot.numpy(), t_val.numpy(), ks=(1, 3))
    report["zero_shot_history_candidate_cosine"] = {"val_hr1": m["HR@1"], "val_hr3": m["HR@3"],
                                                    "val_mrr": m["MRR"]}
    print(f"zero-shot cosine(history span, candidate span) in the same pass: HR@1 {m['HR@1']:.3f}  MRR {m['MRR']:.3f}")
    report["grad_norms_first_step"] = {pl: grad_norms(xm, tok, data, train[:8], pl, args.seed)
                                       for pl in ("first", "mean")}
    print("gradient norms at step 0:", json.dumps(report["grad_norms_first_step"]))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"wrote {write_report(args.out, report)}")
    return add_training_parts(args) if (args.fixed_batch or args.train_runs) else 0


def add_training_parts(args: argparse.Namespace) -> int:
    """``--fixed-batch`` / ``--train-runs`` into the recorded report (runs of the same spec are replaced)."""
    import xkern
    from xkern.data.domain import load_processed
    from xkern.data.evaluate import write_report
    from xkern.nn.pretrained import load_tokenizer, minilm_dir

    report = json.loads(Path(args.out).read_text())
    data = load_processed(args.data, args.target, max_words=6)
    xm = xkern.load_model(str(minilm_dir()), dtype=torch.float32, progress=False)
    tok = load_tokenizer(minilm_dir())
    if args.fixed_batch:
        report["fixed_batch"] = [fixed_batch_fit(xm, tok, data, pl, 12, 1e-3, args.seed)
                                 for pl in ("first", "candidate")]
        for r in report["fixed_batch"]:
            print(f"fixed batch, {r['pooling']} pooling: loss {r['loss'][0]:.3f} -> {r['loss'][-1]:.4f} in 12 steps")
    runs = {(r["pooling"], r["head_lr"], r["lora_lr"], r["train_users"]): r for r in report.get("training_runs", [])}
    for spec in filter(None, args.train_runs.split(",")):
        r = training_run(xm, tok, data, spec, args.eval_every, args.seed)
        runs[(r["pooling"], r["head_lr"], r["lora_lr"], r["train_users"])] = r
        print(json.dumps({k: v for k, v in r.items() if k != "val"}), [round(v["loss"], 4) for v in r["val"]])
        report["training_runs"] = list(runs.values())
        write_report(args.out, report)  # after every run: a long series keeps what it finished
    report["training_runs"] = list(runs.values())
    report["training_parts_load_average"] = [round(x, 2) for x in os.getloadavg()]
    print(f"wrote {write_report(args.out, report)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
