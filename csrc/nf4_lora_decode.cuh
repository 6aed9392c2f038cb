// Decode-regime (M <= 16) kernels: NF4 GEMV fused with the multi-adapter LoRA expand, and the LoRA
// shrink. Device code only; no torch. See nf4_lora_decode.h for the interface and docs/kernels.md
// ("CUDA decode kernel") for the design.
//
// GEMV thread mapping (kernel nf4_lora_gemv_kernel<T, MT, RW, VEC>):
//   block = 8 warps; each warp owns RW consecutive output features (rows of W), the block owns
//   8*RW of them; blockIdx.x = N tile, blockIdx.y = K split. K is walked in windows of 1024
//   elements: lane l of a warp takes elements [32l, 32l+32) of the window for each of its RW rows,
//   i.e. one 16-byte load of packed NF4 per row (VEC) -- a warp reads 512 contiguous bytes per row.
//   The activations of the window (MT rows x 1024) are staged in shared memory (cp.async, double
//   buffered, 16-byte units XOR-swizzled so the lanes' 16-byte reads are bank-conflict free), and
//   every decoded weight is used for all MT activation rows. A 32-element chunk lies in one
//   quantization block, so the chunk's dot products are accumulated unscaled and multiplied by the
//   block's absmax once. After the K loop, warp shuffles reduce the lanes; lane p = r*MT + m owns
//   output (row r, activation row m) and writes it (split_k == 1) together with the LoRA expand
//   s[a] * xa[m] . B[a, n, :], or writes a float32 partial; with split_k > 1 the last block of an N
//   tile to finish (threadfence + atomic counter) sums the partials in split order (deterministic),
//   adds the expand and stores in the activation dtype.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "nf4_lora_decode.h"

namespace xkern {
namespace decode {

// kWarps, kThreads, kChunk, kWindow, kMaxSplitK: nf4_lora_decode.h
constexpr int kUnits = kWindow / 8;      // 16-byte units of 8 x 16-bit activations per window row
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

// The three hardware-specific pieces below are replaced by csrc/host_emulation/ when the kernels
// are run on the CPU by the host emulator (tests/ops/test_cuda_backend.py); the rest is shared.
#ifndef XKERN_HOST_EMULATION
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char xkern_dynamic_smem[];
  return xkern_dynamic_smem;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;  // src-size 0: the 16 bytes are zero-filled, nothing is read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
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

// T: activation type (__half / __nv_bfloat16). MT: activation rows computed (M <= MT; rows >= M
// are zero). RW: weight rows per warp. VEC: 16-byte weight loads + cp.async activations (needs
// K % 32 == 0 and 16-byte aligned packed / x); otherwise byte-wise loads for any K.
// Dynamic shared memory: (VEC ? 2 : 1) * MT * kWindow * sizeof(T) bytes.
template <typename T, int MT, int RW, bool VEC>
// MT == 8 asks for two resident blocks (<= 128 registers; ptxas otherwise takes 130 on sm_90a). The
// others keep ptxas' default (0 = unspecified): they stay at or under 128 registers on their own, a
// bound of 2 makes MT == 16 spill, and an explicit 1 lets the small variants grow to ~200 registers.
__global__ void __launch_bounds__(kThreads, MT == 8 ? 2 : 0)
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

