"""Triton kernels of the X-Cross integrator (forward and input gradient), one launch each.

For a block of ``BLOCK_T`` tokens of ``n`` streams (``h [n, T, d]``, any strides) the forward kernel

1. streams ``h`` once over ``d`` in chunks of ``BLOCK_D`` and accumulates the small GEMV
   ``z[t, :] = sum_m h[m, t, :] @ w[:, m*d:(m+1)*d]^T`` (+ bias) in a float32 ``[BLOCK_T, BLOCK_P]``
   tile (``tl.dot``; ``P = 2 n (n-1)`` padded to ``BLOCK_P``), and stores ``z`` (float32, for backward);
2. after a CTA barrier, reads the mixing coefficients back from the ``z`` rows it just wrote (L1/L2):
   column ``m'`` of the per-token matrix ``C`` is a ``[N_PAD, BLOCK_T]`` gather
   (``C[m, m'] = beta zd[m, m'] - gamma zi[m, m']``), the diagonal ``C[m, m] = 1 + gamma sum zi[m, :]``
   is summed once;
3. streams ``h`` a second time (the tile was just read: L1/L2) and writes
   ``out[m, t, :] = sum_m' C[m, m', t] h[m', t, :]`` as one ``[N_PAD, BLOCK_T, BLOCK_D]`` tile per chunk.

The input-gradient kernel reads ``C`` the same way from the saved ``z``, accumulates
``G[m, m'] = <g_m, h_m'>`` over ``d`` per token block, writes it to a float32 scratch ``[T, n*n]`` and,
after a barrier, gathers ``dz`` from it (``dzd = beta G[m, m']``, ``dzi = gamma (G[m, m] - G[m, m'])``;
stored, float32); then writes ``dh[m'] = sum_m C[m, m'] g_m + w_m'^T dz`` one output stream at a time
(``[BLOCK_T, BLOCK_D]`` accumulator; ``dz`` read back in ``BLOCK_PK``-wide slices for the dot).

Why the round trips through memory: computing ``C`` (and ``dz``) in registers as products of
``[N_PAD, BLOCK_T, BLOCK_P]`` coefficient masks with ``z``, and the backward's ``dz @ w`` over all of
``P`` at once, took 255 registers, 2.5 KB of spills and 400 s of ptxas at n = 8 (now: at most 143
registers, no spills in the backward, under 20 s; bench/results/gpu-compile-check.json). The gathers
are a few hundred bytes per token block from L1.

Values are upcast to float32 right after ``tl.load``; accumulation is float32 (the Triton CPU
interpreter computes bf16 arithmetic wrongly). On a GPU with 16-bit inputs the z GEMV takes
16-bit ``tl.dot`` operands (exact products, float32 accumulation); float32 inputs and the
backward's ``dz @ w`` (float32 ``dz``) use ``input_precision="ieee"``.
"""

import triton
import triton.language as tl


@triton.jit
def _pair_index(row, col, N: tl.constexpr):
    """Entry of pair ``(row, col)``, ``col != row``, in ``zd`` (``zi``: + ``N (N-1)``); row-major, col skips row."""
    return row * (N - 1) + col - (col > row).to(tl.int32)


@triton.jit
def _diagonal(z_ptr, offs_t64, t_mask, offs_m, m_mask, gamma, P: tl.constexpr, N: tl.constexpr):
    """``C[m, m, t] = 1 + gamma sum_m' zi[m, m']`` as ``[N_PAD, BLOCK_T]`` float32, read from the stored z rows."""
    NPAIRS: tl.constexpr = N * (N - 1)
    row = z_ptr + offs_t64[None, :] * P + NPAIRS + offs_m[:, None] * (N - 1)
    mask = m_mask[:, None] & t_mask[None, :]
    s = tl.load(row, mask=mask, other=0.0)
    for k in tl.static_range(1, N - 1):
        s += tl.load(row + k, mask=mask, other=0.0)
    return 1.0 + gamma * s


@triton.jit
def _off_diagonal(z_ptr, offs_t64, t_mask, idx, valid, beta, gamma, P: tl.constexpr, N: tl.constexpr):
    """``beta zd - gamma zi`` at pair entries ``idx`` (0 where not ``valid``), ``[N_PAD, BLOCK_T]`` float32."""
    NPAIRS: tl.constexpr = N * (N - 1)
    ptr = z_ptr + offs_t64[None, :] * P + idx[:, None]
    mask = valid[:, None] & t_mask[None, :]
    zd = tl.load(ptr, mask=mask, other=0.0)
    zi = tl.load(ptr + NPAIRS, mask=mask, other=0.0)
    return beta * zd - gamma * zi


@triton.jit
def _row_sum_zi(z_ptr, offs_t64, t_mask, m: tl.constexpr, P: tl.constexpr, N: tl.constexpr):
    """``sum_m' zi[m, m']`` per token, ``[BLOCK_T]`` float32, for one stream ``m``."""
    NPAIRS: tl.constexpr = N * (N - 1)
    row = z_ptr + offs_t64 * P + NPAIRS + m * (N - 1)
    s = tl.load(row, mask=t_mask, other=0.0)
    for k in tl.static_range(1, N - 1):
        s += tl.load(row + k, mask=t_mask, other=0.0)
    return s


