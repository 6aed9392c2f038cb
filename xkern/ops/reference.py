"""Torch reference implementations of the fused ops (the yardstick for every kernel; runs on any device).

They compute in float32 and never hold more than one dequantized weight. The LoRA terms run by
adapter segment (:class:`~xkern.ops.routing.RowRouting`): each row's shrink and expand use its own
adapter only, so a NaN or Inf in one adapter (or one row) stays in the rows that use it, and the
LoRA FLOPs do not grow with the number of adapters in the bank. Segments are read on the host
(one sync per call): this path is for correctness, not for CUDA graphs.
"""

from __future__ import annotations

import torch

from xkern.nf4 import NF4Tensor, dequantize_nf4
from xkern.ops.routing import RowRouting


def _native(t: torch.Tensor, precision: str) -> bool:
    """Whether ``t``'s products run in its own 16-bit dtype (see ``xkern.ops.checks.PRECISIONS``)."""
    return precision == "native" and t.dtype in (torch.float16, torch.bfloat16)


def _native_terms(act: torch.Tensor, weight: torch.Tensor, shrink: list[torch.Tensor], expand: list[torch.Tensor],
                  scale: torch.Tensor, routing: RowRouting) -> tuple[torch.Tensor, torch.Tensor]:
    """``act @ weight + s (act @ shrink[a]) @ expand[a]`` with every operand in ``act.dtype`` (16-bit products,
    float32 accumulation inside the matmul, each product rounded to the dtype); the shrink comes back in float32."""
    dt = act.dtype
    out = act @ weight.to(dt)
    mid = torch.zeros(act.shape[0], shrink[0].shape[-1] if shrink else 0, dtype=torch.float32, device=act.device)
    for a, rows in routing.segments():
        part = act[rows] @ shrink[a].to(dt)
        mid[rows] = part.float()
        out[rows] += (part @ expand[a].to(dt)) * scale[a].to(dt)
    return out, mid


def lora_linear_forward(x: torch.Tensor, weight: NF4Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                        scale: torch.Tensor, routing: RowRouting,
                        precision: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """``y = x W^T + s[a] (x A[a]^T) B[a]^T`` per row; also returns ``xa = x A[a]^T`` ([M, r], float32)."""
    if _native(x, precision):
        return _native_terms(x, dequantize_nf4(weight, x.dtype).T, [a.T for a in lora_A], [b.T for b in lora_B],
                             scale.float(), routing)
    xf = x.float()
    y = xf @ dequantize_nf4(weight, torch.float32).T
    xa = torch.zeros(x.shape[0], lora_A.shape[1], dtype=torch.float32, device=x.device)
    s = scale.float()
    for a, rows in routing.segments():
        part = xf[rows] @ lora_A[a].float().T
        xa[rows] = part
        y[rows] += s[a] * (part @ lora_B[a].float().T)
    return y.to(x.dtype), xa


def lora_linear_input_grad(grad_out: torch.Tensor, weight: NF4Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                           scale: torch.Tensor, routing: RowRouting,
                           precision: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """``dX = dY W + s[a] (dY B[a]) A[a]``; also returns ``g = dY B[a]`` ([M, r], float32)."""
    if _native(grad_out, precision):
        dx, g = _native_terms(grad_out, dequantize_nf4(weight, grad_out.dtype), list(lora_B), list(lora_A),
                              scale.float(), routing)
        return dx.float(), g
    gf = grad_out.float()
    dx = gf @ dequantize_nf4(weight, torch.float32)
    g = torch.zeros(grad_out.shape[0], lora_A.shape[1], dtype=torch.float32, device=grad_out.device)
    s = scale.float()
    for a, rows in routing.segments():
        part = gf[rows] @ lora_B[a].float()
        g[rows] = part
        dx[rows] += s[a] * (part @ lora_A[a].float())
    return dx, g


def lora_weight_grads(x: torch.Tensor, grad_out: torch.Tensor, xa: torch.Tensor, g: torch.Tensor,
                      scale: torch.Tensor, routing: RowRouting,
                      precision: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-adapter ``dA[a] = s_a g_a^T X_a`` and ``dB[a] = s_a dY_a^T XA_a`` over each adapter's rows (float32).

    Shared by every backend: it is small next to the base matmuls and cuBLAS/MKL already do it well.
    Adapters no row uses get exact zeros. In native precision a 16-bit ``x`` keeps its products in its
    dtype (``g`` and ``xa`` rounded to it, float32 accumulation), as autocast training does.
    """
    n_adapters, rank = routing.n_adapters, xa.shape[1]
    d_a = torch.zeros(n_adapters, rank, x.shape[1], dtype=torch.float32, device=x.device)
    d_b = torch.zeros(n_adapters, grad_out.shape[1], rank, dtype=torch.float32, device=x.device)
    s = scale.float()
    if x.device.type == "cpu":
        native = _native(x, precision) and grad_out.dtype == x.dtype
        for a, rows in routing.segments():
            if native:
                d_a[a] = s[a] * (g[rows].to(x.dtype).T @ x[rows]).float()
                d_b[a] = s[a] * (grad_out[rows].T @ xa[rows].to(x.dtype)).float()
            else:
                d_a[a] = s[a] * (g[rows].T @ x[rows].float())
                d_b[a] = s[a] * (grad_out[rows].float().T @ xa[rows])
        return d_a, d_b
    # on a GPU: masked full-batch products (no host sync); torch.where keeps a NaN row out of other adapters
    xf, gof = x.float(), grad_out.float()
    for a in range(n_adapters):
        mine = (routing.ids == a)[:, None]
        d_a[a] = s[a] * (torch.where(mine, g, 0.0).T @ torch.where(mine, xf, 0.0))
        d_b[a] = s[a] * (torch.where(mine, gof, 0.0).T @ torch.where(mine, xa, 0.0))
    return d_a, d_b


def dequantize(weight: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_nf4(weight, dtype)
