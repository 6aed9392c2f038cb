"""Training in bf16 against float32: the same LoRA run (data, seed, steps) at both compute dtypes.

``xkern train-lora``'s recipe on real Tools users (SmolLM2-135M on an NF4 base, next-item causal-LM
examples, the prompt masked, r 16 on every linear, float32 adapter weights and AdamW state at both
dtypes) for ``--steps`` optimizer steps, once with the model in float32 and once in bf16 (xkern's
native precision: bf16 products, float32 accumulation). Records both loss curves, the training
tokens per second, and whether the bf16 curve stays within the run-to-run noise of the float32 one:
the mean over the last ``--tail`` steps of each against two standard errors of such a mean, from the
spread of the per-step losses around a moving average (what one step's loss varies by from its batch
alone).

    python bench/bench_train_precision.py --data ../shared/data/amazon-xcross

Writes ``bench/results/<date>-train-precision-cpu.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from xkern.ops.backends.cpu_native import cpu_model

ROOT = Path(__file__).resolve().parents[1]


def noise(losses: list[float], window: int = 9) -> float:
    """Standard deviation of each step's loss around the centred moving average of its neighbours."""
    half = window // 2
    resid = [losses[i] - statistics.fmean(losses[i - half:i + half + 1]) for i in range(half, len(losses) - half)]
    return statistics.pstdev(resid) if len(resid) > 1 else float("nan")


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--domain", default="Tools")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--tail", type=int, default=50, help="steps at the end whose mean loss is compared")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from xkern.data.cli import load_domains
    from xkern.data.domain import require_data_root
    from xkern.recipes import LoraRecipe, train_lora_on_domains
    from xkern.train.loop import TrainConfig

    root = require_data_root(args.data)
    target = load_domains(root, [args.domain], seed=0)[args.domain]
    runs = {}
    for name in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        recipe = LoraRecipe(model=args.model, r=16, lora_alpha=32.0, dtype=name, max_val_users=100,
                            train=TrainConfig(lr=args.lr, batch_size=args.batch_size, max_steps=args.steps,
                                              warmup_steps=10, seed=0, progress=True))
        with tempfile.TemporaryDirectory(prefix="xkern-train-precision-") as tmp:
            summary = train_lora_on_domains(recipe, [target], target, tmp)
            log = json.loads((Path(tmp) / "train_log.json").read_text())
        losses = [float(e["loss"]) for e in log["train_loss"]]  # one {"step", "loss"} record per step
        runs[name] = {"losses": losses, "tail_mean": statistics.fmean(losses[-args.tail:]), "noise": noise(losses),
                      "val_loss_before": summary["val_loss_before"], "val_loss_after": summary["val_loss_after"],
                      "train_seconds": summary["train_seconds"], "train_tokens_per_s": summary["train_tokens_per_s"],
                      "load_average": os.getloadavg()[0]}
        print(name, {k: v for k, v in runs[name].items() if k != "losses"}, flush=True)
    out = {"kind": "xkern-train-precision", "domain": args.domain, "model": args.model, "steps": args.steps,
           "batch_size": args.batch_size, "lr": args.lr, "tail": args.tail, "rank": 16, "cpu": cpu_model(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "date": dt.date.today().isoformat(),
           "runs": runs, "command": "python bench/bench_train_precision.py " + " ".join(
               argv if argv is not None else sys.argv[1:])}
    if {"bfloat16", "float32"} <= runs.keys():
        b, f = runs["bfloat16"], runs["float32"]
        out["tail_mean_difference"] = b["tail_mean"] - f["tail_mean"]
        out["float32_step_noise"] = f["noise"]
        # the batch noise of a tail mean: two standard errors of the mean of tail steps with that step noise
        out["tail_mean_noise"] = 2 * f["noise"] / args.tail ** 0.5
        out["within_noise"] = abs(out["tail_mean_difference"]) <= out["tail_mean_noise"]
        diffs = [x - y for x, y in zip(b["losses"], f["losses"], strict=True)]
        out["max_step_difference"] = max(abs(d) for d in diffs)
        out["speedup_bf16"] = b["train_tokens_per_s"] / f["train_tokens_per_s"]
    path = args.out or ROOT / "bench" / "results" / f"{dt.date.today()}-train-precision-cpu.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
