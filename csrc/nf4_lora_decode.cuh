// Decode-regime (M <= 16) kernels: NF4 GEMV fused with the multi-adapter LoRA expand, and the LoRA
// shrink. Device code only; no torch. See nf4_lora_decode.h for the interface and docs/kernels.md
// ("CUDA decode kernel") for the design.
//
// Two GEMV kernels:
// - nf4_lora_mma_kernel<T, NH, GK, DQ> (K % 32 == 0, 16-byte aligned packed weight and x: the models'
//   case): tensor cores. Weights are decoded two at a time with a pair table in shared memory
//   straight into mma.sync A fragments, activations are the B operand read from global memory in
//   fragment order; see the comment above the kernel.
// - nf4_lora_gemv_kernel<T, MT, RW> (any K, any alignment): CUDA cores. Block = 8 warps; each warp
//   owns RW consecutive output features, lane l takes elements [32l, 32l+32) of each 1024-element K
//   window; the window's activations are staged in shared memory (16-byte units XOR-swizzled), every
//   decoded weight (byte-wise loads, a 16-entry code table in shared memory) is used for all MT
//   activation rows; warp shuffles reduce the lanes.
// Both end the same way: an output's owner adds the LoRA expand s[a] * xa[m] . B[a, n, :] and stores
// in the activation dtype, or (split_k > 1) writes a float32 partial; the last block of an N tile to
// finish (threadfence + atomic counter) sums the partials in split order (deterministic), adds the
// expand and stores.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "nf4_lora_decode.h"

namespace xkern {
namespace decode {

// kWarps, kThreads, kChunk, kWindow, kMaxSplitK: nf4_lora_decode.h
constexpr int kNestedShift = 8;          // double quantization: 256 absmax values per nested block

// NF4 code table (bitsandbytes order); copied into shared memory by every block.
static __constant__ float kNF4Code[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// ---- element types ---------------------------------------------------------------------------

template <typename T>
struct Elem;

template <>
struct Elem<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ uint32_t bits(float v) { return __half_as_ushort(__float2half_rn(v)); }
  // two packed 16-bit values, element 0 in the low half
  static __device__ __forceinline__ void unpack2(uint32_t w, float& lo, float& hi) {
    lo = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
    hi = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
};

template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ uint32_t bits(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
  static __device__ __forceinline__ void unpack2(uint32_t w, float& lo, float& hi) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
  }
};

template <>
struct Elem<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// 8 consecutive elements (16-byte aligned) -> float
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&f)[8]) {
  static_assert(sizeof(T) == 2, "16-bit element");
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
#pragma unroll
  for (int i = 0; i < 4; ++i) Elem<T>::unpack2(word_of(v, i), f[2 * i], f[2 * i + 1]);
}

template <>
__device__ __forceinline__ void load8<float>(const float* p, float (&f)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
  f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}

__device__ __forceinline__ float load_as_float(const void* base, int64_t i, DType dt) {
  switch (dt) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(base)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

// ---- small primitives ------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Position of 16-byte unit u of a window row in shared memory. Lane l reads units 4l..4l+3; the
// XOR spreads the 8 lanes of each 128-bit shared-memory phase over all 32 banks.
__device__ __forceinline__ int swz(int u) { return u ^ ((u >> 3) & 3); }

// The hardware-specific pieces below are replaced by csrc/host_emulation/ when the kernels
// are run on the CPU by the host emulator (tests/ops/test_cuda_backend.py); the rest is shared.
#ifndef XKERN_HOST_EMULATION
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char xkern_dynamic_smem[];
  return xkern_dynamic_smem;
}

__device__ __forceinline__ unsigned byte_perm(unsigned x, unsigned y, unsigned selector) {
  return __byte_perm(x, y, selector);
}

// d = a b + c for one m16n8k16 tensor-core step of the warp (float32 accumulation): a the A fragment
// (16 x 16, row major: a[0] row g, a[1] row g+8, a[2]/a[3] the same rows 8 columns on), b0/b1 the B
// fragment (16 x 8, column g, k rows 2t.. and 2t+8..), each register two 16-bit values, lower k in the
// low half; d/c: rows g and g+8, columns 2t and 2t+1 (g = lane / 4, t = lane % 4).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                          const float (&c)[4]);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1, const float (&c)[4]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                                  const float (&c)[4]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

