"""Training adapters of an xkern model: ``train_lora`` and its objectives."""

from xkern.train.objectives import CandidateScoring, CausalLM, prompt_completion_example, sequence_logprob
from xkern.train.trainer import TrainConfig, TrainResult, evaluate_loss, train_lora

__all__ = ["CandidateScoring", "CausalLM", "TrainConfig", "TrainResult", "evaluate_loss", "prompt_completion_example",
           "sequence_logprob", "train_lora"]