@triton.jit
def _coefficient(z_ptr, offs_t64, t_mask, m: tl.constexpr, mc: tl.constexpr, beta, gamma, P: tl.constexpr,
                 N: tl.constexpr):
    """Off-diagonal ``C[m, mc, t] = beta zd[m, mc] - gamma zi[m, mc]`` per token, ``[BLOCK_T]`` float32."""
    NPAIRS: tl.constexpr = N * (N - 1)
    ptr = z_ptr + offs_t64 * P + (m * (N - 1) + mc - (mc > m))
    return beta * tl.load(ptr, mask=t_mask, other=0.0) - gamma * tl.load(ptr + NPAIRS, mask=t_mask, other=0.0)


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
    tl.debug_barrier()  # the CTA's z rows are visible to all its threads before they are gathered below

    # 2. the diagonal of the per-token mixing matrix (its columns are gathered per stream in 3.)
    diag = _diagonal(z_ptr, offs_t64, t_mask, offs_m, m_mask, gamma, P, N)

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
            off = _off_diagonal(z_ptr, offs_t64, t_mask, _pair_index(offs_m, mc, N), m_mask & (offs_m != mc),
                                beta, gamma, P, N)
            ccol = tl.where((offs_m == mc)[:, None], diag, off)  # [N_PAD, BLOCK_T]: C[:, mc, t]
            acc += ccol[:, :, None] * hm[None, :, :]
            hp += stride_hm
        tl.store(o_base + offs_d[None, None, :] * stride_od, acc.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None, None] & t_mask[None, :, None] & d_mask[None, None, :])


@triton.jit
def xcross_bwd_kernel(
    g_ptr, h_ptr, w_ptr, z_ptr, dh_ptr, dz_ptr, gram_ptr,
    T, D, beta, gamma,
    stride_gm, stride_gt, stride_gd,
    stride_hm, stride_ht, stride_hd,
    stride_wp, stride_wk,
    stride_om, stride_ot, stride_od,
    N: tl.constexpr, N_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_PK: tl.constexpr,
):
    P: tl.constexpr = 2 * N * (N - 1)
    NN: tl.constexpr = N * N
    NPAIRS: tl.constexpr = N * (N - 1)
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

    # 1. G[m, m', t] = <g_m, h_m'>, column m' at a time, written to the scratch gram[t, m * N + m']
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
    nn_mask = m_mask[:, None, None] & m_mask[None, :, None] & t_mask[None, None, :]
    tl.store(gram_ptr + offs_t64[None, None, :] * NN + offs_m[:, None, None] * N + offs_m[None, :, None], gram,
             mask=nn_mask)
    tl.debug_barrier()  # the CTA's gram rows are visible to all its threads before they are gathered below

    # 2. dz[t, p]: pair q = p mod N(N-1) is (src, dst); dzd = beta G[src, dst], dzi = gamma (G[src, src] - G[src, dst])
    is_d = offs_p < NPAIRS
    q = tl.where(is_d, offs_p, offs_p - NPAIRS)
    src = q // (N - 1)
    k = q % (N - 1)
    dst = k + (k >= src).to(tl.int32)
    g_row = gram_ptr + offs_t64[:, None] * NN + (src * N)[None, :]
    g_pair = tl.load(g_row + dst[None, :], mask=tp_mask, other=0.0)
    g_self = tl.load(g_row + src[None, :], mask=tp_mask, other=0.0)
    dz = tl.where(is_d[None, :], beta * g_pair, gamma * (g_self - g_pair))
    tl.store(dz_ptr + offs_t64[:, None] * P + offs_p[None, :], dz, mask=tp_mask)
    tl.debug_barrier()  # dz is read back below in BLOCK_PK-wide slices (a float32 FMA dot over all of P at once
    # holds a whole dz row per thread: 255 registers and KBs of spills at n = 8)
    offs_pk = tl.arange(0, BLOCK_PK)

    # 3. dh[m'] = sum_m C[m, m', t] g_m + w[:, m' block]^T dz, one output stream at a time (a [N_PAD, BLOCK_T,
    # BLOCK_D] accumulator with the dz @ w dots unrolled over the streams took 255 registers and spilled at n = 8)
    dh_row = dh_ptr + offs_t64[:, None] * stride_ot  # advanced by stride_om per output stream (64-bit pointers)
    for mo in tl.static_range(N):
        diag_mo = 1.0 + gamma * _row_sum_zi(z_ptr, offs_t64, t_mask, mo, P, N)  # C[mo, mo, t]
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_dd
            d_mask = offs_d < D
            td_mask = t_mask[:, None] & d_mask[None, :]
            acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
            for p0 in tl.static_range(0, P, BLOCK_PK):
                pk = p0 + offs_pk
                pk_mask = pk < P
                dzk = tl.load(dz_ptr + offs_t64[:, None] * P + pk[None, :], mask=t_mask[:, None] & pk_mask[None, :],
                              other=0.0)  # [BLOCK_T, BLOCK_PK]
                wm = tl.load(w_ptr + pk[:, None] * stride_wp + (mo * D + offs_d[None, :]) * stride_wk,
                             mask=pk_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_PK, BLOCK_D]
                acc += tl.dot(dzk, wm, input_precision="ieee")
            gp = g_ptr
            for m in tl.static_range(N):
                gm = tl.load(gp + offs_t64[:, None] * stride_gt + offs_d[None, :] * stride_gd, mask=td_mask,
                             other=0.0).to(tl.float32)
                if m == mo:
                    acc += diag_mo[:, None] * gm
                else:
                    acc += _coefficient(z_ptr, offs_t64, t_mask, m, mo, beta, gamma, P, N)[:, None] * gm
                gp += stride_gm
            tl.store(dh_row + offs_d[None, :] * stride_od, acc.to(dh_ptr.dtype.element_ty), mask=td_mask)
        dh_row += stride_om
