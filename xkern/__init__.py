"""xkern: fused NF4 + multi-adapter LoRA kernels and the cross-domain recommenders built on them."""

from xkern._version import __version__
from xkern.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from xkern.nn.model import XkernModel, load_model

__all__ = ["NF4Tensor", "Recommender", "XkernModel", "dequantize_nf4", "load_model", "load_recommender",
           "quantize_nf4", "__version__"]


def __getattr__(name: str):
    """``Recommender`` and ``load_recommender`` load on first use: they import the recommenders' models."""
    if name in ("Recommender", "load_recommender"):
        from xkern import recommend

        return getattr(recommend, name)
    raise AttributeError(f"module 'xkern' has no attribute {name!r}")
