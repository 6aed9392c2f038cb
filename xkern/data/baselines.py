"""Non-neural scorers: sanity floors and a check that the data is learnable.

All follow the scorer contract of xkern.data.evaluate: `scorer(histories, candidates) -> [B, C]`.
- RandomScorer: the chance floor (HR@1 ~ 1/C).
- PopularityScorer: training interaction counts.
- ItemTransitionScorer: item-to-item transitions inside a window (a Markov/co-occurrence model on
  item ids; needs target-domain training data).
- TokenTransitionScorer: transitions between title WORDS (positive PMI). Words like a theme or a
  brand are shared across domains, so it can be trained on source domains only and applied to an
  unseen target domain: the simplest cross-domain transfer baseline.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from xkern.data.domain import DomainData
from xkern.data.evaluate import Scorer, evaluate_scorer
from xkern.data.negatives import CandidateSet
from xkern.errors import InputError

_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_STOP = {"a", "an", "and", "for", "of", "the", "with", "in", "to", "by", "on", "edition"}


class RandomScorer:
    """Uniform random scores; deterministic for a given seed and call order."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, histories: Sequence[Sequence[int]], candidates: np.ndarray) -> np.ndarray:
        return self.rng.random(np.shape(candidates))

    def skip_rows(self, n: int, c: int) -> None:
        """Advance as if ``n`` rows of ``c`` candidates were scored (a shard starting at row ``n``)."""
        self.rng.random((n, c))


class PopularityScorer:
    """Score = number of training interactions of the candidate (ties are ranked pessimistically)."""

    def __init__(self, train: dict[int, list[int]], n_items: int) -> None:
        counts = np.zeros(n_items, dtype=np.float64)
        for seq in train.values():
            np.add.at(counts, np.asarray(seq, dtype=np.int64), 1.0)
        self.counts = counts

    def __call__(self, histories: Sequence[Sequence[int]], candidates: np.ndarray) -> np.ndarray:
        return self.counts[np.asarray(candidates)]


class ItemTransitionScorer:
    """Score(c) = sum over the last `window` history items h (weight decay**distance) of
    P(c follows h within the window), plus a small popularity term to break ties."""

    def __init__(
        self,
        train: dict[int, list[int]],
        n_items: int,
        window: int = 3,
        decay: float = 0.5,
        pop_weight: float = 1e-3,
    ) -> None:
        self.window, self.decay, self.pop_weight = window, decay, pop_weight
        self.next: dict[int, Counter] = defaultdict(Counter)
        counts = np.zeros(n_items, dtype=np.float64)
        for seq in train.values():
            for pos, item in enumerate(seq):
                counts[item] += 1
                for d in range(1, window + 1):
                    if pos + d < len(seq):
                        self.next[item][seq[pos + d]] += decay ** (d - 1)
        self.totals = {i: sum(c.values()) for i, c in self.next.items()}
        self.pop = counts / max(counts.sum(), 1.0)

    def __call__(self, histories: Sequence[Sequence[int]], candidates: np.ndarray) -> np.ndarray:
        cand = np.asarray(candidates)
        scores = self.pop_weight * self.pop[cand]
        for b, hist in enumerate(histories):
            for d, h in enumerate(reversed(hist[-self.window :])):
                nxt = self.next.get(h)
                if not nxt:
                    continue
                w = self.decay**d / self.totals[h]
                scores[b] += w * np.fromiter(
                    (nxt.get(int(c), 0.0) for c in cand[b]), np.float64, cand.shape[1]
                )
        return scores


def title_tokens(title: str) -> set[str]:
    return {w for w in _WORD.findall(title.lower()) if w not in _STOP}


class TokenTransitionScorer:
    """Positive PMI between words of consecutive items' titles, learned on any set of domains.

    fit: for each adjacent pair (a, b) in training sequences, every word pair (u in a, v in b) is
    counted. score(c) = sum over the last `window` history items h (decay**distance) of the mean
    PPMI(u, v) over words u of h and v of c. Unseen words contribute 0.
    """

    def __init__(self, window: int = 3, decay: float = 0.5) -> None:
        self.window, self.decay = window, decay
        self.pair: Counter = Counter()
        self.left: Counter = Counter()
        self.right: Counter = Counter()
        self.n_pairs = 0
        self._cache: dict[tuple[str, str], float] = {}

    def fit(self, sequences: Iterable[Sequence[int]], titles: Sequence[str]) -> TokenTransitionScorer:
        """Add one domain's training sequences (call once per domain)."""
        toks = [title_tokens(t) for t in titles]
        for seq in sequences:
            for a, b in zip(seq[:-1], seq[1:], strict=False):
                ta, tb = toks[a], toks[b]
                self.n_pairs += 1
                self.left.update(ta)
                self.right.update(tb)
                self.pair.update((u, v) for u in ta for v in tb)
        self._cache.clear()
        return self

    def ppmi(self, u: str, v: str) -> float:
        key = (u, v)
        if key not in self._cache:
            n = self.pair.get(key, 0)
            val = 0.0
            if n:
                val = max(0.0, math.log(n * self.n_pairs / (self.left[u] * self.right[v])))
            self._cache[key] = val
        return self._cache[key]

    def for_domain(self, titles: Sequence[str]) -> _BoundTokenScorer:
        """A scorer over the item indices of a domain with these titles."""
        return _BoundTokenScorer(self, [title_tokens(t) for t in titles])

    def ppmi_rows(self) -> tuple[dict[str, int], np.ndarray, np.ndarray, np.ndarray]:
        """All positive PPMI entries as CSR rows over a vocabulary: (vocab, indptr, indices, values)."""
        vocab: dict[str, int] = {}
        for u, v in self.pair:
            vocab.setdefault(u, len(vocab))
            vocab.setdefault(v, len(vocab))
        if not self.pair:
            return vocab, np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0)
        keys = list(self.pair)
        n = np.fromiter((self.pair[k] for k in keys), np.float64, len(keys))
        left = np.fromiter((self.left[u] for u, _ in keys), np.float64, len(keys))
        right = np.fromiter((self.right[v] for _, v in keys), np.float64, len(keys))
        rows = np.fromiter((vocab[u] for u, _ in keys), np.int64, len(keys))
        cols = np.fromiter((vocab[v] for _, v in keys), np.int64, len(keys))
        val = np.log(n * self.n_pairs / (left * right))
        keep = val > 0
        rows, cols, val = rows[keep], cols[keep], val[keep]
        order = np.argsort(rows, kind="stable")
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(vocab)))])
        return vocab, indptr, cols[order], val[order]


