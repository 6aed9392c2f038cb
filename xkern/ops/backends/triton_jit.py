"""The ``triton`` backend: launchers of the Triton kernels in :mod:`xkern.kernels` (CUDA; the CPU under
``TRITON_INTERPRET=1``, for correctness only, and only when asked for).

Block sizes come from small tables by regime (no autotuning at import); the CPU interpreter uses
small tiles so tests stay fast.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from xkern.nf4 import NF4Tensor, nf4_code
from xkern.ops.registry import register_backend, register_kernel
from xkern.ops.routing import RowRouting

_XCROSS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cpu" and not interpreter_enabled():
        return "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before import"
    return None


register_backend("triton", device_types=("cuda",), opt_in_device_types=("cpu",), priority=20, probe=_probe,
                 description="fused Triton kernels (CPU: interpreter, when requested)")

if importlib.util.find_spec("triton") is not None:
    import triton

    from xkern.kernels.nf4_lora import nf4_dequantize_kernel, nf4_lora_kernel
    from xkern.kernels.xcross import xcross_bwd_kernel, xcross_fwd_kernel


def _store_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The CPU interpreter truncates float32 -> bfloat16 casts; there, store float32 and let torch round."""
    if device.type == "cpu" and dtype == torch.bfloat16 and interpreter_enabled():
        return torch.float32
    return dtype


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _XCROSS_DTYPES:
        raise TypeError(f"backend 'triton' supports float32, float16 and bfloat16 inputs, got {dtype}")


# --------------------------------------------------------------------------------------------- lora_linear

@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


