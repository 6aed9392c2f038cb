"""Triton kernels: NF4 dequantization and the fused NF4 base + multi-adapter LoRA matmul.

One generic kernel serves the forward and the input-gradient of the backward. It computes, for
each row ``m`` with adapter ``a = ids[m]``::

    out[m, o] = sum_j x[m, j] * W(o, j)  +  s[a] * sum_r xa[m, r] * U[a, o, r]
    xa[m, r]  = sum_j x[m, j] * D[a, r, j]

where ``W(o, j)`` is read from the packed NF4 codes at flat index ``o * w_stride_out + j * w_stride_red``
(forward: ``W[o, j]``; backward: ``W[j, o]``), ``D`` is the "shrink" matrix (forward ``A``,
backward ``B`` viewed as ``[a, r, n]``) and ``U`` the "expand" matrix (forward ``B``, backward
``A`` viewed as ``[a, k, r]``). All of it is strided, so nothing is transposed or copied.

Rows arrive through ``row_index`` sorted by adapter id (the caller does a stable sort), so a row
tile usually holds one adapter; a tile that straddles several loops over them. Each NF4 tile is
dequantized once per K step in registers and reused for all rows of the tile. ``SPLIT_K > 1``
is the small-M (decode) variant: programs split the reduction and add their partial results,
base and LoRA alike (the expand is linear in ``xa``), into a float32 output with atomics.

Activations are upcast to float32 right after loading and accumulation is float32 (the Triton
CPU interpreter computes bf16 arithmetic wrongly, and fp32 accumulation is what the GPU wants).
"""

import triton
import triton.language as tl


@triton.jit
def _nf4_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, flat, mask,
              BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """Dequantize NF4 elements at flat indices ``flat`` (any shape) to float32."""
    byte = tl.load(packed_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
    shift = (1 - (flat & 1)) * 4  # even element: high nibble
    nibble = (byte >> shift.to(tl.int32)) & 0xF
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    block = flat // BLOCKSIZE
    if DOUBLE_QUANT:
        q2 = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q2, mask=mask, other=0.0) * tl.load(absmax2_ptr + block // 256, mask=mask,
                                                                          other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return value * scale


@triton.jit
def nf4_dequantize_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr, numel,
                          BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = code[q[i]] * absmax[i // BLOCKSIZE] for a flat range of BLOCK elements."""
    pid = tl.program_id(0)
    flat = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = flat < numel
    w = _nf4_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, flat, mask,
                  BLOCKSIZE, DOUBLE_QUANT)
    tl.store(out_ptr + flat, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def nf4_lora_kernel(
    x_ptr, row_index_ptr, ids_ptr,
    packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
    d_ptr, u_ptr, scale_ptr,
    out_ptr, xa_ptr,
    M, N_OUT, N_RED, R,
    stride_xm, stride_xj,
    w_stride_out, w_stride_red,
    stride_da, stride_dr, stride_dj,
    stride_ua, stride_uo, stride_ur,
    stride_om, stride_oo,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_LORA: tl.constexpr, STORE_XA: tl.constexpr,
    SPLIT_K: tl.constexpr, LOW_PRECISION_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    rows = tl.load(row_index_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    ids = tl.load(ids_ptr + offs_m, mask=m_mask, other=-1)
    offs_o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_mask = offs_o < N_OUT
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R

    # Rows are sorted by adapter id: the adapters of this tile form a contiguous id range.
    a_lo = tl.maximum(tl.min(tl.where(m_mask, ids, 2147483647), axis=0), 0)
    a_hi = tl.max(ids, axis=0)

    k_per_split = tl.cdiv(tl.cdiv(N_RED, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, N_RED)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_j = k0 + tl.arange(0, BLOCK_K)
        j_mask = offs_j < k_end
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_j[None, :] * stride_xj,
                    mask=m_mask[:, None] & j_mask[None, :], other=0.0).to(tl.float32)
        # W tile laid out [BLOCK_K, BLOCK_N] (reduction x output) so that x @ w needs no transpose.
        flat = offs_j[:, None].to(tl.int64) * w_stride_red + offs_o[None, :].to(tl.int64) * w_stride_out
        w = _nf4_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, flat,
                      j_mask[:, None] & o_mask[None, :], BLOCKSIZE, DOUBLE_QUANT)
        if LOW_PRECISION_DOT:  # GPU: 16-bit tensor-core operands, float32 accumulation
            acc += tl.dot(x.to(x_ptr.dtype.element_ty), w.to(x_ptr.dtype.element_ty))
        else:
            acc += tl.dot(x, w, input_precision="ieee")
        if HAS_LORA:
            for a in range(a_lo, a_hi + 1):
                d = tl.load(d_ptr + a * stride_da + offs_j[:, None] * stride_dj + offs_r[None, :] * stride_dr,
                            mask=j_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
                part = tl.dot(x, d, input_precision="ieee")
                xa += tl.where((ids == a)[:, None], part, 0.0)

    if HAS_LORA:
        for a in range(a_lo, a_hi + 1):
            u = tl.load(u_ptr + a * stride_ua + offs_r[:, None] * stride_ur + offs_o[None, :] * stride_uo,
                        mask=r_mask[:, None] & o_mask[None, :], other=0.0).to(tl.float32)
            s = tl.load(scale_ptr + a).to(tl.float32)
            part = tl.dot(xa, u, input_precision="ieee") * s
            acc += tl.where((ids == a)[:, None], part, 0.0)
        if STORE_XA:
            if pid_n == 0:
                xa_ptrs = xa_ptr + rows[:, None] * BLOCK_R + offs_r[None, :]
                if SPLIT_K == 1:
                    tl.store(xa_ptrs, xa, mask=m_mask[:, None])
                else:
                    tl.atomic_add(xa_ptrs, xa, mask=m_mask[:, None])

    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_o[None, :] * stride_oo
    out_mask = m_mask[:, None] & o_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)
