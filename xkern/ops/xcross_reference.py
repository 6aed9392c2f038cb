"""Torch reference of the X-Cross integrator (CPU default; the yardstick for the Triton kernels).

Layout: ``h [n, T, d]`` (n streams, T tokens), ``w [P, n*d]`` with ``P = 2 n (n-1)``, ``z [T, P]``.
``z[t] = w @ concat(h[0, t], ..., h[n-1, t]) (+ bias)``; the first ``n(n-1)`` entries are ``zd``, the
next ``n(n-1)`` are ``zi``, each ordered m-major then ``m' != m`` ascending. The output is
``h~[m, t] = sum_m' C[t, m, m'] h[m', t]`` with ``C[m, m'] = beta zd[m, m'] - gamma zi[m, m']``
(``m' != m``) and ``C[m, m] = 1 + gamma sum_m' zi[m, m']``.

Everything is computed in float32 (float64 for float64 inputs) with a few batched matmuls; the
functions are differentiable by torch autograd as written, but the op uses the explicit backward
below (:func:`xcross_input_grad`, :func:`xcross_weight_grads`), shared by every backend.
"""

from __future__ import annotations

import torch


def n_pairs(n: int) -> int:
    """``n (n-1)``: the number of ordered stream pairs ``(m, m')``, ``m' != m``."""
    return n * (n - 1)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _partner_index(n: int, device: torch.device) -> torch.Tensor:
    """``[n, n-1]`` long: ``idx[m, k] = m'`` of the k-th pair of stream m (``k + (k >= m)``)."""
    k = torch.arange(n - 1, device=device)
    m = torch.arange(n, device=device)[:, None]
    return k[None, :] + (k[None, :] >= m).long()


def coupling_matrix(z: torch.Tensor, n: int, beta: float, gamma: float) -> torch.Tensor:
    """Per-token mixing matrix ``C [T, n, n]`` from ``z [T, 2 n (n-1)]`` (differentiable in z)."""
    t = z.shape[0]
    npairs = n_pairs(n)
    zd = z[:, :npairs].reshape(t, n, n - 1)
    zi = z[:, npairs:].reshape(t, n, n - 1)
    idx = _partner_index(n, z.device).expand(t, n, n - 1)
    off = torch.zeros(t, n, n, dtype=z.dtype, device=z.device).scatter(2, idx, beta * zd - gamma * zi)
    return off + torch.diag_embed(1.0 + gamma * zi.sum(-1))


def xcross_z(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``z [T, P] = concat_m(h[m]) @ w^T (+ bias)`` in the compute dtype."""
    n, _, d = h.shape
    ct = compute_dtype(h.dtype)
    z = torch.einsum("mtd,pmd->tp", h.to(ct), w.to(ct).reshape(w.shape[0], n, d))
    if bias is not None:
        z = z + bias.to(ct)
    return z


def xcross_forward(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, beta: float,
                   gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h~ [n, T, d] in h.dtype, z [T, P] in the compute dtype)``."""
    n = h.shape[0]
    z = xcross_z(h, w, bias)
    c = coupling_matrix(z, n, beta, gamma)
    out = torch.einsum("tmk,ktd->mtd", c, h.to(z.dtype))
    return out.to(h.dtype).contiguous(), z.contiguous()


def xcross_input_grad(grad_out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, z: torch.Tensor, beta: float,
                      gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dh [n, T, d] in h.dtype, dz [T, P] in the compute dtype)`` for ``grad_out = dL/dh~``.

    With ``G[t, m, m'] = <g_m, h_m'>``: ``dzd[m, m'] = beta G[m, m']``,
    ``dzi[m, m'] = gamma (G[m, m] - G[m, m'])``; ``dh = C^T g + w^T dz`` per token.
    """
    n, t, d = h.shape
    ct = z.dtype
    g = grad_out.to(ct)
    hc = h.to(ct)
    c = coupling_matrix(z, n, beta, gamma)
    gram = torch.einsum("mtd,ktd->tmk", g, hc)  # [T, n, n]
    idx = _partner_index(n, z.device).expand(t, n, n - 1)
    g_pair = gram.gather(2, idx)  # G[m, m'] for each pair
    g_diag = gram.diagonal(dim1=1, dim2=2)[:, :, None]  # G[m, m]
    npairs = n_pairs(n)
    dz = torch.cat([(beta * g_pair).reshape(t, npairs), (gamma * (g_diag - g_pair)).reshape(t, npairs)], dim=1)
    dh = torch.einsum("tmk,mtd->ktd", c, g) + torch.einsum("tp,pmd->mtd", dz, w.to(ct).reshape(w.shape[0], n, d))
    return dh.to(h.dtype).contiguous(), dz


def xcross_weight_grads(h: torch.Tensor, dz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``dw = sum_t dz[t] (x) concat_m(h[m, t])`` ``[P, n*d]`` and ``dbias = sum_t dz[t]``, in dz's dtype.

    Shared by every backend: two reductions over the tokens that cuBLAS/MKL already do well.
    """
    n, _, d = h.shape
    dw = torch.einsum("tp,mtd->pmd", dz, h.to(dz.dtype)).reshape(dz.shape[1], n * d)
    return dw, dz.sum(0)