#endif  // XKERN_HOST_EMULATION

// absmax of quantization block b, decoding double quantization: code2[q] * absmax2[b / 256] + offset
__device__ __forceinline__ float block_scale(const DecodeParams& p, float offset, int64_t b) {
  if (p.double_quant) {
    const int q = __ldg(static_cast<const uint8_t*>(p.absmax) + b);
    return fmaf(__ldg(p.code2 + q), __ldg(p.absmax2 + (b >> kNestedShift)), offset);
  }
  return __ldg(static_cast<const float*>(p.absmax) + b);
}

// scale[a] * xa[m, :] . B[a, n, :]  (0 for base-only rows or without adapters)
__device__ __forceinline__ float lora_expand(const DecodeParams& p, int m, int n) {
  if (p.n_adapters <= 0 || p.rank <= 0) return 0.f;
  const int a = p.ids[m];
  if (a < 0) return 0.f;
  const float* xa = p.xa + static_cast<int64_t>(m) * p.rank;
  const int64_t base = (static_cast<int64_t>(a) * p.N + n) * p.rank;
  float s = 0.f;
  for (int r = 0; r < p.rank; ++r) s = fmaf(xa[r], load_as_float(p.lora_B, base + r, p.b_dtype), s);
  return __ldg(p.scale + a) * s;
}

// The end of both GEMVs: each thread holds kN finished dot products, outputs (m[u], n[u]) (`active` where
// m < M and n < N). With one split it adds the LoRA expand and stores; otherwise it writes its float32
// partials, and the last block of the N tile to finish (threadfence + atomic counter; no block waits for
// another) sums every split's partials in split order -- deterministic --, adds the expand, stores, and
// resets the counter. Every thread of the block calls it.
template <typename T, int kN>
__device__ __forceinline__ void finish_outputs(const DecodeParams& p, int split, int split_k, int n_tile,
                                               const float (&v)[kN], const int (&m)[kN], const int (&n)[kN],
                                               const bool (&active)[kN], int& s_last) {
  T* y = static_cast<T*>(p.y);
  if (split_k == 1) {
#pragma unroll
    for (int u = 0; u < kN; ++u) {
      if (active[u]) y[static_cast<int64_t>(m[u]) * p.N + n[u]] = Elem<T>::from_float(v[u] + lora_expand(p, m[u], n[u]));
    }
    return;
  }
#pragma unroll
  for (int u = 0; u < kN; ++u) {
    if (active[u]) p.partial[(static_cast<int64_t>(split) * p.M + m[u]) * p.N + n[u]] = v[u];
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(p.counters + n_tile, 1) == split_k - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
#pragma unroll
  for (int u = 0; u < kN; ++u) {
    if (active[u]) {
      float total = 0.f;
      for (int s = 0; s < split_k; ++s) total += __ldcg(p.partial + (static_cast<int64_t>(s) * p.M + m[u]) * p.N + n[u]);
      y[static_cast<int64_t>(m[u]) * p.N + n[u]] = Elem<T>::from_float(total + lora_expand(p, m[u], n[u]));
    }
  }
  if (threadIdx.x == 0) p.counters[n_tile] = 0;  // leave the workspace reusable
}

// part[r][m] += sum_j c[r][j] * x[m, 8*unit + j]  (x from the swizzled window in shared memory)
template <typename T, int MT, int RW>
__device__ __forceinline__ void fma_subchunk(const float (&c)[RW][8], const T* xw, int unit,
                                             float (&part)[RW][MT]) {
  const int pos = swz(unit) * 8;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const uint4 xv = *reinterpret_cast<const uint4*>(xw + m * kWindow + pos);
    float xf[8];
#pragma unroll
    for (int i = 0; i < 4; ++i) Elem<T>::unpack2(word_of(xv, i), xf[2 * i], xf[2 * i + 1]);
#pragma unroll
    for (int r = 0; r < RW; ++r) {
#pragma unroll
      for (int j = 0; j < 8; ++j) part[r][m] = fmaf(c[r][j], xf[j], part[r][m]);
    }
  }
}

