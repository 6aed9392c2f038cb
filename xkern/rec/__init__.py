"""Recommendation data, splits, negatives, prompts, metrics and evaluation."""
