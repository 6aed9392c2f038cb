"""WeaveRec's data weaving: target examples mixed with each source's, plus the two prompt formats.

:func:`mix_domains` draws, for each source, a seeded sample of target and source examples (equal
amounts by default) and shuffles them together. :func:`domain_examples` turns one domain's training
sequences into causal-LM examples in the likelihood format (``next_item``: history -> next title),
the listwise format (``listwise``: history + candidate titles -> next title, WeaveRec's reference)
or ``both``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from xkern.data.domain import DomainData
from xkern.data.encoding import PromptEncoder, prompt_completion_example
from xkern.data.examples import next_item_pairs
from xkern.data.negatives import sample_uniform, user_rng
from xkern.data.prompts import listwise_prompt, titles_of
from xkern.data.splits import sample_users
from xkern.errors import InputError

T = TypeVar("T")
FORMATS = ("next_item", "listwise", "both")


def _draw(items: Sequence[T], n: int, rng: np.random.Generator, what: str) -> list[T]:
    if n > len(items):
        raise InputError(f"asked for {n} {what} examples, only {len(items)} available")
    idx = rng.permutation(len(items))[:n]
    return [items[i] for i in sorted(idx.tolist())]


def mix_domains(target: Sequence[T], sources: Sequence[Sequence[T]] | Mapping[str, Sequence[T]],
                per_domain: int | None = None, seed: int = 0) -> list[list[T]] | dict[str, list[T]]:
    """For each source, a shuffled mix of target and source training examples.

    ``per_domain``: how many examples to take from each side; ``None`` (default) takes equal amounts,
    ``min(len(target), len(source))`` from each. The draw (without replacement) and the shuffle are
    seeded by ``seed`` and the source's position (or name), so a mix does not depend on the other
    sources. Returns a list of mixes (or a dict, for a dict of sources), each ``2 * n`` long.
    """
    named = isinstance(sources, Mapping)
    keyed = list(sources.items()) if named else list(enumerate(sources))
    target = list(target)
    out: dict[Any, list[T]] = {}
    for key, src in keyed:
        src = list(src)
        n = min(len(target), len(src)) if per_domain is None else int(per_domain)
        if n < 0:
            raise InputError(f"per_domain must be >= 0, got {per_domain}")
        rng = user_rng(seed, "weave-mix", key)
        mixed = _draw(target, n, rng, "target") + _draw(src, n, rng, f"source {key!r}")
        out[key] = [mixed[i] for i in rng.permutation(len(mixed)).tolist()]
    return out if named else [out[k] for k, _ in keyed]


def listwise_examples(enc: PromptEncoder, data: DomainData, n_candidates: int = 30, split: str = "train",
                      max_per_user: int | None = 1, seed: int = 0) -> list[dict[str, list[int]]]:
    """Listwise prompt (history + ``n_candidates`` titles: the target and uniform negatives at a seeded
    position) -> the target's title + EOS; loss on the title only."""
    out = []
    for user, hist, tgt in next_item_pairs(data, split, max_per_user):
        rng = user_rng(seed, data.name, f"listwise-{split}", int(user), len(hist))
        neg = sample_uniform(data.n_items, set(hist) | {tgt} | data.user_items(user), n_candidates - 1, rng)
        items = np.insert(neg, int(rng.integers(0, n_candidates)), tgt).tolist()
        text = listwise_prompt(titles_of(hist, data.titles), titles_of(items, data.titles), enc.domain,
                               enc.max_history)
        prompt = list(enc.tokenizer(text, add_special_tokens=True)["input_ids"])
        out.append(prompt_completion_example(prompt, enc.title(data.titles[tgt] or "", eos=True)))
    return out


def domain_examples(tokenizer: Any, data: DomainData, fmt: str = "next_item", max_history: int = 5,
                    max_per_user: int | None = 1, n_candidates: int = 30, seed: int = 0,
                    max_examples: int | None = None) -> list[dict[str, list[int]]]:
    """Training examples of one domain in ``fmt`` (prompts name the domain itself).

    ``max_examples`` keeps a seeded sample of that many training pairs (per format) before
    tokenizing, so large domains stay cheap.
    """
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if max_examples is not None:
        data = subsample_users(data, max_examples, seed)
    enc = PromptEncoder(tokenizer, data.name, max_history=max_history)
    out: list[dict[str, list[int]]] = []
    if fmt in ("next_item", "both"):
        pairs = next_item_pairs(data, "train", max_per_user)
        out += [prompt_completion_example(enc.prompt(titles_of(h, data.titles)),
                                          enc.title(data.titles[t] or "", eos=True)) for _, h, t in pairs]
    if fmt in ("listwise", "both"):
        out += listwise_examples(enc, data, n_candidates, "train", max_per_user, seed)
    return out


def subsample_users(data: DomainData, n_users: int, seed: int = 0) -> DomainData:
    """A copy of ``data`` whose ``train`` keeps a seeded sample of ``n_users`` users (with >= 2 items)."""
    from dataclasses import replace

    users = [u for u, s in data.train.items() if len(s) >= 2]
    if n_users >= len(users):
        return data
    keep = sample_users(users, n_users, user_rng(seed, "weave-users", data.name))
    return replace(data, train={u: data.train[u] for u in keep})
