"""Public ops. Each has a torch reference and faster backends (native CPU, Triton, CUDA), chosen once per call.

See :mod:`xkern.ops.registry` for how backends register and are chosen, and
:mod:`xkern.ops.routing` for the row grouping that a model builds once per forward.
"""

from xkern.ops import backends as _backends  # noqa: F401  (registers every backend)
from xkern.ops.lora_linear import dequantize, lora_linear
from xkern.ops.registry import choose, report
from xkern.ops.routing import RowRouting
from xkern.ops.xcross_integrate import xcross_integrate


def select_backend(op: str, device) -> str:
    """The backend the op's forward would use on ``device`` by default (``XKERN_BACKEND`` honoured)."""
    import torch

    stage = {"lora_linear": "lora_linear.forward", "xcross_integrate": "xcross_integrate.forward"}.get(op, op)
    return choose(stage, torch.device(device))


__all__ = ["RowRouting", "dequantize", "lora_linear", "report", "select_backend", "xcross_integrate"]