// ---- the fused GEMV + LoRA expand --------------------------------------------------------------

// The generic GEMV (any K, any alignment). T: activation type (__half / __nv_bfloat16). MT:
// activation rows computed (M <= MT; rows >= M are zero). RW: weight rows per warp.
// Dynamic shared memory: MT * kWindow * sizeof(T) bytes.
template <typename T, int MT, int RW>
__global__ void __launch_bounds__(kThreads)
    nf4_lora_gemv_kernel(const DecodeParams p, const int k_slab, const int split_k, const int lg_block) {
  static_assert(RW * MT <= 32, "one lane per (weight row, activation row) output");
  static_assert(sizeof(T) == 2, "16-bit activations");
  __shared__ float lut[16];
  __shared__ int s_last;
  T* xs = reinterpret_cast<T*>(dynamic_smem());

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  if (tid < 16) lut[tid] = kNF4Code[tid];

  const int n_tile = blockIdx.x;
  const int split = blockIdx.y;
  const int row0 = n_tile * (kWarps * RW) + warp * RW;
  const int k_begin = split * k_slab;
  const int k_end = min(p.K, k_begin + k_slab);
  const int n_windows = (k_end - k_begin + kWindow - 1) / kWindow;
  const int64_t K = p.K;
  const float offset = p.double_quant ? __ldg(p.offset) : 0.f;
  const T* __restrict__ x = static_cast<const T*>(p.x);

  float acc[RW][MT];
#pragma unroll
  for (int r = 0; r < RW; ++r) {
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;
  }

  // Any K (rows need not start on a byte or a block): byte-wise weight loads.
  const T zero = Elem<T>::from_float(0.f);
  for (int i = 0; i < n_windows; ++i) {
    const int win = k_begin + i * kWindow;
    __syncthreads();  // previous window fully read
    for (int t = tid; t < MT * kWindow; t += kThreads) {
      const int m = t / kWindow;
      const int e = t % kWindow;
      const int k = win + e;
      xs[m * kWindow + swz(e >> 3) * 8 + (e & 7)] = (m < p.M && k < k_end) ? x[m * K + k] : zero;
    }
    __syncthreads();
    const int k_lane = win + lane * kChunk;
    if (k_lane < k_end) {
      const int n_valid = min(kChunk, k_end - k_lane);
      int64_t f0[RW], b0[RW];
      float s0[RW], s1[RW];
#pragma unroll
      for (int r = 0; r < RW; ++r) {
        const int n = row0 + r;
        f0[r] = static_cast<int64_t>(min(n, p.N - 1)) * K + k_lane;
        b0[r] = f0[r] >> lg_block;
        const int64_t b1 = (f0[r] + n_valid - 1) >> lg_block;  // a chunk spans at most two blocks
        s0[r] = block_scale(p, offset, b0[r]);
        s1[r] = b1 != b0[r] ? block_scale(p, offset, b1) : s0[r];
      }
#pragma unroll
      for (int sc = 0; sc < 4; ++sc) {
        float c[RW][8];
#pragma unroll
        for (int r = 0; r < RW; ++r) {
          const bool row_ok = row0 + r < p.N;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const int e = sc * 8 + j;
            float v = 0.f;
            if (row_ok && e < n_valid) {
              const int64_t f = f0[r] + e;
              const uint32_t byte = __ldg(p.packed + (f >> 1));
              const uint32_t q = (f & 1) ? (byte & 0xfu) : (byte >> 4);
              v = lut[q] * (((f >> lg_block) == b0[r]) ? s0[r] : s1[r]);
            }
            c[r][j] = v;
          }
        }
        fma_subchunk<T, MT, RW>(c, xs, lane * 4 + sc, acc);
      }
    }
  }

  // ---- epilogue: reduce the lanes, lane p = r * MT + m owns output (row0 + r, m) -------------
  float mine = 0.f;
#pragma unroll
  for (int r = 0; r < RW; ++r) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const float v = warp_sum(acc[r][m]);
      if (lane == r * MT + m) mine = v;
    }
  }
  const int my_r = lane / MT;
  const int my_m = lane % MT;
  const int n = row0 + my_r;
  const bool active = lane < RW * MT && my_m < p.M && n < p.N;
  const float v[1] = {mine};
  const int out_m[1] = {my_m};
  const int out_n[1] = {n};
  const bool out_active[1] = {active};
  finish_outputs<T, 1>(p, split, split_k, n_tile, v, out_m, out_n, out_active, s_last);
}

