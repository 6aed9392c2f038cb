"""Microbenchmark: the fused NF4 + multi-adapter LoRA linear against separate-launch baselines.

On the CPU (``--device cpu``, the default without a GPU) xkern runs its native kernels
(``xkern._cpu`` through ``lora_linear(..., backend="cpu")``, the rows' routing built once as a model
forward does) and is compared, in the same run on the same bytes (quantized once by bitsandbytes), with
  (a) bitsandbytes' default CPU path (``Linear4bit`` in inference: weights repacked, bf16 kernel) +
      a PEFT-style LoRA loop (one matmul pair per adapter present),
  (b) bitsandbytes' exact path (``Linear4bit.support_avx512bf16_for_cpu = False``: dequantize +
      ``F.linear``) + the same LoRA loop,
  (c) a dense ``F.linear`` on the dequantized weight (activation dtype) + the same LoRA loop,
  (d) the memory-bandwidth bound: weight bytes / the copy bandwidth measured in the run,
with every method's max error relative to a float64 reference (divided by the reference's largest
magnitude). Times are medians; ``x vs <baseline>`` = baseline time / xkern time (> 1: xkern faster);
``of bound`` = bound time / xkern time. ``kernel ms`` is the native call alone, without the op layer's
checks and dispatch (the ratios use ``xkern ms``). The machine's load average is recorded in the JSON.

    python bench/bench_lora_linear.py                      # CPU: every shape, M, adapter count, dtype, 1 and 2 threads
    python bench/bench_lora_linear.py --quick              # CPU smoke subset
    python bench/bench_lora_linear.py --shapes 4096x4096 --ms 1,16 --threads 1
    python bench/bench_lora_linear.py --device cuda        # GPU: the fused kernels vs bitsandbytes + LoRA loop

Writes ``bench/results/<date>-lora_linear-<device>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
import torch.nn.functional as F
from tqdm import tqdm

import xkern
from xkern import NF4Tensor
from xkern.ops import RowRouting, lora_linear, select_backend

GPU_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N, K): Llama-8B projections
GPU_MS = [1, 8, 64, 512, 4096]
# (N, K): SmolLM2-135M's projections, then Llama-style square and MLP shapes
CPU_SHAPES = [(576, 576), (1536, 576), (576, 1536), (2048, 2048), (4096, 4096), (14336, 4096)]
CPU_MS = [1, 4, 16, 128, 512]
CPU_DTYPES = [torch.float32, torch.bfloat16]
CPU_THREADS = [1, 2]
QUICK_SHAPES = [(576, 576), (1536, 576)]
QUICK_MS = [1, 16, 128]
QUICK_ADAPTERS = [4]
ADAPTERS = [1, 4, 16]
RANK = 16


def _time_cpu(fn, rotations: int, warmup: int = 3, repeats: int = 15) -> float:
    """Median wall time in ms over ``repeats`` timed calls (each call cycles the weight copies)."""
    for i in range(warmup):
        fn(i % rotations)
    samples = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i % rotations)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _time_gpu(fn, rotations: int) -> float:
    import triton.testing

    state = {"i": 0}

    def step():
        fn(state["i"] % rotations)
        state["i"] += 1

    return triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second) on a 1 GiB buffer."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _time_gpu(lambda _: dst.copy_(src), 1)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def _lora_loop(y, x, lora_A, lora_B, scale, ids, present):
    """PEFT-style: for each adapter present, select its rows and add s * (x A^T) B^T."""
    for a in present:
        rows = ids == a
        xa = x[rows]
        y[rows] += scale[a] * ((xa @ lora_A[a].T) @ lora_B[a].T)
    return y


def bench_case(n: int, k: int, m: int, n_adapters: int, device: torch.device, dtype: torch.dtype,
               rotations: int) -> dict:
    g = torch.Generator().manual_seed(n * 7 + k * 3 + m + n_adapters)
    dense = [(torch.randn(n, k, generator=g) / k**0.5).to(dtype) for _ in range(rotations)]
    # xkern quantizes exactly like bitsandbytes: quantize once with bnb, load the bytes into xkern
    bnb_weights, xk_weights = [], []
    for w in dense:
        packed, state = bnbF.quantize_4bit(w.to(device), blocksize=64, compress_statistics=True, quant_type="nf4")
        bnb_weights.append((packed, state))
        sd = {"w": packed, **{f"w.{key}": v for key, v in state.as_dict(packed=True).items()}}
        xk_weights.append(NF4Tensor.from_bnb_state_dict(sd, "w"))
    dense = [w.to(device, torch.bfloat16 if device.type == "cuda" else dtype) for w in dense]
    lora_A = (torch.randn(n_adapters, RANK, k, generator=g) / k**0.5).to(device, dtype)
    lora_B = (torch.randn(n_adapters, n, RANK, generator=g) * 0.01).to(device, dtype)
    scale = torch.full((n_adapters,), 2.0, device=device)
    scale_list = scale.tolist()
    x = torch.randn(m, k, generator=g).to(device, dtype)
    ids = torch.randint(0, n_adapters, (m,), generator=g).to(device)
    present = sorted(set(ids.tolist()))

    def run_xkern(i):
        return lora_linear(x, xk_weights[i], lora_A, lora_B, scale, ids)

    def run_bnb(i):
        packed, state = bnb_weights[i]
        return _lora_loop(bnb.matmul_4bit(x, packed.t(), quant_state=state), x, lora_A, lora_B, scale_list, ids,
                          present)

    def run_dense(i):
        xd = x.to(dense[i].dtype)
        return _lora_loop(F.linear(xd, dense[i]), xd, lora_A.to(xd.dtype), lora_B.to(xd.dtype), scale_list, ids,
                          present)

    # agreement first: a fast wrong kernel is worth nothing
    ref = run_bnb(0).float()
    err = (run_xkern(0).float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)

    timer = _time_gpu if device.type == "cuda" else _time_cpu
    ms = {name: timer(fn, rotations) for name, fn in
          (("xkern", run_xkern), ("bnb_lora_loop", run_bnb), ("dense_lora_loop", run_dense))}
    w = xk_weights[0]
    moved = w.nbytes + (x.numel() + m * n) * x.element_size() + (lora_A.numel() + lora_B.numel()) * x.element_size()
    rec = {
        "N": n, "K": k, "M": m, "n_adapters": n_adapters, "rank": RANK, "dtype": str(dtype).removeprefix("torch."),
        "backend": select_backend("lora_linear", device),
        "xkern_ms": ms["xkern"], "bnb_lora_loop_ms": ms["bnb_lora_loop"], "dense_lora_loop_ms": ms["dense_lora_loop"],
        "speedup_vs_bnb_lora_loop": ms["bnb_lora_loop"] / ms["xkern"],
        "speedup_vs_dense_lora_loop": ms["dense_lora_loop"] / ms["xkern"],
        "max_rel_err_vs_bnb": err,
        "bytes_moved": int(moved),
        "xkern_gbs": moved / (ms["xkern"] * 1e-3) / 1e9,
        "tflops": 2 * m * n * k * (1 + 2 * RANK / n) / (ms["xkern"] * 1e-3) / 1e12,
    }
    return rec



# ---- CPU ------------------------------------------------------------------------------------------

def _time_cpu_adaptive(fn, min_time: float = 0.3, max_repeats: int = 25, min_repeats: int = 3) -> float:
    """Median wall time in ms: two warm-up calls, then calls until ``min_time`` seconds or ``max_repeats``."""
    fn()
    fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < min_repeats or (len(samples) < max_repeats and time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def cpu_copy_bandwidth_gbs(nbytes: int = 1 << 28) -> float:
    """Copy bandwidth (read + write bytes per second) of a large torch copy on the current thread count."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = min(_time_cpu_adaptive(lambda: dst.copy_(src), min_time=0.5) for _ in range(2))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _bnb_linear(w: torch.Tensor, exact: bool) -> torch.nn.Module:
    """A bitsandbytes NF4 Linear4bit (double quant, blocksize 64) holding ``w``; ``exact`` turns off the bf16 path."""
    n, k = w.shape
    lin = bnb.nn.Linear4bit(k, n, bias=False, compress_statistics=True, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4")
    lin = lin.to("cpu").eval()  # quantizes
    if exact:
        # the flag lives on the module (set from bitsandbytes.functional.has_avx512bf16() in __init__);
        # without it the forward dequantizes and calls F.linear instead of repacking for the bf16 kernel
        lin.support_avx512bf16_for_cpu = False
    return lin


def run_xkern_cpu(x, weight, lora_A, lora_B, scale, routing):
    """xkern's CPU path: the registered ``cpu`` backend (native kernels of ``xkern._cpu``)."""
    return lora_linear(x, weight, lora_A, lora_B, scale, routing, backend="cpu")


def run_xkern_cpu_raw(x, weight, lora_A, lora_B, scale, routing):
    """The native kernel alone (no op-layer checks or dispatch): how much of xkern's time is the kernel."""
    from xkern import _cpu  # type: ignore[attr-defined]

    offset = None if weight.offset is None else weight.offset.reshape(1)
    n, k = weight.shape
    return _cpu.lora_linear_forward(x, weight.packed, weight.absmax, weight.absmax2, weight.code2, offset, n, k,
                                    weight.blocksize, lora_A, lora_B, scale, routing.ids, routing.order,
                                    routing.starts)[0]


def _float64_reference(x, w64, lora_A, lora_B, scale, ids):
    y = x.double() @ w64.T
    for a in sorted(set(ids.tolist()) - {-1}):
        rows = ids == a
        y[rows] += float(scale[a]) * (x[rows].double() @ lora_A[a].double().T) @ lora_B[a].double().T
    return y


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)


