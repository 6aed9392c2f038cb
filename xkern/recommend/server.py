"""``xkern serve``: a Recommender over HTTP (FastAPI), requests batched by one worker.

Endpoints: ``POST /rank`` ({"history", "candidates", "run"?, "k"?}), ``POST /recommend`` ({"history",
"k"?, "run"?, "retriever"?}), ``GET /health``, ``GET /metrics``. A request is read (size-capped), parsed
and resolved to item indices on the event loop, where a mistake is answered at once (400 malformed,
413 too large, 422 unknown items or bad fields); the checked job goes to a bounded queue (full: 503).
One worker thread owns the model: it takes the first waiting job, collects more until
``batch_wait_ms`` after that job arrived (then only the jobs already queued) or until the batch
reaches ``max_batch_tokens`` (prompt and candidate tokens) or ``max_batch_size`` jobs, and scores them
in one mixed-adapter call (:meth:`Recommender.run_jobs`).
A request that waits longer than ``timeout_s`` is answered 504 and dropped if it has not started.
Scoring runs under ``no_grad`` in eval mode: no request changes the model.
"""

import asyncio  # no `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time
import concurrent.futures
import json
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Any

from xkern.errors import InputError, InputKeyError, InputTypeError
from xkern.recommend.recommender import Job, Recommender, check_retriever


@dataclass
class ServeConfig:
    """The server's limits and batching (``xkern serve`` flags of the same names)."""

    batch_wait_ms: float = 5.0  # how long the worker collects requests after the first of a batch
    max_batch_tokens: int = 4096  # prompt + candidate tokens of one batch (a larger single request runs alone)
    max_batch_size: int = 32  # requests in one batch
    max_queue: int = 64  # requests waiting; more are answered 503
    timeout_s: float = 30.0  # a request not answered by then gets 504
    max_body_bytes: int = 65536  # larger bodies get 413
    max_items: int = 1000  # longest history or candidate list (413 beyond)

    def validate(self) -> None:
        for name in ("max_batch_tokens", "max_batch_size", "max_queue", "max_body_bytes", "max_items"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.batch_wait_ms < 0 or self.timeout_s <= 0:
            raise InputError("--batch-wait-ms must be >= 0 and --timeout-s > 0")


class QueueFull(Exception):
    """The bounded queue holds ``max_queue`` requests already."""


@dataclass
class _Pending:
    job: Job
    future: concurrent.futures.Future
    queued: float


class Batcher:
    """The one worker that runs the model: a bounded queue in, batches of jobs through ``run_jobs``, results out."""

    def __init__(self, recommender: Recommender, config: ServeConfig) -> None:
        self.rec, self.cfg = recommender, config
        self.queue: queue.Queue[_Pending] = queue.Queue(maxsize=config.max_queue)
        self.batch_sizes: Counter[int] = Counter()
        self.batch_tokens = 0
        self.cancelled = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="xkern-serve-worker", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Job) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self.queue.put_nowait(_Pending(job, fut, time.monotonic()))
        except queue.Full:
            raise QueueFull from None
        return fut

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _collect(self, first: _Pending) -> tuple[list[_Pending], _Pending | None]:
        batch, tokens = [first], first.job.tokens
        deadline = first.queued + self.cfg.batch_wait_ms / 1000  # a first that waited already waits no more
        while len(batch) < self.cfg.max_batch_size:
            left = deadline - time.monotonic()
            try:  # past the deadline: only what is queued already
                nxt = self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if tokens + nxt.job.tokens > self.cfg.max_batch_tokens:
                return batch, nxt  # it opens the next batch
            batch.append(nxt)
            tokens += nxt.job.tokens
        return batch, None

    def _loop(self) -> None:
        carry: _Pending | None = None
        while not self._stop.is_set():
            if carry is None:
                try:
                    carry = self.queue.get(timeout=0.05)
                except queue.Empty:
                    continue
            batch, carry = self._collect(carry)
            live = [p for p in batch if p.future.set_running_or_notify_cancel()]  # timed out: dropped
            self.cancelled += len(batch) - len(live)
            if not live:
                continue
            self.batch_sizes[len(live)] += 1
            self.batch_tokens += sum(p.job.tokens for p in live)
            try:
                results = self.rec.run_jobs([p.job for p in live])
            except Exception as e:  # noqa: BLE001 - the error belongs to the requests, the worker goes on
                for p in live:
                    p.future.set_exception(e)
                continue
            for p, r in zip(live, results, strict=True):
                p.future.set_result((r, len(live)))


