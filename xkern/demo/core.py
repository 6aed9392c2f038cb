"""The quickstart experiment: source domains -> target domain -> one table of methods x data fractions.

Extension point: a method is a `Method(name, build)` where `build(ctx: DemoContext) -> Scorer`.
`default_methods()` lists the methods that exist now; later issues (per-domain LoRA, X-Cross,
WeaveRec) append theirs there or pass `methods=` to `run_demo`. Every method of a run is scored on
the same target-domain candidates (one CandidateSet per run), for every target-data fraction.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from xkern.data.baselines import ItemTransitionScorer, PopularityScorer, RandomScorer, TokenTransitionScorer
from xkern.data.domain import DomainData
from xkern.data.evaluate import Scorer, evaluate_scorer, format_table
from xkern.data.negatives import build_candidates
from xkern.data.splits import subsample_train
from xkern.data.synthetic import SyntheticConfig, make_synthetic
from xkern.demo.methods import DemoContext, Method
from xkern.errors import InputError

METRIC_COLUMNS = ("HR@1", "HR@3", "HR@10", "NDCG@3", "NDCG@10", "MRR")


def _token_markov(use_target: bool) -> Callable[[DemoContext], Scorer]:
    def build(ctx: DemoContext) -> Scorer:
        model = TokenTransitionScorer()
        for d in ctx.sources:
            model.fit(d.train.values(), d.titles)
        if use_target:
            model.fit(ctx.target.train.values(), ctx.target.titles)
        return model.for_domain(ctx.target.titles)

    return build


def default_methods() -> list[Method]:
    """The methods available without the model runtime (non-neural baselines)."""
    return [
        Method(
            "random", lambda ctx: RandomScorer(ctx.seed), "uniform random scores", uses_target_train=False
        ),
        Method(
            "popularity", lambda ctx: PopularityScorer(ctx.target.train, ctx.target.n_items), "train counts"
        ),
        Method(
            "item-markov",
            lambda ctx: ItemTransitionScorer(ctx.target.train, ctx.target.n_items),
            "item-to-item transitions (target only)",
        ),
        Method(
            "token-markov-src",
            _token_markov(use_target=False),
            "title-word transitions, source domains only (zero-shot transfer)",
            uses_target_train=False,
        ),
        Method("token-markov", _token_markov(use_target=True), "title-word transitions, sources + target"),
    ]


@dataclass
class DemoConfig:
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    target: str | None = None  # default: the last domain
    fractions: tuple[float, ...] = (0.25, 1.0)
    n_neg: int = 29
    split: str = "test"
    seed: int = 0
    ks: tuple[int, ...] = (1, 3, 10)
    max_eval_users: int | None = None
    lm: bool = True  # add the model rows (LoRA on a tiny NF4 Llama)
    lm_config: Any = None  # xkern.demo.lm.LMDemoConfig; None = its defaults
    xcross_config: Any = None  # xkern.demo.xcross.XCrossDemoConfig; None = its defaults
    extra: tuple[str, ...] = ("xcross", "weave")  # model rows beyond the LoRA rows (() for LoRA only)
    profile: str = "quick"  # model-row settings when lm_config / xcross_config are None (see profile_configs)

    def __post_init__(self) -> None:  # refused before any row runs (or a worker process starts)
        check_extra(self.extra)


EXTRA_ROWS = ("xcross", "weave")
PROFILES = ("quick", "full")


def check_extra(extra: Sequence[str]) -> None:
    unknown = sorted(set(extra) - set(EXTRA_ROWS))
    if unknown:
        raise InputError(f"unknown extra demo rows {unknown}; choose from {EXTRA_ROWS}")


def profile_configs(profile: str) -> tuple[Any, Any]:
    """``(LMDemoConfig, XCrossDemoConfig)`` of a profile.

    ``full``: the settings the quickstart had before it had to finish in a minute (LoRAs 3 epochs on 2
    positions per user, hybrids too; X-Cross 8 epochs on 5 history titles, 100 validation users).
    ``quick`` (the default): LoRAs 2 epochs (the fewest that still learn the target: at 1-1.5 epochs
    the target LoRA stays near popularity), WeaveRec hybrids on 1 position per user (as many examples
    as the target LoRA, half of ``full``'s), X-Cross 2 epochs on 3 history titles with 32 validation
    users. Both evaluate every row on the same candidates of all test users.
    """
    from xkern.demo.lm import LMDemoConfig
    from xkern.demo.xcross import XCrossDemoConfig

    if profile == "full":
        return LMDemoConfig(), XCrossDemoConfig()
    if profile == "quick":
        return (LMDemoConfig(epochs=2.0, hybrid_max_per_user=1),
                XCrossDemoConfig(epochs=2.0, max_history=3, max_tokens=64, max_val_users=32, patience=2))
    raise InputError(f"unknown demo profile {profile!r}; choose from {PROFILES}")


def model_methods(source_names: Sequence[str], extra: Sequence[str] = ()) -> list[Method]:
    """Rows that run the model runtime: per-domain and target-only LoRA, plus (``extra``) the X-Cross
    rows over the source LoRAs and the WeaveRec rows (hybrid LoRAs and their merge with the target LoRA)."""
    from xkern.demo.lm import lora_methods

    check_extra(extra)
    methods = lora_methods(source_names)
    if "xcross" in extra:
        from xkern.demo.xcross import xcross_methods

        methods += xcross_methods(source_names)
    if "weave" in extra:
        from xkern.demo.weave import weave_methods

        methods += weave_methods(source_names)
    return methods


def row_seed(seed: int, method: str, fraction: float) -> int:
    """The seed every row starts from: a row's result does not depend on which rows ran before it, or where."""
    digest = hashlib.blake2b(repr((int(seed), method, float(fraction))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31)


def _run_jobs(jobs: Sequence[tuple[Method, float]], target: DomainData, sources: list[DomainData], cands: Any,
              cfg: DemoConfig, shared: dict[str, Any], on_row: Callable[[dict[str, Any]], None]) -> None:
    import random

    import numpy as np
    import torch

    for m, frac in jobs:
        rs = row_seed(cfg.seed, m.name, frac)
        torch.manual_seed(rs)
        np.random.seed(rs)
        random.seed(rs)
        sub = replace(target, train=subsample_train(target.train, frac, cfg.seed))
        ctx = DemoContext(sub, sources, frac, cfg.seed, options=shared)
        t1 = time.perf_counter()
        scorer = m.build(ctx)
        fit_s = time.perf_counter() - t1
        metrics = evaluate_scorer(scorer, cands, cfg.ks, desc=m.name)
        eval_s = time.perf_counter() - t1 - fit_s
        frac_label = frac if m.uses_target_train else "-"
        on_row({"method": m.name, "fraction": frac_label, **metrics, "fit_seconds": round(fit_s, 3),
                "eval_seconds": round(eval_s, 3)})


def _plan(cfg: DemoConfig, domains: dict[str, DomainData], methods: Sequence[Method] | None):
    target_name = cfg.target or list(domains)[-1]
    if target_name not in domains:
        raise InputError(f"target {target_name!r} not among domains {list(domains)}")
    target = domains[target_name]
    sources = [d for n, d in domains.items() if n != target_name]
    if methods is None:
        methods = default_methods() + (model_methods([d.name for d in sources], cfg.extra) if cfg.lm else [])
    methods = list(methods)
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise InputError(f"duplicate method names: {names}")
    fractions = sorted(set(cfg.fractions))
    jobs = [(m, f) for m in methods for f in fractions if m.uses_target_train or f == fractions[-1]]
    cands = build_candidates(target, cfg.split, cfg.n_neg, "uniform", cfg.seed, cfg.max_eval_users)
    return target, sources, methods, jobs, cands


def _shared(cfg: DemoConfig, progress: bool) -> dict[str, Any]:
    lm_default, xcross_default = profile_configs(cfg.profile)
    return {"progress": progress, "lm_config": cfg.lm_config or lm_default,
            "xcross_config": cfg.xcross_config or xcross_default}


def _exit_with_parent(poll_seconds: float = 0.5) -> None:
    """A worker whose parent died (SIGKILL, a crash) exits too, not living on under init with the caller's pipes."""
    import multiprocessing as mp
    import threading

    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        while parent.is_alive():
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="xkern-demo-parent-watch", daemon=True).start()


def _worker(queue: Any, cfg: DemoConfig, domains: dict[str, DomainData] | None, group: str, threads: int,
            handoff: str) -> None:
    """A second process: the rows of ``group`` (default methods only), each row put on ``queue`` as it finishes."""
    import traceback

    import torch

    _exit_with_parent()
    torch.set_num_threads(threads)
    try:
        domains = domains if domains is not None else make_synthetic(cfg.synthetic)
        target, sources, _, jobs, cands = _plan(cfg, domains, None)
        shared = {**_shared(cfg, False), "handoff": handoff, "process": "worker"}
        _run_jobs([(m, f) for m, f in jobs if m.group == group], target, sources, cands, cfg, shared,
                  lambda row: queue.put(("row", row)))
        queue.put(("done", shared["lm"].describe() if "lm" in shared else None))
    except BaseException:  # noqa: BLE001  (the parent re-raises it with the child's traceback)
        queue.put(("error", traceback.format_exc()))


def run_demo(
    cfg: DemoConfig,
    methods: Sequence[Method] | None = None,
    domains: dict[str, DomainData] | None = None,
    progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    workers: int = 1,
    threads: int | None = None,
) -> dict[str, Any]:
    """Evaluate every method x fraction on the target domain; returns a JSON-ready dict with rows.

    ``on_row(row)`` is called as each row finishes (the command prints rows as they come).
    ``workers=2`` (default methods only) runs the rows of the ``"sources"`` group (the first source's
    LoRA and X-Cross) in a second process while this one runs the others (handing the other source
    LoRAs over as files, see :func:`xkern.demo.lm.source_lora`), each with ``threads``
    torch threads: on a small CPU two single-threaded processes get through the many small matmuls
    of the tiny model faster than one process with two threads. Every row starts from its own seed
    (:func:`row_seed`), so the table is the same for any number of workers.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    split = workers > 1 and methods is None and cfg.lm
    child, queue, worker_lm, handoff, bar = None, None, [], None, None
    try:
        if split:  # started first: the second process spends its first seconds importing torch and transformers
            import multiprocessing as mp
            import tempfile

            handoff = tempfile.mkdtemp(prefix="xkern-demo-")
            ctx = mp.get_context("spawn")  # fork after torch started its thread pools can deadlock
            queue = ctx.Queue()
            child = ctx.Process(target=_worker, args=(queue, cfg, domains, "sources", threads or 1, handoff),
                                daemon=True)
            child.start()
        domains = domains if domains is not None else make_synthetic(cfg.synthetic)
        target, sources, methods, jobs, cands = _plan(cfg, domains, methods)
        shared = {**_shared(cfg, progress), **({"handoff": handoff, "process": "main"} if split else {})}
        done: dict[tuple[str, Any], dict[str, Any]] = {}
        bar = tqdm(total=len(jobs), desc="demo", unit="row", disable=not progress)

        def finished(row: dict[str, Any]) -> None:
            done[(row["method"], row["fraction"])] = row
            bar.update(1)
            if on_row is not None:
                on_row(row)

        def drain(block: bool) -> None:
            """Take the child's finished rows (``block``: until it says it is done)."""
            import queue as queue_mod

            while not worker_lm:
                try:
                    kind, payload = queue.get(timeout=1.0) if block else queue.get_nowait()
                except queue_mod.Empty:
                    if block and not child.is_alive():
                        raise RuntimeError(f"the demo worker process died (exit code {child.exitcode})") from None
                    if not block:
                        return
                    continue
                if kind == "row":
                    finished(payload)
                elif kind == "error":
                    raise RuntimeError(f"a demo row failed in the worker process:\n{payload}")
                else:
                    worker_lm.append(payload)  # "done", with the worker's trained-adapter summary

        mine = [(m, f) for m, f in jobs if not split or m.group != "sources"]

        def each(row: dict[str, Any]) -> None:
            finished(row)
            if split:
                drain(block=False)

        _run_jobs(mine, target, sources, cands, cfg, shared, each)
        if split:
            drain(block=True)
            child.join(timeout=30)
    finally:
        if bar is not None:
            bar.close()
        if child is not None and child.is_alive():
            child.terminate()
            child.join(timeout=10)
        if handoff is not None:
            import shutil

            shutil.rmtree(handoff, ignore_errors=True)
    rows = [done[(m.name, f if m.uses_target_train else "-")] for m, f in jobs]
    lm = shared["lm"].describe() if "lm" in shared else None
    for other in worker_lm:  # the adapters the worker trained, next to this process's
        if other is not None:
            lm = other if lm is None else {**lm, "adapters": {**lm["adapters"], **other["adapters"]}}
    return {
        "kind": "xkern-demo",
        "config": _config_dict(cfg),
        "target": target.name,
        "sources": [d.name for d in sources],
        "stats": {n: d.stats() for n, d in domains.items()},
        "methods": {m.name: m.description for m in methods},
        "rows": rows,
        "lm": lm,
        "workers": 2 if split else 1,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _config_dict(cfg: DemoConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["synthetic"]["domains"] = list(cfg.synthetic.domains)
    return d


def row_line(row: dict[str, Any] | None = None) -> str:
    """One aligned line of the demo table (the header when ``row`` is None), for printing rows as they finish."""
    if row is None:
        return f"{'method':<19}  {'fraction':>8}  " + "  ".join(f"{c:>7}" for c in METRIC_COLUMNS)
    frac = row["fraction"] if isinstance(row["fraction"], str) else f"{row['fraction']:g}"
    return f"{row['method']:<19}  {frac:>8}  " + "  ".join(f"{row[c]:>7.4f}" for c in METRIC_COLUMNS)


def demo_table(result: dict[str, Any]) -> str:
    """Aligned plain-text table of a run_demo result."""
    metrics = [c for c in METRIC_COLUMNS if result["rows"] and c in result["rows"][0]]
    n_users, candidates = result["rows"][0]["n_users"], result["config"]["n_neg"] + 1
    head = f"target={result['target']}  sources={','.join(result['sources'])}  users={n_users}"
    rows = [
        {**r, "fraction": r["fraction"] if isinstance(r["fraction"], str) else f"{r['fraction']:g}"}
        for r in result["rows"]
    ]
    return f"{head}  candidates={candidates}\n" + format_table(rows, ["method", "fraction", *metrics])
