"""The ``cpu`` backend: native C++ kernels of ``xkern._cpu`` (csrc/cpu/, AVX-512 / AVX2 / portable, chosen at run time).

Built by ``pip install`` wherever a C++ compiler and torch are present (``XKERN_NO_EXT=1`` skips it);
without it the ``torch`` reference serves CPU tensors. The kernels read the NF4 bytes directly
(never a dequantized copy of the whole weight), compute each row's LoRA for its own adapter only
(by the segments of :class:`~xkern.ops.routing.RowRouting`), accumulate in float32 and run on
``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from xkern.nf4 import NF4Tensor
from xkern.ops.registry import register_backend, register_kernel
from xkern.ops.routing import RowRouting


@functools.cache
def extension() -> ModuleType | None:
    try:
        from xkern import _cpu  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _cpu


@functools.cache
def _import_error() -> str:
    try:
        from xkern import _cpu  # type: ignore[attr-defined]  # noqa: F401
    except ImportError as e:
        return str(e)
    return ""


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor or machine name elsewhere), recorded
    with every benchmark number."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.machine())
    except OSError:
        return platform.processor() or platform.machine()


@functools.cache
def bf16_instructions() -> tuple[str, ...]:
    """The bf16 arithmetic this CPU has (``avx512_bf16``: ``vdpbf16ps``; ``amx_bf16``: AMX tiles), from
    ``/proc/cpuinfo``; empty where it has none (bf16 then runs through float32 emulation in oneDNN)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return ()
    return tuple(x for x in ("avx512_bf16", "amx_bf16") if x in flags)


def _probe(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"backend 'cpu' needs CPU tensors, got {device}"
    if extension() is None:
        return f"xkern._cpu is not built ({_import_error()}; reinstall with a C++ compiler, without XKERN_NO_EXT=1)"
    return None


register_backend("cpu", device_types=("cpu",), priority=10, probe=_probe,
                 description="native C++ kernels (xkern._cpu)")


def _weight_args(weight: NF4Tensor) -> tuple:
    offset = None if weight.offset is None else weight.offset.reshape(1)
    n_out, k = weight.shape
    return (weight.packed, weight.absmax, weight.absmax2, weight.code2, offset, int(n_out), int(k),
            int(weight.blocksize))


def _call(fn: str, act: torch.Tensor, weight: NF4Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
          scale: torch.Tensor, routing: RowRouting, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    return getattr(extension(), fn)(act.contiguous(), *_weight_args(weight), lora_A.contiguous(), lora_B.contiguous(),
                                    scale.float().contiguous(), routing.ids, routing.order, routing.starts,
                                    precision == "exact")


@register_kernel("lora_linear.forward", "cpu")
def lora_linear_forward(x: torch.Tensor, weight: NF4Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                        scale: torch.Tensor, routing: RowRouting,
                        precision: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    return _call("lora_linear_forward", x, weight, lora_A, lora_B, scale, routing, precision)


@register_kernel("lora_linear.input_grad", "cpu")
def lora_linear_input_grad(grad_out: torch.Tensor, weight: NF4Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                           scale: torch.Tensor, routing: RowRouting,
                           precision: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    return _call("lora_linear_input_grad", grad_out, weight, lora_A, lora_B, scale, routing, precision)


@register_kernel("dequantize_nf4", "cpu")
def dequantize(weight: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    flat = extension().dequantize_nf4(weight.packed, weight.absmax, weight.absmax2, weight.code2,
                                      None if weight.offset is None else weight.offset.reshape(1), weight.numel,
                                      int(weight.blocksize), dtype)
    return flat.view(weight.shape)
