"""Recommendation data, splits, negatives, prompts, metrics and evaluation."""

from xkern.rec.amazon import RELEASES, load_release, read_reviews, read_titles, write_domain_folder
from xkern.rec.baselines import (
    ItemTransitionScorer,
    PopularityScorer,
    RandomScorer,
    TokenTransitionScorer,
    make_scorer,
)
from xkern.rec.data import DataFormatError, DomainData, clean_title, load_processed, write_processed
from xkern.rec.evaluate import Scorer, evaluate_scorer, score_candidates, write_report
from xkern.rec.metrics import evaluate_ranking, metrics_from_ranks, pessimistic_ranks
from xkern.rec.negatives import CandidateSet, build_candidates, sample_popularity, sample_uniform, user_rng
from xkern.rec.splits import Split, by_user, leave_one_out, split_users, subsample_train
from xkern.rec.synthetic import SyntheticConfig, make_synthetic, write_synthetic

__all__ = [
    "RELEASES",
    "CandidateSet",
    "DataFormatError",
    "DomainData",
    "ItemTransitionScorer",
    "PopularityScorer",
    "RandomScorer",
    "Scorer",
    "Split",
    "SyntheticConfig",
    "TokenTransitionScorer",
    "build_candidates",
    "by_user",
    "clean_title",
    "evaluate_ranking",
    "evaluate_scorer",
    "leave_one_out",
    "load_processed",
    "load_release",
    "make_scorer",
    "make_synthetic",
    "metrics_from_ranks",
    "pessimistic_ranks",
    "read_reviews",
    "read_titles",
    "sample_popularity",
    "sample_uniform",
    "score_candidates",
    "split_users",
    "subsample_train",
    "user_rng",
    "write_domain_folder",
    "write_processed",
    "write_report",
    "write_synthetic",
]