class _Metrics:
    def __init__(self) -> None:
        self.started = time.time()
        self.requests: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.latency_ms: deque[float] = deque(maxlen=10000)

    def quantile(self, q: float) -> float | None:
        if not self.latency_ms:
            return None
        xs = sorted(self.latency_ms)
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _read_json(request: Any, cfg: ServeConfig) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cfg.max_body_bytes:
        raise _Refused(413, f"request body of {declared} bytes is over the limit of {cfg.max_body_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cfg.max_body_bytes:
            raise _Refused(413, f"request body is over the limit of {cfg.max_body_bytes} bytes")
    try:
        value = json.loads(bytes(body))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Refused(400, f"malformed JSON: {e}") from None
    if not isinstance(value, dict):
        raise _Refused(400, f"the body must be a JSON object, got {type(value).__name__}")
    return value


def parse_request(rec: Recommender, body: dict[str, Any], kind: str, max_items: int, default_k: int = 10) -> Job:
    """One user's request (a JSON object) as a checked job; the fields each kind takes, and nothing else."""
    allowed = {"history", "candidates", "run", "k"} if kind == "rank" else {"history", "run", "k", "retriever"}
    extra = sorted(set(body) - allowed)
    if extra:
        raise InputError(f"unknown field(s) {extra} (a {kind} request takes {sorted(allowed)})")
    if "history" not in body:
        raise InputError("missing field 'history' (a list of item ids or titles, oldest first; [] for none)")
    run = body.get("run")
    if run is not None and not isinstance(run, str):
        raise InputTypeError(f"run must be a string, got {type(run).__name__}")
    k = body.get("k", None if kind == "rank" else default_k)
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise InputError(f"k must be an integer >= 1, got {k!r}")
    for key in ("history", "candidates"):
        if isinstance(body.get(key), list) and len(body[key]) > max_items:
            raise _Refused(413, f"{key} lists {len(body[key])} items, over the limit of {max_items}")
    if kind == "rank":
        if "candidates" not in body:
            raise InputError("missing field 'candidates' (a list of item ids or titles to rank)")
        job = rec.rank_job(body["history"], body["candidates"], run)
        job.k = k
        return job
    retriever = body.get("retriever")
    if retriever is not None:
        check_retriever(retriever)
    return rec.recommend_job(body["history"], k, run, retriever)


def create_app(rec: Recommender, config: ServeConfig | None = None) -> Any:
    """The FastAPI application over ``rec``; its worker starts with the app and stops at shutdown."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    cfg = config or ServeConfig()
    cfg.validate()
    metrics = _Metrics()
    state: dict[str, Batcher] = {}

    @asynccontextmanager
    async def lifespan(app: Any):
        state["batcher"] = app.state.batcher = Batcher(rec, cfg)
        try:
            yield
        finally:
            state.pop("batcher").close()

    app = FastAPI(title="xkern recommender", lifespan=lifespan)

    def answer(status: int, payload: dict[str, Any], t0: float) -> JSONResponse:
        metrics.statuses[status] += 1
        metrics.latency_ms.append((time.perf_counter() - t0) * 1000)
        return JSONResponse(payload, status_code=status, headers={"Retry-After": "1"} if status == 503 else None)

    async def handle(request: Request, kind: str) -> JSONResponse:
        t0 = time.perf_counter()
        metrics.requests[kind] += 1
        try:
            job = parse_request(rec, await _read_json(request, cfg), kind, cfg.max_items)
        except _Refused as e:
            return answer(e.status, {"error": str(e)}, t0)
        except (InputError, InputKeyError, InputTypeError) as e:  # unknown items, bad fields
            return answer(422, {"error": str(e)}, t0)
        try:
            fut = state["batcher"].submit(job)
        except QueueFull:
            return answer(503, {"error": f"the queue is full ({cfg.max_queue} requests waiting); retry later"}, t0)
        try:
            ranking, batch = await asyncio.wait_for(asyncio.wrap_future(fut), cfg.timeout_s)
        except asyncio.TimeoutError:
            return answer(504, {"error": f"not answered within {cfg.timeout_s} s"}, t0)
        except Exception as e:  # noqa: BLE001 - the model failed on this batch; the server goes on
            return answer(500, {"error": f"{type(e).__name__}: {e}"}, t0)
        return answer(200, {**ranking.to_dict(), "batch_size": batch}, t0)

    @app.post("/rank")
    async def rank(request: Request) -> JSONResponse:
        return await handle(request, "rank")

    @app.post("/recommend")
    async def recommend(request: Request) -> JSONResponse:
        return await handle(request, "recommend")

    @app.get("/health")
    async def health() -> JSONResponse:
        b = state.get("batcher")
        ok = b is not None and b.alive
        return JSONResponse({"status": "ok" if ok else "down", "runs": rec.runs,
                             "queued": b.queue.qsize() if b else 0}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def get_metrics() -> JSONResponse:
        b = state.get("batcher")
        sizes = b.batch_sizes if b else Counter()
        n_batches = sum(sizes.values())
        return JSONResponse({
            "uptime_s": round(time.time() - metrics.started, 3), "requests": dict(metrics.requests),
            "responses": {str(k): v for k, v in sorted(metrics.statuses.items())},
            "queued": b.queue.qsize() if b else 0, "batches": n_batches,
            "batch_size_mean": round(sum(k * v for k, v in sizes.items()) / n_batches, 3) if n_batches else None,
            "batch_size_max": max(sizes, default=None), "batch_sizes": {str(k): v for k, v in sorted(sizes.items())},
            "batch_tokens_total": b.batch_tokens if b else 0, "timed_out_before_start": b.cancelled if b else 0,
            "latency_ms_p50": metrics.quantile(0.5), "latency_ms_p99": metrics.quantile(0.99),
            "config": asdict(cfg)})

    return app
