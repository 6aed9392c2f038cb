"""The ``torch`` backend: the reference implementations of every op, on any device (the yardstick)."""

from __future__ import annotations

from xkern.ops import reference, xcross_reference
from xkern.ops.registry import register_backend, register_kernel

register_backend("torch", device_types=("cpu", "cuda"), priority=0,
                 description="torch reference ops (float32, any device)")

register_kernel("lora_linear.forward", "torch")(reference.lora_linear_forward)
register_kernel("lora_linear.input_grad", "torch")(reference.lora_linear_input_grad)
register_kernel("dequantize_nf4", "torch")(reference.dequantize)
register_kernel("xcross_integrate.forward", "torch")(xcross_reference.xcross_forward)
register_kernel("xcross_integrate.input_grad", "torch")(xcross_reference.xcross_input_grad)
