"""The benchmarks of ``bench/gpu_check.sh`` that need neither bitsandbytes nor PEFT (the GPU image has neither).

    python bench/gpu_bench.py lora_linear --out X.json [--dry-run]   # every backend vs F.linear + LoRA loop
    python bench/gpu_bench.py runtime --out Y.json [--dry-run]       # a tiny XkernModel: mixed-adapter decode step,
                                                                     # eager and replayed from a CUDA graph

On a GPU: weights rotated through more than 2x L2 (so HBM is measured, DESIGN section 7), median of
``triton.testing.do_bench``-style CUDA-event timings, the copy bandwidth of this GPU measured in the
same run as the ceiling. ``--dry-run`` (CPU, toy sizes, the Triton interpreter for the triton backend)
checks that every step runs and writes the same JSON keys; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _timer(device: str, reps: int, inner: int = 1):
    """Seconds per call: the median over ``reps`` samples of ``inner`` back-to-back calls between one CUDA event
    pair (no host sync inside a sample), so a call of a few microseconds is timed on the GPU, not the launch."""
    def run(fn) -> float:
        times = []
        for _ in range(reps):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) * 1e-3 / inner)
            else:
                t = time.perf_counter()
                for _ in range(inner):
                    fn()
                times.append((time.perf_counter() - t) / inner)
        return statistics.median(times)
    return run


def _graph_timer(fn, reps: int, inner: int) -> float | None:
    """Seconds per call of ``inner`` calls captured in one CUDA graph and replayed: what is left when the host's
    launch cost is gone (``None`` where the call cannot be captured: the error goes in the JSON instead)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up outside the capture: compilation, caches, workspaces
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return _timer("cuda", reps, 1)(graph.replay) / inner


