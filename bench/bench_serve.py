"""Serving on the CPU: ``rank_batch`` against one user at a time, and ``xkern serve`` on loopback under load.

Three runs over one base (``--run``, repeat; by default three tiny LoRAs trained here on the synthetic
Tools, Toys and Sports domains over one tiny base, seconds on a CPU) are loaded once.

* ``rank_batch``: ``--users`` test users spread over the runs' domains, each with ``--batch-candidates``
  candidates (the target and seeded uniform items), ranked by one ``Recommender.rank_batch`` call
  (every user in one mixed-adapter forward, prompt KV shared per user) and by one ``rank`` call per
  user; best of ``--repeats`` each, and the largest difference between the two scores of any item.
* ``serve``: ``xkern serve`` over the same runs, started as its own process on ``127.0.0.1`` in two
  modes: ``batched`` (its defaults, ``--max-batch-tokens`` aside: requests collected for 5 ms, up to 32 a
  batch) and ``one-at-a-time`` (no wait, batches of one). At each offered load (``--clients``: closed-loop
  client threads here, each sending its next ``POST /recommend`` (or ``/rank``) for a user of one of the
  domains when the last is answered, until ``--requests`` are answered or ``--seconds`` pass) recorded:
  requests per second, p50 / p99 latency, status codes, and the batch sizes the server ran (``/metrics``).
  The table compares the modes at the load where each peaks.

With the machine: CPU model, cores, torch threads, load average before and after.

    python bench/bench_serve.py --clients 1,4,8,16,32 --requests 200

Writes ``bench/results/<date>-serve-cpu.json`` (``--device cuda``: ``-serve-cuda.json``, the GPU script's step).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from xkern.ops.backends.cpu_native import cpu_model  # noqa: E402

MODES = {"batched": [], "one-at-a-time": ["--batch-wait-ms", "0", "--max-batch-size", "1"]}
DOMAINS = ("Tools", "Toys", "Sports")


def train_runs(root: Path, steps: int = 20) -> list[str]:
    """Three tiny LoRAs, one per synthetic domain, over one tiny base (built from the three domains)."""
    from xkern.cli import main

    out = []
    for d in DOMAINS:
        rc = main(["train-lora", "--data", "synthetic", "--model", "tiny", "--dtype", "float32", "--domain", d,
                   "--train-domains", ",".join(DOMAINS), "--max-steps", str(steps), "--lr", "1e-2", "--batch-size", "8",
                   "--max-train-users", "64", "--max-val-users", "8", "--no-progress", "--out", str(root / d)])
        if rc != 0:
            raise SystemExit(f"training the benchmark's {d} run failed ({rc})")
        out.append(str(root / d))
    return out


README_HISTORY = ["SYN-Tools-00003", "SYN-Tools-00007"]


def readme_lines(root: Path) -> dict:
    """The README's lines from a trained run to a recommendation, each timed as a user runs it (the commands
    as processes, the Python lines in this one)."""
    import xkern

    run = root / "train-lora"
    out: dict = {}

    def shell(name: str, cmd: list[str], stdin: str | None = None) -> str:
        t0 = time.perf_counter()
        done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed ({done.returncode}): {done.stderr[-2000:]}")
        out[name] = round(time.perf_counter() - t0, 3)
        return done.stdout

    xkern_cmd = [sys.executable, "-m", "xkern.cli"]
    shell("xkern train-lora", [*xkern_cmd, "train-lora", "--data", "synthetic", "--domain", "Tools", "--model", "tiny",
                               "--max-steps", "20", "--out", str(run), "--no-progress"])
    t0 = time.perf_counter()
    rec = xkern.load_recommender(run)
    out["xkern.load_recommender"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    rec.rank(README_HISTORY, candidates=[1, 2, 9])
    out["rec.rank (first call)"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    answer = rec.recommend(README_HISTORY, k=5)
    out["rec.recommend"] = round(time.perf_counter() - t0, 3)
    line = shell("xkern recommend", [*xkern_cmd, "recommend", str(run)],
                 json.dumps({"history": README_HISTORY, "k": 5}) + "\n")
    if json.loads(line)["items"][0]["item"] != answer.items[0].item:
        raise SystemExit("xkern recommend and Recommender.recommend disagree on the same run")
    return {"seconds": out, "top_item": answer.items[0].item}


def users_across_runs(rec, n: int, candidates: int, seed: int = 0) -> tuple[list, list, list]:
    """``n`` test users taken in turn from each run's domain: (histories, candidate lists, runs), item ids."""
    rng = np.random.default_rng(seed)
    per_run = {name: rec.domain(name).examples("test") for name in rec.runs}
    hists, cands, runs = [], [], []
    for i in range(n):
        name = rec.runs[i % len(rec.runs)]
        d = rec.domain(name)
        _, hs, ts = per_run[name]
        h, t = hs[i // len(rec.runs) % len(hs)], ts[i // len(rec.runs) % len(hs)]
        others = rng.choice(np.setdiff1d(np.arange(d.n_items), [t]), candidates - 1, replace=False)
        hists.append([d.item_ids[j] for j in h])
        cands.append([d.item_ids[int(j)] for j in [t, *others]])
        runs.append(name)
    return hists, cands, runs


def rank_batch_bench(rec, users: int, candidates: int, repeats: int) -> dict:
    """One ``rank_batch`` over every user against a ``rank`` call per user: throughput and score agreement."""
    hists, cands, runs = users_across_runs(rec, users, candidates)
    rec.rank_batch(hists, cands, runs)  # warm-up: the kernels' first calls at these shapes, the tokenizer caches
    rec.rank(hists[0], cands[0], runs[0])
    batched, single = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        together = rec.rank_batch(hists, cands, runs)
        batched.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        alone = [rec.rank(h, c, r) for h, c, r in zip(hists, cands, runs, strict=True)]
        single.append(time.perf_counter() - t0)
    diff = max(abs(a.score - {s.item: s.score for s in b.items}[a.item])
               for x, b in zip(together, alone, strict=True) for a in x.items)
    pairs = list(zip(together, alone, strict=True))
    same_order = all([s.item for s in x.items] == [s.item for s in b.items] for x, b in pairs)
    return {"users": users, "candidates": candidates, "runs": list(rec.runs), "repeats": repeats,
            "batched_seconds": round(min(batched), 4), "one_at_a_time_seconds": round(min(single), 4),
            "batched_users_per_s": round(users / min(batched), 2),
            "one_at_a_time_users_per_s": round(users / min(single), 2),
            "speedup": round(min(single) / min(batched), 2), "max_abs_score_difference": float(diff),
            "same_order": same_order}


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_mode(runs: list[str], flags: list[str], bodies: list[dict], levels: list[int],
               args: argparse.Namespace) -> dict:
    """``xkern serve`` in its own process with ``flags``; the closed loop at every offered load."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "xkern.cli", "serve", *runs, "--port", str(port), "--threads", str(args.threads),
           "--max-batch-tokens", str(args.max_batch_tokens), *(["--device", args.device] if args.device else []),
           *flags]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise SystemExit(f"xkern serve exited ({server.returncode}): {server.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                raise SystemExit("the server did not start within 120 s")
            time.sleep(0.2)
        path = f"/{args.kind}"
        closed_loop(url, bodies, path, 1, 3, 30)  # warm-up: first calls of the kernels and the tokenizer caches
        out = {"command": "xkern serve RUNS " + " ".join(cmd[cmd.index("--port") + 2:]), "loads": {}}
        for clients in levels:
            before = httpx.get(f"{url}/metrics").json()["batch_sizes"]
            r = closed_loop(url, bodies, path, clients, args.requests, args.seconds)
            after = httpx.get(f"{url}/metrics").json()
            sizes = {k: v - before.get(k, 0) for k, v in after["batch_sizes"].items() if v - before.get(k, 0)}
            n = sum(sizes.values())
            r.update(batches=n, batch_size_mean=round(sum(int(k) * v for k, v in sizes.items()) / max(n, 1), 2),
                     batch_size_max=max((int(k) for k in sizes), default=0), batch_sizes=sizes)
            out["loads"][str(clients)] = r
            print(f"  {clients:3d} clients: {r['requests_per_s']:8.2f} req/s  p50 {r['latency_ms_p50']:8.1f} ms  "
                  f"p99 {r['latency_ms_p99']:8.1f} ms  batch mean {r['batch_size_mean']}", flush=True)
        out["config"] = after["config"]
        peak = max(out["loads"], key=lambda k: out["loads"][k]["requests_per_s"])
        out["peak"] = {"clients": int(peak), **{k: out["loads"][peak][k] for k in
                                                 ("requests_per_s", "latency_ms_p50", "latency_ms_p99", "statuses")}}
        return out
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", default=None,
                   help="run folder (repeat; default: three tiny LoRAs trained here)")
    p.add_argument("--kind", choices=("recommend", "rank"), default="recommend")
    p.add_argument("--clients", default="1,4,8,16,32", help="offered loads: closed-loop clients, comma-separated")
    p.add_argument("--requests", type=int, default=200, help="answered requests per load and mode")
    p.add_argument("--seconds", type=float, default=60.0, help="time cap per load and mode")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--candidates", type=int, default=20, help="--kind rank: candidates per request")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="the server's batch token budget")
    p.add_argument("--users", type=int, default=64, help="rank_batch: users")
    p.add_argument("--batch-candidates", type=int, default=30, help="rank_batch: candidates per user")
    p.add_argument("--repeats", type=int, default=3, help="rank_batch: timed repeats (best kept)")
    p.add_argument("--train-steps", type=int, default=20, help="steps of each tiny run trained here")
    p.add_argument("--skip-serve", action="store_true", help="no server runs")
    p.add_argument("--skip-readme", action="store_true", help="do not time the README's lines")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads here and in the server (default 1: the clients share the machine's cores, "
                        "and on 2 cores a second spinning OpenMP thread starves them and the server's event loop)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: where the runs' base loads)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import xkern

    levels = [int(c) for c in args.clients.split(",") if c]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        readme = None if args.skip_readme else readme_lines(Path(tmp))
        runs = args.run or train_runs(Path(tmp), args.train_steps)
        rec = xkern.load_recommender(runs, device=args.device)
        rank_batch = rank_batch_bench(rec, args.users, args.batch_candidates, args.repeats)
        print(f"rank_batch: {rank_batch['batched_users_per_s']} users/s batched, "
              f"{rank_batch['one_at_a_time_users_per_s']} one at a time ({rank_batch['speedup']}x), "
              f"max score difference {rank_batch['max_abs_score_difference']:.2e}", flush=True)
        hists, cands, names = users_across_runs(rec, 256, args.candidates)
        bodies = [{"history": h, "run": r, **({"candidates": c} if args.kind == "rank" else {"k": args.k})}
                  for h, c, r in zip(hists, cands, names, strict=True)]
        top_n, retriever = rec.top_n, rec.retriever
        del rec
        results = {}
        if not args.skip_serve:
            for name, flags in MODES.items():
                print(f"{name}:", flush=True)
                results[name] = serve_mode(runs, flags, bodies, levels, args)
    payload = {
        "kind": "xkern-bench-serve", "date": dt.date.today().isoformat(), "endpoint": f"/{args.kind}",
        "runs": "three tiny LoRAs (synthetic Tools, Toys, Sports over one tiny base), trained by the benchmark"
        if args.run is None else args.run,
        "readme": readme, "rank_batch": rank_batch, "offered_loads": levels, "requests_per_load": args.requests,
        "seconds_cap": args.seconds, "k": args.k, "candidates": args.candidates if args.kind == "rank" else None,
        "top_n": top_n, "retriever": retriever, "modes": results,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": args.threads,
                    "python": platform.python_version(), "torch": torch.__version__,
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "command": "python bench/bench_serve.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    if results:
        b, one = results["batched"]["peak"], results["one-at-a-time"]["peak"]
        payload["speedup_at_peak"] = round(b["requests_per_s"] / one["requests_per_s"], 2)
    from xkern.fileio import atomic_write_text

    where = "cuda" if args.device == "cuda" else "cpu"
    payload["machine"]["device"] = where
    if where == "cuda":
        payload["machine"]["gpu"] = torch.cuda.get_device_name()
    out = atomic_write_text(args.out or ROOT / "bench" / "results" / f"{payload['date']}-serve-{where}.json",
                            json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
