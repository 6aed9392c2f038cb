"""Model layer: ``NF4LoRALinear`` and the ``transformers`` wrapper built on it."""

from xkern.nn.linear import BASE, AdapterRouting, NF4LoRALinear
from xkern.nn.model import XkernModel, load_model

__all__ = ["BASE", "AdapterRouting", "NF4LoRALinear", "XkernModel", "load_model"]
