"""CUDA implementation of ``lora_linear`` (the ``xkern._C`` extension): the decode regime.

For 1..16 rows of float16 / bfloat16 activations on sm_8x / sm_90 GPUs, ``lora_linear_forward``
runs the kernels of ``csrc/nf4_lora_decode.cu``: a small LoRA shrink launch (``xa = x A[a]^T``), then
one NF4 GEMV launch that streams the packed weight once for all rows, split over K where N is small,
and adds ``s[a] * xa B[a]^T`` in its epilogue. Everything else -- more rows, float32 activations,
other GPUs, CPU tensors -- and the backward go to the Triton implementation (the torch reference
where Triton cannot run). Signatures and semantics are those of :mod:`xkern.ops.reference`.
"""

from __future__ import annotations

import functools

import torch

from xkern.nf4 import NF4Tensor
from xkern.ops import reference
from xkern.ops.dispatch import cuda_extension_ops, triton_available, triton_interpreter_enabled

MAX_ROWS = 16
_ACT_DTYPES = (torch.float16, torch.bfloat16)
_LORA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _arch_supported(device_index: int) -> bool:
    """The extension carries sm_80 code (runs on every sm_8x) and sm_90a code (runs on sm_90 only)."""
    major, minor = torch.cuda.get_device_capability(device_index)
    return major == 8 or (major, minor) == (9, 0)


def supports(x: torch.Tensor, weight: NF4Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> bool:
    """Whether the CUDA decode kernel handles this call (else the fallback runs)."""
    if not (x.is_cuda and x.dim() == 2 and 1 <= x.shape[0] <= MAX_ROWS and x.dtype in _ACT_DTYPES):
        return False
    if len(weight.shape) != 2 or weight.shape[0] < 1 or weight.shape[1] < 1 or x.shape[1] != weight.shape[1]:
        return False
    if weight.shape[0] >= 2**31 or weight.shape[1] >= 2**31:
        return False
    if lora_A.dtype not in _LORA_DTYPES or lora_B.dtype not in _LORA_DTYPES:
        return False
    if "lora_linear" not in cuda_extension_ops():
        return False
    return _arch_supported(x.device.index if x.device.index is not None else torch.cuda.current_device())


def _fallback(device: torch.device):
    if triton_available() and (device.type == "cuda" or triton_interpreter_enabled()):
        from xkern.ops import triton_impl
        return triton_impl
    return reference


def _decode(x: torch.Tensor, weight: NF4Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor,
            ids: torch.Tensor, split_k: int, force_generic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from xkern import _C  # type: ignore[attr-defined]

    offset = None if weight.offset is None else weight.offset.reshape(1)
    n_out, k = weight.shape
    y, xa = _C.lora_linear_decode(x, weight.packed, weight.absmax, weight.absmax2, weight.code2, offset,
                                  n_out, k, weight.blocksize, lora_A, lora_B, scale, ids, split_k, force_generic)
    return y, xa


def lora_linear_forward(x: torch.Tensor, weight: NF4Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                        scale: torch.Tensor, ids: torch.Tensor, *, split_k: int = 0,
                        force_generic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = x W^T + s[a] (x A[a]^T) B[a]^T`` per row; also returns ``xa = x A[a]^T`` ([M, r], float32).

    ``split_k`` (> 0 forces the number of K splits) and ``force_generic`` (byte-wise weight loads
    even where 16-byte loads work) are for tests and benchmarks; they do not apply to the fallback.
    """
    if not supports(x, weight, lora_A, lora_B):
        return _fallback(x.device).lora_linear_forward(x, weight, lora_A, lora_B, scale, ids)
    return _decode(x, weight, lora_A, lora_B, scale.float(), ids.int(), int(split_k), bool(force_generic))


def lora_linear_input_grad(grad_out: torch.Tensor, weight: NF4Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                           scale: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``dX = dY W + s[a] (dY B[a]) A[a]`` and ``g = dY B[a]``: delegated (Triton on CUDA)."""
    return _fallback(grad_out.device).lora_linear_input_grad(grad_out, weight, lora_A, lora_B, scale, ids)
