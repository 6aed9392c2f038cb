"""Listwise generation (WeaveRec's reference format): the model writes the next item's title.

The prompt (:func:`xkern.data.prompts.listwise_prompt`) lists the user's history titles and the 30
candidate titles; the model generates greedily (KV cache, batched users, one adapter per user) and
the first line it writes is matched to a candidate: exact match first (case, spacing, surrounding
quotes and a leading ``"12."`` numbering ignored), otherwise the candidate whose title has the
highest likelihood after the same prompt (a *fallback*, counted separately).

:class:`ListwiseGenerationScorer` is a ``Scorer``: its ranking puts the matched candidate first and
orders the rest by that likelihood, so HR@1 is the generation's accuracy and HR@10 / NDCG@10 are
defined too. The prompt runs once per user: its cache serves both the likelihood of the 30 titles
(:func:`xkern.serve.scoring.score_continuations`) and the greedy decoding.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from xkern.adapters.peft_format import BASE
from xkern.data.prompts import MAX_HISTORY, listwise_prompt, titles_of
from xkern.nn.compat import cache_keyword
from xkern.serve.scoring import Prefill, _names, prefill, score_continuations

_NUMBERING = re.compile(r"^\s*(?:\(?\d{1,3}[.):]\s+)")
_EDGE = re.compile(r"^[\s\"'`*\-]+|[\s\"'`*.]+$")
_SPACE_BEFORE = re.compile(r"\s+([,.;:!?%)\]}])")
_SPACE_AFTER = re.compile(r"([(\[{])\s+")


def normalize_title(text: str) -> str:
    """Casefolded, NFKC, whitespace collapsed (none before closing punctuation or after opening brackets, as
    word-level tokenizers decode it), surrounding quotes / leading numbering / final period removed."""
    t = unicodedata.normalize("NFKC", text or "").strip()
    t = _NUMBERING.sub("", t, count=1)
    t = _EDGE.sub("", " ".join(t.split()))
    t = _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", t))
    return t.casefold()


def first_line(text: str) -> str:
    """The first non-empty line of generated text."""
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def match_title(text: str, candidate_titles: Sequence[str]) -> int | None:
    """Index of the candidate whose normalized title equals the normalized first line of ``text``."""
    want = normalize_title(first_line(text))
    if not want:
        return None
    for j, title in enumerate(candidate_titles):
        if normalize_title(title) == want:
            return j
    return None


@torch.no_grad()
def greedy_decode(model: Any, pre: Prefill, tokenizer: Any, adapter: str | Sequence[str] | None = None,
                  max_new_tokens: int = 32) -> list[str]:
    """Greedy continuation of each prefilled prompt until EOS, a newline, or ``max_new_tokens``.

    Extends ``pre.cache`` in place (score continuations on it first). Returns the decoded texts.
    """
    device = model.device
    n = pre.mask.shape[0]
    names = _names(adapter, n)
    eos = getattr(tokenizer, "eos_token_id", None)
    tok = pre.last_logprobs.argmax(-1)
    tokens = [[int(t)] for t in tok.tolist()]
    done = [False] * n
    mask, pos = pre.mask, pre.lengths.clone()

    def finished(i: int) -> bool:
        return (eos is not None and tokens[i][-1] == eos) or "\n" in tokenizer.decode(
            tokens[i], skip_special_tokens=True).lstrip()

    done = [finished(i) for i in range(n)]
    for _ in range(max_new_tokens - 1):
        if all(done):
            break
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos[:, None],
                    use_cache=True, adapter_names=names, **{cache_keyword(model): pre.cache})
        pos = pos + 1
        tok = out.logits[:, -1].argmax(-1)
        for i, t in enumerate(tok.tolist()):
            if not done[i]:
                tokens[i].append(int(t))
                done[i] = finished(i)
    texts = []
    for row in tokens:
        if eos is not None and eos in row:
            row = row[:row.index(eos)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


class ListwiseGenerationScorer:
    """A ``Scorer`` that generates the next title from the listwise prompt and matches it to a candidate.

    ``stats`` counts users, exact matches and fallbacks over every call; ``last`` holds the last
    batch's generated texts and matched columns (``-1``: fallback). ``fallback_scorer``: another
    ``Scorer`` whose scores rank the candidates instead of their likelihood after the listwise
    prompt (e.g. the cached scores of the likelihood mode, to save a second pass over the titles).
    """

    def __init__(self, model: Any, enc: Any, titles: Sequence[str], adapter: str = BASE,
                 max_history: int = MAX_HISTORY, user_batch: int = 8, row_batch: int = 64,
                 max_new_tokens: int = 32, max_prompt_tokens: int = 2048, fallback_scorer: Any = None) -> None:
        self.model, self.enc, self.titles, self.adapter = model, enc, titles, adapter
        self.tokenizer = enc.tokenizer
        self.max_history, self.user_batch, self.row_batch = max_history, user_batch, row_batch
        self.max_new_tokens, self.max_prompt_tokens = max_new_tokens, max_prompt_tokens
        self.fallback_scorer = fallback_scorer
        self.stats = {"users": 0, "exact": 0, "fallback": 0}
        self.last: dict[str, list] = {"texts": [], "matched": []}

    def prompt(self, history_titles: Sequence[str], candidate_titles: Sequence[str]) -> list[int]:
        text = listwise_prompt(history_titles, candidate_titles, self.enc.domain, self.max_history)
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])[-self.max_prompt_tokens:]

    @torch.no_grad()
    def __call__(self, histories: Sequence[Sequence[int]], candidates: np.ndarray) -> np.ndarray:
        candidates = np.asarray(candidates)
        self.model.eval()
        scores = np.empty(candidates.shape, dtype=np.float64)
        self.last = {"texts": [], "matched": []}
        for s in range(0, len(histories), self.user_batch):
            e = min(s + self.user_batch, len(histories))
            cand_titles = [titles_of(row, self.titles) for row in candidates[s:e].tolist()]
            prompts = [self.prompt(titles_of(h, self.titles), ct)
                       for h, ct in zip(histories[s:e], cand_titles, strict=True)]
            pre = prefill(self.model, prompts, self.adapter)
            if self.fallback_scorer is None:
                conts = [[self.enc.title(self.titles[i] or "") for i in row] for row in candidates[s:e].tolist()]
                like = score_continuations(self.model, pre, conts, self.adapter, self.row_batch)
            else:
                like = list(np.asarray(self.fallback_scorer(histories[s:e], candidates[s:e]), dtype=np.float64))
            texts = greedy_decode(self.model, pre, self.tokenizer, self.adapter, self.max_new_tokens)
            for k, (text, ct, ll) in enumerate(zip(texts, cand_titles, like, strict=True)):
                j = match_title(text, ct)
                row = ll.copy()
                self.stats["users"] += 1
                if j is None:
                    self.stats["fallback"] += 1  # the ranking is the likelihood's: its argmax is the pick
                else:
                    self.stats["exact"] += 1
                    row[j] = row.max() + 1.0
                scores[s + k] = row
                self.last["texts"].append(text)
                self.last["matched"].append(-1 if j is None else j)
        return scores
