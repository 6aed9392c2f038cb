"""A trained run as a recommender: rank given candidates, or recommend from the whole catalogue.

:func:`load_recommender` reads the ``run.json`` that ``xkern train-lora``, ``train-xcross`` and ``weave``
write (:mod:`xkern.serve.runs`), checks every file it names and the domain's catalogue before a model
loads, then loads the base once and each run's adapters on it. Several runs over one base share it:
their users can be scored in one mixed-adapter forward.

Scores are the evaluation scorers' own: a likelihood run's prompts and title rows come from its
:class:`~xkern.serve.PrefixLikelihoodScorer` and are scored by :func:`xkern.serve.score_users` (the
function behind that scorer), an X-Cross run's by its ``XCrossModel.scorer``. ``recommend`` is two
stages: a cheap retriever from :mod:`xkern.data.baselines` (``popularity`` or ``item-markov``, fit on the
domain's training sequences) proposes the ``top_n`` unseen items, the language model re-ranks them; an
empty history gets the retriever's ranking and says so. A history longer than the prompt's context
is cut from the oldest items, and the response says how many were dropped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xkern.data.domain import DomainData
from xkern.errors import FormatError, InputError, InputKeyError, InputTypeError

RETRIEVERS = ("popularity", "item-markov")
Item = int | str


def check_retriever(name: str) -> None:
    """Refuse a retriever that is not one of :data:`RETRIEVERS`."""
    if name not in RETRIEVERS:
        raise InputError(f"unknown retriever {name!r} ({', '.join(RETRIEVERS)})")


@dataclass(frozen=True)
class ScoredItem:
    """One ranked item: the domain's item id (its index where the domain has no ids), title and score."""

    item: Item
    title: str
    score: float


@dataclass
class Ranking:
    """The answer for one user: items best first, and what was done to get there."""

    run: str
    items: list[ScoredItem]
    history_used: int  # history items the prompt holds
    history_dropped: int = 0  # oldest items cut to fit the context
    retriever: str | None = None  # recommend: the retriever that proposed the candidates
    fallback: bool = False  # recommend with an empty history: the retriever's ranking, the LM not asked
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "items": [{"item": s.item, "title": s.title, "score": s.score} for s in self.items],
                "history_used": self.history_used, "history_dropped": self.history_dropped,
                "retriever": self.retriever, "fallback": self.fallback, "notes": list(self.notes)}


@dataclass
class Job:
    """One user's request, checked and resolved to item indices; what :meth:`Recommender.run_jobs` scores."""

    run: _Run
    history: list[int]  # after truncation
    dropped: int
    candidates: np.ndarray  # item indices to score
    k: int | None = None  # recommend: how many to return
    retriever: str | None = None
    fallback_scores: np.ndarray | None = None  # empty-history recommend: the retriever's scores
    prompt: list[int] | None = None
    rows: list[list[int]] | None = None
    tokens: int = 0


class _Run:
    """One served run: its domain, how it scores, and its item lookups."""

    def __init__(self, name: str, domain: DomainData, max_history: int, *, scorer: Any = None,
                 adapter: str | None = None, xcross: Any = None) -> None:
        self.name, self.domain, self.max_history = name, domain, max_history
        self.scorer, self.adapter, self.xcross = scorer, adapter, xcross
        self.by_id = {str(x): i for i, x in enumerate(domain.item_ids or [])}
        titles: dict[str, list[int]] = {}
        for i, t in enumerate(domain.titles):
            titles.setdefault(t, []).append(i)
        self.by_title = titles
        self._retrievers: dict[str, Any] = {}

    def item(self, i: int) -> Item:
        return self.domain.item_ids[i] if self.domain.item_ids else i

    def retriever(self, name: str) -> Any:
        check_retriever(name)
        if name not in self._retrievers:
            from xkern.data.baselines import make_scorer

            self._retrievers[name] = make_scorer(name, self.domain)
        return self._retrievers[name]

    def resolve(self, items: Any, what: str) -> list[int]:
        """Item ids, titles or indices -> indices; every item that is none of them named in one error."""
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
            raise InputTypeError(f"{what} must be a list of item ids or titles, got {type(items).__name__}")
        out, unknown, ambiguous = [], [], []
        for x in items:
            if isinstance(x, bool) or not isinstance(x, (int, str)):
                raise InputTypeError(f"{what}: {x!r} is not an item id, title or index")
            if isinstance(x, int):
                if 0 <= x < self.domain.n_items:
                    out.append(x)
                else:
                    unknown.append(x)
            elif x in self.by_id:
                out.append(self.by_id[x])
            elif x in self.by_title:
                if len(self.by_title[x]) > 1:
                    ambiguous.append(x)
                out.append(self.by_title[x][0])
            else:
                unknown.append(x)
        if unknown:
            shown = ", ".join(repr(u)[:80] for u in unknown[:5]) + (f" and {len(unknown) - 5} more"
                                                                    if len(unknown) > 5 else "")
            raise InputKeyError(f"{what}: {len(unknown)} item(s) not in the {self.domain.name} catalogue of run "
                                f"{self.name!r}: {shown}")
        if ambiguous:
            raise InputError(f"{what}: title(s) {ambiguous[:5]} name several items of {self.domain.name}; "
                             f"give the item id")
        return out


