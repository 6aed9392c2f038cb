"""The quickstart experiment: source domains -> target domain -> one table of methods x data fractions.

Extension point: a method is a `Method(name, build)` where `build(ctx: DemoContext) -> Scorer`.
`default_methods()` lists the methods that exist now; later issues (per-domain LoRA, X-Cross,
WeaveRec) append theirs there or pass `methods=` to `run_demo`. Every method of a run is scored on
the same target-domain candidates (one CandidateSet per run), for every target-data fraction.
"""

from __future__ import annotations

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
    extra: tuple[str, ...] = ("xcross", "weave")  # model rows beyond the LoRA rows (() for LoRA only)


EXTRA_ROWS = ("xcross", "weave")


def model_methods(source_names: Sequence[str], extra: Sequence[str] = ()) -> list[Method]:
    """Rows that run the model runtime: per-domain and target-only LoRA, plus (``extra``) the X-Cross
    rows over the source LoRAs and the WeaveRec rows (hybrid LoRAs and their merge with the target LoRA)."""
    from xkern.demo.lm import lora_methods

    unknown = sorted(set(extra) - set(EXTRA_ROWS))
    if unknown:
        raise ValueError(f"unknown extra demo rows {unknown}; choose from {EXTRA_ROWS}")
    methods = lora_methods(source_names)
    if "xcross" in extra:
        from xkern.demo.xcross import xcross_methods

        methods += xcross_methods(source_names)
    if "weave" in extra:
        from xkern.demo.weave import weave_methods

        methods += weave_methods(source_names)
    return methods


def run_demo(
    cfg: DemoConfig,
    methods: Sequence[Method] | None = None,
    domains: dict[str, DomainData] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate every method x fraction on the target domain; returns a JSON-ready dict with rows."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    domains = domains if domains is not None else make_synthetic(cfg.synthetic)
    target_name = cfg.target or list(domains)[-1]
    if target_name not in domains:
        raise ValueError(f"target {target_name!r} not among domains {list(domains)}")
    target = domains[target_name]
    sources = [d for n, d in domains.items() if n != target_name]
    if methods is None:
        methods = default_methods() + (model_methods([d.name for d in sources], cfg.extra) if cfg.lm else [])
    methods = list(methods)
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate method names: {names}")
    shared: dict[str, Any] = {"progress": progress, "lm_config": cfg.lm_config}
    cands = build_candidates(target, cfg.split, cfg.n_neg, "uniform", cfg.seed, cfg.max_eval_users)
    fractions = sorted(set(cfg.fractions))
    jobs = [(m, f) for m in methods for f in fractions if m.uses_target_train or f == fractions[-1]]
    rows = []
    for m, frac in tqdm(jobs, desc="demo", unit="method", disable=not progress):
        sub = replace(target, train=subsample_train(target.train, frac, cfg.seed))
        ctx = DemoContext(sub, sources, frac, cfg.seed, options=shared)
        t1 = time.perf_counter()
        scorer = m.build(ctx)
        fit_s = time.perf_counter() - t1
        metrics = evaluate_scorer(scorer, cands, cfg.ks, desc=m.name)
        frac_label = frac if m.uses_target_train else "-"
        rows.append({"method": m.name, "fraction": frac_label, **metrics, "fit_seconds": round(fit_s, 3)})
    return {
        "kind": "xkern-demo",
        "config": _config_dict(cfg),
        "target": target_name,
        "sources": [d.name for d in sources],
        "stats": {n: d.stats() for n, d in domains.items()},
        "methods": {m.name: m.description for m in methods},
        "rows": rows,
        "lm": shared["lm"].describe() if "lm" in shared else None,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _config_dict(cfg: DemoConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["synthetic"]["domains"] = list(cfg.synthetic.domains)
    return d


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
