"""xkern: fused NF4 + multi-adapter LoRA kernels and the cross-domain recommenders built on them."""

from xkern._version import __version__
from xkern.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from xkern.nn.model import XkernModel, load_model

__all__ = ["NF4Tensor", "XkernModel", "dequantize_nf4", "load_model", "quantize_nf4", "__version__"]
