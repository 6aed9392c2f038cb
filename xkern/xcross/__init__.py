"""X-Cross (Hadad et al., SIGIR 2025): n domain adapters run as n streams, mixed after every block.

``XCrossModel`` runs the streams (one core-op launch per linear layer for all of them) with the
integrator between blocks and a scoring head; ``train`` fits its integrators, ``w`` and head with
cross-entropy over the positive and K sampled negatives; ``train_adapter_scorer`` trains a per-domain
LoRA with a head the same way. See docs/xcross.md.
"""

from xkern.data.encoding import PairEncoder
from xkern.xcross.model import ScoringHead, XCrossModel, pool_hidden
from xkern.xcross.train import (
    XCrossTrainConfig,
    XCrossTrainResult,
    candidate_examples,
    evaluate,
    init_head_from,
    train,
    train_adapter_scorer,
)

__all__ = ["PairEncoder", "ScoringHead", "XCrossModel", "XCrossTrainConfig", "XCrossTrainResult",
           "candidate_examples", "evaluate", "init_head_from", "pool_hidden", "train", "train_adapter_scorer"]
