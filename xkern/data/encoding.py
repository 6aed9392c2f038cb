"""Text to token ids, the same way for training and scoring: prompt encoders, pair encoders, padding.

:class:`PromptEncoder` turns a history into the next-item prompt and a title into its completion
(the likelihood models); :class:`PairEncoder` turns a (history, candidate) pair into one
cross-encoder input (X-Cross); :func:`pad_batch` pads token rows into tensors;
:func:`prompt_completion_example` makes a causal-LM example that learns only its completion.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from xkern.data.prompts import (
    MAX_HISTORY,
    candidate_continuation,
    history_block,
    next_item_prompt,
    pointwise_prompt,
    titles_of,
)
from xkern.errors import InputError

IGNORE = -100  # the label of tokens that carry no loss (torch's cross-entropy ignore_index)


def pad_rows(rows: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    """Token rows of different lengths as one ``[B, max_len]`` long tensor filled with ``value``
    (rows start at column 0, or end at the last column with ``left=True``)."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    width = int(lengths.max()) if len(rows) else 0
    out = np.full((len(rows), width), value, dtype=np.int64)
    if lengths.sum():
        flat = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(lengths.sum()))
        cols = np.arange(width)
        mask = (cols >= width - lengths[:, None]) if left else (cols < lengths[:, None])
        out[mask] = flat  # row-major order of the mask is the rows' token order
    return torch.from_numpy(out)


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of padded token rows (see :func:`pad_rows`)."""
    lengths = torch.as_tensor([len(r) for r in rows], dtype=torch.long)
    width = int(lengths.max()) if len(rows) else 0
    cols = torch.arange(width)
    mask = (cols >= width - lengths[:, None]) if left else (cols < lengths[:, None])
    return pad_rows(rows, pad_id, left), mask.long()


def prompt_completion_example(prompt_ids: Sequence[int], completion_ids: Sequence[int],
                              max_len: int | None = None) -> dict[str, list[int]]:
    """A causal-LM example that learns only the completion (prompt labels are -100); truncates the prompt's left."""
    prompt, completion = list(prompt_ids), list(completion_ids)
    if max_len is not None and len(prompt) + len(completion) > max_len:
        keep = max(max_len - len(completion), 1)
        prompt = prompt[-keep:]
        completion = completion[: max_len - len(prompt)]
    return {"input_ids": prompt + completion, "labels": [IGNORE] * len(prompt) + completion}


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


class PairEncoder:
    """(history, candidate) item pairs -> padded token ids of the pointwise cross-encoder prompt.

    The text is :func:`xkern.data.prompts.pointwise_prompt`; its history part and its candidate part
    are tokenized separately (both cached) and joined inside the tokenizer's special tokens. When a
    pair is longer than ``max_tokens`` the history is cut from the left (the most recent titles stay).
    """

    def __init__(self, tokenizer: Any, titles: Sequence[str], domain: str | None = None,
                 max_history: int = MAX_HISTORY, max_tokens: int = 128) -> None:
        self.tokenizer, self.titles, self.domain = tokenizer, list(titles), domain
        self.max_history, self.max_tokens = max_history, max_tokens
        probe = "probe text"
        with_sp = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
        bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
        at = next((i for i in range(len(with_sp) - len(bare) + 1) if with_sp[i:i + len(bare)] == bare), None)
        if at is None:
            raise InputError("cannot locate the tokenizer's special tokens around a text")
        self.head_ids, self.tail_ids = with_sp[:at], with_sp[at + len(bare):]
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        self.pad_id = int(pad or 0)
        self._hist: dict[tuple[int, ...], list[int]] = {}
        self._cand: dict[int, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def history_ids(self, history: Sequence[int]) -> list[int]:
        key = tuple(int(i) for i in history)[-self.max_history:] if self.max_history > 0 else ()
        if key not in self._hist:
            self._hist[key] = self._ids(history_block(titles_of(key, self.titles), self.domain, self.max_history))
        return self._hist[key]

    def candidate_ids(self, item: int) -> list[int]:
        item = int(item)
        if item not in self._cand:
            full = pointwise_prompt([], self.titles[item], self.domain, 0)
            head = history_block([], self.domain, 0)
            assert full.startswith(head)
            self._cand[item] = self._ids(full[len(head):])[: max(self.max_tokens // 2, 1)]
        return self._cand[item]

    def pair_ids(self, history: Sequence[int], item: int) -> list[int]:
        hist, cand = self.history_ids(history), self.candidate_ids(item)
        room = self.max_tokens - len(self.head_ids) - len(self.tail_ids) - len(cand)
        hist = hist[-room:] if room > 0 else []
        return self.head_ids + hist + cand + self.tail_ids

    def encode(self, histories: Sequence[Sequence[int]], candidates: np.ndarray | Sequence[Sequence[int]]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids, attention_mask [U*C, T]``, user-major (the C candidates of user 0 first), right-padded."""
        rows = [self.pair_ids(h, int(c)) for h, cands in zip(histories, candidates, strict=True) for c in cands]
        return pad_batch(rows, self.pad_id)


class CompletionPairEncoder:
    """(history, candidate) -> the causal-LM training row: next-item prompt + candidate title, with
    labels on the title tokens only (exactly the rows :class:`xkern.serve.LikelihoodScorer` scores), so
    a score summed over the labelled tokens is the title's log-likelihood after the prompt."""

    def __init__(self, tokenizer: Any, titles: Sequence[str], domain: str | None = None,
                 max_history: int = MAX_HISTORY, max_tokens: int = 384) -> None:
        self.prompts = PromptEncoder(tokenizer, domain, max_history, max_prompt_tokens=max_tokens)
        self.titles, self.domain = list(titles), domain
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        self.pad_id = int(pad or 0)
        self._prompt: dict[tuple[int, ...], list[int]] = {}

    def prompt_ids(self, history: Sequence[int]) -> list[int]:
        """The next-item prompt of ``history`` (item indices), cached per history."""
        key = tuple(int(i) for i in history)
        if key not in self._prompt:
            self._prompt[key] = self.prompts.prompt(titles_of(key, self.titles))
        return self._prompt[key]

    def pair(self, history: Sequence[int], item: int) -> dict[str, list[int]]:
        return prompt_completion_example(self.prompt_ids(history), self.prompts.title(self.titles[int(item)] or ""))

    def pair_ids(self, history: Sequence[int], item: int) -> list[int]:
        return self.pair(history, item)["input_ids"]
