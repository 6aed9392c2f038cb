"""Triton kernels: NF4 dequantization, the grouped LoRA shrink and the fused NF4 base + LoRA-expand matmul.

``lora_linear`` on the Triton path is two launches (see docs/kernels.md):

1. ``lora_shrink_kernel`` -- grouped by adapter segment (Punica SGMV / vLLM ``LoRAKernelMeta``):
   program ``(tile, segment)`` reads rows ``order[starts[j] + tile * BLOCK_M ...]`` of adapter
   ``j - 1`` and computes ``xa[row, :] = x[row, :] @ D[a]^T`` once per row (tensor cores for 16-bit
   inputs); segment 0 (base-only rows) writes zeros, so ``xa`` needs no memset.
2. ``nf4_lora_kernel`` -- program ``(row tile of the sorted rows, output tile[, K split])`` streams
   the NF4 weight tile by tile, decodes it in registers and accumulates ``x @ W^T`` (forward) or
   ``dY @ W`` (input gradient, ``TRANS_W``), then adds the LoRA expand
   ``s[a] * xa[rows of a] @ U[a]^T`` in the epilogue, once for each adapter present in the tile
   (the tile's ids are sorted: the loop jumps from one id to the next larger one).

NF4 decode (``_w_tile``): W is ``[ROWS, COLS]`` row-major with two codes per byte (even element in the
high nibble). A tile is read as ``[BR, NG, GB]`` packed bytes along the contiguous axis (one
contiguous run of ``BC / 2`` bytes per row: the compiler issues 64/128-bit loads), both nibbles are
split with a shift and a mask, the 16-entry code table is indexed from registers (``tl.gather`` on a
table loaded once per program) and interleaved back (``tl.join`` + reshape). When the quantization
blocks align with the tile (``COLS % BLOCKSIZE == 0``) the absmax (and the double-quantized
``code2[q] * absmax2 + offset``) is loaded and decoded once per (row, block) of the tile (``GROUP``
elements); otherwise once per byte from the flat index. ``ODD`` (``COLS`` odd: a byte may hold the
last element of one row and the first of the next) decodes element by element.

Activations are upcast to float32 after loading and accumulation is float32 (the Triton CPU
interpreter computes bf16 arithmetic wrongly); on a GPU with 16-bit inputs the ``tl.dot`` operands
are 16-bit (tensor cores). ``SPLIT_K > 1`` (decode) splits the reduction over programs that store
float32 partials; the last program of an output tile to finish (an acq_rel counter in a buffer the
launcher zeroes for this launch alone) adds them in split order -- deterministic -- and runs the epilogue.
Adapter offsets are 64-bit.
"""

import triton
import triton.language as tl


