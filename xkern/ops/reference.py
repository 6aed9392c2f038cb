"""Torch reference implementations of the fused ops (CPU default; the yardstick for every kernel).

They compute in float32 and never hold more than one dequantized weight. The multi-adapter LoRA
terms are written as a few dense matmuls over all adapters with a one-hot row mask, which handles
unsorted rows, ``-1`` (base only) and padded ranks without a Python loop or a host sync.
"""

from __future__ import annotations

import torch

from xkern.nf4 import NF4Tensor, dequantize_nf4
from xkern.ops.routing import RowRouting


def _row_onehot(ids: torch.Tensor, n_adapters: int) -> torch.Tensor:
    """float32 ``[M, n_adapters]``: 1 where row m uses adapter a; all zero for ``-1`` rows."""
    valid = ids >= 0
    onehot = torch.zeros(ids.numel(), n_adapters, dtype=torch.float32, device=ids.device)
    onehot[valid, ids[valid].long()] = 1.0
    return onehot


def _per_row(all_adapters: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Select each row's adapter block from ``[M, n, r]`` (zero for base-only rows) -> ``[M, r]``."""
    return (all_adapters * onehot[:, :, None]).sum(dim=1)


def _spread(per_row: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Place each row's ``[r]`` vector in its adapter's slot: ``[M, r]`` -> ``[M, n * r]``."""
    return (onehot[:, :, None] * per_row[:, None, :]).reshape(per_row.shape[0], -1)


def lora_linear_forward(x: torch.Tensor, weight: NF4Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                        scale: torch.Tensor, routing: RowRouting) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = x W^T + s[a] (x A[a]^T) B[a]^T`` per row; also returns ``xa = x A[a]^T`` ([M, r], float32)."""
    n_adapters, rank, k = lora_A.shape
    ids = routing.ids
    xf = x.float()
    y = xf @ dequantize_nf4(weight, torch.float32).T
    onehot = _row_onehot(ids, n_adapters)
    xa = _per_row((xf @ lora_A.float().reshape(n_adapters * rank, k).T).view(-1, n_adapters, rank), onehot)
    coef = xa * (onehot @ scale.float())[:, None]
    b_stacked = lora_B.float().permute(0, 2, 1).reshape(n_adapters * rank, -1)  # [n*r, N]
    y = y + _spread(coef, onehot) @ b_stacked
    return y.to(x.dtype), xa


def lora_linear_input_grad(grad_out: torch.Tensor, weight: NF4Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                           scale: torch.Tensor, routing: RowRouting) -> tuple[torch.Tensor, torch.Tensor]:
    """``dX = dY W + s[a] (dY B[a]) A[a]``; also returns ``g = dY B[a]`` ([M, r], float32)."""
    n_adapters, rank, k = lora_A.shape
    ids = routing.ids
    gf = grad_out.float()
    dx = gf @ dequantize_nf4(weight, torch.float32)
    onehot = _row_onehot(ids, n_adapters)
    b_cols = lora_B.float().permute(1, 0, 2).reshape(-1, n_adapters * rank)  # [N, n*r]
    g = _per_row((gf @ b_cols).view(-1, n_adapters, rank), onehot)
    coef = g * (onehot @ scale.float())[:, None]
    dx = dx + _spread(coef, onehot) @ lora_A.float().reshape(n_adapters * rank, k)
    return dx, g


def lora_weight_grads(x: torch.Tensor, grad_out: torch.Tensor, xa: torch.Tensor, g: torch.Tensor,
                      scale: torch.Tensor, routing: RowRouting) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-adapter ``dA[a] = s_a g_a^T X_a`` and ``dB[a] = s_a dY_a^T XA_a``, as two matmuls (float32).

    Shared by every backend: it is small next to the base matmuls and cuBLAS/MKL already do it well.
    """
    n_adapters, ids = routing.n_adapters, routing.ids
    onehot = _row_onehot(ids, n_adapters)
    row_scale = (onehot @ scale.float())[:, None]
    rank = xa.shape[1]
    d_a = (_spread(g * row_scale, onehot).T @ x.float()).view(n_adapters, rank, -1)
    d_b = (grad_out.float().T @ _spread(xa * row_scale, onehot)).view(-1, n_adapters, rank).permute(1, 0, 2)
    return d_a, d_b


def dequantize(weight: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_nf4(weight, dtype)
