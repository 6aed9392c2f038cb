"""Trained runs as recommenders: ``load_recommender``, ``Recommender``, the ``recommend`` and ``serve`` commands."""

from xkern.recommend.recommender import RETRIEVERS, Ranking, Recommender, ScoredItem, load_recommender

__all__ = ["RETRIEVERS", "Ranking", "Recommender", "ScoredItem", "load_recommender"]