def _cpu_shape_state(n: int, k: int) -> dict:
    g = torch.Generator().manual_seed(n * 7 + k * 3)
    w = torch.randn(n, k, generator=g) / k**0.5
    default, exact = _bnb_linear(w, exact=False), _bnb_linear(w, exact=True)
    packed, state = exact.weight.data, exact.weight.quant_state
    sd = {"w": packed, **{f"w.{key}": v for key, v in state.as_dict(packed=True).items()}}
    weight = NF4Tensor.from_bnb_state_dict(sd, "w")  # the same bytes bitsandbytes holds
    return {"weight": weight, "w64": weight.dequantize(torch.float64), "bnb_default": default, "bnb_exact": exact,
            "generator": g}


def bench_cpu_case(state: dict, m: int, n_adapters: int, dtype: torch.dtype, threads: list[int],
                   copy_gbs: dict[int, float]) -> list[dict]:
    """One (shape, M, adapters, dtype) problem, timed on each thread count; errors from one run each."""
    weight, w64, g = state["weight"], state["w64"], state["generator"]
    n, k = weight.shape
    lora_A = (torch.randn(n_adapters, RANK, k, generator=g) / k**0.5).to(dtype)
    lora_B = (torch.randn(n_adapters, n, RANK, generator=g) * 0.01).to(dtype)
    scale = torch.full((n_adapters,), 2.0)
    scale_list = scale.tolist()
    x = torch.randn(m, k, generator=g).to(dtype)
    ids = torch.randint(0, n_adapters, (m,), generator=g)
    present = sorted(set(ids.tolist()))
    routing = RowRouting.build(ids, n_adapters)  # built once per model forward in real use
    dense = w64.to(dtype)

    def bnb_path(module):
        module.compute_dtype, module.compute_type_is_set = dtype, True

        def run():
            with torch.no_grad():
                return _lora_loop(module(x), x, lora_A, lora_B, scale_list, ids, present)
        return run

    methods = {
        "xkern": lambda: run_xkern_cpu(x, weight, lora_A, lora_B, scale, routing),
        "xkern_raw": lambda: run_xkern_cpu_raw(x, weight, lora_A, lora_B, scale, routing),
        "bnb_default": bnb_path(state["bnb_default"]),
        "bnb_exact": bnb_path(state["bnb_exact"]),
        "dense": lambda: _lora_loop(F.linear(x, dense), x, lora_A, lora_B, scale_list, ids, present),
    }
    ref = _float64_reference(x, w64, lora_A, lora_B, scale, ids)
    with torch.no_grad():
        errors = {name: _rel_err(fn(), ref) for name, fn in methods.items()}
    records = []
    for t in threads:
        torch.set_num_threads(t)
        with torch.no_grad():
            ms = {name: _time_cpu_adaptive(fn) for name, fn in methods.items()}
        bound_ms = weight.nbytes / (copy_gbs[t] * 1e9) * 1e3
        rec = {"N": n, "K": k, "M": m, "n_adapters": n_adapters, "rank": RANK,
               "dtype": str(dtype).removeprefix("torch."), "threads": t, "isa": _cpu_isa(),
               "weight_bytes": weight.nbytes, "bound_ms": bound_ms}
        for name in methods:
            rec[f"{name}_ms"] = ms[name]
            rec[f"max_rel_err_{name}"] = errors[name]
        for name in ("bnb_default", "bnb_exact", "dense"):
            rec[f"speedup_vs_{name}"] = ms[name] / ms["xkern"]
        rec["fraction_of_bound"] = bound_ms / ms["xkern"]
        records.append(rec)
    return records


