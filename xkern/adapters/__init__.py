"""LoRA adapters: PEFT-format I/O, the in-memory adapter, and merging on weight deltas."""

from xkern.adapters.merge import fold, merge
from xkern.adapters.peft_format import (
    BASE,
    AdapterError,
    LoraAdapter,
    LoraWeights,
    load_adapter,
    save_adapter,
)

__all__ = ["BASE", "AdapterError", "LoraAdapter", "LoraWeights", "fold", "load_adapter", "merge", "save_adapter"]
