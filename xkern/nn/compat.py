"""What differs between the ``transformers`` releases xkern runs on (>= 4.56), in one place.

Releases from 5.2x take a forward's KV cache as ``cache=`` and return it as ``output.cache``; earlier
ones use ``past_key_values`` for both (the new releases still accept the old name, with a deprecation
warning). Callers ask here instead of naming either.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.cache
def _takes_cache(forward: Any) -> bool:
    try:
        return "cache" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def cache_keyword(model: Any) -> str:
    """The keyword ``model``'s forward takes its KV cache by: ``"cache"`` or ``"past_key_values"``.

    ``model``: a ``transformers`` model, an ``XkernModel`` (its wrapped model decides) or any callable
    whose signature names one of the two."""
    target = getattr(model, "model", model)
    forward = getattr(type(target), "forward", None) or type(target).__call__
    return "cache" if _takes_cache(forward) else "past_key_values"


def cache_field(output_type: type) -> str:
    """The field a ``transformers`` output class carries its KV cache in: ``"cache"`` or ``"past_key_values"``."""
    return "cache" if "cache" in getattr(output_type, "__dataclass_fields__", {}) else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned (``output.cache`` or ``output.past_key_values``), None when it has none.

    ``output``: a ``transformers`` output (a dataclass: its fields decide) or any object with a ``cache``."""
    if hasattr(type(output), "__dataclass_fields__"):
        return getattr(output, cache_field(type(output)), None)
    return getattr(output, "cache", None)