// ---- the tensor-core GEMV + LoRA expand ------------------------------------------------------

// NF4 pair table in dynamic shared memory: the entry of byte value v for lane l sits at byte offset
// v * 256 + 4 l and holds the codes of both nibbles as 16-bit T (the high nibble -- the even element
// -- in the low half, where an mma fragment wants the lower k). One lookup decodes two elements; the
// 32 lanes read 32 different banks whatever their bytes; the address is a single PRMT (byte v of a
// weight word into bits 8..15, 4 l into bits 0..7). Half of each 256-byte row is unused.
constexpr int kPairTableBytes = 256 * 256;

// Shared memory of the tensor-core kernel: the pair table, reused after the K loop for the
// cross-warp reduction (kWarps * kMmaTiles * NH * 4 * 32 floats <= 16 KiB).
constexpr size_t mma_smem_bytes() { return kPairTableBytes; }

// T: activation type. NH: halves of 8 activation rows (M <= 8: 1, M <= 16: 2). GK: K elements of a
// weight row per chunk (a thread loads GK / 8 bytes of each of its rows: 4 or 8), which lie in one
// quantization block (K % GK == 0, blocksize >= GK), so a chunk's dot products are taken on the
// codes alone and scaled once per (row, chunk). DQ: double-quantized absmax.
//
// Block: kMmaTiles tiles of 16 weight rows (output features); all 8 warps work on all of them, warp w
// taking chunks w, w + 8, ... of the block's K range; grid (N tiles, K splits). Per chunk and tile a
// warp runs GK / 16 mma.sync m16n8k16 steps per 8 activation rows with A = the decoded weights and
// B = x^T. K is permuted inside a chunk (the same way for W and x, which leaves the dot product
// unchanged) so that each thread's operands are contiguous in memory: thread (g = lane / 4, t = lane
// % 4) holds elements [GK/4 t, GK/4 (t+1)) of the chunk -- bytes [GK/8 t, GK/8 (t+1)) of weight rows
// g and g + 8, one 4- or 8-byte load each, and the same elements of activation row g (and g + 8),
// one or two 16-byte loads. Byte j becomes register pair P_j; k-step s takes a = (P_2s of row g,
// P_2s of row g+8, P_2s+1 of row g, P_2s+1 of row g+8) and b = (x words 2s, 2s+1). The next chunk's
// loads are issued before the current chunk is decoded. After the loop the 8 warps' accumulators are
// summed in warp order through shared memory and each thread finishes one or two outputs: the LoRA
// expand, then the store -- or, with split_k > 1, the float32 partial and the last-block reduction.
template <typename T, int NH, int GK, bool DQ>
__global__ void __launch_bounds__(kThreads)
    nf4_lora_mma_kernel(const DecodeParams p, const int k_slab, const int split_k, const int lg_block) {
  static_assert(GK == 32 || GK == 64, "GK / 8 bytes of a row per thread: 4 or 8");
  static_assert(NH == 1 || NH == 2, "8 or 16 activation rows");
  static_assert(kThreads == 256, "one thread per pair-table entry and per code2 value");
  static_assert(kMmaRows == 32, "one block row per lane for the scales");
  static_assert(sizeof(T) == 2, "16-bit activations");
  constexpr int kWords = GK / 32;   // 32-bit words of one weight row per thread and chunk
  constexpr int kBytes = GK / 8;    // bytes of one weight row per thread and chunk (= pair registers)
  constexpr int kXWords = GK / 8;   // 32-bit words (element pairs) of one activation row per thread and chunk
  constexpr int kSteps = GK / 16;   // mma k-steps per chunk
  constexpr int kStride = kWarps * GK;  // K elements between a warp's chunks
  constexpr int kOut = kMmaTiles * NH * 4;  // accumulators per thread
  constexpr int kMine = kOut * 32 / kThreads;  // outputs each thread finishes
  __shared__ float code2_s[256];
  __shared__ int s_last;
  unsigned char* smem = dynamic_smem();

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  {  // thread v writes the 32 lane copies of entry v
    const uint32_t v = Elem<T>::bits(kNF4Code[tid >> 4]) | (Elem<T>::bits(kNF4Code[tid & 15]) << 16);
    uint4* dst = reinterpret_cast<uint4*>(smem + tid * 256);
#pragma unroll
    for (int c = 0; c < 8; ++c) dst[c] = make_uint4(v, v, v, v);
  }
  if (DQ) code2_s[tid] = __ldg(p.code2 + tid);
  __syncthreads();

  const int n_tile = blockIdx.x;
  const int split = blockIdx.y;
  const int row0 = n_tile * kMmaRows;
  const int k_begin = split * k_slab;
  const int k_end = min(p.K, k_begin + k_slab);
  const int64_t K = p.K;
  const int k_first = k_begin + warp * GK;  // this warp's first chunk
  const float offset = DQ ? __ldg(p.offset) : 0.f;
  const uint32_t lane4 = static_cast<uint32_t>(lane) * 4u;

  // This thread's weight rows row0 + 16 i + 8 h + g and activation rows 8 j + g, clamped to the last
  // row: a row of A only reaches the same row of D, a column of B the same column of D, so rows past
  // N or M compute on a copy of the last one and are never stored -- no branch in the loop. The
  // pointers advance by one warp stride per load.
  const uint8_t* w_ptr[kMmaTiles][2];
#pragma unroll
  for (int i = 0; i < kMmaTiles; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = min(row0 + 16 * i + 8 * h + g, p.N - 1);
      w_ptr[i][h] = p.packed + ((static_cast<int64_t>(n) * K + k_first) >> 1) + kBytes * t;
    }
  }
  const T* x_ptr[NH];