@triton.jit
def _scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, mask, DOUBLE_QUANT: tl.constexpr):
    """The float32 absmax of quantization blocks ``block`` (any shape)."""
    if DOUBLE_QUANT:
        q2 = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        s = tl.load(code2_ptr + q2, mask=mask, other=0.0) * tl.load(absmax2_ptr + block // 256, mask=mask, other=0.0)
        s = s + tl.load(offset_ptr)
    else:
        s = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return s


@triton.jit
def _nf4_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, flat, mask,
              BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """Dequantize NF4 elements at flat indices ``flat`` (any shape) to float32, element by element."""
    byte = tl.load(packed_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
    shift = (1 - (flat & 1)) * 4  # even element: high nibble
    nibble = (byte >> shift.to(tl.int32)) & 0xF
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    return value * _scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, flat // BLOCKSIZE, mask, DOUBLE_QUANT)


LUT = tl.constexpr(0)


@triton.jit
def _lut(table, code_ptr, nib, BR: tl.constexpr, NG: tl.constexpr, GB: tl.constexpr):
    """The NF4 code of each 4-bit index."""
    if LUT == 0:
        v = tl.gather(table, nib.reshape(BR * NG * GB), 0).reshape(BR, NG, GB)
    elif LUT == 1:
        v = tl.load(code_ptr + nib)
    else:  # select tree on the 4 bits, constants in the instruction stream
        b0 = (nib & 1) != 0
        b1 = (nib & 2) != 0
        b2 = (nib & 4) != 0
        b3 = (nib & 8) != 0
        l0 = tl.where(b1, tl.where(b0, -0.39491748809814453, -0.5250730514526367),
                      tl.where(b0, -0.6961928009986877, -1.0))
        l1 = tl.where(b1, tl.where(b0, 0.0, -0.09105003625154495),
                      tl.where(b0, -0.18477343022823334, -0.28444138169288635))
        l2 = tl.where(b1, tl.where(b0, 0.33791524171829224, 0.24611230194568634),
                      tl.where(b0, 0.16093020141124725, 0.07958029955625534))
        l3 = tl.where(b1, tl.where(b0, 1.0, 0.7229568362236023),
                      tl.where(b0, 0.5626170039176941, 0.44070982933044434))
        v = tl.where(b3, tl.where(b2, l3, l2), tl.where(b2, l1, l0))
    return v


@triton.jit
def _w_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, table,
            row0, col0, row_end, col_end, COLS, ROW_BYTES,
            BR: tl.constexpr, BC: tl.constexpr, GROUP: tl.constexpr, BLOCKSIZE: tl.constexpr,
            DOUBLE_QUANT: tl.constexpr, ODD: tl.constexpr, EVEN_COLS: tl.constexpr = False,
            W64: tl.constexpr = True):
    """``W[row0:row0+BR, col0:col0+BC]`` of the row-major ``W [*, COLS]`` as float32 (zero from ``row_end``
    and ``col_end`` on)."""
    offs_r = row0 + tl.arange(0, BR)
    if W64:  # the packed weight has 2**30 bytes or more: byte index x 2 (element index) passes 2**31
        offs_r = offs_r.to(tl.int64)
    r_mask = offs_r < row_end
    if ODD:
        offs_c = col0 + tl.arange(0, BC)
        mask = r_mask[:, None] & (offs_c < col_end)[None, :]
        flat = offs_r[:, None].to(tl.int64) * COLS + offs_c[None, :].to(tl.int64)
        w = _nf4_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, flat, mask,
                      BLOCKSIZE, DOUBLE_QUANT)
    else:
        NG: tl.constexpr = BC // GROUP
        GB: tl.constexpr = GROUP // 2
        offs_g = tl.arange(0, NG)
        offs_b = tl.arange(0, GB)
        bcol = offs_g[:, None] * GB + offs_b[None, :]  # byte within the tile's row run [NG, GB]
        if EVEN_COLS:  # the tile lies inside the columns: a row mask only, so the loads vectorize
            mask = tl.broadcast_to(r_mask[:, None, None], (BR, NG, GB))
        else:
            mask = r_mask[:, None, None] & (col0 + 2 * bcol < col_end)[None, :, :]
        # col0 is a multiple of BC (the tile's first column): tell the compiler, so the loads vectorize
        row_ptr = packed_ptr + tl.multiple_of(col0 // 2, BC // 2) + offs_r * ROW_BYTES  # ROW_BYTES = COLS / 2
        byte_idx = offs_r[:, None, None] * ROW_BYTES + (col0 // 2 + bcol)[None, :, :]
        byte = tl.load(row_ptr[:, None, None] + bcol[None, :, :], mask=mask, other=0).to(tl.int32)
        hi = _lut(table, code_ptr, (byte >> 4) & 0xF, BR, NG, GB)
        lo = _lut(table, code_ptr, byte & 0xF, BR, NG, GB)
        if GROUP == 2:  # blocks not aligned with rows: one scale per byte, from the flat index
            block = byte_idx * 2 // BLOCKSIZE
            s = _scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, mask, DOUBLE_QUANT)
        else:  # COLS % BLOCKSIZE == 0 and GROUP divides BLOCKSIZE: one scale per (row, group)
            g_col = col0 + offs_g * GROUP
            if EVEN_COLS:
                g_mask = tl.broadcast_to(r_mask[:, None], (BR, NG))
            else:
                g_mask = r_mask[:, None] & (g_col < col_end)[None, :]
            block = offs_r[:, None] * (COLS // BLOCKSIZE) + (g_col // BLOCKSIZE)[None, :]
            s = _scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, g_mask, DOUBLE_QUANT)[:, :, None]
        w = tl.join(hi * s, lo * s).reshape(BR, BC)
    return w


@triton.jit
def nf4_dequantize_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr, numel,
                          BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ODD: tl.constexpr,
                          BLOCK: tl.constexpr):
    """out[i] = code[q[i]] * absmax[i // BLOCKSIZE] for a flat range of BLOCK elements (as one row)."""
    pid = tl.program_id(0)
    table = tl.load(code_ptr + tl.arange(0, 16))
    if BLOCKSIZE % BLOCK == 0:
        w = _w_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, table,
                    0, pid.to(tl.int64) * BLOCK, 1, numel, numel, 0, 1, BLOCK, BLOCK, BLOCKSIZE, DOUBLE_QUANT, ODD)
    else:
        w = _w_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, table,
                    0, pid.to(tl.int64) * BLOCK, 1, numel, numel, 0, 1, BLOCK, BLOCKSIZE, BLOCKSIZE, DOUBLE_QUANT, ODD)
    flat = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + flat, w.reshape(BLOCK).to(out_ptr.dtype.element_ty), mask=flat < numel)


