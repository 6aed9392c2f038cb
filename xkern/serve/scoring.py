"""Candidate scoring with a shared prefix: the prompt's KV cache is computed once per user.

Scoring a candidate title by its summed log-probability after a prompt needs the prompt's keys and
values, which are the same for all the candidates of one user. :func:`prefill` runs the prompts of a
batch of users once (left padding, explicit positions, ``logits_to_keep=1``);
:func:`score_continuations` then runs every (user, candidate) continuation as a batch on top of the
user's cache (the cache rows are gathered per candidate), so a user's prompt costs one forward
instead of one per candidate. :class:`PrefixLikelihoodScorer` is the ``Scorer`` built on it: the
same scores as :class:`LikelihoodScorer` (which scores each (prompt, candidate)
sequence independently), within float tolerance.

Works with any decoder whose ``transformers`` forward takes ``attention_mask``, ``position_ids``,
a KV cache (``cache`` or ``past_key_values``, see :mod:`xkern.nn.compat`) and ``logits_to_keep``
(Llama, Qwen2, Mistral, ...) and full attention layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xkern.adapters.peft_format import BASE
from xkern.data.encoding import IGNORE, PromptEncoder, pad_batch, pad_rows, prompt_completion_example
from xkern.data.prompts import titles_of
from xkern.errors import InputError
from xkern.nn.compat import cache_keyword, output_cache
from xkern.train.objectives import model_pad_id, sequence_logprob


@dataclass
class Prefill:
    """The prompts of a batch, run once: cache, next-token log-probabilities, mask and lengths."""

    cache: Any  # transformers DynamicCache, rows = prompts
    last_logprobs: torch.Tensor  # [B, V] float32: log p(next token | prompt)
    mask: torch.Tensor  # [B, P] left-padded attention mask
    lengths: torch.Tensor  # [B] prompt lengths


def _names(adapter: str | Sequence[str] | None, n: int) -> list[str]:
    if adapter is None:
        return [BASE] * n
    if isinstance(adapter, str):
        return [adapter] * n
    names = list(adapter)
    if len(names) != n:
        raise InputError(f"{len(names)} adapter names for {n} prompts")
    return names


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids [B, P]`` and ``mask [B, P]``, each row right-aligned (left padding)."""
    if not rows or any(len(r) == 0 for r in rows):
        raise InputError("every prompt needs at least one token")
    return pad_batch(rows, pad, left=True)


@torch.no_grad()
def prefill(model: Any, prompts: Sequence[Sequence[int]], adapter: str | Sequence[str] | None = None) -> Prefill:
    """Run the prompts once with ``use_cache``; logits only for the last position."""
    device = model.device
    ids, mask = left_pad(prompts, model_pad_id(model))
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                adapter_names=_names(adapter, len(prompts)))
    last = F.log_softmax(out.logits[:, -1].float(), dim=-1)
    return Prefill(output_cache(out), last, mask, mask.sum(-1))


def map_cache(cache: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """A new DynamicCache with ``fn`` applied to every layer's keys and values (full attention only)."""
    from transformers import DynamicCache

    data = []
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):
            raise NotImplementedError("prefix scoring supports full-attention layers only")
        data.append((fn(layer.keys), fn(layer.values)))
    return DynamicCache(ddp_cache_data=data)