def _env(device: str) -> dict:
    import xkern
    info = {"device": device, "torch": torch.__version__, "xkern": xkern.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": platform.node()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, l2_bytes=getattr(p, "L2_cache_size", None))
    return info


def copy_bandwidth(device: str, nbytes: int) -> float:
    """GB/s of a device-to-device copy, read + write counted."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    b = torch.empty_like(a)
    t = _timer(device, 5)(lambda: b.copy_(a))
    return 2 * nbytes / t / 1e9


def _rotating_call(op, x, weights, A, B, s, routing, backend):
    """``op`` on the next weight copy at each call (rotating through more than 2x L2)."""
    state = [0]

    def call():
        state[0] += 1
        return op(x, weights[state[0] % len(weights)], A, B, s, routing, backend=backend)
    return call


def _dense_lora_loop(x, dense, A, B, s, rows_of):
    """The baseline: 16-bit ``F.linear`` + one LoRA launch pair per adapter (a per-adapter loop). ``rows_of[a]``
    are adapter ``a``'s row indices, built before timing: no boolean indexing, so no host sync while timed."""
    y = torch.nn.functional.linear(x, dense)
    for a, rows in enumerate(rows_of):
        xa = x.index_select(0, rows)
        y.index_add_(0, rows, s[a].to(x.dtype) * ((xa @ A[a].t()) @ B[a].t()))
    return y


def bench_lora_linear(args) -> dict:
    from xkern import quantize_nf4
    from xkern.fileio import atomic_write_text  # a whole file or none: a step killed mid-write keeps the last
    from xkern.ops import RowRouting, lora_linear, registry

    device = "cpu" if args.dry_run else "cuda"
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    if args.dry_run:
        shapes, ms, n_adapters_list, reps = [(64, 128)], [1, 20], [2], 1
    else:
        shapes = [(4096, 4096), (14336, 4096), (4096, 14336)]
        ms, n_adapters_list, reps = [1, 2, 4, 8, 16, 64, 256, 1024], [1, 8], 10
    inner = 1 if args.dry_run else 50  # back-to-back calls per timed sample
    ceiling = copy_bandwidth(device, 8 * 2**20 if args.dry_run else 1 << 30)
    backends = [b for b in ("cuda", "triton", "torch") if device == "cuda" or b != "cuda"]
    head = {"kind": "xkern-gpu-bench-lora_linear", "dry_run": args.dry_run, "env": _env(device),
            "copy_gbs": round(ceiling, 1), "inner_calls": inner}
    records = []
    g = torch.Generator().manual_seed(0)
    l2 = _env(device).get("l2_bytes") or 0
    for n, k in shapes:
        w = torch.randn(n, k, generator=g) / k**0.5
        weight = quantize_nf4(w.to(dtype)).to(device)
        copies = max(1, -(-3 * l2 // max(weight.nbytes, 1))) if device == "cuda" else 1
        weights = [weight] + [dataclasses.replace(weight, packed=weight.packed.clone()) for _ in range(copies - 1)]
        dense = w.to(device, dtype)
        for na in n_adapters_list:
            r = 16
            A = (torch.randn(na, r, k, generator=g) / k**0.5).to(device, dtype)
            B = (torch.randn(na, n, r, generator=g) * 0.1).to(device, dtype)
            s = torch.full((na,), 2.0, device=device)
            for m in ms:
                x = torch.randn(m, k, generator=g).to(device, dtype)
                ids = torch.randint(0, na, (m,), generator=g).to(device)
                routing = RowRouting.build(ids, na)
                ref = x.float() @ weight.dequantize(torch.float32).t() + torch.stack(
                    [s[a] * (x[i].float() @ A[a].float().t()) @ B[a].float().t() for i, a in enumerate(ids.tolist())])
                rec = {"N": n, "K": k, "M": m, "adapters": na, "rank": r, "dtype": str(dtype).replace("torch.", "")}
                for b in backends:
                    try:
                        registry.choose("lora_linear.forward", x.device, (x, weight, A, B), requested=b)
                    except (RuntimeError, ValueError) as e:
                        rec[f"{b}_skipped"] = str(e)[:120]
                        continue
                    call = _rotating_call(lora_linear, x, weights, A, B, s, routing, b)
                    with torch.no_grad():
                        y = call()
                        rec[f"{b}_max_err"] = float((y.float() - ref).abs().max() / ref.abs().max())
                        t = _timer(device, reps, inner)(call)
                        if device == "cuda":
                            try:
                                rec[f"{b}_graph_us"] = round(_graph_timer(call, reps, inner) * 1e6, 2)
                            except RuntimeError as e:  # a path that syncs or allocates cannot be captured: say so
                                rec[f"{b}_graph_error"] = str(e)[:200]
                    rec[f"{b}_us"] = round(t * 1e6, 2)
                    rec[f"{b}_weight_gbs"] = round(weight.nbytes / t / 1e9, 1)
                    rec[f"{b}_fraction_of_copy"] = round(weight.nbytes / t / 1e9 / ceiling, 3)

                rows_of = [torch.nonzero(ids == a).flatten() for a in range(na)]
                with torch.no_grad():
                    rec["dense_lora_loop_us"] = round(_timer(device, reps, inner)(
                        lambda: _dense_lora_loop(x, dense, A, B, s, rows_of)) * 1e6, 2)  # noqa: B023 - called here
                records.append(rec)
                print(json.dumps(rec), flush=True)
                partial = {**head, "complete": False, "records": records}  # a step cut short keeps these
                atomic_write_text(args.out, json.dumps(partial, indent=1) + "\n")
    return {**head, "complete": True, "records": records, "decode_crossover": decode_crossover(records)}


def decode_crossover(records: list[dict]) -> list[dict]:
    """Per shape and adapter count: the smallest M at which the Triton path beats the CUDA decode kernel (both
    forced), from the same run's timings; ``None`` when CUDA wins at every M measured (or either is missing)."""
    out = []
    for key in sorted({(r["N"], r["K"], r["adapters"]) for r in records}):
        rows = sorted((r for r in records if (r["N"], r["K"], r["adapters"]) == key), key=lambda r: r["M"])
        both = [r for r in rows if "cuda_us" in r and "triton_us" in r]
        first = next((r["M"] for r in both if r["triton_us"] < r["cuda_us"]), None)
        out.append({"N": key[0], "K": key[1], "adapters": key[2], "triton_faster_from_M": first,
                    "measured_M": [r["M"] for r in both]})
    return out


def bench_runtime(args) -> dict:
    """A tiny Llama with 4 adapters: one mixed-adapter decode step (8 sequences x 1 token), eager and as a
    replayed CUDA graph (the graph needs no host sync on the CUDA path)."""
    import transformers

    import xkern

    device = "cpu" if args.dry_run else "cuda"
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    hidden = 64 if args.dry_run else 1024
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 2,
                                   num_hidden_layers=2, num_attention_heads=max(hidden // 64, 1),
                                   num_key_value_heads=max(hidden // 64, 1), max_position_embeddings=256)
    torch.manual_seed(0)
    xm = xkern.load_model(transformers.LlamaForCausalLM(cfg).eval(), dtype=dtype, device=device, progress=False)
    names = [f"a{i}" for i in range(4)]
    for i, name in enumerate(names):
        xm.add_adapter(name, r=16, seed=i, init_lora_weights=False)
    batch = 8
    ids = torch.randint(5, 500, (batch, 1), device=device)
    adapters = [names[i % 4] for i in range(batch)]
    reps, inner = (3, 1) if args.dry_run else (10, 20)
    timer = _timer(device, reps, inner)
    rows = []
    with torch.no_grad():
        step = (lambda: xm(ids, adapter_names=adapters, use_cache=False).logits)
        eager = step()
        rows.append({"config": "decode_step_eager", "median_ms": round(timer(step) * 1e3, 3), "batch": batch})
        if device == "cuda":
            graph, out = xm.capture_cuda_graph(ids.clone(), adapters, use_cache=False)
            graph.replay()
            torch.cuda.synchronize()
            err = float((out.float() - eager.float()).abs().max())
            rows.append({"config": "decode_step_cuda_graph", "median_ms": round(timer(graph.replay) * 1e3, 3),
                         "batch": batch, "max_abs_diff_vs_eager": err})
    for r in rows:
        print(json.dumps(r), flush=True)
    return {"kind": "xkern-gpu-bench-runtime", "dry_run": args.dry_run, "env": _env(device), "hidden": hidden,
            "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["lora_linear", "runtime"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes (CI: the steps run; numbers mean nothing)")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from xkern.fileio import atomic_write_text  # after TRITON_INTERPRET is set: xkern imports its kernels

    t0 = time.perf_counter()
    result = bench_lora_linear(args) if args.what == "lora_linear" else bench_runtime(args)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