#pragma unroll
  for (int j = 0; j < NH; ++j) {
    x_ptr[j] = static_cast<const T*>(p.x) + static_cast<int64_t>(min(8 * j + g, p.M - 1)) * K + k_first + (GK / 4) * t;
  }
  // Scales: lane l loads the one of block row l (row0 + l) for the warp's chunk, and the threads that
  // need it shuffle it over (rows g, g + 8, g + 16, g + 24). The chunk's quantization block is
  // b_row + (pos >> lg_block), pos the chunk's offset from the start of the row's first block (the
  // plan keeps block indices below 2^31).
  const int64_t flat_s = static_cast<int64_t>(min(row0 + lane, p.N - 1)) * K;
  const uint32_t b_row = static_cast<uint32_t>(flat_s >> lg_block);
  uint32_t pos = static_cast<uint32_t>(flat_s & ((int64_t{1} << lg_block) - 1)) + k_first;

  struct Stage {
    uint32_t w[kMmaTiles][2][kWords];
    uint32_t x[NH][kXWords];
    float s;  // the lane's block row: absmax, or (DQ) absmax2 of the nested block
    int q;    // DQ: the absmax code
  };
  auto load = [&](Stage& st) {
#pragma unroll
    for (int i = 0; i < kMmaTiles; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if constexpr (kWords == 2) {
          const uint2 v = __ldg(reinterpret_cast<const uint2*>(w_ptr[i][h]));
          st.w[i][h][0] = v.x;
          st.w[i][h][1] = v.y;
        } else {
          st.w[i][h][0] = __ldg(reinterpret_cast<const uint32_t*>(w_ptr[i][h]));
        }
        w_ptr[i][h] += kStride / 2;
      }
    }
    const uint32_t b = b_row + (pos >> lg_block);
    pos += kStride;
    if constexpr (DQ) {
      st.q = __ldg(static_cast<const uint8_t*>(p.absmax) + b);
      st.s = __ldg(p.absmax2 + (b >> kNestedShift));
    } else {
      st.q = 0;
      st.s = __ldg(static_cast<const float*>(p.absmax) + b);
    }
#pragma unroll
    for (int j = 0; j < NH; ++j) {
#pragma unroll
      for (int u = 0; u < kXWords / 4; ++u) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(x_ptr[j]) + u);
        st.x[j][4 * u] = v.x;
        st.x[j][4 * u + 1] = v.y;
        st.x[j][4 * u + 2] = v.z;
        st.x[j][4 * u + 3] = v.w;
      }
      x_ptr[j] += kStride;
    }
  };

  float acc[kMmaTiles][NH][4];
