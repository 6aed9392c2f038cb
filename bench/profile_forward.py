"""Where the time of a model forward goes: GEMMs against everything else, from torch.profiler.

The benchmark forward of ``bench/bench_runtime.py`` (SmolLM2-135M on an NF4 base, 16 requests x 128
tokens, 8 adapters of rank 16 on every linear, a mixed batch, full logits) in one process, profiled
with ``torch.profiler`` after warm-up calls. Each operator's self time goes to one category: GEMMs
(oneDNN / MKL matmuls, the LM head included), xkern's NF4 layer outside those GEMMs (weight decode,
LoRA kernels, GEMV; measured as the self time of a ``record_function`` around every NF4 layer),
attention (SDPA), elementwise and normalization, copies and layout, the rest; the wall time minus
the profiled self time is Python and dispatch.

    python bench/profile_forward.py --dtype bfloat16 --label after
    PYTHONPATH=<checkout of an older commit> python bench/profile_forward.py --label before --out ...

Writes ``bench/results/<date>-profile-forward-<label>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CATEGORIES = {
    "gemm": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"),
    "attention": ("scaled_dot_product", "aten::_efficient_attention", "aten::_flash_attention"),
    "elementwise": ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::silu", "aten::pow", "aten::rsqrt",
                    "aten::mean", "aten::neg", "aten::exp", "aten::sum", "aten::gelu", "aten::where", "aten::fill_",
                    "aten::masked_fill", "aten::softmax", "aten::_softmax", "aten::_log_softmax", "aten::sqrt"),
    "copies": ("aten::copy_", "aten::_to_copy", "aten::cat", "aten::index_select", "aten::index", "aten::clone",
               "aten::contiguous", "aten::index_add_", "aten::index_copy_", "aten::empty", "aten::zeros",
               "aten::empty_strided", "aten::stack", "aten::constant_pad_nd"),
}
XKERN = "xkern::nf4_lora_linear"


def category(name: str) -> str:
    if name == XKERN:
        return "xkern_nf4_layer"
    for cat, keys in CATEGORIES.items():
        if any(name == k or (cat == "attention" and k in name) for k in keys):
            return cat
    return "other_ops"


def instrument() -> None:
    """A record_function around every NF4 layer call: its self time is xkern's work outside ATen ops."""
    from xkern.nn import NF4LoRALinear

    original = NF4LoRALinear.forward

    def forward(self, x):
        with torch.profiler.record_function(XKERN):
            return original(self, x)

    NF4LoRALinear.forward = forward


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls without the profiler (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--label", default="after")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import xkern
    from xkern.nn.pretrained import smollm2_gguf

    dtype = getattr(torch, args.dtype)
    xm = xkern.load_model(smollm2_gguf(), dtype=dtype, progress=False)
    names = [f"a{i}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        xm.add_adapter(name, r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False, seed=1000 + i)
    xm.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, xm.config.vocab_size, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)
    order = torch.randperm(args.batch, generator=g).tolist()
    adapter_names = [names[i % len(names)] for i in order]

    def forward():
        with torch.no_grad():
            return xm(input_ids=ids, attention_mask=mask, adapter_names=adapter_names, use_cache=False).logits

    forward()
    forward()
    samples = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        forward()
        samples.append(time.perf_counter() - t0)
    instrument()
    from torch.profiler import ProfilerActivity, profile

    forward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        forward()
        profiled_wall = time.perf_counter() - t0
    totals: dict[str, float] = {}
    ops = []
    for ev in prof.key_averages():
        seconds = ev.self_cpu_time_total * 1e-6
        totals[category(ev.key)] = totals.get(category(ev.key), 0.0) + seconds
        ops.append({"op": ev.key, "self_s": round(seconds, 4), "calls": ev.count})
    profiled = sum(totals.values())
    totals["python_and_dispatch"] = max(0.0, profiled_wall - profiled)
    shares = {k: v / profiled_wall for k, v in totals.items()}
    tokens = int(mask.sum())
    try:
        from xkern.ops.backends import cpu_native

        isa = cpu_native.extension().isa() if cpu_native.extension() else None
    except ImportError:
        isa = None
    from xkern.ops.backends.cpu_native import cpu_model

    cpu = cpu_model()
    result = {
        "kind": "xkern-forward-profile", "label": args.label, "dtype": args.dtype, "batch": args.batch,
        "seq": args.seq, "adapters": args.adapters, "rank": 16, "tokens": tokens,
        "wall_s": statistics.median(samples), "samples_s": samples, "tokens_per_s": tokens / statistics.median(samples),
        "profiled_wall_s": profiled_wall, "seconds": totals, "shares": shares,
        "top_ops": sorted(ops, key=lambda o: -o["self_s"])[:15],
        "xkern": getattr(xkern, "__version__", "?"), "isa": isa, "cpu": cpu, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "load_average": os.getloadavg()[0], "date": dt.date.today().isoformat(),
    }
    out = args.out or ROOT / "bench" / "results" / f"{dt.date.today()}-profile-forward-{args.label}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("label", "dtype", "wall_s", "tokens_per_s", "shares")}, indent=1))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
