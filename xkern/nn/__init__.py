"""Model layer: ``NF4LoRALinear``, the ``transformers`` wrapper built on it, and per-call adapter routing."""

from xkern.adapters.peft_format import BASE
from xkern.nn.linear import NF4LoRALinear
from xkern.nn.model import XkernModel, load_model, resolve_dtype
from xkern.nn.routing import SampleRouting, current_routing, routing_scope

__all__ = ["BASE", "NF4LoRALinear", "SampleRouting", "XkernModel", "current_routing", "load_model", "resolve_dtype",
           "routing_scope"]
