"""X-Cross layer stack: n streams in one pass vs n separate single-adapter runs vs one single-adapter run.

One NF4 transformer trunk (a Llama-shaped stack, random weights) with LoRA adapters on every linear:

- ``xcross``: ``XCrossModel.stream_hidden`` with n = 2, 3: the n streams stacked on the batch axis
  (each linear is one core-op launch for all streams) and the integrator after every block;
- ``separate``: the same n adapters run one after another, each a single-adapter pass (no mixing);
- ``single``: one single-adapter pass (the cost X-Cross is compared with in DESIGN section 7: <= 1.2x
  at decode sizes on a GPU).

Shapes: ``decode``-like (B sequences x 1 token: the small-M regime) and ``scoring``-like (B
(history, candidate) pairs x T tokens). All timings of one shape come from the same run, interleaved
(median of ``--reps``); the ratios are computed from them. CPU: torch reference path; CUDA: whatever
the dispatch picks, timed with CUDA events after warm-up.

    OMP_NUM_THREADS=2 python bench/bench_xcross.py            # -> bench/results/xcross_<device>.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build(hidden: int, layers: int, n_adapters: int, r: int, device: str, dtype: torch.dtype):
    import transformers

    import xkern

    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 8 * 8,
                                   num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                                   num_key_value_heads=max(hidden // 64, 1), max_position_embeddings=512)
    torch.manual_seed(0)
    xm = xkern.load_model(transformers.LlamaForCausalLM(cfg).eval(), dtype=dtype, device=device, progress=False)
    for i in range(n_adapters):
        xm.add_adapter(f"a{i}", r=r, seed=i, init_lora_weights=False)
    return xm


def timer(device: str):
    if device.startswith("cuda"):
        def run(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def run(fn) -> float:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--streams", default="2,3")
    p.add_argument("--decode-batch", type=int, default=8, help="decode-like: B sequences x 1 token")
    p.add_argument("--score-batch", type=int, default=16, help="scoring-like: B pairs x --score-tokens")
    p.add_argument("--score-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA by default")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from xkern.xcross import XCrossModel

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                           else torch.float32)
    streams = [int(s) for s in args.streams.split(",")]
    xm = build(args.hidden, args.layers, max(streams), args.r, args.device, dtype)
    run = timer(args.device)
    shapes = {"decode": (args.decode_batch, 1), "scoring": (args.score_batch, args.score_tokens)}
    rows = []
    for shape, (batch, tokens) in shapes.items():
        ids = torch.randint(5, 1000, (batch, tokens), device=args.device)
        mask = torch.ones_like(ids)
        for n in streams:
            names = [f"a{i}" for i in range(n)]
            xc = XCrossModel(xm, names).eval()
            with torch.no_grad():
                for w in xc.w_concat:
                    w.normal_(0, 0.01)  # non-zero integrators: the real work
            singles = [XCrossModel(xm, [a]).eval() for a in names]
            fns = {
                "xcross": lambda xc=xc, ids=ids, mask=mask: xc.stream_hidden(ids, mask),
                "separate": lambda singles=singles, ids=ids, mask=mask: [s.stream_hidden(ids, mask) for s in singles],
                "single": lambda singles=singles, ids=ids, mask=mask: singles[0].stream_hidden(ids, mask),
            }
            times: dict[str, list[float]] = {k: [] for k in fns}
            with torch.no_grad():
                for _ in range(args.warmup):
                    for fn in fns.values():
                        fn()
                for _ in range(args.reps):  # interleaved, so that load changes hit every variant alike
                    for k, fn in fns.items():
                        times[k].append(run(fn))
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"shape": shape, "batch": batch, "tokens": tokens, "streams": n,
                   "rows_per_linear_xcross": n * batch * tokens,
                   **{f"{k}_ms": round(v * 1e3, 3) for k, v in med.items()},
                   **{f"{k}_ms_all": [round(t * 1e3, 3) for t in v] for k, v in times.items()},
                   "xcross_over_single": round(med["xcross"] / med["single"], 3),
                   "xcross_over_separate": round(med["xcross"] / med["separate"], 3),
                   "separate_over_single": round(med["separate"] / med["single"], 3)}
            rows.append(row)
            print(f"{shape:8s} B={batch:3d} T={tokens:3d} n={n}: xcross {row['xcross_ms']:9.2f} ms  separate "
                  f"{row['separate_ms']:9.2f} ms  single {row['single_ms']:9.2f} ms  | xcross/single "
                  f"{row['xcross_over_single']:.2f}  xcross/separate {row['xcross_over_separate']:.2f}", flush=True)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    result = {"kind": "xkern-bench-xcross", "device": args.device, "device_name": device_name,
              "threads": torch.get_num_threads(), "dtype": str(dtype), "torch": torch.__version__,
              "config": vars(args), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": rows}
    out = Path(args.out or ROOT / "bench" / "results" / f"xcross_{args.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
