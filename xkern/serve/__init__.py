"""Batched inference: candidate scoring (independent or with a shared prompt prefix), listwise generation."""

from xkern.serve.generate import ListwiseGenerationScorer, greedy_decode, match_title, normalize_title
from xkern.serve.scoring import (
    LikelihoodScorer,
    PrefixLikelihoodScorer,
    prefill,
    score_continuations,
    score_users,
    select_cache,
)

__all__ = ["LikelihoodScorer", "ListwiseGenerationScorer", "PrefixLikelihoodScorer", "greedy_decode", "match_title",
           "normalize_title", "prefill", "score_continuations", "score_users", "select_cache"]