#pragma unroll
  for (int i = 0; i < kMmaTiles; ++i) {
#pragma unroll
    for (int j = 0; j < NH; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
    }
  }
  auto compute = [&](const Stage& st) {
    const float lane_scale = DQ ? fmaf(code2_s[st.q], st.s, offset) : st.s;
#pragma unroll
    for (int i = 0; i < kMmaTiles; ++i) {
      uint32_t pair[2][kBytes];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int b = 0; b < kBytes; ++b) {
          const uint32_t at = byte_perm(st.w[i][h][b >> 2], lane4, 0x5504u | (static_cast<uint32_t>(b & 3) << 4));
          pair[h][b] = *reinterpret_cast<const uint32_t*>(smem + at);
        }
      }
      float part[NH][4];
#pragma unroll
      for (int j = 0; j < NH; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) part[j][e] = 0.f;
      }
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
        const uint32_t a[4] = {pair[0][2 * s], pair[1][2 * s], pair[0][2 * s + 1], pair[1][2 * s + 1]};
#pragma unroll
        for (int j = 0; j < NH; ++j) mma_16816<T>(part[j], a, st.x[j][2 * s], st.x[j][2 * s + 1], part[j]);
      }
      float sc[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) sc[h] = __shfl_sync(0xffffffffu, lane_scale, 16 * i + 8 * h + g);
#pragma unroll
      for (int j = 0; j < NH; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = fmaf(part[j][e], sc[e >> 1], acc[i][j][e]);
      }
    }
  };

  // Two chunks per iteration, the loads of one in flight while the other is decoded and multiplied
  // (two register stages, no copies between them). The loop is warp-uniform: every lane takes part in
  // every mma.
  Stage st0, st1;
  const int n_chunks = k_first < k_end ? (k_end - k_first + kStride - 1) / kStride : 0;
  if (n_chunks > 0) load(st0);
#pragma unroll 1
  for (int i = 0; i < n_chunks; i += 2) {
    if (i + 1 < n_chunks) load(st1);
    compute(st0);
    if (i + 1 >= n_chunks) break;
    if (i + 2 < n_chunks) load(st0);
    compute(st1);
  }

  // ---- epilogue: sum the warps (fixed order), thread q finishes outputs q, q + 256 --------------
  __syncthreads();  // every warp is done with the pair table: its memory becomes the reduction buffer
  float* red = reinterpret_cast<float*>(smem);  // [kWarps][kOut][32]
#pragma unroll
  for (int i = 0; i < kMmaTiles; ++i) {
#pragma unroll
    for (int j = 0; j < NH; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) red[(warp * kOut + (i * NH + j) * 4 + e) * 32 + lane] = acc[i][j][e];
    }
  }
  __syncthreads();
  float mine[kMine];
  int out_m[kMine], out_n[kMine];
  bool active[kMine];
#pragma unroll
  for (int u = 0; u < kMine; ++u) {
    const int q = tid + u * kThreads;
    const int l = q & 31;
    const int o = q >> 5;  // (i * NH + j) * 4 + e
    const int e = o & 3;
    const int j = (o >> 2) % NH;
    const int i = (o >> 2) / NH;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += red[(w * kOut + o) * 32 + l];
    mine[u] = v;
    out_n[u] = row0 + 16 * i + 8 * (e >> 1) + (l >> 2);
    out_m[u] = 8 * j + 2 * (l & 3) + (e & 1);
    active[u] = out_m[u] < p.M && out_n[u] < p.N;
  }
  finish_outputs<T, kMine>(p, split, split_k, n_tile, mine, out_m, out_n, active, s_last);
}

// ---- which GEMV a plan runs ------------------------------------------------------------------

// A GEMV instantiation and its dynamic shared memory, as a type (the kernel is a template argument, so
// per-kernel state such as the shared-memory opt-in can be keyed by it).
template <auto Kernel, size_t Smem>
struct GemvVariant {
  static constexpr auto kernel = Kernel;
  static constexpr size_t smem = Smem;
};