def _cpu_isa() -> str:
    try:
        from xkern import _cpu  # type: ignore[attr-defined]
    except ImportError:
        return "not built"
    return _cpu.isa()


def _parse_list(text: str | None, cast):
    return None if text is None else [cast(v) for v in text.split(",") if v]


def _parse_shape(text: str) -> tuple[int, int]:
    n, k = text.lower().split("x")
    return int(n), int(k)


def cpu_main(args) -> Path:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # the optional kernels-community hub package
    shapes = _parse_list(args.shapes, _parse_shape) or (QUICK_SHAPES if args.quick else CPU_SHAPES)
    ms_list = _parse_list(args.ms, int) or (QUICK_MS if args.quick else CPU_MS)
    adapters = _parse_list(args.adapters, int) or (QUICK_ADAPTERS if args.quick else ADAPTERS)
    dtypes = [getattr(torch, d) for d in (_parse_list(args.dtypes, str) or ["float32", "bfloat16"])]
    threads = _parse_list(args.threads, int) or ([torch.get_num_threads()] if args.quick else CPU_THREADS)
    old_threads = torch.get_num_threads()
    copy_gbs = {}
    for t in threads:
        torch.set_num_threads(t)
        copy_gbs[t] = cpu_copy_bandwidth_gbs()
    torch.set_num_threads(old_threads)
    info = {"device": platform.processor() or platform.machine(), "device_type": "cpu", "torch": torch.__version__,
            "xkern": xkern.__version__, "bitsandbytes": bnb.__version__, "isa": _cpu_isa(),
            "bnb_avx512bf16": bool(bnbF.has_avx512bf16()), "threads": threads, "copy_gbs": copy_gbs,
            "date": dt.datetime.now().isoformat(timespec="seconds")}
    info["load_average_at_start"] = list(os.getloadavg())
    records = []
    cases = [(shape, dtype, m, a) for shape in shapes for dtype in dtypes for m in ms_list for a in adapters]
    state, state_shape = None, None
    for shape, dtype, m, a in tqdm(cases, desc="lora_linear cpu"):
        if shape != state_shape:
            state, state_shape = _cpu_shape_state(*shape), shape
        records += bench_cpu_case(state, m, a, dtype, threads, copy_gbs)
    torch.set_num_threads(old_threads)
    info["load_average_at_end"] = list(os.getloadavg())
    out = args.out or Path(__file__).parent / "results" / f"{dt.date.today()}-lora_linear-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": info, "records": records}, indent=1))
    print(cpu_markdown_table(records))
    print(f"\ncopy bandwidth (read + write) GB/s by threads: {copy_gbs}")
    print(f"wrote {out}")
    return out


