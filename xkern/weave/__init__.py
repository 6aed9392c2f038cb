"""WeaveRec: data weaving, target + hybrid LoRA training, merging, and serving the merge.

``mix_domains`` / ``train`` build the adapters, ``merge_loaded`` / ``folded`` serve their merge (exact
rank ``sum r_i``, SVD rank ``r``, or folded into NF4), ``select_weights`` picks merge weights on a
simplex grid, ``run_weave`` runs the whole experiment (also ``xkern weave``). The quickstart rows
are in :mod:`xkern.demo.weave`.
"""

from xkern.weave.data import domain_examples, listwise_examples, mix_domains, subsample_users
from xkern.weave.merging import (
    folded,
    merge_loaded,
    merged_adapter,
    select_merge_weights,
    select_weights,
    simplex_grid,
)
from xkern.weave.train import CompletionLM, WeaveAdapters, train, train_adapter

__all__ = ["CompletionLM", "WeaveAdapters", "domain_examples", "folded", "listwise_examples", "merge_loaded",
           "merged_adapter", "mix_domains", "run_weave", "select_merge_weights", "select_weights", "simplex_grid",
           "subsample_users", "train", "train_adapter"]


def __getattr__(name: str):  # the experiment (serving, evaluation) loads lazily
    if name == "run_weave":
        from xkern.weave.experiment import run_weave

        return run_weave
    raise AttributeError(name)