class _BoundTokenScorer:
    """Vectorised scoring: g[v] = sum_h decay**d / |t_h| * sum_{u in t_h} PPMI(u, v) per user, then
    score(c) = mean of g over the words of c (same value as the pairwise definition above)."""

    def __init__(self, model: TokenTransitionScorer, toks: list[set[str]]) -> None:
        self.model = model
        vocab, self.indptr, self.indices, self.values = model.ppmi_rows()
        self.unk = len(vocab)  # words never seen in training: no PPMI row, g = 0
        width = max((len(t) for t in toks), default=1) or 1
        self.item_tok = np.full((len(toks), width), self.unk, dtype=np.int64)
        for i, t in enumerate(toks):
            ids = sorted(vocab.get(w, self.unk) for w in t)
            self.item_tok[i, : len(ids)] = ids
        self.item_len = np.asarray([len(t) for t in toks], dtype=np.float64)

    def __call__(self, histories: Sequence[Sequence[int]], candidates: np.ndarray) -> np.ndarray:
        cand = np.asarray(candidates)
        scores = np.zeros(cand.shape, dtype=np.float64)
        g = np.zeros(self.unk + 1, dtype=np.float64)
        for b, hist in enumerate(histories):
            g[:] = 0.0
            for d, h in enumerate(reversed(hist[-self.model.window :])):
                if self.item_len[h] == 0:
                    continue
                w = self.model.decay**d / self.item_len[h]
                for u in self.item_tok[h]:
                    if u != self.unk:
                        s, e = self.indptr[u], self.indptr[u + 1]
                        g[self.indices[s:e]] += w * self.values[s:e]
            g[self.unk] = 0.0
            c = cand[b]
            scores[b] = g[self.item_tok[c]].sum(axis=1) / np.maximum(self.item_len[c], 1.0)
        return scores


SCORERS = ("random", "popularity", "item-markov", "token-markov", "sasrec")


def make_scorer(name: str, data: DomainData, seed: int = 0, sources: Sequence[DomainData] = ()) -> Scorer:
    """Build a named baseline for one DomainData (`sources`: extra DomainData for token-markov)."""
    if name == "random":
        return RandomScorer(seed)
    if name == "popularity":
        return PopularityScorer(data.train, data.n_items)
    if name == "item-markov":
        return ItemTransitionScorer(data.train, data.n_items)
    if name == "token-markov":
        model = TokenTransitionScorer()
        for d in [*sources, data]:
            model.fit(d.train.values(), d.titles)
        return model.for_domain(data.titles)
    if name == "sasrec":
        from xkern.data.sasrec import SASRecConfig, SASRecScorer

        return SASRecScorer.train(data, SASRecConfig(seed=seed))
    raise InputError(f"unknown scorer {name!r} ({', '.join(SCORERS)})")


def baseline_quality_rows(data: DomainData, cands: CandidateSet, names: Sequence[str], seed: int = 0,
                          n_boot: int = 2000, split: str = "test") -> list[dict[str, Any]]:
    """Rows of the quality results format (``xkern.data.confidence.quality_row``: per-user ranks and
    bootstrap intervals) for the named baselines, each ranked on exactly ``cands``."""
    from xkern.data.confidence import quality_row
    from xkern.data.evaluate import rank_candidates

    rows = []
    for name in names:
        scorer = make_scorer(name, data, seed=seed)
        ranks = rank_candidates(scorer, cands, 256)
        fit = scorer.summary() if hasattr(scorer, "summary") else {}
        rows.append(quality_row(name, ranks, target=data.name, trainable_params=fit.get("trainable_params", 0),
                                val_loss_start=fit.get("val_loss_start"), val_loss_best=fit.get("val_loss_best"),
                                n_boot=n_boot, seed=seed, split=split))
    return rows


def evaluate_baselines(data: DomainData, cands: CandidateSet,
                       names: Sequence[str] = ("random", "popularity", "item-markov"), seed: int = 0,
                       ks: Sequence[int] = (1, 10)) -> list[dict[str, Any]]:
    """Baseline rows for a model table: each named scorer ranked on exactly ``cands``."""
    return [{"scorer": n, **evaluate_scorer(make_scorer(n, data, seed=seed), cands, tuple(ks), 256)} for n in names]