  if constexpr (VEC) {
    uint4 w_cur[RW], w_nxt[RW];
    float s_cur[RW], s_nxt[RW];
#pragma unroll
    for (int r = 0; r < RW; ++r) {
      w_nxt[r] = make_uint4(0u, 0u, 0u, 0u);
      s_nxt[r] = 0.f;
    }
    // stage activations [MT, window] into buffer `stage` (16-byte cp.async, zero-fill outside)
    auto load_x = [&](int win, int stage) {
      T* dst = xs + stage * (MT * kWindow);
      for (int t = tid; t < MT * kUnits; t += kThreads) {
        const int m = t / kUnits;
        const int u = t % kUnits;
        const int k = win + 8 * u;
        const bool ok = m < p.M && k < k_end;
        cp_async16(dst + m * kWindow + swz(u) * 8, ok ? x + m * K + k : x, ok);
      }
      cp_async_commit();
    };
    auto load_w = [&](int win, uint4 (&w)[RW], float (&s)[RW]) {
      const int k = win + lane * kChunk;
#pragma unroll
      for (int r = 0; r < RW; ++r) {
        const int n = row0 + r;
        if (n < p.N && k < k_end) {
          const int64_t f = n * K + k;  // flat element index, a multiple of 32: one block
          w[r] = __ldg(reinterpret_cast<const uint4*>(p.packed + (f >> 1)));
          s[r] = block_scale(p, offset, f >> lg_block);
        } else {
          w[r] = make_uint4(0u, 0u, 0u, 0u);
          s[r] = 0.f;
        }
      }
    };

    load_x(k_begin, 0);
    load_w(k_begin, w_cur, s_cur);
    for (int i = 0; i < n_windows; ++i) {
      const int win = k_begin + i * kWindow;
      if (i + 1 < n_windows) {  // prefetch the next window while this one is computed
        load_x(win + kWindow, (i + 1) & 1);
        load_w(win + kWindow, w_nxt, s_nxt);
      } else {
        cp_async_commit();  // empty group: keeps "all but the newest group" meaning this window
      }
      cp_async_wait<1>();
      __syncthreads();
      if (win + lane * kChunk < k_end) {
        const T* xw = xs + (i & 1) * (MT * kWindow);
        float part[RW][MT];
#pragma unroll
        for (int r = 0; r < RW; ++r) {
#pragma unroll
          for (int m = 0; m < MT; ++m) part[r][m] = 0.f;
        }
#pragma unroll
        for (int sc = 0; sc < 4; ++sc) {  // 4 x 8 elements = the 32-element chunk
          float c[RW][8];
#pragma unroll
          for (int r = 0; r < RW; ++r) {
            const uint32_t word = word_of(w_cur[r], sc);
#pragma unroll
            for (int b = 0; b < 4; ++b) {
              const uint32_t byte = (word >> (8 * b)) & 0xffu;
              c[r][2 * b] = lut[byte >> 4];        // element 2i: high nibble
              c[r][2 * b + 1] = lut[byte & 0xfu];  // element 2i+1: low nibble
            }
          }
          fma_subchunk<T, MT, RW>(c, xw, lane * 4 + sc, part);
        }
#pragma unroll
        for (int r = 0; r < RW; ++r) {
#pragma unroll
          for (int m = 0; m < MT; ++m) acc[r][m] = fmaf(s_cur[r], part[r][m], acc[r][m]);
        }
      }
      __syncthreads();  // the buffer just read is the target of the next prefetch
#pragma unroll
      for (int r = 0; r < RW; ++r) {
        w_cur[r] = w_nxt[r];
        s_cur[r] = s_nxt[r];
      }
    }
  } else {
    // Generic path: any K (rows need not start on a byte or a block), byte-wise weight loads.
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
  T* y = static_cast<T*>(p.y);
  const int64_t out_idx = static_cast<int64_t>(my_m) * p.N + n;

  if (split_k == 1) {
    if (active) y[out_idx] = Elem<T>::from_float(mine + lora_expand(p, my_m, n));
    return;
  }
  if (active) p.partial[(static_cast<int64_t>(split) * p.M + my_m) * p.N + n] = mine;
  __threadfence();
  __syncthreads();
  if (tid == 0) s_last = atomicAdd(p.counters + n_tile, 1) == split_k - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  if (active) {
    float v = 0.f;
    for (int s = 0; s < split_k; ++s) v += __ldcg(p.partial + (static_cast<int64_t>(s) * p.M + my_m) * p.N + n);
    y[out_idx] = Elem<T>::from_float(v + lora_expand(p, my_m, n));
  }
  if (tid == 0) p.counters[n_tile] = 0;  // leave the workspace reusable
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
