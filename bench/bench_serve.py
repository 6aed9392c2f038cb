"""``xkern serve`` on loopback: closed-loop clients, batched against one request at a time.

One run folder (``--run``; by default a tiny LoRA trained here on the synthetic Tools domain, seconds
on a CPU) is loaded once and served twice in this process on ``127.0.0.1``: ``batched`` (the defaults:
requests collected for ``--batch-wait-ms``, up to 32 a batch) and ``one-at-a-time`` (no wait, batches
of one). In each mode ``--clients`` threads send ``POST /recommend`` (or ``/rank`` with ``--kind rank``)
for test users of the domain, each waiting for its answer before the next request (closed loop),
until ``--requests`` are answered or ``--seconds`` pass. Recorded per mode: requests per second,
p50 / p99 latency, the batch sizes the server ran (``/metrics``), the status codes; and the machine:
CPU model, cores, torch threads, load average before and after.

    python bench/bench_serve.py --clients 8 --requests 200

Writes ``bench/results/<date>-serve-cpu.json``. The clients share the process (and the GIL) with the
server, so the numbers are a floor for a server with its own process.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scoring import cpu_model  # noqa: E402

MODES = {"batched": {}, "one-at-a-time": {"batch_wait_ms": 0.0, "max_batch_size": 1}}


def train_run(out: Path) -> str:
    from xkern.cli import main

    rc = main(["train-lora", "--data", "synthetic", "--model", "tiny", "--dtype", "float32", "--domain", "Tools",
               "--max-steps", "20", "--lr", "1e-2", "--batch-size", "8", "--max-train-users", "64",
               "--max-val-users", "8", "--no-progress", "--out", str(out)])
    if rc != 0:
        raise SystemExit(f"training the benchmark's run failed ({rc})")
    return str(out)


def closed_loop(url: str, bodies: list[dict], path: str, clients: int, requests: int, seconds: float) -> dict:
    """``clients`` threads, each sending its next body when the last is answered; latencies in ms."""
    import httpx

    lock, latencies, statuses = threading.Lock(), [], {}
    sent = [0]
    deadline = time.monotonic() + seconds

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while time.monotonic() < deadline:
                with lock:
                    if sent[0] >= requests:
                        return
                    n = sent[0]
                    sent[0] += 1
                t0 = time.perf_counter()
                r = c.post(path, json=bodies[n % len(bodies)])
                ms = (time.perf_counter() - t0) * 1000
                with lock:
                    latencies.append(ms)
                    statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.asarray(latencies)
    return {"answered": len(latencies), "seconds": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 2),
            "latency_ms_p50": round(float(np.percentile(lat, 50)), 2),
            "latency_ms_p99": round(float(np.percentile(lat, 99)), 2), "statuses": statuses}


def serve_mode(rec, mode: dict, bodies: list[dict], args: argparse.Namespace) -> dict:
    import httpx
    import uvicorn

    from xkern.recommend.server import ServeConfig, create_app

    cfg = ServeConfig(**mode)
    server = uvicorn.Server(uvicorn.Config(create_app(rec, cfg), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        end = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > end:
                raise SystemExit("the server did not start within 30 s")
            time.sleep(0.01)
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        url = f"http://{host}:{port}"
        path = f"/{args.kind}"
        closed_loop(url, bodies, path, 1, 2, 30)  # warm-up: first calls of the kernels and the tokenizer caches
        out = closed_loop(url, bodies, path, args.clients, args.requests, args.seconds)
        m = httpx.get(f"{url}/metrics").json()
        out.update(batches=m["batches"], batch_size_mean=m["batch_size_mean"], batch_size_max=m["batch_size_max"],
                   batch_sizes=m["batch_sizes"], config=m["config"])
        return out
    finally:
        server.should_exit = True
        thread.join(30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="run folder to serve (default: train a tiny LoRA here)")
    p.add_argument("--kind", choices=("recommend", "rank"), default="recommend")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=200, help="answered requests per mode")
    p.add_argument("--seconds", type=float, default=120.0, help="time cap per mode")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--candidates", type=int, default=20, help="--kind rank: candidates per request")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import xkern

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or train_run(Path(tmp) / "run")
        rec = xkern.load_recommender(run)
    data = rec.domain()
    _, hists, _ = data.examples("test")
    rng = np.random.default_rng(0)
    bodies = []
    for h in hists:
        body = {"history": [data.item_ids[i] for i in h]}
        if args.kind == "rank":
            body["candidates"] = rng.choice(data.n_items, args.candidates, replace=False).tolist()
        else:
            body["k"] = args.k
        bodies.append(body)
    results = {name: serve_mode(rec, mode, bodies, args) for name, mode in MODES.items()}
    b, one = results["batched"], results["one-at-a-time"]
    payload = {
        "kind": "xkern-bench-serve", "date": dt.date.today().isoformat(), "endpoint": f"/{args.kind}",
        "run": "a tiny LoRA on synthetic Tools, trained by the benchmark" if args.run is None else args.run,
        "clients": args.clients, "requests_per_mode": args.requests, "seconds_cap": args.seconds, "k": args.k,
        "candidates": args.candidates if args.kind == "rank" else None, "top_n": rec.top_n,
        "retriever": rec.retriever, "modes": results,
        "speedup_requests_per_s": round(b["requests_per_s"] / one["requests_per_s"], 2),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
    }
    from xkern.fileio import atomic_write_text

    out = atomic_write_text(args.out or ROOT / "bench" / "results" / f"{payload['date']}-serve-cpu.json",
                            json.dumps(payload, indent=2) + "\n")
    print("\n".join(f"{name:14s} {r['requests_per_s']:8.2f} req/s  p50 {r['latency_ms_p50']:8.1f} ms  p99 "
                    f"{r['latency_ms_p99']:8.1f} ms  batches: mean {r['batch_size_mean']}, max {r['batch_size_max']}"
                    for name, r in results.items()) + f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
