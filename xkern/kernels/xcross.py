"""Triton kernels of the X-Cross integrator (forward and input gradient), one launch each.

For a block of ``BLOCK_T`` tokens of ``n`` streams (``h [n, T, d]``, any strides) the forward kernel

1. streams ``h`` once over ``d`` in chunks of ``BLOCK_D`` and accumulates the small GEMV
   ``z[t, :] = sum_m h[m, t, :] @ w[:, m*d:(m+1)*d]^T`` (+ bias) in a float32 ``[BLOCK_T, BLOCK_P]``
   tile (``tl.dot``; ``P = 2 n (n-1)`` padded to ``BLOCK_P``), and stores ``z`` (float32, for backward);
2. turns ``z`` into the per-token mixing matrix ``C [N_PAD, N_PAD, BLOCK_T]`` in registers
   (``C[m, m'] = beta zd[m, m'] - gamma zi[m, m']``, ``C[m, m] = 1 + gamma sum zi[m, :]``) through
   coefficient masks built from iotas (no gather);
3. streams ``h`` a second time (the tile was just read: L1/L2) and writes
   ``out[m, t, :] = sum_m' C[m, m', t] h[m', t, :]`` as one ``[N_PAD, BLOCK_T, BLOCK_D]`` tile per chunk.

The input-gradient kernel recomputes ``C`` from the saved ``z`` and, per token block, accumulates
``G[m, m'] = <g_m, h_m'>`` over ``d``, turns it into ``dz`` (``dzd = beta G[m, m']``,
``dzi = gamma (G[m, m] - G[m, m'])``; stored, float32) and writes ``dh[m'] = sum_m C[m, m'] g_m + w_m'^T dz``.

Values are upcast to float32 right after ``tl.load``; accumulation is float32 (the Triton CPU
interpreter computes bf16 arithmetic wrongly). On a GPU with 16-bit inputs the z GEMV takes
16-bit ``tl.dot`` operands (exact products, float32 accumulation); float32 inputs and the
backward's ``dz @ w`` (float32 ``dz``) use ``input_precision="ieee"``.
"""

import triton
import triton.language as tl


@triton.jit
def _coef_col(offs_m, offs_p, mc, beta, gamma, N: tl.constexpr):
    """``coef [N_PAD, BLOCK_P]`` with ``C[m, mc] = [m == mc] + sum_p coef[m, p] * z[p]``.

    Entry p < n(n-1) is ``zd`` of pair ``(src, dst)``, entry ``n(n-1) + q`` is ``zi`` of pair q;
    pair q: ``src = q // (n-1)``, ``k = q % (n-1)``, ``dst = k + (k >= src)``.
    """
    NPAIRS: tl.constexpr = N * (N - 1)
    is_d = offs_p < NPAIRS
    q = tl.where(is_d, offs_p, offs_p - NPAIRS)
    valid = q < NPAIRS  # padded entries of BLOCK_P get 0
    src = q // (N - 1)
    k = q % (N - 1)
    dst = k + (k >= src).to(tl.int32)
    d_coef = tl.where(dst == mc, beta, 0.0)
    i_coef = gamma * ((src == mc).to(tl.float32) - (dst == mc).to(tl.float32))
    c = tl.where(is_d, d_coef, i_coef)
    own = (offs_m[:, None] == src[None, :]) & valid[None, :]
    return tl.where(own, c[None, :], 0.0)


