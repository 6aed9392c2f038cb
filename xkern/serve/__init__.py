"""Batched inference: candidate scoring with a shared prompt prefix, listwise generation."""

from xkern.serve.generate import ListwiseGenerationScorer, greedy_decode, match_title, normalize_title
from xkern.serve.scoring import PrefixLikelihoodScorer, prefill, score_continuations, select_cache

__all__ = ["ListwiseGenerationScorer", "PrefixLikelihoodScorer", "greedy_decode", "match_title", "normalize_title",
           "prefill", "score_continuations", "select_cache"]
