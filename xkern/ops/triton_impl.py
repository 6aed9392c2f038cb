"""Launchers of the Triton kernels: grid, block sizes and split-K by shape, strides for fwd/bwd.

Block sizes come from a small table by regime (no autotuning at import); the CPU interpreter uses
small tiles so tests stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from xkern.kernels.nf4_lora import nf4_dequantize_kernel, nf4_lora_kernel
from xkern.nf4 import NF4Tensor, nf4_code
from xkern.ops.dispatch import triton_interpreter_enabled


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


def _store_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The CPU interpreter truncates float32 -> bfloat16 casts; there, store float32 and let torch round."""
    if device.type == "cpu" and dtype == torch.bfloat16 and triton_interpreter_enabled():
        return torch.float32
    return dtype


def dequantize(weight: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(weight.shape, dtype=_store_dtype(dtype, weight.device), device=weight.device)
    block = 1024
    grid = (triton.cdiv(weight.numel, block),)
    nf4_dequantize_kernel[grid](*_weight_args(weight), nf4_code(weight.device), out, weight.numel,
                                BLOCKSIZE=weight.blocksize, DOUBLE_QUANT=weight.double_quant, BLOCK=block)
    return out.to(dtype)


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(max(rank, 1)))


def _fused(x: torch.Tensor, weight: NF4Tensor, ids: torch.Tensor, shrink: torch.Tensor,
           shrink_strides: tuple[int, int, int], expand: torch.Tensor, expand_strides: tuple[int, int, int],
           scale: torch.Tensor, rank: int, n_out: int, transpose_w: bool,
           config: LaunchConfig | None) -> tuple[torch.Tensor, torch.Tensor]:
    m, n_red = x.shape
    k_w = weight.shape[1]
    cfg = config or default_config(m, n_out, n_red, x.device)
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order].to(torch.int32).contiguous()
    row_index = order.to(torch.int32).contiguous()
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


def lora_linear_forward(x: torch.Tensor, weight: NF4Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                        scale: torch.Tensor, ids: torch.Tensor,
                        config: LaunchConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``y = x W^T + s[a] (x A[a]^T) B[a]^T`` in one launch; also returns ``xa`` for backward."""
    rank = lora_A.shape[1]
    return _fused(x, weight, ids,
                  lora_A, (lora_A.stride(0), lora_A.stride(1), lora_A.stride(2)),
                  lora_B, (lora_B.stride(0), lora_B.stride(1), lora_B.stride(2)),
                  scale, rank, weight.shape[0], transpose_w=False, config=config)


def lora_linear_input_grad(grad_out: torch.Tensor, weight: NF4Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                           scale: torch.Tensor, ids: torch.Tensor,
                           config: LaunchConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``dX = dY W + s[a] (dY B[a]) A[a]`` (W read transposed in place); also returns ``dY B[a]``."""
    rank = lora_A.shape[1]
    # shrink D[a, r, n] = B[a, n, r]; expand U[a, k, r] = A[a, r, k]
    return _fused(grad_out, weight, ids,
                  lora_B, (lora_B.stride(0), lora_B.stride(2), lora_B.stride(1)),
                  lora_A, (lora_A.stride(0), lora_A.stride(2), lora_A.stride(1)),
                  scale, rank, weight.shape[1], transpose_w=True, config=config)