@triton.jit
def _coupling(z, offs_m, offs_p, beta, gamma, N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """``C [N_PAD (m), N_PAD (m'), BLOCK_T]`` float32 from ``z [BLOCK_T, BLOCK_P]``; zero outside ``n x n``."""
    c3 = tl.zeros((N_PAD, N_PAD, BLOCK_T), dtype=tl.float32)
    for mc in tl.static_range(N):
        coef = _coef_col(offs_m, offs_p, mc, beta, gamma, N)
        col = tl.sum(coef[:, None, :] * z[None, :, :], axis=2)  # [N_PAD, BLOCK_T]: C[:, mc, t]
        col = col + (offs_m == mc).to(tl.float32)[:, None]
        c3 += tl.where((offs_m == mc)[None, :, None], col[:, None, :], 0.0)
    return c3


@triton.jit
def xcross_fwd_kernel(
    h_ptr, w_ptr, bias_ptr, out_ptr, z_ptr,
    T, D, beta, gamma,
    stride_hm, stride_ht, stride_hd,
    stride_wp, stride_wk,
    stride_om, stride_ot, stride_od,
    N: tl.constexpr, N_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, LOW_PRECISION_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    P: tl.constexpr = 2 * N * (N - 1)
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    offs_t64 = offs_t.to(tl.int64)
    offs_m = tl.arange(0, N_PAD)
    m_mask = offs_m < N
    offs_p = tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    offs_dd = tl.arange(0, BLOCK_D)

    # 1. z = w @ concat(h) (+ bias), float32
    z = tl.zeros((BLOCK_T, BLOCK_P), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_dd
        d_mask = offs_d < D
        hp = h_ptr  # advanced by stride_hm per stream: 64-bit pointer arithmetic, no int32 product
        for m in tl.static_range(N):
            hm = tl.load(hp + offs_t64[:, None] * stride_ht + offs_d[None, :] * stride_hd,
                         mask=t_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            wt = tl.load(w_ptr + offs_p[None, :] * stride_wp + (m * D + offs_d[:, None]) * stride_wk,
                         mask=p_mask[None, :] & d_mask[:, None], other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK_P]
            if LOW_PRECISION_DOT:  # GPU, 16-bit inputs: exact 16-bit operands, float32 accumulation
                z += tl.dot(hm.to(h_ptr.dtype.element_ty), wt.to(h_ptr.dtype.element_ty))
            else:
                z += tl.dot(hm, wt, input_precision="ieee")
            hp += stride_hm
    if HAS_BIAS:
        z += tl.load(bias_ptr + offs_p, mask=p_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(z_ptr + offs_t64[:, None] * P + offs_p[None, :], z, mask=t_mask[:, None] & p_mask[None, :])

    # 2. per-token mixing matrix
    c3 = _coupling(z, offs_m, offs_p, beta, gamma, N, N_PAD, BLOCK_T)

    # 3. out[m] = sum_m' C[m, m'] h[m']
    o_base = out_ptr + offs_m.to(tl.int64)[:, None, None] * stride_om + offs_t64[None, :, None] * stride_ot
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_dd
        d_mask = offs_d < D
        acc = tl.zeros((N_PAD, BLOCK_T, BLOCK_D), dtype=tl.float32)
        hp = h_ptr
        for mc in tl.static_range(N):
            hm = tl.load(hp + offs_t64[:, None] * stride_ht + offs_d[None, :] * stride_hd,
                         mask=t_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            ccol = tl.sum(tl.where((offs_m == mc)[None, :, None], c3, 0.0), axis=1)  # [N_PAD, BLOCK_T]
            acc += ccol[:, :, None] * hm[None, :, :]
            hp += stride_hm
        tl.store(o_base + offs_d[None, None, :] * stride_od, acc.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None, None] & t_mask[None, :, None] & d_mask[None, None, :])


@triton.jit
def xcross_bwd_kernel(
    g_ptr, h_ptr, w_ptr, z_ptr, dh_ptr, dz_ptr,
    T, D, beta, gamma,
    stride_gm, stride_gt, stride_gd,
    stride_hm, stride_ht, stride_hd,
    stride_wp, stride_wk,
    stride_om, stride_ot, stride_od,
    N: tl.constexpr, N_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    P: tl.constexpr = 2 * N * (N - 1)
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    offs_t64 = offs_t.to(tl.int64)
    offs_m = tl.arange(0, N_PAD)
    m_mask = offs_m < N
    offs_p = tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    offs_dd = tl.arange(0, BLOCK_D)
    tp_mask = t_mask[:, None] & p_mask[None, :]

    z = tl.load(z_ptr + offs_t64[:, None] * P + offs_p[None, :], mask=tp_mask, other=0.0).to(tl.float32)
    c3 = _coupling(z, offs_m, offs_p, beta, gamma, N, N_PAD, BLOCK_T)

    # 1. G[m, m', t] = <g_m, h_m'>
    g_base = g_ptr + offs_m.to(tl.int64)[:, None, None] * stride_gm + offs_t64[None, :, None] * stride_gt
    gram = tl.zeros((N_PAD, N_PAD, BLOCK_T), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_dd
        d_mask = offs_d < D
        g3 = tl.load(g_base + offs_d[None, None, :] * stride_gd,
                     mask=m_mask[:, None, None] & t_mask[None, :, None] & d_mask[None, None, :],
                     other=0.0).to(tl.float32)
        hp = h_ptr
        for mc in tl.static_range(N):
            hm = tl.load(hp + offs_t64[:, None] * stride_ht + offs_d[None, :] * stride_hd,
                         mask=t_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            gcol = tl.sum(g3 * hm[None, :, :], axis=2)  # [N_PAD, BLOCK_T]: G[:, mc, t]
            gram += tl.where((offs_m == mc)[None, :, None], gcol[:, None, :], 0.0)
            hp += stride_hm

    # 2. dz[t, p] = sum_{m, m'} coef_m'[m, p] G[m, m', t]
    dz = tl.zeros((BLOCK_T, BLOCK_P), dtype=tl.float32)
    for mc in tl.static_range(N):
        coef = _coef_col(offs_m, offs_p, mc, beta, gamma, N)  # [N_PAD, BLOCK_P]
        gcol = tl.sum(tl.where((offs_m == mc)[None, :, None], gram, 0.0), axis=1)  # [N_PAD, BLOCK_T]
        dz += tl.sum(gcol[:, :, None] * coef[:, None, :], axis=0)
    tl.store(dz_ptr + offs_t64[:, None] * P + offs_p[None, :], dz, mask=tp_mask)

    # 3. dh[m'] = sum_m C[m, m'] g_m + w[:, m' block]^T dz
    o_base = dh_ptr + offs_m.to(tl.int64)[:, None, None] * stride_om + offs_t64[None, :, None] * stride_ot
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_dd
        d_mask = offs_d < D
        acc = tl.zeros((N_PAD, BLOCK_T, BLOCK_D), dtype=tl.float32)
        gp = g_ptr
        for m in tl.static_range(N):
            gm = tl.load(gp + offs_t64[:, None] * stride_gt + offs_d[None, :] * stride_gd,
                         mask=t_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            crow = tl.sum(tl.where((offs_m == m)[:, None, None], c3, 0.0), axis=0)  # [N_PAD (m'), BLOCK_T]
            acc += crow[:, :, None] * gm[None, :, :]
            wm = tl.load(w_ptr + offs_p[:, None] * stride_wp + (m * D + offs_d[None, :]) * stride_wk,
                         mask=p_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_P, BLOCK_D]
            part = tl.dot(dz, wm, input_precision="ieee")  # [BLOCK_T, BLOCK_D]
            acc += tl.where((offs_m == m)[:, None, None], part[None, :, :], 0.0)
            gp += stride_gm
        tl.store(o_base + offs_d[None, None, :] * stride_od, acc.to(dh_ptr.dtype.element_ty),
                 mask=m_mask[:, None, None] & t_mask[None, :, None] & d_mask[None, None, :])
