"""Public ops. Each has a torch reference, a Triton kernel and (where built) a CUDA kernel behind one dispatch."""

from xkern.ops.dispatch import select_backend
from xkern.ops.lora_linear import dequantize, lora_linear
from xkern.ops.xcross_integrate import xcross_integrate

__all__ = ["dequantize", "lora_linear", "select_backend", "xcross_integrate"]
