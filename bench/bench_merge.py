"""Serving cost of a merged WeaveRec adapter: exact (rank sum r_i), SVD (rank r), folded into NF4, base alone.

A Llama-architecture model on an NF4 base (default: random weights with SmolLM2-135M's block shapes,
``--layers`` blocks, a small vocabulary so that the linear layers dominate; ``--model smollm2`` takes
the real weights of the first ``--layers`` blocks) carries ``--adapters`` LoRA adapters (rank
``--r``, every linear of every block) with random factors scaled so that each adapter's delta has
``||s B A||_F = ratio * ||W||_F`` per module. Their uniform task-arithmetic merge is served:

- ``base``: the NF4 base alone (no adapter): the floor of the cost, and how far the merge moves logits;
- ``exact``: the merge as ONE adapter of rank ``sum r_i`` through the core op (``merge(..., "linear")``);
- ``svd_r``: the merge truncated to rank ``r`` by SVD (the cost of one adapter);
- ``fold``: the merged delta added to the dequantized weights and re-quantized to NF4, served as the base.

Quality: max |logit difference| to the exact merge computed densely (float32 model with
``W = dequant(W_nf4) + dW``), over a fixed batch, for each ``--ratio``; also relative to the size of
the merge's effect (``max |logits_exact - logits_base|``). Time: median forward time over
``--repeats`` runs for a prefill batch and a decode-sized batch (one token per sequence).

    OMP_NUM_THREADS=2 python bench/bench_merge.py                    # CPU, ~1-3 min
    python bench/bench_merge.py --layers 2 --repeats 2 --ratios 0.05  # smoke

Writes ``bench/results/<date>-merge-<cpu|gpu>.json`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from xkern.adapters import LoraAdapter, LoraWeights, merge  # noqa: E402
from xkern.adapters.peft_format import default_config  # noqa: E402
from xkern.nn import load_model  # noqa: E402
from xkern.weave.merging import folded  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_hf(args: argparse.Namespace) -> torch.nn.Module:
    import transformers

    torch.manual_seed(args.seed)
    if args.model == "smollm2":
        from xkern.nn.pretrained import smollm2_gguf

        p = smollm2_gguf()
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
        hf.model.layers = hf.model.layers[: args.layers]
        hf.config.num_hidden_layers = args.layers
        if getattr(hf.config, "layer_types", None):
            hf.config.layer_types = hf.config.layer_types[: args.layers]
        return hf.eval()
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=576, intermediate_size=1536,
                                   num_hidden_layers=args.layers, num_attention_heads=9, num_key_value_heads=3,
                                   max_position_embeddings=1024)
    return transformers.LlamaForCausalLM(cfg).eval()


def random_adapters(model: Any, n: int, r: int, ratio: float, seed: int, overlap: float = 0.0) -> list[LoraAdapter]:
    """``n`` adapters whose deltas have Frobenius norm ``ratio * ||W||`` in every module.

    ``overlap``: each factor is ``sqrt(overlap) * shared + sqrt(1 - overlap) * own`` (``shared``
    common to all adapters), a stand-in for adapters trained on overlapping data (WeaveRec's
    hybrids all contain the target data); 0 gives independent adapters, the worst case for SVD.
    """
    g = torch.Generator().manual_seed(seed)
    shared = {name: (torch.randn(r, layer.in_features, generator=g), torch.randn(layer.out_features, r, generator=g))
              for name, layer in model.nf4_layers.items()}
    out = []
    for _ in range(n):
        ad = LoraAdapter(config=default_config(r, 2 * r, TARGETS))
        for name, layer in model.nf4_layers.items():
            w_norm = layer.nf4_weight.dequantize(torch.float32).norm()
            a = overlap ** 0.5 * shared[name][0] + (1 - overlap) ** 0.5 * torch.randn(r, layer.in_features, generator=g)
            a = a / layer.in_features ** 0.5
            b = overlap ** 0.5 * shared[name][1] + (1 - overlap) ** 0.5 * torch.randn(layer.out_features, r,
                                                                                       generator=g)
            d = 2.0 * (b @ a)
            b = b * (ratio * w_norm / d.norm())
            ad.modules[name] = LoraWeights(a, b, 2.0)
        out.append(ad)
    return out


def dense_reference(ref: torch.nn.Module, model: Any, merged: LoraAdapter) -> torch.nn.Module:
    dense = copy.deepcopy(ref)
    mods = dict(dense.named_modules())
    with torch.no_grad():
        for name, layer in model.nf4_layers.items():
            w = layer.nf4_weight.dequantize(torch.float32)
            if name in merged.modules:
                w = w + merged.modules[name].delta(torch.float32)
            mods[name].weight.copy_(w)
    return dense


def timed(fn: Any, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("random", "smollm2"), default="random")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--adapters", type=int, default=3, help="N+1 adapters merged (default 3: target + 2 hybrids)")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--ratios", type=str, default="0.01,0.05,0.2", help="||dW_i|| / ||W|| per module")
    ap.add_argument("--overlaps", type=str, default="0,0.9", help="shared fraction of the adapters' factors")
    ap.add_argument("--prefill", type=str, default="4x128", help="batch x sequence of the prefill workload")
    ap.add_argument("--decode", type=int, default=16, help="sequences of the decode workload (1 token each)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hf = build_hf(args)
    ref = copy.deepcopy(hf)
    model = load_model(hf, dtype=torch.float32, progress=False)
    vocab = model.config.vocab_size
    pb, ps = (int(x) for x in args.prefill.split("x"))
    g = torch.Generator().manual_seed(args.seed + 1)
    prefill_ids = torch.randint(0, vocab, (pb, ps), generator=g)
    decode_ids = torch.randint(0, vocab, (args.decode, 1), generator=g)
    ratios = [float(x) for x in args.ratios.split(",") if x.strip()]
    overlaps = [float(x) for x in args.overlaps.split(",") if x.strip()]
    quality, timing = [], []
    for k, (overlap, ratio) in enumerate((o, r) for o in overlaps for r in ratios):
        adapters = random_adapters(model, args.adapters, args.r, ratio, args.seed + 10, overlap)
        exact = merge(adapters, None, "linear")
        svd = merge(adapters, None, "linear", rank=args.r)
        dense = dense_reference(ref, model, exact)
        truth = dense(input_ids=prefill_ids).logits
        for name in ("exact", "svd"):
            if name in model.list_adapters():
                model.delete_adapter(name)
        model.add_lora("exact", exact)
        model.add_lora("svd", svd)
        configs: dict[str, Any] = {
            "base": lambda ids: model(input_ids=ids, adapter_names="__base__").logits,
            "exact": lambda ids: model(input_ids=ids, adapter_names="exact").logits,
            f"svd_r{args.r}": lambda ids: model(input_ids=ids, adapter_names="svd").logits,
        }
        effect = float((model(input_ids=prefill_ids, adapter_names="__base__").logits - truth).abs().max())
        rows = {}
        for name, fn in configs.items():
            rows[name] = float((fn(prefill_ids) - truth).abs().max())
        with folded(model, exact) as served:
            rows["fold"] = float((model(input_ids=prefill_ids, adapter_names=served).logits - truth).abs().max())
            if k == 0:
                t_fold = {"prefill_s": timed(lambda: model(input_ids=prefill_ids, adapter_names=served), args.repeats,
                                             args.warmup),
                          "decode_s": timed(lambda: model(input_ids=decode_ids, adapter_names=served), args.repeats,
                                            args.warmup)}
        for name, err in rows.items():
            quality.append({"overlap": overlap, "ratio": ratio, "config": name, "max_abs_logit_diff": err,
                            "relative_to_merge_effect": err / max(effect, 1e-12), "merge_effect": effect})
        if k == 0:
            for name, fn in configs.items():
                timing.append({"config": name,
                               "prefill_s": timed(lambda fn=fn: fn(prefill_ids), args.repeats, args.warmup),
                               "decode_s": timed(lambda fn=fn: fn(decode_ids), args.repeats, args.warmup)})
            timing.append({"config": "fold", **t_fold})
    ranks = {"base": 0, "exact": args.adapters * args.r, f"svd_r{args.r}": args.r, "fold": 0}
    base_t = next(t for t in timing if t["config"] == "base")
    for t in timing:
        t["rank"] = ranks[t["config"]]
        t["prefill_vs_base"] = t["prefill_s"] / base_t["prefill_s"]
        t["decode_vs_base"] = t["decode_s"] / base_t["decode_s"]
    device = "gpu" if torch.cuda.is_available() else "cpu"
    info = {"date": dt.date.today().isoformat(), "device": device, "platform": platform.platform(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args),
            "model": f"{args.model} Llama, {args.layers} blocks (576 hidden, 1536 MLP)", "workloads": {
                "prefill": f"{pb}x{ps} tokens", "decode": f"{args.decode} sequences x 1 token"}}
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"{info['date']}-merge-{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": info, "timing": timing, "quality": quality}, indent=2) + "\n")
    print(f"model: {info['model']}; {args.adapters} adapters of rank {args.r} merged uniformly; "
          f"threads {info['threads']}")
    print("\n| config | rank | prefill " + info["workloads"]["prefill"] + " (ms) | vs base | decode "
          + info["workloads"]["decode"] + " (ms) | vs base |\n|---|---|---|---|---|---|")
    for t in timing:
        print(f"| {t['config']} | {t['rank']} | {1e3 * t['prefill_s']:.1f} | {t['prefill_vs_base']:.2f}x | "
              f"{1e3 * t['decode_s']:.1f} | {t['decode_vs_base']:.2f}x |")
    print("\n| overlap | ratio ||dW_i||/||W|| | config | max abs logit diff to exact merge | / merge effect |\n"
          "|---|---|---|---|---|")
    for q in quality:
        print(f"| {q['overlap']} | {q['ratio']} | {q['config']} | {q['max_abs_logit_diff']:.2e} | "
              f"{q['relative_to_merge_effect']:.3f} |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
