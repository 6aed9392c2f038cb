"""Recommendation data (a leaf: imports no model code): loaders, splits, negatives, prompts, tokenization and
padding, training examples, metrics, the evaluation harness and the non-neural baselines."""

from xkern.data.amazon import RELEASES, load_release, read_reviews, read_titles, write_domain_folder
from xkern.data.baselines import (
    ItemTransitionScorer,
    PopularityScorer,
    RandomScorer,
    TokenTransitionScorer,
    make_scorer,
)
from xkern.data.domain import DataFormatError, DomainData, clean_title, load_processed, write_processed
from xkern.data.encoding import IGNORE, PairEncoder, PromptEncoder, pad_batch, pad_rows, prompt_completion_example
from xkern.data.evaluate import Scorer, evaluate_scorer, score_candidates, write_report
from xkern.data.examples import candidate_examples, causal_lm_examples, next_item_pairs
from xkern.data.metrics import evaluate_ranking, metrics_from_ranks, pessimistic_ranks
from xkern.data.negatives import CandidateSet, build_candidates, sample_popularity, sample_uniform, user_rng
from xkern.data.splits import Split, by_user, leave_one_out, sample_users, split_users, subsample_train
from xkern.data.synthetic import SyntheticConfig, make_synthetic, write_synthetic

__all__ = [
    "IGNORE",
    "PairEncoder",
    "PromptEncoder",
    "candidate_examples",
    "causal_lm_examples",
    "next_item_pairs",
    "pad_batch",
    "pad_rows",
    "prompt_completion_example",
    "sample_users",
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
