"""Recommendation data as language-model data: training examples and a likelihood scorer.

The prompt is :func:`xkern.rec.prompts.next_item_prompt` (history titles, most recent last); the
completion is the next item's title. A causal-LM example learns the completion only; a candidate
example lists the target and sampled negatives for :class:`xkern.train.CandidateScoring`; the
scorer ranks candidates by the summed log-probability of their titles after the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from xkern.adapters.peft_format import BASE
from xkern.rec.data import DomainData
from xkern.rec.negatives import sample_uniform, user_rng
from xkern.rec.prompts import MAX_HISTORY, candidate_continuation, next_item_prompt, titles_of
from xkern.train.objectives import IGNORE, pad_batch, pad_rows, prompt_completion_example, sequence_logprob


def next_item_pairs(data: DomainData, split: str = "train", max_per_user: int | None = 1,
                    min_history: int = 1) -> list[tuple[int, list[int], int]]:
    """(user, history, target) triples. ``train``: the last ``max_per_user`` positions of each
    sequence (``None``: all); ``val``/``test``: each sequence's last item given the rest."""
    if split != "train":
        users, hists, targets = data.examples(split)
        return [(u, h, t) for u, h, t in zip(users, hists, targets, strict=True) if len(h) >= min_history]
    out = []
    for user in sorted(data.train):
        seq = data.train[user]
        positions = range(min_history, len(seq))
        if max_per_user is not None:
            positions = positions[-max_per_user:] if max_per_user > 0 else range(0)
        out.extend((user, list(seq[:t]), seq[t]) for t in positions)
    return out


class PromptEncoder:
    """Tokenizes prompts and candidate titles the same way for training and scoring."""

    def __init__(self, tokenizer: Any, domain: str | None = None, max_history: int = MAX_HISTORY,
                 max_prompt_tokens: int = 384, max_title_tokens: int = 32) -> None:
        self.tokenizer = tokenizer
        self.domain = domain
        self.max_history = max_history
        self.max_prompt_tokens = max_prompt_tokens
        self.max_title_tokens = max_title_tokens
        self._title_cache: dict[str, list[int]] = {}
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos = [] if eos is None else [int(eos)]

    def prompt(self, history_titles: Sequence[str]) -> list[int]:
        text = next_item_prompt(history_titles, self.domain, self.max_history)
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        return ids[-self.max_prompt_tokens:]  # keep the most recent part

    def title(self, title: str, eos: bool = False) -> list[int]:
        if title not in self._title_cache:
            ids = self.tokenizer(candidate_continuation(title), add_special_tokens=False)["input_ids"]
            self._title_cache[title] = list(ids)[: self.max_title_tokens]
        return self._title_cache[title] + (self.eos if eos else [])


def causal_lm_examples(enc: PromptEncoder, data: DomainData, split: str = "train",
                       max_per_user: int | None = 1) -> list[dict[str, list[int]]]:
    """Prompt -> next item's title (+ EOS), loss on the title only."""
    return [prompt_completion_example(enc.prompt(titles_of(h, data.titles)), enc.title(data.titles[t] or "", eos=True))
            for _, h, t in next_item_pairs(data, split, max_per_user)]


def candidate_examples(enc: PromptEncoder, data: DomainData, split: str = "train", n_neg: int = 4,
                       seed: int = 0, max_per_user: int | None = 1) -> list[dict[str, Any]]:
    """Target + ``n_neg`` uniform negatives (not in the user's sequence), target at a seeded position."""
    out = []
    for user, hist, tgt in next_item_pairs(data, split, max_per_user):
        rng = user_rng(seed, data.name, f"lm-{split}", int(user), len(hist))
        neg = sample_uniform(data.n_items, set(hist) | {tgt} | data.user_items(user), n_neg, rng)
        pos = int(rng.integers(0, n_neg + 1))
        items = np.insert(neg, pos, tgt).tolist()
        out.append({"prompt_ids": enc.prompt(titles_of(hist, data.titles)),
                    "candidates": [enc.title(data.titles[i] or "") for i in items], "target": pos})
    return out


class LikelihoodScorer:
    """A ``Scorer``: candidates ranked by the summed log-probability of their title after the prompt.

    Every (user, candidate) sequence is scored independently in padded batches of ``batch_size``
    rows; ``adapter`` selects the adapter (``"__base__"``: the base model).
    """

    def __init__(self, model: Any, enc: PromptEncoder, titles: Sequence[str], adapter: str = BASE,
                 batch_size: int = 64) -> None:
        self.model, self.enc, self.titles, self.adapter, self.batch_size = model, enc, titles, adapter, batch_size
        pad = getattr(model.config, "pad_token_id", None)
        self.pad = int(pad if pad is not None else 0)

    @torch.no_grad()
    def __call__(self, histories: Sequence[Sequence[int]], candidates: np.ndarray) -> np.ndarray:
        candidates = np.asarray(candidates)
        rows, labels = [], []
        for hist, cands in zip(histories, candidates, strict=True):
            prompt = self.enc.prompt(titles_of(hist, self.titles))
            for item in cands.tolist():
                ex = prompt_completion_example(prompt, self.enc.title(self.titles[item] or ""))
                rows.append(ex["input_ids"])
                labels.append(ex["labels"])
        scores = np.empty(len(rows), dtype=np.float64)
        device = self.model.device
        self.model.eval()
        for s in range(0, len(rows), self.batch_size):
            ids, mask = pad_batch(rows[s : s + self.batch_size], self.pad)
            lbl = pad_rows(labels[s : s + self.batch_size], IGNORE)
            ids, lbl, mask = ids.to(device), lbl.to(device), mask.to(device)
            logits = self.model(input_ids=ids, attention_mask=mask, adapter_names=self.adapter).logits
            scores[s : s + len(ids)] = sequence_logprob(logits, ids, lbl).double().cpu().numpy()
        return scores.reshape(candidates.shape)
