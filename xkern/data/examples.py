"""Recommendation data as language-model training examples.

The prompt is :func:`xkern.data.prompts.next_item_prompt` (history titles, most recent last); the
completion is the next item's title. A causal-LM example learns the completion only; a candidate
example lists the target and sampled negatives for :class:`xkern.train.CandidateScoring`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xkern.data.domain import DomainData
from xkern.data.encoding import PromptEncoder, prompt_completion_example
from xkern.data.negatives import sample_uniform, user_rng
from xkern.data.prompts import titles_of
from xkern.errors import InputError

POSITIONS = ("last", "random")


def next_item_pairs(data: DomainData, split: str = "train", max_per_user: int | None = 1,
                    min_history: int = 1, positions: str = "last", seed: int = 0,
                    epoch: int = 0) -> list[tuple[int, list[int], int]]:
    """(user, history, target) triples. ``train``: ``max_per_user`` target positions of each sequence
    (``None``: all), its ``last`` ones (the most recent) or ``random`` ones, drawn uniformly without
    replacement per (seed, domain, user, epoch), so that epochs over the same users see the whole of their
    sequences; ``val``/``test``: each sequence's last item given the rest."""
    if positions not in POSITIONS:
        raise InputError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if split != "train":
        users, hists, targets = data.examples(split)
        return [(u, h, t) for u, h, t in zip(users, hists, targets, strict=True) if len(h) >= min_history]
    out = []
    for user in sorted(data.train):
        seq = data.train[user]
        chosen = range(min_history, len(seq))
        if max_per_user is not None and max_per_user < len(chosen):
            if max_per_user <= 0:
                chosen = range(0)
            elif positions == "last":
                chosen = chosen[-max_per_user:]
            else:
                rng = user_rng(seed, data.name, "target-position", int(user), epoch)
                chosen = [chosen[i] for i in sorted(rng.choice(len(chosen), max_per_user, replace=False))]
        out.extend((user, list(seq[:t]), seq[t]) for t in chosen)
    return out


def causal_lm_examples(enc: PromptEncoder, data: DomainData, split: str = "train",
                       max_per_user: int | None = 1, positions: str = "last", seed: int = 0,
                       epoch: int = 0) -> list[dict[str, list[int]]]:
    """Prompt -> next item's title (+ EOS), loss on the title only."""
    return [prompt_completion_example(enc.prompt(titles_of(h, data.titles)), enc.title(data.titles[t] or "", eos=True))
            for _, h, t in next_item_pairs(data, split, max_per_user, positions=positions, seed=seed, epoch=epoch)]


def candidate_examples(enc: PromptEncoder, data: DomainData, split: str = "train", n_neg: int = 4,
                       seed: int = 0, max_per_user: int | None = 1, positions: str = "last",
                       epoch: int = 0) -> list[dict[str, Any]]:
    """Target + ``n_neg`` uniform negatives (not in the user's sequence), target at a seeded position."""
    out = []
    for user, hist, tgt in next_item_pairs(data, split, max_per_user, positions=positions, seed=seed, epoch=epoch):
        rng = user_rng(seed, data.name, f"lm-{split}", int(user), len(hist))
        neg = sample_uniform(data.n_items, set(hist) | {tgt} | data.user_items(user), n_neg, rng)
        pos = int(rng.integers(0, n_neg + 1))
        items = np.insert(neg, pos, tgt).tolist()
        out.append({"prompt_ids": enc.prompt(titles_of(hist, data.titles)),
                    "candidates": [enc.title(data.titles[i] or "") for i in items], "target": pos})
    return out