def select_cache(cache: Any, index: torch.Tensor) -> Any:
    """A new DynamicCache holding rows ``index`` of ``cache`` (each layer's keys and values gathered)."""
    return map_cache(cache, lambda x: x.index_select(0, index))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``log softmax(logits)[..., target]`` in float32, ``chunk`` positions at a time: a 16-bit ``[R, T, V]``
    never becomes one float32 copy of itself (``V`` is 49,152 for SmolLM2)."""
    flat, tgt = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    out = torch.empty(tgt.shape[0], dtype=torch.float32, device=logits.device)
    buf = torch.empty(min(chunk, flat.shape[0]), flat.shape[1], dtype=torch.float32, device=logits.device)
    for s in range(0, flat.shape[0], chunk):  # one float32 buffer for every chunk: no fresh pages per chunk
        part = buf[: min(chunk, flat.shape[0] - s)]
        part.copy_(flat[s:s + chunk])
        out[s:s + chunk] = part.gather(1, tgt[s:s + chunk, None]).squeeze(1) - torch.logsumexp(part, dim=-1)
    return out.view(targets.shape)


def length_batches(lengths: Sequence[int], token_budget: int, max_rows: int) -> list[list[int]]:
    """Indices grouped for padded batches: longest first, so rows of one batch have nearly one length, and
    each batch as many rows as fit ``rows * longest <= token_budget`` (at least one, at most ``max_rows``)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, cur, width = [], [], 0
    for i in order:
        w = max(width, lengths[i], 1)
        if cur and (len(cur) + 1 > max_rows or (len(cur) + 1) * w > token_budget):
            batches.append(cur)
            cur, w = [], max(lengths[i], 1)
        cur.append(i)
        width = w
    if cur:
        batches.append(cur)
    return batches


@torch.no_grad()
def score_continuations(model: Any, pre: Prefill, continuations: Sequence[Sequence[Sequence[int]]],
                        adapter: str | Sequence[str] | None = None, row_batch: int = 64,
                        token_budget: int = 2048) -> list[np.ndarray]:
    """Summed log-probability of each continuation after its prompt's cached prefix.

    ``continuations[b]`` lists the token rows scored after prompt ``b``. Rows from all prompts run
    together, longest first, in batches of at most ``row_batch`` rows and ``token_budget`` padded
    tokens (rows of one batch have nearly one length, so little is computed for padding), each on a
    gathered copy of its prompts' cache. Returns one float64 array per prompt. An empty continuation
    scores 0.
    """
    device = model.device
    n = len(continuations)
    names = _names(adapter, n)
    flat = [(b, j, list(c)) for b, conts in enumerate(continuations) for j, c in enumerate(conts) if len(c)]
    out = [np.zeros(len(c), dtype=np.float64) for c in continuations]
    pad = model_pad_id(model)
    for batch in length_batches([len(c) for _, _, c in flat], token_budget, row_batch):
        chunk = [flat[i] for i in batch]
        rows = torch.tensor([b for b, _, _ in chunk], dtype=torch.long, device=device)
        ids, cmask = pad_batch([c for _, _, c in chunk], pad)
        width = ids.shape[1]
        ids, cmask = ids.to(device), cmask.to(device)
        total = pre.last_logprobs.index_select(0, rows).gather(1, ids[:, :1]).squeeze(1)  # log p(t_0 | prompt)
        if width > 1:
            mask = torch.cat([pre.mask.index_select(0, rows), cmask], dim=1)
            pos = pre.lengths.index_select(0, rows)[:, None] + torch.arange(width - 1, device=device)[None]
            cache = getattr(model, "select_cache", select_cache)(pre.cache, rows)  # the model's layout if it has one
            logits = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos,
                           use_cache=True, adapter_names=[names[b] for b, _, _ in chunk],
                           **{cache_keyword(model): cache}).logits
            total = total + (token_logprobs(logits, ids[:, 1:]) * cmask[:, 1:]).sum(-1)
        for (b, j, _), v in zip(chunk, total.double().cpu().tolist(), strict=True):
            out[b][j] = v
    return out


def score_users(model: Any, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[Sequence[int]]],
                adapters: str | Sequence[str] | None = None, user_batch: int = 8, row_batch: int = 64,
                token_budget: int = 2048) -> list[np.ndarray]:
    """Each user's candidate rows scored after its prompt: ``user_batch`` prompts per :func:`prefill`, their
    candidates by :func:`score_continuations` on the shared cache; ``adapters`` one name per user (users of
    different adapters share the forwards), a user's candidate count its own. One float64 array per user."""
    names = _names(adapters, len(prompts))
    out: list[np.ndarray] = []
    for s in range(0, len(prompts), max(1, user_batch)):
        e = min(s + max(1, user_batch), len(prompts))
        pre = prefill(model, prompts[s:e], names[s:e])
        out += score_continuations(model, pre, continuations[s:e], names[s:e], row_batch, token_budget)
    return out


