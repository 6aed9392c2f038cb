"""Pick the implementation of an op: the CUDA extension, Triton, or the torch reference.

``XKERN_BACKEND=torch|triton|cuda`` forces one. Otherwise CUDA tensors use the CUDA extension when
it implements the op, else Triton; CPU tensors use the torch reference (Triton runs on the CPU
only in its interpreter, ``TRITON_INTERPRET=1``, which is for correctness, not speed).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("torch", "triton", "cuda")


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def cuda_extension_ops() -> frozenset[str]:
    """Names of the ops the compiled ``xkern._C`` implements (empty when it is not built)."""
    try:
        from xkern import _C  # type: ignore[attr-defined]
    except ImportError:
        return frozenset()
    return frozenset(_C.available_ops())


def select_backend(op: str, device: torch.device) -> str:
    """The backend that runs ``op`` for tensors on ``device``; raises if a forced one cannot."""
    forced = os.environ.get("XKERN_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"XKERN_BACKEND must be one of {BACKENDS}, got {forced!r}")
        check_backend(forced, op, device)
        return forced
    if device.type == "cuda":
        if op in cuda_extension_ops():
            return "cuda"
        return "triton" if triton_available() else "torch"
    return "torch"


def check_backend(backend: str, op: str, device: torch.device) -> None:
    """Raise a clear error when ``backend`` cannot run ``op`` on ``device``."""
    if backend == "torch":
        return
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' requested but triton is not installed")
        if device.type == "cpu" and not triton_interpreter_enabled():
            raise RuntimeError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before import")
        return
    if backend == "cuda":
        if device.type != "cuda":
            raise RuntimeError(f"backend 'cuda' needs CUDA tensors, got {device}")
        if op not in cuda_extension_ops():
            raise RuntimeError(f"backend 'cuda' requested but xkern._C does not implement {op!r} "
                               "(build with `pip install --no-build-isolation .` on a CUDA machine)")
        return
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