class Recommender:
    """Ranks and recommends items for users of one or more trained runs over one loaded base.

    ``retriever`` (``popularity`` or ``item-markov``) and ``top_n`` are ``recommend``'s first stage;
    ``user_batch`` users share a prefill, their candidates run ``row_batch`` rows and ``token_budget``
    padded tokens a forward. ``calibrate``: each score minus its title's likelihood after an empty
    history (the evaluation's ``pmi`` mode, see :class:`~xkern.serve.PrefixLikelihoodScorer`); each
    title's prior is computed once and kept. Every call runs under ``torch.no_grad`` with the model in
    eval mode and changes no weights.
    """

    def __init__(self, model: Any, tokenizer: Any, runs: dict[str, _Run], *, retriever: str = "popularity",
                 top_n: int = 50, user_batch: int = 64, row_batch: int = 64, token_budget: int = 2048,
                 calibrate: bool = False) -> None:
        check_retriever(retriever)
        if top_n < 1:
            raise InputError(f"top_n must be >= 1, got {top_n}")
        self.model, self.tokenizer, self._runs = model, tokenizer, runs
        self.retriever, self.top_n = retriever, top_n
        self.user_batch, self.row_batch, self.token_budget = user_batch, row_batch, token_budget
        self.calibrate = calibrate
        heads = [n for n, r in runs.items() if calibrate and r.xcross is not None and r.xcross.scoring != "likelihood"]
        if heads:
            raise InputError(f"calibrate needs likelihood scoring; X-Cross run(s) {heads} score with a trained head")

    @property
    def runs(self) -> list[str]:
        return list(self._runs)

    def domain(self, run: str | None = None) -> DomainData:
        return self._run(run).domain

    def _run(self, run: str | None) -> _Run:
        if run is None:
            if len(self._runs) != 1:
                raise InputError(f"{len(self._runs)} runs are loaded ({', '.join(self._runs)}): name one with run=")
            return next(iter(self._runs.values()))
        if run not in self._runs:
            raise InputKeyError(f"unknown run {run!r} (loaded: {', '.join(self._runs)})")
        return self._runs[run]

    # ---- requests -> jobs (cheap, no model) -------------------------------------------------------------

    def _history(self, r: _Run, history: Any) -> tuple[list[int], list[int], int]:
        """(every history item, the most recent ones the prompt holds, how many older ones it drops)."""
        items = r.resolve(history, "history")
        dropped = max(0, len(items) - r.max_history)
        return items, items[dropped:], dropped

    def _finish(self, job: Job) -> Job:
        """Token rows of a likelihood job (made once, where the request is read) and its token count."""
        r = job.run
        if job.fallback_scores is not None:
            return job
        if r.scorer is not None:
            job.prompt = r.scorer.prompts([job.history], job.candidates[None])[0]
            job.rows = r.scorer.continuations([job.candidates.tolist()])[0]
            job.tokens = len(job.prompt) + sum(len(x) for x in job.rows)
        else:  # X-Cross: every candidate is a whole (history, candidate) pair through n streams
            enc = r.xcross.encoder
            job.tokens = r.xcross.n_streams * sum(len(enc.pair_ids(job.history, int(c))) for c in job.candidates)
        return job

    def rank_job(self, history: Any, candidates: Any, run: str | None = None) -> Job:
        """A checked ``rank`` request: unknown items, duplicates or no candidates are refused here."""
        r = self._run(run)
        _, hist, dropped = self._history(r, history)
        cands = r.resolve(candidates, "candidates")
        if not cands:
            raise InputError("candidates: give at least one item")
        if len(set(cands)) != len(cands):
            raise InputError("candidates: an item is listed twice")
        return self._finish(Job(r, hist, dropped, np.asarray(cands, dtype=np.int64)))

    def recommend_job(self, history: Any, k: int = 10, run: str | None = None, retriever: str | None = None,
                      top_n: int | None = None) -> Job:
        """A checked ``recommend`` request, its candidates proposed by the retriever (the items not in the history)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"k must be an integer >= 1, got {k!r}")
        r = self._run(run)
        full, hist, dropped = self._history(r, history)
        name = retriever or self.retriever
        pool = np.setdiff1d(np.arange(r.domain.n_items), np.asarray(full, dtype=np.int64))
        if len(pool) == 0:
            raise InputError("history: every item of the catalogue is in the history; nothing is left to recommend")
        scores = np.asarray(r.retriever(name)([full], pool[None]), dtype=np.float64)[0]
        order = np.argsort(-scores, kind="stable")  # ties: the lower item index first
        n = min(top_n or self.top_n, len(pool))
        job = Job(r, hist, dropped, pool[order[:n]], k=min(k, n), retriever=name)
        if not full:
            job.candidates = pool[order[:job.k]]
            job.fallback_scores = scores[order[:job.k]]
        return self._finish(job)

    # ---- jobs -> rankings (the model) -------------------------------------------------------------------

    @torch.no_grad()
    def run_jobs(self, jobs: Sequence[Job]) -> list[Ranking]:
        """Score every job: likelihood users of every run in one mixed-adapter batch (each prompt once, its
        candidates on its cached prefix), X-Cross users by their run's scorer; then sort each user's items."""
        from xkern.serve.scoring import score_users

        scores: dict[int, np.ndarray] = {}
        lik = [i for i, j in enumerate(jobs) if j.fallback_scores is None and j.run.scorer is not None]
        if lik:
            self.model.eval()
            rows = score_users(self.model, [jobs[i].prompt for i in lik], [jobs[i].rows for i in lik],
                               [jobs[i].run.adapter for i in lik], user_batch=self.user_batch, row_batch=self.row_batch,
                               token_budget=self.token_budget)
            if self.calibrate:  # the prior of each title after an empty history, as the evaluation's pmi mode
                rows = [v - jobs[i].run.scorer.prior(jobs[i].candidates[None])[0]
                        for i, v in zip(lik, rows, strict=True)]
            scores.update(zip(lik, rows, strict=True))
        groups: dict[tuple[str, int], list[int]] = {}
        for i, j in enumerate(jobs):
            if j.fallback_scores is None and j.run.xcross is not None:
                groups.setdefault((j.run.name, len(j.candidates)), []).append(i)
        for (name, _), idx in groups.items():
            out = self._runs[name].xcross.score([jobs[i].history for i in idx],  # what its scorer() runs
                                                np.stack([jobs[i].candidates for i in idx]),
                                                calibrate=self.calibrate).numpy()
            scores.update(zip(idx, np.asarray(out, dtype=np.float64), strict=True))
        return [self._ranking(j, j.fallback_scores if j.fallback_scores is not None else scores[i])
                for i, j in enumerate(jobs)]

    def _ranking(self, job: Job, scores: np.ndarray) -> Ranking:
        r = job.run
        order = np.argsort(-np.asarray(scores), kind="stable")[: job.k]
        items = [ScoredItem(r.item(int(job.candidates[o])), r.domain.titles[int(job.candidates[o])],
                            float(scores[o])) for o in order]
        notes = []
        if job.dropped:
            notes.append(f"history longer than the context ({r.max_history} items): the oldest {job.dropped} dropped")
        if job.fallback_scores is not None:
            notes.append(f"empty history: the {job.retriever} retriever's ranking, not re-ranked by the model")
        return Ranking(r.name, items, len(job.history), job.dropped, job.retriever, job.fallback_scores is not None,
                       notes)

    # ---- the API --------------------------------------------------------------------------------------------

    def rank(self, history: Sequence[Item], candidates: Sequence[Item], run: str | None = None) -> Ranking:
        """``candidates`` (item ids, titles or indices of the run's domain) scored for ``history``, best first."""
        return self.run_jobs([self.rank_job(history, candidates, run)])[0]

    def recommend(self, history: Sequence[Item], k: int = 10, run: str | None = None,
                  retriever: str | None = None, top_n: int | None = None) -> Ranking:
        """The ``k`` best unseen items of the catalogue: the retriever's ``top_n``, re-ranked by the model."""
        return self.run_jobs([self.recommend_job(history, k, run, retriever, top_n)])[0]

    def rank_batch(self, histories: Sequence[Sequence[Item]], candidates: Sequence[Sequence[Item]],
                   runs: Sequence[str | None] | None = None) -> list[Ranking]:
        """:meth:`rank` for many users (of any loaded runs), scored together."""
        runs = list(runs) if runs is not None else [None] * len(histories)
        if not len(histories) == len(candidates) == len(runs):
            raise InputError(f"{len(histories)} histories, {len(candidates)} candidate lists, {len(runs)} runs")
        return self.run_jobs([self.rank_job(h, c, r) for h, c, r in zip(histories, candidates, runs, strict=True)])

    def recommend_batch(self, histories: Sequence[Sequence[Item]], k: int = 10,
                        runs: Sequence[str | None] | None = None) -> list[Ranking]:
        """:meth:`recommend` for many users (of any loaded runs), re-ranked together."""
        runs = list(runs) if runs is not None else [None] * len(histories)
        if len(histories) != len(runs):
            raise InputError(f"{len(histories)} histories, {len(runs)} runs")
        return self.run_jobs([self.recommend_job(h, k, r) for h, r in zip(histories, runs, strict=True)])


# --------------------------------------------------------------------------------------------- loading

def _run_names(dirs: Sequence[Path]) -> list[str]:
    names: list[str] = []
    for d in dirs:
        base = re.sub(r"[^A-Za-z0-9_-]+", "-", d.resolve().name).strip("-") or "run"
        name, n = base, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names


def _base_key(base: dict[str, Any]) -> str:
    """What makes two runs' bases one: the model and where it is, its fingerprint, dtype, and how it was built."""
    keep = ("model", "path", "fingerprint", "dtype", "seed", "domains", "layers", "tiny_pretrain_steps",
            "max_history")
    b = dict(base)
    if b["model"] != "tiny":  # a model on disk is itself whatever built the run
        b = {k: b.get(k) for k in ("path", "fingerprint", "dtype", "layers")}
    return json.dumps({k: b.get(k) for k in keep if k in b}, sort_keys=True)


def _load_base(m: dict[str, Any], domains: dict[str, DomainData], device: str | None) -> tuple[Any, Any]:
    base = m["base"]
    if m["command"] == "weave":
        from xkern.weave.experiment import WeaveConfig
        from xkern.weave.experiment import load_lm as weave_lm

        cfg = WeaveConfig(model=base["model"] if base["path"] is None else base["path"], layers=base.get("layers"),
                          tiny_pretrain_steps=base.get("tiny_pretrain_steps"),
                          max_history=base.get("max_history", 5), seed=base.get("seed", 0))
        model, tok, _ = weave_lm(cfg, {n: domains[n] for n in base["domains"]})
        if device is not None:
            model.to(device)
        return model, tok
    from xkern.nn import resolve_dtype

    dtype, _ = resolve_dtype(base.get("dtype", "float32"), device)
    if m["command"] == "train-lora":
        from xkern.recipes import load_lm

        spec = base["model"] if base["path"] is None else base["path"]
        return load_lm(spec, [domains[n] for n in base["domains"]], dtype, device, base.get("seed", 0))
    from xkern.nn import load_model
    from xkern.nn.pretrained import load_tokenizer

    if base["path"] is None:
        raise FormatError(f"{m['run_dir']}/run.json: the X-Cross run's base has no path on disk")
    model = load_model(base["path"], dtype=dtype, device=device, progress=False)
    return model, load_tokenizer(base.get("tokenizer") or base["path"])


def load_recommender(run_dirs: str | Path | Sequence[str | Path], *, device: str | None = None,
                     data: str | None = None, retriever: str = "popularity", top_n: int = 50,
                     user_batch: int = 64, row_batch: int = 64, token_budget: int = 2048,
                     calibrate: bool = False) -> Recommender:
    """A :class:`Recommender` over the runs in ``run_dirs`` (one folder or several over one base).

    Every manifest, file, base and catalogue is checked before the model loads: a folder that is not a
    run, a missing file or base (NotFoundError), a changed file or catalogue (FormatError), runs over
    different bases (InputError). ``data`` replaces the data root the runs recorded (data moved).
    """
    from xkern.data.cli import load_domains
    from xkern.serve.runs import catalogue_digest, read_run

    dirs = [Path(run_dirs)] if isinstance(run_dirs, (str, Path)) else [Path(d) for d in run_dirs]
    if not dirs:
        raise InputError("no run folder given")
    check_retriever(retriever)
    manifests = [read_run(d) for d in dirs]
    keys = {_base_key(m["base"]) for m in manifests}
    if len(keys) > 1:
        raise InputError("the runs need different bases (" + "; ".join(f"{m['run_dir']}: {m['base']['model']}"
                                                                     for m in manifests) + "); serve them apart")
    domains: list[dict[str, DomainData]] = []
    for m in manifests:
        d = m["data"]
        wanted = list(dict.fromkeys([*(m["base"].get("domains") or []), m["domain"]]))
        got = load_domains(data or d["root"], wanted, seed=d.get("seed", 0), val_frac=d.get("val_frac", 0.1),
                           mode=d.get("mode", "by-user"), synthetic_users=d.get("synthetic_users"))
        target = got[m["domain"]]
        if m.get("catalogue") != catalogue_digest(target.titles, target.item_ids):
            raise FormatError(f"the {m['domain']} catalogue under {data or d['root']} differs from the one the run in "
                              f"{m['run_dir']} was trained on (titles or item ids changed)")
        domains.append(got)
    model, tok = _load_base(manifests[0], domains[0], device)
    runs: dict[str, _Run] = {}
    for name, m, doms in zip(_run_names(dirs), manifests, domains, strict=True):
        runs[name] = _attach(model, tok, name, m, doms[m["domain"]])
        runs[name].retriever(retriever)  # fit now, not on the first request
    return Recommender(model, tok, runs, retriever=retriever, top_n=top_n, user_batch=user_batch,
                       row_batch=row_batch, token_budget=token_budget, calibrate=calibrate)


def _attach(model: Any, tok: Any, name: str, m: dict[str, Any], domain: DomainData) -> _Run:
    """Load one run's adapters onto the shared base and build its scorer."""
    from xkern.data.encoding import PromptEncoder
    from xkern.serve.scoring import PrefixLikelihoodScorer

    scorer = m["scorer"]
    max_history = int(scorer.get("max_history", 5))
    if scorer["kind"] == "xcross":
        from xkern.xcross.model import XCrossModel

        for a, entry in m["adapters"].items():
            if a in model.list_adapters():
                raise InputError(f"adapter {a!r} of {m['run_dir']} is already loaded by another run; serve X-Cross "
                                 f"runs whose stream adapters have distinct names")
            model.load_adapter(entry["dir"], a)
        xc = XCrossModel.load(scorer["dir"], model, tokenizer=tok, titles=domain.titles, domain=domain.name)
        xc.eval()
        return _Run(name, domain, max_history, xcross=xc)
    loaded = {a: f"{name}-{a}" for a in m["adapters"]}
    for a, entry in m["adapters"].items():
        model.load_adapter(entry["dir"], loaded[a])
    if "merge" in scorer:
        from xkern.weave.merging import merge_loaded

        served = merge_loaded(model, f"{name}-{scorer.get('row', 'merge')}", [loaded[a] for a in scorer["merge"]["of"]],
                              scorer["merge"].get("weights"))
        for a in loaded.values():
            model.delete_adapter(a)
    else:
        served = loaded[scorer["adapter"]]
    enc = PromptEncoder(tok, domain.name, max_history)
    return _Run(name, domain, max_history, scorer=PrefixLikelihoodScorer(model, enc, domain.titles, served),
                adapter=served)
