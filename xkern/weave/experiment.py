"""A WeaveRec experiment end to end: data -> adapters -> merges -> both prediction modes -> table.

Rows (each scored on the same target test candidates, 1 positive + ``n_neg`` negatives):

- ``target-only``: a LoRA on target examples only;
- ``plain-merge``: uniform task-arithmetic merge of the target LoRA and one source-only LoRA per
  source (trained on source examples only);
- ``weave-merge``: uniform merge of the target LoRA and the hybrid LoRAs (target + source mixes);
- ``weave-merge-val``: the same with weights chosen on the validation split (``select_step``);
- ``joint``: one LoRA trained on target + all sources' examples;
- ``hybrid-<src>``: each hybrid LoRA alone; ``base``: no adapter.

Merges are served exactly (one adapter of rank ``sum r_i`` through the core op). Prediction modes:
``likelihood`` (prefix-KV likelihood of each candidate title after the next-item prompt), ``pmi``
(the same minus the title's likelihood after an empty history, see
:class:`xkern.serve.PrefixLikelihoodScorer`) and ``listwise`` (generation from the listwise prompt,
matched to a candidate; fallbacks counted). Each row also carries its per-user ranks and its
causal-LM loss on the target's validation users (the base model's loss is the start point).
Also measured: the prefix-KV scorer against independent (prompt, candidate) scoring on the same
users (time ratio and the largest score difference).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xkern.adapters.peft_format import BASE
from xkern.data.domain import DomainData, check_usable
from xkern.data.encoding import PromptEncoder
from xkern.data.evaluate import evaluate_scorer, format_table, rank_candidates
from xkern.data.examples import causal_lm_examples
from xkern.data.metrics import metrics_from_ranks
from xkern.data.negatives import build_candidates
from xkern.distributed import dist_setup, sum_over_ranks
from xkern.errors import InputError, NotFoundError
from xkern.serve import LikelihoodScorer, ListwiseGenerationScorer, PrefixLikelihoodScorer
from xkern.train import evaluate_loss
from xkern.train.loop import TrainConfig
from xkern.weave.data import domain_examples, mix_domains
from xkern.weave.merging import merge_loaded, select_merge_weights
from xkern.weave.train import train_adapter

ROWS = ("base", "target-only", "plain-merge", "weave-merge", "weave-merge-val", "joint", "hybrids")
MERGES = ("plain-merge", "weave-merge", "weave-merge-val")
MODES = ("likelihood", "pmi", "listwise")
TABLE_METRICS = ("HR@1", "HR@10", "NDCG@10")


@dataclass
class WeaveConfig:
    data: str = "synthetic"  # a root of processed domain folders, or "synthetic"
    target: str = "Tools"
    sources: tuple[str, ...] = ("Toys", "Sports")
    model: str = "tiny"  # "tiny" (random word-level Llama), "smollm2", or a model path / .gguf
    layers: int | None = None  # keep only the first N transformer blocks of the model
    tiny_pretrain_steps: int | None = None  # model "tiny": the tiny base's pretraining steps (None: its default)
    fmt: str = "both"  # training prompts: next_item, listwise or both
    train_users: int | None = 96  # training users sampled per domain (None: all)
    synthetic_users: int = 300
    max_history: int = 5
    n_candidates_train: int = 10  # candidates in listwise training prompts
    r: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] | None = None
    # every adapter's training loop (seed and progress come from this config's own fields)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, batch_size=8, epochs=1.0))
    n_neg: int = 29
    eval_users: int = 100
    val_users: int = 32
    select_step: float | None = None  # e.g. 0.25: choose merge weights on validation (row weave-merge-val)
    rows: tuple[str, ...] = ("target-only", "plain-merge", "weave-merge", "joint")
    modes: tuple[str, ...] = ("likelihood", "listwise")
    speed_users: int = 8  # users for the prefix-vs-independent timing (0: skip)
    user_batch: int = 8
    row_batch: int = 64
    max_new_tokens: int = 24
    listwise_fallback: str = "listwise"  # rank non-generated candidates by: "listwise" prompt or "next_item" scores
    threads: int | None = None
    seed: int = 0
    save_adapters: str | None = None  # directory: every trained adapter saved there in PEFT format
    load_adapters: str | None = None  # directory of an earlier save_adapters: load the adapters, train none
    progress: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def load_domains(cfg: WeaveConfig) -> dict[str, DomainData]:
    from xkern.data.cli import load_domains as load

    return load(cfg.data, [*cfg.sources, cfg.target], seed=cfg.seed, synthetic_users=cfg.synthetic_users)


def load_lm(cfg: WeaveConfig, domains: dict[str, DomainData]) -> tuple[Any, Any, str]:
    """(XkernModel, tokenizer, description) for ``cfg.model``."""
    if cfg.model == "tiny":
        from xkern.train.tiny import TinyLMConfig, build_tiny_lm

        extra = {} if cfg.tiny_pretrain_steps is None else {"pretrain_steps": cfg.tiny_pretrain_steps}
        lm = build_tiny_lm(domains, TinyLMConfig(max_history=cfg.max_history, seed=cfg.seed, **extra))
        steps = lm.config.pretrain_steps
        return lm.model, lm.tokenizer, (f"tiny Llama (2 layers, hidden 64, word tokenizer; {steps} steps of "
                                        "catalog-text pretraining, as the quickstart's), NF4")
    import transformers

    from xkern.nn import load_model
    from xkern.nn.pretrained import load_tokenizer, refuse_remote_code, resolve

    spec = resolve(cfg.model, also_known=("tiny",))
    path = Path(spec)
    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    directory = str(path.parent) if path.suffix == ".gguf" else spec
    tok = load_tokenizer(spec)
    refuse_remote_code(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, trust_remote_code=False,
                                                           **kw)
    n_layers = hf.config.num_hidden_layers
    desc = f"{path.name} ({n_layers} layers)"
    if cfg.layers is not None and cfg.layers < n_layers:
        hf.model.layers = hf.model.layers[: cfg.layers]
        hf.config.num_hidden_layers = cfg.layers
        if getattr(hf.config, "layer_types", None):
            hf.config.layer_types = hf.config.layer_types[: cfg.layers]
        desc = f"{path.name}, first {cfg.layers} of {n_layers} layers (final norm and tied head kept)"
    if hf.config.pad_token_id is None:
        hf.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = load_model(hf, dtype=torch.float32, progress=False)
    return model, tok, desc + ", NF4 (xkern), float32 compute"


def _train_kw(cfg: WeaveConfig) -> dict[str, Any]:
    kw: dict[str, Any] = dict(r=cfg.r, lora_alpha=cfg.lora_alpha, seed=cfg.seed, config=cfg.train,
                              progress=cfg.progress, output_dir=cfg.save_adapters)
    if cfg.target_modules:
        kw["target_modules"] = list(cfg.target_modules)
    return kw


def _examples(cfg: WeaveConfig, tok: Any, d: DomainData) -> list[dict[str, Any]]:
    return domain_examples(tok, d, cfg.fmt, cfg.max_history, n_candidates=cfg.n_candidates_train, seed=cfg.seed,
                           max_examples=cfg.train_users)


def load_saved_adapters(model: Any, directory: str | os.PathLike, names: list[str]) -> dict[str, Any]:
    """Load ``<directory>/<name>/adapter`` (the layout ``save_adapters`` writes) for every name.

    Lets a run score new modes on the adapters of an earlier run without training them again. All
    are checked before any is loaded, so a missing one leaves the model as it was.
    """
    root = Path(directory)
    paths = {name: root / name / "adapter" for name in names}
    missing = [str(p) for p in paths.values() if not (p / "adapter_config.json").is_file()]
    if missing:
        raise NotFoundError(f"load_adapters={str(directory)!r}: no saved adapter at {', '.join(missing)} "
                                f"(expected <dir>/<name>/adapter from an earlier run's save_adapters)")
    clashing = [name for name in names if name in model.adapter_configs]
    if clashing:
        raise InputError(f"adapters {clashing} are already loaded in the model; load_adapters would replace them")
    info: dict[str, Any] = {}
    for name, path in paths.items():
        model.load_adapter(path, name)
        info[name] = {"loaded_from": str(path), "r": model.adapter_configs[name].get("r")}
    return info


def row_adapters(rows: Sequence[str], sources: Sequence[str]) -> dict[str, list[str]]:
    """Each evaluated row (``"hybrids"`` expanded to one row per source, in :data:`ROWS` order) -> the LoRAs it
    is made of: what must be trained for it, what a merge merges, and whose parameters it counts."""
    weave = ["target", *(f"hybrid-{s}" for s in sources)]
    table = {"base": [], "target-only": ["target"], "plain-merge": ["target", *(f"source-{s}" for s in sources)],
             "weave-merge": weave, "weave-merge-val": weave, "joint": ["joint"]}
    out: dict[str, list[str]] = {}
    for row in ROWS:
        if row in rows:
            out.update({f"hybrid-{s}": [f"hybrid-{s}"] for s in sources} if row == "hybrids" else {row: table[row]})
    return out


def run_weave(cfg: WeaveConfig, domains: dict[str, DomainData] | None = None, model: Any = None,
              tokenizer: Any = None, log: Any = print) -> dict[str, Any]:
    """Run the experiment of ``cfg``; returns a JSON-ready dict (rows, speed, adapters, timings).

    Under ``torchrun`` every rank runs it: each adapter trains data-parallel (``train_lora``), each
    evaluation splits the users across ranks, and every rank returns the same result; ``log`` is
    called on rank 0 only.
    """
    t_start = time.perf_counter()
    rank, world = dist_setup()
    if rank != 0:
        def log(*args: Any, **kwargs: Any) -> None:
            return None

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    for r in cfg.rows:
        if r not in ROWS:
            raise InputError(f"unknown row {r!r}; expected some of {ROWS}")
    for m in cfg.modes:
        if m not in MODES:
            raise InputError(f"unknown mode {m!r}; expected some of {MODES}")
    domains = domains if domains is not None else load_domains(cfg)
    target, sources = domains[cfg.target], [domains[s] for s in cfg.sources]
    for d in (target, *sources):  # before the model loads or anything trains
        check_usable(d, titles=True, candidates=cfg.n_neg + 1 if d is target else None)
    desc = "given model"
    if model is None:
        model, tokenizer, desc = load_lm(cfg, domains)
    log(f"model: {desc}")
    t0 = time.perf_counter()
    tgt_ex = _examples(cfg, tokenizer, target)
    src_ex = {d.name: _examples(cfg, tokenizer, d) for d in sources}
    mixes = mix_domains(tgt_ex, src_ex, None, cfg.seed)
    kw = _train_kw(cfg)
    parts = row_adapters(cfg.rows, cfg.sources)
    need = {"target"}.union(*parts.values())
    plan = [("target", tgt_ex)] + [(f"hybrid-{s}", mixes[s]) for s in cfg.sources] + \
        [(f"source-{s}", src_ex[s]) for s in cfg.sources]
    if "joint" in need:
        joint = list(tgt_ex) + [e for s in cfg.sources for e in src_ex[s]]
        order = np.random.default_rng(cfg.seed).permutation(len(joint))
        plan.append(("joint", [joint[i] for i in order]))
    adapters: dict[str, Any] = {}
    if cfg.load_adapters is not None:
        adapters = load_saved_adapters(model, cfg.load_adapters, [name for name, _ in plan if name in need])
        log(f"loaded {', '.join(adapters)} from {cfg.load_adapters}")
    for name, ex in plan:
        if name in need and name not in adapters:
            log(f"training {name} on {len(ex)} examples ...")
            adapters[name] = train_adapter(model, name, ex, **kw)
            log(f"  {adapters[name]}")
    train_s = time.perf_counter() - t0
    n_params = {name: sum(p.numel() for p in model.adapter_parameters(name)) for name in adapters}

    enc = PromptEncoder(tokenizer, target.name, max_history=cfg.max_history)
    val_users = sorted(target.val)[: cfg.val_users]
    val_examples = causal_lm_examples(enc, replace(target, val={u: target.val[u] for u in val_users}), "val")
    val_loss_base = evaluate_loss(model, BASE, val_examples, batch_size=cfg.train.batch_size) if val_examples else None
    cands = build_candidates(target, "test", cfg.n_neg, "uniform", cfg.seed, cfg.eval_users)
    selection, weights = None, None
    if "weave-merge-val" in parts:
        step = cfg.select_step or 0.25
        val = build_candidates(target, "val", cfg.n_neg, "uniform", cfg.seed, cfg.val_users)
        names = parts["weave-merge-val"]

        def val_ndcg(adapter: str) -> float:
            sc = PrefixLikelihoodScorer(model, enc, target.titles, adapter, cfg.user_batch, cfg.row_batch)
            return evaluate_scorer(sc, val, (10,), batch_size=len(val), distributed=True)["NDCG@10"]

        t1 = time.perf_counter()
        best, table = select_merge_weights(model, names, val_ndcg, step)
        selection = {"names": names, "step": step, "best": list(best), "grid": table, "val_users": len(val),
                     "seconds": round(time.perf_counter() - t1, 2)}
        log(f"selected weights {best} (validation NDCG@10 grid of {len(table)} points)")
        weights = list(best)
    served: dict[str, str] = {}  # row -> the adapter that serves it (a merge is added to the model under its name)
    for row, loras in parts.items():
        if row in MERGES:
            served[row] = merge_loaded(model, row, loras, weights if row == "weave-merge-val" else None)
        else:
            served[row] = loras[0] if loras else BASE

    speed = None
    if cfg.speed_users and "likelihood" in cfg.modes:
        speed = measure_prefix_speedup(model, enc, target.titles, cands.subset(range(min(cfg.speed_users,
                                       len(cands)))), served.get("target-only", "target"), cfg)
        log(f"prefix-KV speed: {speed}")

    if cfg.listwise_fallback not in ("listwise", "next_item"):
        raise InputError(f"listwise_fallback must be 'listwise' or 'next_item', got {cfg.listwise_fallback!r}")
    results = []
    for row, adapter in served.items():
        prefix = PrefixLikelihoodScorer(model, enc, target.titles, adapter, cfg.user_batch, cfg.row_batch)
        cached = None
        val_loss = (evaluate_loss(model, adapter, val_examples, batch_size=cfg.train.batch_size)
                    if val_examples else None)
        for mode in cfg.modes:
            if mode in ("likelihood", "pmi"):
                cached = cached or CachedScorer(prefix)
                sc: Any = cached if mode == "likelihood" else CalibratedScorer(cached, prefix)
            else:
                fb = (cached or prefix) if cfg.listwise_fallback == "next_item" else None
                sc = ListwiseGenerationScorer(model, enc, target.titles, adapter, cfg.max_history, cfg.user_batch,
                                              cfg.row_batch, cfg.max_new_tokens, fallback_scorer=fb)
            t_mode = time.perf_counter()
            ranks = rank_candidates(sc, cands, 256, distributed=True)
            m = {**metrics_from_ranks(ranks, (1, 3, 10)), "n_users": len(cands),
                 "seconds": round(time.perf_counter() - t_mode, 3)}
            rec = {"method": row, "mode": mode, **m, "val_loss": val_loss,
                   "trainable_params": sum(n_params.get(a, 0) for a in parts[row]),
                   "ranks": ranks.tolist()}
            if mode == "listwise":  # each rank counted its own users
                exact, fallback = sum_over_ranks([sc.stats["exact"], sc.stats["fallback"]], world)
                rec.update(exact=exact, fallback=fallback)
            results.append(rec)
            log(f"  {row:16s} {mode:10s} HR@1 {m['HR@1']:.3f} HR@10 {m['HR@10']:.3f} NDCG@10 {m['NDCG@10']:.3f}"
                f" ({m['seconds']:.0f} s)")
    return {
        "kind": "xkern-weave",
        "config": asdict(cfg),
        "model": desc,
        "target": cfg.target,
        "sources": list(cfg.sources),
        "n_eval_users": len(cands),
        "examples": {"target": len(tgt_ex), **{f"source-{k}": len(v) for k, v in src_ex.items()},
                     **{f"hybrid-{k}": len(v) for k, v in mixes.items()}},
        "adapters": adapters,
        "selection": selection,
        "speed": speed,
        "val_loss_base": val_loss_base,
        "val_users": len(val_users),
        "rows": results,
        "train_seconds": round(train_s, 2),
        "seconds": round(time.perf_counter() - t_start, 2),
        "world_size": world,
    }


class CalibratedScorer:
    """``scorer``'s scores minus each candidate title's prior (``prior_scorer.prior``), the ``pmi`` mode."""

    def __init__(self, scorer: Any, prior_scorer: PrefixLikelihoodScorer) -> None:
        self.scorer, self.prior_scorer = scorer, prior_scorer

    def __call__(self, histories: Any, candidates: np.ndarray) -> np.ndarray:
        return np.asarray(self.scorer(histories, candidates)) - self.prior_scorer.prior(candidates)


class CachedScorer:
    """A scorer that remembers the scores of each (history, candidates) it has seen."""

    def __init__(self, scorer: Any) -> None:
        self.scorer, self.cache = scorer, {}

    def __call__(self, histories: Any, candidates: np.ndarray) -> np.ndarray:
        candidates = np.asarray(candidates)
        keys = [(tuple(h), tuple(c)) for h, c in zip(histories, candidates.tolist(), strict=True)]
        todo = [i for i, k in enumerate(keys) if k not in self.cache]
        if todo:
            fresh = np.asarray(self.scorer([histories[i] for i in todo], candidates[todo]), dtype=np.float64)
            for i, row in zip(todo, fresh, strict=True):
                self.cache[keys[i]] = row
        return np.stack([self.cache[k] for k in keys])


def measure_prefix_speedup(model: Any, enc: PromptEncoder, titles: list[str], cands: Any, adapter: str,
                           cfg: WeaveConfig) -> dict[str, Any]:
    """Time independent (prompt, candidate) scoring and prefix-KV scoring of the same users, same run."""
    indep = LikelihoodScorer(model, enc, titles, adapter, batch_size=cfg.row_batch)
    prefix = PrefixLikelihoodScorer(model, enc, titles, adapter, cfg.user_batch, cfg.row_batch)
    indep(cands.histories[:1], cands.items[:1])  # warm-up (one user each)
    prefix(cands.histories[:1], cands.items[:1])
    t = time.perf_counter()
    a = indep(cands.histories, cands.items)
    t_indep = time.perf_counter() - t
    t = time.perf_counter()
    b = prefix(cands.histories, cands.items)
    t_prefix = time.perf_counter() - t
    return {"users": len(cands), "candidates": int(cands.items.shape[1]), "independent_s": round(t_indep, 3),
            "prefix_s": round(t_prefix, 3), "speedup": round(t_indep / max(t_prefix, 1e-9), 2),
            "max_abs_score_diff": float(np.abs(a - b).max())}


def results_table(result: dict[str, Any], markdown: bool = False) -> str:
    """One row per method, the metrics of each mode side by side (listwise: exact / fallback counts)."""
    modes = [m for m in MODES if any(r["mode"] == m for r in result["rows"])]
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    by = {(r["method"], r["mode"]): r for r in result["rows"]}
    cols = ["method"] + [f"{m[:4]} {k}" for m in modes for k in TABLE_METRICS]
    if "listwise" in modes:
        cols.append("exact/fallback")
    rows = []
    for meth in methods:
        row: dict[str, Any] = {"method": meth}
        for m in modes:
            for k in TABLE_METRICS:
                row[f"{m[:4]} {k}"] = by[(meth, m)][k] if (meth, m) in by else ""
        if "listwise" in modes and (meth, "listwise") in by:
            r = by[(meth, "listwise")]
            row["exact/fallback"] = f"{r['exact']}/{r['fallback']}"
        rows.append(row)
    if not markdown:
        return format_table(rows, cols)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c])
                                       for c in cols) + " |")
    return "\n".join(lines)


def quality_rows(result: dict[str, Any], n_boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """The rows of :func:`run_weave`'s result in the quality results format
    (:func:`xkern.data.confidence.quality_row`): one per (method, mode), named ``method/mode``, with
    bootstrap intervals over its per-user ranks; the validation loss starts at the base model's and ends
    at the served adapter's (no selection)."""
    from xkern.data.confidence import quality_row

    out = []
    for r in result["rows"]:
        extra = {k: r[k] for k in ("exact", "fallback") if k in r}
        out.append(quality_row(f"{r['method']}/{r['mode']}", r["ranks"], target=result["target"],
                               sources=[] if r["method"] == "target-only" else result["sources"],
                               trainable_params=r["trainable_params"], val_loss_start=result["val_loss_base"],
                               val_loss_best=r["val_loss"], n_boot=n_boot, seed=seed, split="test",
                               model=r["method"], mode=r["mode"], **extra))
    return out


def quality_pairs(rows: list[dict[str, Any]], n_boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Paired HR@10 comparisons the WeaveRec claim is about, per mode: the WeaveRec merge against the
    plain merge, the target-only LoRA and joint training; each model row against popularity and SASRec."""
    from xkern.data.confidence import paired_comparison

    def pair(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        return {"a": a["method"], "b": b["method"], **paired_comparison(a["ranks"], b["ranks"], "HR@10", n_boot, seed)}

    by = {(r.get("model"), r.get("mode")): r for r in rows}
    out = []
    for (model, mode), a in by.items():
        if model in ("weave-merge", "weave-merge-val"):
            out += [pair(a, by[(b, mode)]) for b in ("plain-merge", "target-only", "joint") if (b, mode) in by]
    refs = [r for r in rows if r["method"] in ("popularity", "sasrec")]
    out += [pair(a, b) for a in rows if a.get("mode") for b in refs]
    return out