@triton.jit
def lora_shrink_kernel(
    x_ptr, order_ptr, starts_ptr, d_ptr, xa_ptr,
    N_RED, R,
    stride_xm, stride_xj, stride_da, stride_dr, stride_dj, stride_xam,
    LOW_PRECISION_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``xa[row] = x[row] @ D[a]^T`` (float32) for the rows of adapter segment ``program_id(1) - 1``."""
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    seg_start = tl.load(starts_ptr + seg)
    seg_end = tl.load(starts_ptr + seg + 1)
    first = seg_start + pid_m * BLOCK_M
    if first < seg_end:
        offs = first + tl.arange(0, BLOCK_M)
        m_mask = offs < seg_end
        rows = tl.load(order_ptr + offs, mask=m_mask, other=0).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        if seg > 0:
            d_base = d_ptr + (seg - 1).to(tl.int64) * stride_da
            for k0 in range(0, N_RED, BLOCK_K):
                offs_j = k0 + tl.arange(0, BLOCK_K)
                j_mask = offs_j < N_RED
                x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_j[None, :] * stride_xj,
                            mask=m_mask[:, None] & j_mask[None, :], other=0.0)
                d = tl.load(d_base + offs_j[:, None] * stride_dj + offs_r[None, :] * stride_dr,
                            mask=j_mask[:, None] & r_mask[None, :], other=0.0)
                if LOW_PRECISION_DOT:
                    acc += tl.dot(x, d.to(x_ptr.dtype.element_ty))
                else:
                    acc += tl.dot(x.to(tl.float32), d.to(tl.float32), input_precision="ieee")
        tl.store(xa_ptr + rows[:, None] * stride_xam + offs_r[None, :], acc, mask=m_mask[:, None])


@triton.jit
def nf4_lora_kernel(
    x_ptr, row_index_ptr, ids_ptr,
    packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
    xa_ptr, u_ptr, scale_ptr,
    out_ptr, part_ptr, count_ptr,
    M, N_OUT, N_RED, W_COLS, W_ROW_BYTES, R,
    stride_xm, stride_xj, stride_xam,
    stride_ua, stride_uo, stride_ur,
    stride_om, stride_oo,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, TRANS_W: tl.constexpr, GROUP: tl.constexpr,
    ODD: tl.constexpr, HAS_BASE: tl.constexpr, HAS_LORA: tl.constexpr, SPLIT_K: tl.constexpr,
    LOW_PRECISION_DOT: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, W64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_s = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # positions in the sorted order
    m_mask = offs_s < M
    rows = tl.load(row_index_ptr + offs_s, mask=m_mask, other=0).to(tl.int64)
    offs_o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_mask = offs_o < N_OUT
    out_mask = m_mask[:, None] & o_mask[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_o[None, :] * stride_oo

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    finish = True
    if HAS_BASE:
        table = tl.load(code_ptr + tl.arange(0, 16))
        k_per_split = tl.cdiv(tl.cdiv(N_RED, SPLIT_K), BLOCK_K) * BLOCK_K
        k_start = pid_k * k_per_split
        k_end = tl.minimum(k_start + k_per_split, N_RED)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_j = k0 + tl.arange(0, BLOCK_K)
            if EVEN_K:  # N_RED % BLOCK_K == 0: no tile crosses k_end
                x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_j[None, :] * stride_xj,
                            mask=m_mask[:, None], other=0.0)
            else:
                x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_j[None, :] * stride_xj,
                            mask=m_mask[:, None] & (offs_j < k_end)[None, :], other=0.0)
            if TRANS_W:  # W [N_RED, N_OUT] as stored: tile [BLOCK_K, BLOCK_N], contiguous along the output
                w = _w_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, table,
                            k0, pid_n * BLOCK_N, k_end, N_OUT, W_COLS, W_ROW_BYTES, BLOCK_K, BLOCK_N, GROUP,
                            BLOCKSIZE, DOUBLE_QUANT, ODD, EVEN_N, W64)
            else:  # W [N_OUT, N_RED]: tile [BLOCK_N, BLOCK_K], contiguous along the reduction
                w = tl.trans(_w_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, table,
                                     pid_n * BLOCK_N, k0, N_OUT, k_end, W_COLS, W_ROW_BYTES, BLOCK_N, BLOCK_K, GROUP,
                                     BLOCKSIZE, DOUBLE_QUANT, ODD, EVEN_K, W64))
            if LOW_PRECISION_DOT:  # GPU: 16-bit tensor-core operands, float32 accumulation
                acc += tl.dot(x, w.to(x_ptr.dtype.element_ty))
            else:
                acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        if SPLIT_K > 1:
            # float32 partial, then the last program of this output tile sums all partials in split order
            tile = pid_m * tl.num_programs(1) + pid_n
            p_ptrs = part_ptr + (pid_k * M + offs_s.to(tl.int64))[:, None] * N_OUT + offs_o[None, :]
            tl.store(p_ptrs, acc, mask=out_mask)
            tl.debug_barrier()
            done = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
            finish = done == SPLIT_K - 1
            if finish:
                tl.debug_barrier()
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for s in range(SPLIT_K):
                    acc += tl.load(part_ptr + (s * M + offs_s.to(tl.int64))[:, None] * N_OUT + offs_o[None, :],
                                   mask=out_mask, other=0.0, cache_modifier=".cg")
    else:  # the base product is already in out (cuBLAS on the dequantized weight): add the LoRA term
        acc = tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)

    if finish:
        _epilogue(acc, xa_ptr, u_ptr, scale_ptr, ids_ptr, out_ptrs, rows, offs_s, offs_o, m_mask, o_mask, R,
                  stride_xam, stride_ua, stride_uo, stride_ur, x_ptr.dtype.element_ty, HAS_LORA, LOW_PRECISION_DOT,
                  BLOCK_R)


@triton.jit
def _epilogue(acc, xa_ptr, u_ptr, scale_ptr, ids_ptr, out_ptrs, rows, offs_s, offs_o, m_mask, o_mask, R,
              stride_xam, stride_ua, stride_uo, stride_ur, DOT_DTYPE: tl.constexpr, HAS_LORA: tl.constexpr,
              LOW_PRECISION_DOT: tl.constexpr, BLOCK_R: tl.constexpr):
    """``out = acc + s[a] xa[rows of a] @ U[a]^T`` for each adapter ``a`` present in the tile; one store."""
    if HAS_LORA:
        ids = tl.load(ids_ptr + offs_s, mask=m_mask, other=-1)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        xa = tl.load(xa_ptr + rows[:, None] * stride_xam + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :],
                     other=0.0)
        a_hi = tl.max(ids, axis=0)
        a = tl.min(tl.where(ids >= 0, ids, 2147483647), axis=0)
        while a <= a_hi:  # the adapters present in this tile, in increasing order
            u = tl.load(u_ptr + a.to(tl.int64) * stride_ua + offs_r[:, None] * stride_ur + offs_o[None, :] * stride_uo,
                        mask=r_mask[:, None] & o_mask[None, :], other=0.0)
            mine = (ids == a)[:, None]
            sel = tl.where(mine, xa * tl.load(scale_ptr + a), 0.0)
            if LOW_PRECISION_DOT:
                part = tl.dot(sel.to(DOT_DTYPE), u.to(DOT_DTYPE))
            else:
                part = tl.dot(sel, u.to(tl.float32), input_precision="ieee")
            acc += tl.where(mine, part, 0.0)  # 0 * inf in another adapter's U stays out of these rows
            a = tl.min(tl.where(ids > a, ids, 2147483647), axis=0)

    tl.store(out_ptrs, acc.to(out_ptrs.dtype.element_ty), mask=m_mask[:, None] & o_mask[None, :])
