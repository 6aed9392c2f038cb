"""``lora_linear``: NF4 base matmul plus several LoRA adapters (one per row), forward and backward.

The public function validates its inputs, flattens ``x`` to rows and calls the ``xkern::`` custom
ops, which are registered with ``torch.library`` (fake implementations for ``torch.compile``,
autograd for ``x``, ``lora_A`` and ``lora_B``; the NF4 base is frozen). The ops dispatch to the
CUDA extension, Triton or the torch reference (see :mod:`xkern.ops.dispatch`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from xkern.nf4 import NF4Tensor
from xkern.ops import reference
from xkern.ops.dispatch import check_backend, select_backend

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _nf4(packed: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None, code2: torch.Tensor | None,
         offset: torch.Tensor | None, shape: Sequence[int], blocksize: int) -> NF4Tensor:
    return NF4Tensor(packed=packed, absmax=absmax, shape=torch.Size(shape), dtype=torch.float32,
                     blocksize=blocksize, absmax2=absmax2, code2=code2,
                     offset=None if offset is None else offset.reshape(()))


def _impl(backend: str):
    if backend == "torch":
        return reference
    if backend == "triton":
        from xkern.ops import triton_impl
        return triton_impl
    if backend == "cuda":
        from xkern.ops import cuda_impl
        return cuda_impl
    raise ValueError(f"unknown backend {backend!r}")


@torch.library.custom_op("xkern::lora_linear_fwd", mutates_args=())
def _lora_linear_fwd(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None,
                     code2: torch.Tensor | None, offset: torch.Tensor | None, shape: Sequence[int], blocksize: int,
                     lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    weight = _nf4(packed, absmax, absmax2, code2, offset, shape, blocksize)
    return _impl(backend).lora_linear_forward(x, weight, lora_A, lora_B, scale, ids)


@_lora_linear_fwd.register_fake
def _(x, packed, absmax, absmax2, code2, offset, shape, blocksize, lora_A, lora_B, scale, ids, backend):
    return x.new_empty(x.shape[0], shape[0]), x.new_empty(x.shape[0], lora_A.shape[1], dtype=torch.float32)


@torch.library.custom_op("xkern::lora_linear_input_grad", mutates_args=())
def _lora_linear_input_grad(grad_out: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                            absmax2: torch.Tensor | None, code2: torch.Tensor | None, offset: torch.Tensor | None,
                            shape: Sequence[int], blocksize: int, lora_A: torch.Tensor, lora_B: torch.Tensor,
                            scale: torch.Tensor, ids: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    weight = _nf4(packed, absmax, absmax2, code2, offset, shape, blocksize)
    dx, g = _impl(backend).lora_linear_input_grad(grad_out.contiguous(), weight, lora_A, lora_B, scale, ids)
    return dx.float(), g


@_lora_linear_input_grad.register_fake
def _(grad_out, packed, absmax, absmax2, code2, offset, shape, blocksize, lora_A, lora_B, scale, ids, backend):
    return (grad_out.new_empty(grad_out.shape[0], shape[1], dtype=torch.float32),
            grad_out.new_empty(grad_out.shape[0], lora_A.shape[1], dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, packed, absmax, absmax2, code2, offset, shape, blocksize, lora_A, lora_B, scale, ids, backend = inputs
    _, xa = output
    ctx.save_for_backward(x, packed, absmax, absmax2, code2, offset, lora_A, lora_B, scale, ids, xa)
    ctx.shape, ctx.blocksize, ctx.backend = shape, blocksize, backend


def _backward(ctx, grad_y, grad_xa):
    x, packed, absmax, absmax2, code2, offset, lora_A, lora_B, scale, ids, xa = ctx.saved_tensors
    needs_x, needs_a, needs_b = ctx.needs_input_grad[0], ctx.needs_input_grad[8], ctx.needs_input_grad[9]
    dx = d_a = d_b = None
    g = None
    if needs_x or needs_a:
        dx32, g = _lora_linear_input_grad(grad_y, packed, absmax, absmax2, code2, offset, ctx.shape,
                                          ctx.blocksize, lora_A, lora_B, scale, ids, ctx.backend)
        dx = dx32.to(x.dtype) if needs_x else None
    if needs_a or needs_b:
        if g is None:
            g = xa.new_zeros(xa.shape)
        d_a, d_b = reference.lora_weight_grads(x, grad_y, xa, g, scale, ids, lora_A.shape[0])
        d_a = d_a.to(lora_A.dtype) if needs_a else None
        d_b = d_b.to(lora_B.dtype) if needs_b else None
    return dx, None, None, None, None, None, None, None, d_a, d_b, None, None, None


_lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _validate(x, weight, lora_A, lora_B, scale, adapter_ids):
    _check_tensor("x", x)
    if not isinstance(weight, NF4Tensor):
        raise TypeError(f"weight must be an NF4Tensor (see xkern.quantize_nf4), got {type(weight).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if len(weight.shape) != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    n_out, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x has last dimension {x.shape[-1] if x.dim() else None}, weight expects K={k}")
    if not weight.packed.is_contiguous() or not weight.absmax.is_contiguous():
        raise ValueError("weight.packed and weight.absmax must be contiguous")
    _check_tensor("lora_A", lora_A)
    _check_tensor("lora_B", lora_B)
    if lora_A.dim() != 3:
        raise ValueError(f"lora_A must be [n_adapters, r, K], got shape {tuple(lora_A.shape)}")
    n_adapters, rank, k_a = lora_A.shape
    if k_a != k:
        raise ValueError(f"lora_A has K={k_a}, weight has K={k}")
    if lora_B.dim() != 3 or lora_B.shape != (n_adapters, n_out, rank):
        raise ValueError(f"lora_B must be [n_adapters={n_adapters}, N={n_out}, r={rank}], got {tuple(lora_B.shape)}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    devices = {"x": x.device, "weight": weight.device, "lora_A": lora_A.device, "lora_B": lora_B.device}
    if isinstance(scale, torch.Tensor):
        devices["scale"] = scale.device
    if adapter_ids is not None:
        devices["adapter_ids"] = _check_tensor("adapter_ids", adapter_ids).device
    if len(set(devices.values())) != 1:
        raise ValueError("all inputs must be on one device, got " + ", ".join(f"{k}={v}" for k, v in devices.items()))


def _scale_tensor(scale, n_adapters: int, device: torch.device) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        if scale.dtype.is_complex or not (scale.dtype.is_floating_point or scale.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"scale must be a real tensor, got {scale.dtype}")
        s = scale.detach().float().reshape(-1)
    elif isinstance(scale, (int, float)):
        s = torch.full((n_adapters,), float(scale), device=device)
    elif isinstance(scale, Sequence):
        s = torch.tensor([float(v) for v in scale], dtype=torch.float32, device=device)
    else:
        raise TypeError(f"scale must be a tensor, a float or a sequence of floats, got {type(scale).__name__}")
    if s.numel() == 1 and n_adapters != 1:
        s = s.expand(n_adapters)
    if s.numel() != n_adapters:
        raise ValueError(f"scale has {s.numel()} entries, expected n_adapters={n_adapters}")
    return s.contiguous()


def _ids_tensor(adapter_ids: torch.Tensor | None, m: int, n_adapters: int, device: torch.device) -> torch.Tensor:
    if adapter_ids is None:
        return torch.full((m,), -1, dtype=torch.int32, device=device)
    if adapter_ids.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise TypeError(f"adapter_ids must be an integer tensor, got {adapter_ids.dtype}")
    ids = adapter_ids.reshape(-1)
    if ids.numel() != m:
        raise ValueError(f"adapter_ids has {ids.numel()} entries, x has {m} rows")
    if m and not torch.compiler.is_compiling():  # a value check would break the traced graph
        lo, hi = int(ids.min()), int(ids.max())
        if lo < -1 or hi >= n_adapters:
            raise ValueError(f"adapter_ids must lie in [-1, {n_adapters - 1}], got values in [{lo}, {hi}]")
    return ids.to(torch.int32).contiguous()


def lora_linear(x: torch.Tensor, weight: NF4Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scale: torch.Tensor | float | Sequence[float], adapter_ids: torch.Tensor | None = None,
                *, backend: str | None = None) -> torch.Tensor:
    """``y[m] = x[m] W^T + scale[a] * (x[m] A[a]^T) B[a]^T`` with ``a = adapter_ids[m]`` (``-1``: base only).

    Args:
        x: ``[..., K]`` activations (float32, float16 or bfloat16).
        weight: the frozen NF4 base weight ``[N, K]``.
        lora_A: ``[n_adapters, r, K]``; ranks that differ per adapter are zero-padded to ``r``.
        lora_B: ``[n_adapters, N, r]``.
        scale: per-adapter scale (``lora_alpha / r`` in PEFT), a tensor ``[n_adapters]``, a float or a list.
        adapter_ids: one integer per row of the flattened ``x``, any order; ``None`` = base only.
        backend: force ``"torch"``, ``"triton"`` or ``"cuda"`` (default: ``XKERN_BACKEND`` or by device).

    Returns ``[..., N]`` in ``x.dtype``. Differentiable in ``x``, ``lora_A`` and ``lora_B``.
    """
    _validate(x, weight, lora_A, lora_B, scale, adapter_ids)
    n_out, k = weight.shape
    x2d = x.reshape(-1, k)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    ids = _ids_tensor(adapter_ids, x2d.shape[0], lora_A.shape[0], x.device)
    s = _scale_tensor(scale, lora_A.shape[0], x.device)
    if backend is None:
        backend = select_backend("lora_linear", x.device)
    else:
        check_backend(backend, "lora_linear", x.device)
    offset = None if weight.offset is None else weight.offset.reshape(1)
    y, _ = _lora_linear_fwd(x2d, weight.packed, weight.absmax, weight.absmax2, weight.code2, offset,
                            list(weight.shape), weight.blocksize, lora_A, lora_B, s, ids, backend)
    return y.reshape(*x.shape[:-1], n_out)


def dequantize(weight: NF4Tensor, dtype: torch.dtype | None = None, *, backend: str | None = None) -> torch.Tensor:
    """Dequantize ``weight`` with the selected backend (Triton kernel or the torch reference)."""
    if not isinstance(weight, NF4Tensor):
        raise TypeError(f"weight must be an NF4Tensor, got {type(weight).__name__}")
    dtype = dtype or weight.dtype
    if backend is None:
        backend = select_backend("dequantize_nf4", weight.device)
    else:
        check_backend(backend, "dequantize_nf4", weight.device)
    if backend == "triton":
        from xkern.ops import triton_impl
        return triton_impl.dequantize(weight, dtype)
    return weight.dequantize(dtype)