// Calls f(GemvVariant<...>{}) with the instantiation `plan` asks for (generic, or tensor-core by rows,
// chunk and absmax kind). The launcher and the host emulator both dispatch through here.
template <typename T, typename F>
decltype(auto) visit_gemv(const DecodePlan& plan, bool double_quant, F&& f) {
  constexpr size_t kMma = mma_smem_bytes();
  if (!plan.vec) {
    return f(GemvVariant<nf4_lora_gemv_kernel<T, 16, kGenericRowsPerWarp>, size_t{16} * kWindow * sizeof(T)>{});
  }
  const bool wide = plan.mt > 8;
  if (plan.gk == 64) {
    if (wide) {
      return double_quant ? f(GemvVariant<nf4_lora_mma_kernel<T, 2, 64, true>, kMma>{})
                          : f(GemvVariant<nf4_lora_mma_kernel<T, 2, 64, false>, kMma>{});
    }
    return double_quant ? f(GemvVariant<nf4_lora_mma_kernel<T, 1, 64, true>, kMma>{})
                        : f(GemvVariant<nf4_lora_mma_kernel<T, 1, 64, false>, kMma>{});
  }
  if (wide) {
    return double_quant ? f(GemvVariant<nf4_lora_mma_kernel<T, 2, 32, true>, kMma>{})
                        : f(GemvVariant<nf4_lora_mma_kernel<T, 2, 32, false>, kMma>{});
  }
  return double_quant ? f(GemvVariant<nf4_lora_mma_kernel<T, 1, 32, true>, kMma>{})
                      : f(GemvVariant<nf4_lora_mma_kernel<T, 1, 32, false>, kMma>{});
}

// ---- the LoRA shrink -------------------------------------------------------------------------

// xa[m, r] = x[m, :] . A[ids[m], r, :] in float32 (0 for base-only rows); one warp per (m, r),
// grid (ceil(rank / 8), M). Block (0, 0) also zeroes the split-K counters of the GEMV launch that
// follows on the same stream. `vec`: 16-byte loads (K % 8 == 0, x and A 16-byte aligned).
template <typename T, typename TA>
__global__ void __launch_bounds__(kThreads)
    lora_shrink_kernel(const DecodeParams p, const int n_counters, const bool vec) {
  const int tid = threadIdx.x;
  if (blockIdx.x == 0 && blockIdx.y == 0) {
    for (int i = tid; i < n_counters; i += kThreads) p.counters[i] = 0;
  }
  if (p.n_adapters <= 0 || p.rank <= 0) return;
  const int lane = tid & 31;
  const int r = blockIdx.x * kWarps + (tid >> 5);
  const int m = blockIdx.y;
  if (r >= p.rank || m >= p.M) return;
  const int a = p.ids[m];
  float s = 0.f;
  if (a >= 0) {
    const int64_t K = p.K;
    const T* xr = static_cast<const T*>(p.x) + m * K;
    const TA* ar = static_cast<const TA*>(p.lora_A) + (static_cast<int64_t>(a) * p.rank + r) * K;
    if (vec) {
      float s2 = 0.f;
      int k = lane * 8;
#pragma unroll 2
      for (; k + 256 < p.K; k += 512) {  // two independent 8-element steps per iteration
        float xv[8], av[8], xv2[8], av2[8];
        load8<T>(xr + k, xv);
        load8<TA>(ar + k, av);
        load8<T>(xr + k + 256, xv2);
        load8<TA>(ar + k + 256, av2);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          s = fmaf(xv[j], av[j], s);
          s2 = fmaf(xv2[j], av2[j], s2);
        }
      }
      if (k < p.K) {
        float xv[8], av[8];
        load8<T>(xr + k, xv);
        load8<TA>(ar + k, av);
#pragma unroll
        for (int j = 0; j < 8; ++j) s = fmaf(xv[j], av[j], s);
      }
      s += s2;
    } else {
      for (int k = lane; k < p.K; k += 32) s = fmaf(Elem<T>::to_float(xr[k]), Elem<TA>::to_float(ar[k]), s);
    }
    s = warp_sum(s);
  }
  if (lane == 0) p.xa[static_cast<int64_t>(m) * p.rank + r] = s;
}

}  // namespace decode
}  // namespace xkern
