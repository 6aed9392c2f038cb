"""A LoRA training step with and without length groups: the same batches, losses and gradients, fewer pads.

``xkern train-lora``'s step on real next-item examples (SmolLM2-135M on an NF4 base, bf16 or ``--dtype
float32``, r 8 on every linear, the prompt masked): each random batch of ``--batch-size`` examples runs
forward and backward once as one padded batch (``CausalLM(group_lengths=False)``, the reference) and
once as the objective runs it (:func:`xkern.train.objectives.length_groups`: at most two groups of
similar length, each trimmed to its longest row), alternating which goes first. Records the seconds
per step of each, the padded tokens of each, and the largest loss and gradient differences.

    python bench/bench_length_groups.py --data ../shared/data/amazon-xcross --domains Tools
    python bench/bench_length_groups.py --data ../shared/data/amazon-xcross --domains Tools,Toys

Writes ``bench/results/train-length-groups-<domains>[-float32]-cpu.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import torch

from xkern.ops.backends.cpu_native import cpu_model

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--domains", default="Tools", help="comma-separated: the examples of each, mixed (a hybrid's)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from xkern.data.cli import load_domains
    from xkern.data.domain import require_data_root
    from xkern.data.encoding import PromptEncoder
    from xkern.data.examples import causal_lm_examples
    from xkern.recipes import load_lm
    from xkern.train.objectives import CausalLM, length_groups, model_pad_id

    names = [d.strip() for d in args.domains.split(",") if d.strip()]
    domains = load_domains(require_data_root(args.data), names, seed=0)
    model, tok = load_lm(args.model, list(domains.values()), getattr(torch, args.dtype), None)
    examples = [e for d in domains.values() for e in causal_lm_examples(PromptEncoder(tok, d.name), d, "train")]
    model.add_adapter("lora", r=8, lora_alpha=16, init_lora_weights=False, seed=0)
    params = model.train_only("lora")
    model.train()
    pad = model_pad_id(model)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    ways = {"one_batch": CausalLM(group_lengths=False), "length_groups": CausalLM()}
    seconds = {k: [] for k in ways}
    tokens = {k: 0 for k in ways}
    loss_diff, grad_diff = 0.0, 0.0
    for step in range(args.steps + 1):  # step 0 warms up, untimed
        batch = CausalLM().collate([examples[i] for i in order[step * args.batch_size:(step + 1) * args.batch_size]],
                                   pad)
        out = {}
        for name in (list(ways) if step % 2 == 0 else list(reversed(ways))):
            t0 = time.perf_counter()
            loss = ways[name].loss(model, batch, "lora")
            grads = torch.autograd.grad(loss, params)
            if step:
                seconds[name].append(time.perf_counter() - t0)
                groups = length_groups(model, batch) if ways[name].group_lengths else [batch]
                tokens[name] += sum(g["input_ids"].numel() for g in groups)
            out[name] = (float(loss), grads)
        loss_diff = max(loss_diff, abs(out["one_batch"][0] - out["length_groups"][0]))
        grad_diff = max(grad_diff, max(float((a - b).norm() / b.norm().clamp_min(1e-12))
                                       for a, b in zip(out["length_groups"][1], out["one_batch"][1], strict=True)))
        print(step, {k: round(v[-1], 3) for k, v in seconds.items() if v}, flush=True)
    real = sum(len(examples[i]["input_ids"]) for i in order[args.batch_size:(args.steps + 1) * args.batch_size])
    per_step = {k: sum(v) / len(v) for k, v in seconds.items()}
    result = {"kind": "xkern-train-length-groups", "domains": names, "model": args.model, "dtype": args.dtype,
              "rank": 8, "batch_size": args.batch_size, "steps": args.steps, "examples": len(examples),
              "seconds_per_step": per_step, "speedup": per_step["one_batch"] / per_step["length_groups"],
              "token_fraction_real": {k: real / v for k, v in tokens.items()},
              "max_abs_loss_difference": loss_diff, "max_relative_gradient_difference": grad_diff,
              "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "load_average": os.getloadavg()[0], "date": dt.date.today().isoformat(),
              "command": "python bench/bench_length_groups.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    suffix = "" if args.dtype == "bfloat16" else f"-{args.dtype}"
    path = args.out or ROOT / "bench" / "results" / f"train-length-groups-{'-'.join(names)}{suffix}-cpu.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "command"}, indent=1), f"\nwrote {path}")
    return path


if __name__ == "__main__":
    main()