class PrefixLikelihoodScorer:
    """A ``Scorer``: each candidate's title scored by its summed log-probability after the user's prompt.

    The same scores as :class:`LikelihoodScorer` (same :class:`~xkern.data.examples.PromptEncoder`
    prompts and title tokens), but each user's prompt runs once (``user_batch`` users per prefill)
    and its KV cache is reused for all the user's candidates (the candidate rows of the ``user_batch``
    users run longest first, at most ``row_batch`` rows and ``token_budget`` padded tokens a forward).
    ``prompt_fn(history_titles, candidate_titles) -> token ids`` replaces the encoder's prompt (e.g.
    the listwise prompt, which also lists the candidates).

    ``calibrate=True`` subtracts each title's :meth:`prior`, its log-probability after the same prompt
    with an empty history (domain-conditional PMI, Holtzman et al. 2021): an LM's likelihood of a
    title is mostly about the title itself (its words, its length), the same for every user, and that
    part drowns the user-conditional part the ranking is after.
    """

    def __init__(self, model: Any, enc: Any, titles: Sequence[str], adapter: str = BASE, user_batch: int = 8,
                 row_batch: int = 64,
                 prompt_fn: Callable[[list[str], list[str]], list[int]] | None = None,
                 calibrate: bool = False, token_budget: int = 2048) -> None:
        self.model, self.enc, self.titles, self.adapter = model, enc, titles, adapter
        self.user_batch, self.row_batch, self.prompt_fn = user_batch, row_batch, prompt_fn
        self.token_budget = token_budget
        self.calibrate = calibrate
        self._prior: dict[int, float] = {}  # item -> log p(title | empty-history prompt), filled on demand

    def prompts(self, histories: Sequence[Sequence[int]], candidates: np.ndarray) -> list[list[int]]:
        out = []
        for hist, cands in zip(histories, candidates, strict=True):
            h = titles_of(hist, self.titles)
            out.append(self.enc.prompt(h) if self.prompt_fn is None
                       else self.prompt_fn(h, titles_of(cands.tolist(), self.titles)))
        return out

    @torch.no_grad()
    def __call__(self, histories: Sequence[Sequence[int]], candidates: np.ndarray) -> np.ndarray:
        candidates = np.asarray(candidates)
        self.model.eval()
        prompts = self.prompts(histories, candidates)
        scores = np.empty(candidates.shape, dtype=np.float64)
        rows = score_users(self.model, prompts, self.continuations(candidates), self.adapter, self.user_batch,
                           self.row_batch, self.token_budget)
        for k, v in enumerate(rows):
            scores[k] = v
        return scores - self.prior(candidates) if self.calibrate else scores

    def continuations(self, candidates: Sequence[Sequence[int]] | np.ndarray) -> list[list[list[int]]]:
        """Each user's candidate titles as the token rows scored after its prompt."""
        return [[self.enc.title(self.titles[int(i)] or "") for i in row] for row in candidates]

    @torch.no_grad()
    def prior(self, candidates: np.ndarray) -> np.ndarray:
        """Summed log-probability of each candidate's title after the prompt of an empty history, shaped
        like ``candidates``; one prefill, each distinct item scored once and cached on the scorer (a
        scorer is for fixed weights: make a new one after training)."""
        candidates = np.asarray(candidates)
        todo = sorted({int(i) for i in candidates.ravel().tolist()} - self._prior.keys())
        if todo:
            self.model.eval()
            prompt = self.enc.prompt([]) if self.prompt_fn is None else self.prompt_fn([], [])
            pre = prefill(self.model, [prompt], self.adapter)
            conts = [[self.enc.title(self.titles[i] or "") for i in todo]]
            values = score_continuations(self.model, pre, conts, self.adapter, self.row_batch, self.token_budget)[0]
            self._prior.update(zip(todo, values.tolist(), strict=True))
        return np.vectorize(self._prior.__getitem__, otypes=[np.float64])(candidates)


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
