"""The ``cuda`` backend: the compiled ``xkern._C`` extension (csrc/*.cu), the decode regime of ``lora_linear``.

For 1..16 rows of float16 / bfloat16 activations on sm_8x / sm_90 GPUs, the forward runs the kernels
of ``csrc/nf4_lora_decode.cu``: a small LoRA shrink launch (``xa = x A[a]^T``), then one NF4 GEMV
launch that streams the packed weight once for all rows, split over K where N is small, and adds
``s[a] * xa B[a]^T`` in its epilogue. The GEMV runs on tensor cores (``native`` precision: NF4 codes
rounded to the activation dtype, exact 16-bit products, float32 sums, each quantization block's absmax
applied in float32) or, for ``exact`` precision and for shapes the tensor-core kernel does not take,
on CUDA cores in float32. Its ``supports`` predicate declines every other call (more
rows, float32, other GPUs), which the registry then gives to the next backend (Triton); the
backward has no kernel here and goes there too.
"""

from __future__ import annotations

import functools

import torch

from xkern.errors import InputError
from xkern.nf4 import NF4Tensor
from xkern.ops.registry import register_backend, register_kernel
from xkern.ops.routing import RowRouting

MAX_ROWS = 16
_ACT_DTYPES = (torch.float16, torch.bfloat16)
_LORA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def extension_ops() -> frozenset[str]:
    """Names of the ops the compiled ``xkern._C`` implements (empty when it is not built)."""
    try:
        from xkern import _C  # type: ignore[attr-defined]
    except ImportError:
        return frozenset()
    return frozenset(_C.available_ops())


def _probe(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"backend 'cuda' needs CUDA tensors, got {device}"
    if not extension_ops():
        return ("xkern._C is not built (build with `pip install --no-build-isolation .` on a machine with nvcc and "
                "a CUDA torch)")
    return None


register_backend("cuda", device_types=("cuda",), priority=30, probe=_probe,
                 description="xkern._C CUDA kernels (decode GEMV, M <= 16)")


@functools.cache
def _arch_supported(device_index: int) -> bool:
    """The extension carries sm_80 code (runs on every sm_8x) and sm_90a code (runs on sm_90 only)."""
    major, minor = torch.cuda.get_device_capability(device_index)
    return major == 8 or (major, minor) == (9, 0)


def supports(x: torch.Tensor, weight: NF4Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> bool:
    """Whether the CUDA decode kernel handles this call (else the next backend runs it)."""
    if not (x.is_cuda and x.dim() == 2 and 1 <= x.shape[0] <= MAX_ROWS and x.dtype in _ACT_DTYPES):
        return False
    if len(weight.shape) != 2 or weight.shape[0] < 1 or weight.shape[1] < 1 or x.shape[1] != weight.shape[1]:
        return False
    if weight.shape[0] >= 2**31 or weight.shape[1] >= 2**31:
        return False
    if lora_A.dtype not in _LORA_DTYPES or lora_B.dtype not in _LORA_DTYPES:
        return False
    if "lora_linear" not in extension_ops():
        return False
    return _arch_supported(x.device.index if x.device.index is not None else torch.cuda.current_device())


def _decode(x: torch.Tensor, weight: NF4Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor,
            ids: torch.Tensor, split_k: int, force_generic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from xkern import _C  # type: ignore[attr-defined]

    offset = None if weight.offset is None else weight.offset.reshape(1)
    n_out, k = weight.shape
    y, xa = _C.lora_linear_decode(x, weight.packed, weight.absmax, weight.absmax2, weight.code2, offset,
                                  n_out, k, weight.blocksize, lora_A, lora_B, scale, ids, split_k, force_generic)
    return y, xa


@register_kernel("lora_linear.forward", "cuda", supports=supports)
def lora_linear_forward(x: torch.Tensor, weight: NF4Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                        scale: torch.Tensor, routing: RowRouting, precision: str = "exact", *, split_k: int = 0,
                        force_generic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = x W^T + s[a] (x A[a]^T) B[a]^T`` per row; also returns ``xa = x A[a]^T`` ([M, r], float32).

    ``native``: the tensor-core kernel where the shape allows (K % 32 == 0, 16-byte aligned weight and
    activations), its only rounding the NF4 codes' to the activation dtype (2^-9 relative in bfloat16,
    2^-12 in float16 -- what bitsandbytes' own 16-bit dequantization rounds, per element); ``exact``:
    the float32 CUDA-core kernel. ``split_k`` (> 0 forces the number of K splits) and ``force_generic``
    (the CUDA-core kernel whatever the precision) are for tests and benchmarks.
    """
    if not supports(x, weight, lora_A, lora_B):
        raise InputError("the CUDA decode kernel takes 1..16 rows of float16/bfloat16 CUDA activations on sm_8x/sm_90 "
                         "(the registry gives other calls to another backend)")
    generic = bool(force_generic) or precision == "exact"
    return _decode(x, weight, lora_A, lora_B, scale.float(), routing.ids, int(split_k), generic)
