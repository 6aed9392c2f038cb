"""Microbenchmark: the fused NF4 + multi-adapter LoRA linear against separate-launch baselines.

Baselines, measured in the same run on the same inputs:
  (a) bitsandbytes ``matmul_4bit`` + a PEFT-style LoRA loop (one matmul pair per adapter present),
  (b) a dense ``F.linear`` (bf16 on GPU, the activation dtype on CPU) + the same LoRA loop.

On a GPU it also reports achieved GB/s and the fraction of a device-to-device copy bandwidth
measured in the same run, rotating through enough weight copies that L2 holds none of them. On the
CPU, xkern runs its torch reference path (Triton only has an interpreter there) on smaller shapes.

    python bench/bench_lora_linear.py              # CPU, small shapes
    python bench/bench_lora_linear.py --quick      # fewer shapes (smoke run)
    python bench/bench_lora_linear.py --device cuda

Writes ``bench/results/<date>-lora_linear-<device>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
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
from xkern.ops import lora_linear, select_backend

GPU_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N, K): Llama-8B projections
GPU_MS = [1, 8, 64, 512, 4096]
CPU_SHAPES = [(1024, 1024), (2048, 1024), (1024, 2048)]
CPU_MS = [1, 8, 64, 512]
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


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="one shape, fewer M values")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
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
