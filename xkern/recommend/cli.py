"""``xkern recommend`` (JSONL in, JSONL out) and ``xkern serve`` (HTTP), registered from here.

Both load runs with :func:`xkern.recommend.load_recommender`, which checks every file before the model
loads; a mistake is one line and exit 2 like every command (``xkern/cli.py``). In ``recommend`` a bad
input line is not a mistake of the command: it gets an error object naming its line, and the others go on.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from xkern.commands import out_option, positive, run_options
from xkern.errors import InputError, NotFoundError, XkernError


def _port(text: str) -> int:
    value = positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (1-65535), got {value}")
    return value


def recommender_options() -> argparse.ArgumentParser:
    """What both commands load and how ``recommend`` requests retrieve."""
    from xkern.recommend.recommender import RETRIEVERS

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--data", dest="data_root", default=None,
                   help="data root holding the runs' domains (default: the one each run recorded; give it when the "
                        "data moved)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: where the model loads)")
    p.add_argument("--retriever", choices=RETRIEVERS, default="popularity",
                   help="first stage of a recommendation over the whole catalogue (default popularity)")
    p.add_argument("--top-n", type=positive, default=50,
                   help="items the retriever proposes for the model to re-rank (default 50)")
    p.add_argument("--calibrate", action="store_true",
                   help="score a title by its likelihood minus its likelihood after an empty history (the "
                        "evaluation's pmi mode; likelihood runs and likelihood X-Cross)")
    return p


def _load(args: argparse.Namespace, dirs: list[str]) -> Any:
    from xkern.recommend.recommender import load_recommender

    return load_recommender(dirs, device=args.device, data=args.data_root, retriever=args.retriever,
                            top_n=args.top_n, calibrate=args.calibrate)


# --------------------------------------------------------------------------------------------- recommend

def _lines(stream: Any) -> Iterator[tuple[int, str | None, str | None]]:
    """``(line number, text, error)`` of each non-blank line of a binary stream; undecodable lines carry an error."""
    for n, raw in enumerate(stream, 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield n, None, f"not UTF-8: {e}"
            continue
        if text.strip():
            yield n, text, None


def recommend_lines(rec: Any, lines: Iterable[tuple[int, str | None, str | None]], out: TextIO, k: int = 10,
                    batch_size: int = 16, progress: Any = None) -> tuple[int, int]:
    """Answer each JSON line (one user) with one JSON line, in input order, ``batch_size`` users per scoring
    call; a line that cannot be answered gets ``{"line": N, "error": ...}``. Returns (answered, errors)."""
    from xkern.recommend.server import _Refused, parse_request

    answered = errors = 0
    pending: list[tuple[int, Any]] = []

    def flush() -> None:
        nonlocal answered, errors
        jobs = [j for _, j in pending if not isinstance(j, str)]
        results = iter(rec.run_jobs(jobs) if jobs else [])
        for n, j in pending:
            if isinstance(j, str):
                errors += 1
                out.write(json.dumps({"line": n, "error": j}) + "\n")
            else:
                answered += 1
                out.write(json.dumps({"line": n, **next(results).to_dict()}) + "\n")
        out.flush()
        if progress is not None:
            progress.update(len(pending))
        pending.clear()

    for n, text, error in lines:
        item: Any = error
        if error is None:
            try:
                body = json.loads(text)
                if not isinstance(body, dict):
                    raise InputError(f"a line must be a JSON object, got {type(body).__name__}")
                item = parse_request(rec, body, "rank" if "candidates" in body else "recommend", sys.maxsize, k)
            except json.JSONDecodeError as e:
                item = f"malformed JSON: {e}"
            except (XkernError, _Refused) as e:
                item = str(e)
        pending.append((n, item))
        if sum(not isinstance(j, str) for _, j in pending) >= batch_size:
            flush()
    flush()
    return answered, errors


def cmd_recommend(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.input != "-" and not Path(args.input).is_file():
        raise NotFoundError(f"--input {args.input} not found")
    rec = _load(args, [args.run_dir])
    source = sys.stdin.buffer if args.input == "-" else open(args.input, "rb")  # noqa: SIM115 - closed below
    out = sys.stdout if args.out is None else open(args.out, "w", encoding="utf-8")  # noqa: SIM115
    try:
        with tqdm(unit="user", desc="recommend", disable=args.no_progress, file=sys.stderr) as bar:
            answered, errors = recommend_lines(rec, _lines(source), out, args.k, args.batch_size, bar)
    finally:
        if source is not sys.stdin.buffer:
            source.close()
        if out is not sys.stdout:
            out.close()
    if not args.no_progress:
        print(f"{answered} user(s) answered, {errors} line(s) with an error", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------- serve

def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from xkern.recommend.server import ServeConfig, create_app
    except ImportError as e:
        raise InputError(f"xkern serve needs fastapi and uvicorn ({e.name} is missing): pip install 'xkern[serve]'") \
            from None
    cfg = ServeConfig(batch_wait_ms=args.batch_wait_ms, max_batch_tokens=args.max_batch_tokens,
                      max_batch_size=args.max_batch_size, max_queue=args.max_queue, timeout_s=args.timeout_s,
                      max_body_bytes=args.max_body_bytes, max_items=args.max_items)
    cfg.validate()  # before the model loads
    rec = _load(args, list(args.run_dirs))
    app = create_app(rec, cfg)
    print(f"xkern serve: runs {', '.join(rec.runs)} on http://{args.host}:{args.port} (POST /rank, POST /recommend, "
          f"GET /health, GET /metrics)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``recommend`` and ``serve`` to the ``xkern`` command."""
    from xkern.recommend.server import ServeConfig

    p = sub.add_parser("recommend", parents=[run_options(seed=False), recommender_options(),
                                             out_option("JSONL output file", default_text="stdout", file=True)],
                       help="rank or recommend items for users of a trained run (JSONL in, JSONL out)",
                       description="Read one user a line ({\"history\": [...], \"candidates\": [...] optional, "
                       "\"k\": optional}: item ids or titles of the run's domain, oldest first), write one JSON "
                       "line each in input order: the candidates ranked, or without candidates the k best items "
                       "of the catalogue (the retriever's top N re-ranked by the model).")
    p.add_argument("run_dir", help="a run folder of train-lora, train-xcross or weave (holding run.json)")
    p.add_argument("--input", default="-", help="JSONL file (default: stdin)")
    p.add_argument("--k", type=positive, default=10, help="items per recommendation when a line gives no k")
    p.add_argument("--batch-size", type=positive, default=16, help="users scored together (default 16)")
    p.set_defaults(func=cmd_recommend)

    d = ServeConfig()
    q = sub.add_parser("serve", parents=[run_options(seed=False), recommender_options()],
                       help="serve trained runs over HTTP (POST /rank, POST /recommend)",
                       description="Serve one or more runs over one base over HTTP: requests are batched for a few "
                       "ms and scored together by one worker; a full queue answers 503, a slow request 504.")
    q.add_argument("run_dirs", nargs="+", help="run folders (over one base)")
    q.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    q.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    for flag, kind, what in (("batch-wait-ms", float, "how long a batch collects requests after its first"),
                             ("max-batch-tokens", positive, "prompt + candidate tokens per batch"),
                             ("max-batch-size", positive, "requests per batch"),
                             ("max-queue", positive, "requests waiting before 503"),
                             ("timeout-s", float, "seconds before a request gets 504"),
                             ("max-body-bytes", positive, "largest request body"),
                             ("max-items", positive, "longest history or candidate list")):
        default = getattr(d, flag.replace("-", "_"))
        q.add_argument(f"--{flag}", type=kind, default=default, help=f"{what} (default {default})")
    q.set_defaults(func=cmd_serve)
