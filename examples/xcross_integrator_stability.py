"""Why likelihood X-Cross on SmolLM2 diverges within a few steps, and what the RMS-normalized integrator changes.

On SmolLM2-135M (NF4) with a Toys and a Sports next-item LoRA (trained first if ``--adapters`` does
not hold them), likelihood-scored X-Cross over the Tools training users:

1. **Hidden-state scale per layer**: the RMS of each token's block output (median and max over the
   tokens of a batch of real prompts) and the largest absolute entry. A few tokens ("massive
   activations") sit orders of magnitude above the rest.
2. **Training with each integrator form** (``integrator_norm="none"``, the paper's, and ``"rms"``)
   at the same learning rates, and with the title score summed (``LikelihoodScorer``'s) or averaged
   over its tokens (``likelihood_reduce``): the loss per step, the validation loss at the start and
   after training, and the step at which the loop stopped on a non-finite loss
   (``TrainingDivergedError``). ``--runs NORM:REDUCE:LR,...`` picks them; ``--append`` adds runs to
   the recorded file.

Writes ``bench/results/xcross-integrator-stability.json``.

    python examples/xcross_integrator_stability.py      # about 30 minutes on the 2-core CPU VM
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "xcross-integrator-stability.json"


def source_adapters(folder: Path, data_root: str, steps: int) -> dict[str, Path]:
    """The Toys and Sports next-item LoRAs (``xkern train-lora``), trained here when missing."""
    import subprocess
    import sys

    out = {}
    for domain in ("Toys", "Sports"):
        path = folder / domain / "adapter"
        if not (path / "adapter_config.json").is_file():
            subprocess.run([sys.executable, "-m", "xkern.cli", "train-lora", "--data", data_root, "--domain", domain,
                            "--model", "smollm2", "--max-steps", str(steps), "--max-train-users", "80",
                            "--max-val-users", "20", "--no-progress", "--out", str(folder / domain)], check=True)
        out[domain.lower()] = path
    return out


def hidden_scale(xc, examples) -> list[dict[str, float]]:
    ids, mask, labels = xc.encode([(h, int(c)) for h, cands, _ in examples for c in cands])
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o).detach()))
             for b in xc.blocks]
    try:
        with torch.no_grad():
            xc(ids, mask, labels)
    finally:
        for h in hooks:
            h.remove()
    keep = mask.repeat(xc.n_streams, 1).bool()
    rows = []
    for i, h in enumerate(outs):
        rms = h.pow(2).mean(-1).sqrt()[keep]
        rows.append({"layer": i, "rms_median": round(float(rms.median()), 3), "rms_max": round(float(rms.max()), 2),
                     "abs_max": round(float(h.abs().max()), 1)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str((ROOT / ".." / "shared" / "data" / "amazon-xcross").resolve()))
    ap.add_argument("--adapters", default=str(ROOT / "runs" / "scale"), help="folder with Toys/ and Sports/ runs")
    ap.add_argument("--adapter-steps", type=int, default=10)
    ap.add_argument("--runs", default="none:sum:1e-3,rms:sum:1e-3,none:sum:1e-5,rms:sum:1e-5",
                    help="comma-separated integrator_norm:likelihood_reduce:lr")
    ap.add_argument("--append", action="store_true", help="add the runs to the recorded file")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--val-users", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    from xkern.data.domain import load_processed
    from xkern.nn import load_model
    from xkern.nn.pretrained import load_tokenizer, resolve
    from xkern.train.loop import TrainingDivergedError
    from xkern.xcross import XCrossModel, train
    from xkern.xcross.train import candidate_examples

    adapters = source_adapters(Path(args.adapters), args.data, args.adapter_steps)
    path = resolve("smollm2")
    xm = load_model(path, dtype=torch.float32, progress=False)
    for name, p in adapters.items():
        xm.load_adapter(p, name)
    tok = load_tokenizer(path)
    data = load_processed(args.data, "Tools")
    names = list(adapters)

    def model(norm: str, reduce: str = "sum") -> XCrossModel:
        return XCrossModel(xm, names, scoring="likelihood", integrator_norm=norm, likelihood_reduce=reduce,
                           tokenizer=tok, titles=data.titles, domain=data.name)

    before = json.loads(OUT.read_text()) if args.append else None
    scale = before["hidden_scale"] if before else hidden_scale(model("none"),
                                                               candidate_examples(data, "train", 3, 0, 0, 1)[:2])
    runs = list(before["runs"]) if before else []
    for r in runs:
        r.setdefault("likelihood_reduce", "sum")  # runs recorded before the option existed
    for spec in args.runs.split(","):
        norm, reduce, lr_text = spec.split(":")
        lr = float(lr_text)
        xc = model(norm, reduce)
        losses: list[float] = []
        t = time.perf_counter()
        row = {"integrator_norm": norm, "likelihood_reduce": reduce, "lr": lr}
        try:
            res = train(xc, data, max_steps=args.steps, batch_size=args.batch_size, n_neg=3, lr=lr,
                        max_train_users=64, max_val_users=args.val_users, val_neg=9, eval_every=args.steps,
                        keep_best=False, progress=False, grad_checkpointing=True,
                        callback=lambda step, loss, seen=losses: seen.append(round(loss, 4)))
            row.update(diverged_at=None, val_start=round(res.val[0]["loss"], 4),
                       val_end=round(res.val[-1]["loss"], 4), val_hr1_start=res.val[0]["hr@1"],
                       val_hr1_end=res.val[-1]["hr@1"])
        except TrainingDivergedError as e:
            row.update(diverged_at=len(losses) + 1, error=str(e).split(";")[0])
        row.update(train_loss=losses, seconds=round(time.perf_counter() - t, 1))
        print(json.dumps(row), flush=True)
        runs.append(row)
    OUT.write_text(json.dumps({"base": "SmolLM2-135M (NF4, float32 compute)", "adapters": names,
                               "target": "Tools", "steps": args.steps, "batch_size": args.batch_size,
                               "negatives": 3, "val_users": args.val_users, "val_candidates": 10,
                               "chance_val_loss": round(float(torch.log(torch.tensor(10.0))), 4),
                               "hidden_scale": scale, "runs": runs,
                               "machine": "2-core CPU VM", "load_average_end": round(os.getloadavg()[0], 2)},
                              indent=2) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