def default_config(m: int, n_out: int, n_red: int, device: torch.device) -> LaunchConfig:
    """Block sizes by regime: decode (M <= 16) streams W once with split-K; larger M tiles the GEMM."""
    if device.type != "cuda":  # interpreter: a few programs, a few K steps
        return LaunchConfig(block_m=16, block_n=32, block_k=32)
    if m <= 16:
        block_n, block_k = 64, 128
        n_tiles = triton.cdiv(n_out, block_n)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        split_k = max(1, min(triton.cdiv(2 * sms, n_tiles), n_red // (4 * block_k)))
        return LaunchConfig(16, block_n, block_k, split_k=split_k, num_warps=4, num_stages=3)
    if m <= 128:
        return LaunchConfig(32, 128, 64, num_warps=4, num_stages=3)
    return LaunchConfig(64, 128, 64, num_warps=8, num_stages=3)


def _weight_args(weight: NF4Tensor) -> tuple[torch.Tensor, ...]:
    dummy = weight.absmax  # never read when not double-quantized
    if weight.double_quant:
        return weight.packed, weight.absmax, weight.absmax2, weight.code2, weight.offset.reshape(1)
    return weight.packed, weight.absmax, dummy, dummy, dummy


@register_kernel("dequantize_nf4", "triton")
def dequantize(weight: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(weight.shape, dtype=_store_dtype(dtype, weight.device), device=weight.device)
    block = 1024
    grid = (triton.cdiv(weight.numel, block),)
    nf4_dequantize_kernel[grid](*_weight_args(weight), nf4_code(weight.device), out, weight.numel,
                                BLOCKSIZE=weight.blocksize, DOUBLE_QUANT=weight.double_quant, BLOCK=block)
    return out.to(dtype)


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(max(rank, 1)))


def _fused(x: torch.Tensor, weight: NF4Tensor, routing: RowRouting, shrink: torch.Tensor,
           shrink_strides: tuple[int, int, int], expand: torch.Tensor, expand_strides: tuple[int, int, int],
           scale: torch.Tensor, rank: int, n_out: int, transpose_w: bool,
           config: LaunchConfig | None) -> tuple[torch.Tensor, torch.Tensor]:
    m, n_red = x.shape
    k_w = weight.shape[1]
    cfg = config or default_config(m, n_out, n_red, x.device)
    row_index = routing.order
    sorted_ids = routing.ids[routing.order.long()].contiguous()
    has_lora = rank > 0 and bool(shrink.shape[0] > 0)
    block_r = _block_r(rank)
    if cfg.split_k > 1:
        out = torch.zeros(m, n_out, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(m, n_out, dtype=_store_dtype(x.dtype, x.device), device=x.device)
    xa = torch.zeros(m, block_r, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n_out, cfg.block_n), cfg.split_k)
    w_stride_out, w_stride_red = (1, k_w) if transpose_w else (k_w, 1)
    nf4_lora_kernel[grid](
        x, row_index, sorted_ids,
        *_weight_args(weight), nf4_code(x.device),
        shrink, expand, scale,
        out, xa,
        m, n_out, n_red, rank,
        x.stride(0), x.stride(1),
        w_stride_out, w_stride_red,
        *shrink_strides, *expand_strides,
        out.stride(0), out.stride(1),
        BLOCKSIZE=weight.blocksize, DOUBLE_QUANT=weight.double_quant, HAS_LORA=has_lora, STORE_XA=has_lora,
        SPLIT_K=cfg.split_k, LOW_PRECISION_DOT=x.is_cuda and x.dtype != torch.float32,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=block_r,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out.to(x.dtype), xa[:, :rank]


@register_kernel("lora_linear.forward", "triton")
def lora_linear_forward(x: torch.Tensor, weight: NF4Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                        scale: torch.Tensor, routing: RowRouting,
                        config: LaunchConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``y = x W^T + s[a] (x A[a]^T) B[a]^T`` in one launch; also returns ``xa`` for backward."""
    rank = lora_A.shape[1]
    return _fused(x, weight, routing,
                  lora_A, (lora_A.stride(0), lora_A.stride(1), lora_A.stride(2)),
                  lora_B, (lora_B.stride(0), lora_B.stride(1), lora_B.stride(2)),
                  scale, rank, weight.shape[0], transpose_w=False, config=config)


@register_kernel("lora_linear.input_grad", "triton")
def lora_linear_input_grad(grad_out: torch.Tensor, weight: NF4Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                           scale: torch.Tensor, routing: RowRouting,
                           config: LaunchConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``dX = dY W + s[a] (dY B[a]) A[a]`` (W read transposed in place); also returns ``dY B[a]``."""
    rank = lora_A.shape[1]
    # shrink D[a, r, n] = B[a, n, r]; expand U[a, k, r] = A[a, r, k]
    return _fused(grad_out, weight, routing,
                  lora_B, (lora_B.stride(0), lora_B.stride(2), lora_B.stride(1)),
                  lora_A, (lora_A.stride(0), lora_A.stride(2), lora_A.stride(1)),
                  scale, rank, weight.shape[1], transpose_w=True, config=config)


# --------------------------------------------------------------------------------------------- xcross_integrate

@dataclass(frozen=True)
class XCrossLaunchConfig:
    block_t: int = 16
    block_d: int = 128
    num_warps: int = 4


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def xcross_default_config(n: int, d: int, device: torch.device) -> XCrossLaunchConfig:
    """One token block of 16 (the ``tl.dot`` minimum) per program; ``d`` in chunks sized to keep the
    ``[n_pad, 16, block_d]`` float32 tiles in registers. The CPU interpreter uses small chunks."""
    if device.type != "cuda":
        return XCrossLaunchConfig(block_t=16, block_d=16, num_warps=1)
    n_pad = _next_pow2(n)
    cap = 128 if n_pad <= 4 else (64 if n_pad <= 8 else 32)
    return XCrossLaunchConfig(block_t=16, block_d=max(16, min(cap, _next_pow2(d))), num_warps=4)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation of the launchers (tests poison it to prove that every element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _block_p(n: int) -> int:
    return max(16, _next_pow2(2 * n * (n - 1)))


@register_kernel("xcross_integrate.forward", "triton")
def xcross_forward(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, beta: float, gamma: float,
                   config: XCrossLaunchConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused launch: ``(h~ [n, T, d] in h.dtype, z [T, P] float32)``."""
    _check_dtype(h.dtype)
    n, t, d = h.shape
    p = 2 * n * (n - 1)
    out = _empty((n, t, d), _store_dtype(h.dtype, h.device), h.device)
    z = _empty((t, p), torch.float32, h.device)
    if t == 0:
        return out.to(h.dtype), z
    cfg = config or xcross_default_config(n, d, h.device)
    grid = (triton.cdiv(t, cfg.block_t),)
    xcross_fwd_kernel[grid](
        h, w, w if bias is None else bias, out, z,
        t, d, float(beta), float(gamma),
        h.stride(0), h.stride(1), h.stride(2),
        w.stride(0), w.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        N=n, N_PAD=_next_pow2(n), HAS_BIAS=bias is not None,
        LOW_PRECISION_DOT=h.is_cuda and h.dtype != torch.float32,
        BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d, BLOCK_P=_block_p(n), num_warps=cfg.num_warps,
    )
    return out.to(h.dtype), z


@register_kernel("xcross_integrate.input_grad", "triton")
def xcross_input_grad(grad_out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, z: torch.Tensor, beta: float,
                      gamma: float, config: XCrossLaunchConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch: ``(dh [n, T, d] in h.dtype, dz [T, P] float32)``."""
    _check_dtype(h.dtype)
    n, t, d = h.shape
    p = 2 * n * (n - 1)
    dh = _empty((n, t, d), _store_dtype(h.dtype, h.device), h.device)
    dz = _empty((t, p), torch.float32, h.device)
    if t == 0:
        return dh.to(h.dtype), dz
    z = z.float().contiguous()
    cfg = config or xcross_default_config(n, d, h.device)
    grid = (triton.cdiv(t, cfg.block_t),)
    xcross_bwd_kernel[grid](
        grad_out, h, w, z, dh, dz,
        t, d, float(beta), float(gamma),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        h.stride(0), h.stride(1), h.stride(2),
        w.stride(0), w.stride(1),
        dh.stride(0), dh.stride(1), dh.stride(2),
        N=n, N_PAD=_next_pow2(n),
        BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d, BLOCK_P=_block_p(n), num_warps=cfg.num_warps,
    )
    return dh.to(h.dtype), dz
