"""Training: the one loop (:func:`xkern.train.loop.fit`), ``train_lora`` for one adapter, and the objectives."""

from xkern.data.encoding import prompt_completion_example
from xkern.train.loop import FitResult, TrainConfig, add_config_arguments, config_from_args, fit
from xkern.train.objectives import CandidateScoring, CausalLM, sequence_logprob
from xkern.train.trainer import TrainResult, evaluate_loss, train_lora

__all__ = ["CandidateScoring", "CausalLM", "FitResult", "TrainConfig", "TrainResult", "add_config_arguments",
           "config_from_args", "evaluate_loss", "fit", "prompt_completion_example", "sequence_logprob", "train_lora"]