def cpu_markdown_table(records: list[dict]) -> str:
    cols = [("N", "N"), ("K", "K"), ("M", "M"), ("n_adapters", "ad"), ("dtype", "dtype"), ("threads", "thr"),
            ("xkern_ms", "xkern ms"), ("xkern_raw_ms", "kernel ms"), ("bnb_default_ms", "bnb ms"),
            ("bnb_exact_ms", "bnb exact ms"),
            ("dense_ms", "dense ms"), ("bound_ms", "bound ms"), ("speedup_vs_bnb_default", "x vs bnb"),
            ("speedup_vs_bnb_exact", "x vs exact"), ("speedup_vs_dense", "x vs dense"),
            ("fraction_of_bound", "of bound"), ("max_rel_err_xkern", "err xkern"),
            ("max_rel_err_bnb_default", "err bnb"), ("max_rel_err_bnb_exact", "err exact"),
            ("max_rel_err_dense", "err dense")]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        cells = [f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c, _ in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="a small smoke subset")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", default=None, help="CPU: comma-separated thread counts (default 1,2)")
    ap.add_argument("--shapes", default=None, help="CPU: comma-separated NxK shapes (default: all)")
    ap.add_argument("--ms", default=None, help="CPU: comma-separated row counts M")
    ap.add_argument("--adapters", default=None, help="CPU: comma-separated adapter counts")
    ap.add_argument("--dtypes", default=None, help="CPU: comma-separated activation dtypes (float32,bfloat16)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        return cpu_main(args)
    on_gpu = True
    shapes, ms = (GPU_SHAPES, GPU_MS) if on_gpu else (CPU_SHAPES, CPU_MS)
    if args.quick:
        shapes, ms = shapes[:1], ms[:3]
    dtype = torch.bfloat16 if on_gpu else torch.float32
    info = {"device": torch.cuda.get_device_name(device) if on_gpu else platform.processor() or platform.machine(),
            "device_type": device.type, "torch": torch.__version__, "xkern": xkern.__version__,
            "bitsandbytes": bnb.__version__, "threads": torch.get_num_threads(),
            "date": dt.datetime.now().isoformat(timespec="seconds")}
    if on_gpu:
        info["copy_gbs"] = copy_bandwidth_gbs(device)
    records = []
    cases = [(n, k, m, a) for n, k in shapes for m in ms for a in ADAPTERS]
    for n, k, m, a in tqdm(cases, desc="lora_linear"):
        # rotate through enough weight copies that they do not fit in a 50 MB L2 together (GPU)
        rotations = max(2, -(-int(2 * 50e6) // (n * k // 2))) if on_gpu else 1
        rec = bench_case(n, k, m, a, device, dtype, rotations)
        if on_gpu:
            rec["fraction_of_copy_bw"] = rec["xkern_gbs"] / info["copy_gbs"]
        records.append(rec)
    out = args.out or Path(__file__).parent / "results" / f"{dt.date.today()}-lora_linear-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": info, "records": records}, indent=1))
    print(markdown_table(records, on_gpu))
    print(f"\nwrote {out}")
    return out


def markdown_table(records: list[dict], on_gpu: bool) -> str:
    cols = ["N", "K", "M", "n_adapters", "xkern_ms", "bnb_lora_loop_ms", "dense_lora_loop_ms",
            "speedup_vs_bnb_lora_loop", "speedup_vs_dense_lora_loop", "max_rel_err_vs_bnb"]
    if on_gpu:
        cols += ["xkern_gbs", "fraction_of_copy_bw"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        cells = [f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
