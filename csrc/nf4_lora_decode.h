// Host interface of the decode-regime (M <= 16 rows) NF4 GEMV + multi-adapter LoRA kernel.
//
// Plain C++ (no torch): the kernels live in nf4_lora_decode.cuh, their launchers in
// nf4_lora_decode.cu (nvcc compiles it on its own), the launch plan in nf4_lora_decode_plan.cpp; the
// torch-facing wrapper (lora_linear.cpp) fills DecodeParams from tensors, asks for a DecodePlan,
// allocates the split-K workspace the plan names, and launches.
//
//   y[m, :]  = x[m, :] @ dequant(W)^T + scale[a] * xa[m, :] @ B[a]^T      a = ids[m]  (-1: base only)
//   xa[m, :] = x[m, :] @ A[a]^T   (float32, zero for base-only rows)
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace xkern {

namespace decode {
constexpr int kWarps = 8;               // warps per GEMV / shrink block
constexpr int kThreads = 32 * kWarps;
constexpr int kChunk = 32;              // NF4 elements per lane and window: one 16-byte load
constexpr int kWindow = 32 * kChunk;    // K elements per window (one chunk per lane)
constexpr int kMaxSplitK = 32;
// generic (byte-wise) GEMV: weight rows per warp; rows per block = kWarps * this
constexpr int kGenericRowsPerWarp = 2;
// tensor-core (mma.sync m16n8k16) GEMV: 16-row tiles per block; every warp works on all of them, the
// 8 warps split K between them
constexpr int kMmaTiles = 2;
constexpr int kMmaRows = 16 * kMmaTiles;
}  // namespace decode

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct DecodeParams {
  // activations [M, K], row-major and contiguous; float16 or bfloat16 (act_dtype)
  const void* x = nullptr;
  DType act_dtype = DType::kBFloat16;
  int M = 0;  // 1..16
  int N = 0;  // output features
  int K = 0;  // input features
  // NF4 weight [N, K] (bitsandbytes layout): flat row-major, blocks of `blocksize` elements,
  // two codes a byte with element 2i in the HIGH nibble.
  const uint8_t* packed = nullptr;  // [ceil(N*K/2)]
  const void* absmax = nullptr;     // float32 [n_blocks], or uint8 codes [n_blocks] when double_quant
  const float* absmax2 = nullptr;   // [ceil(n_blocks/256)]  (double_quant)
  const float* code2 = nullptr;     // [256]                 (double_quant)
  const float* offset = nullptr;    // [1] device scalar     (double_quant)
  int blocksize = 64;               // power of two >= 32
  bool double_quant = false;
  // adapters
  const int32_t* ids = nullptr;  // [M], -1 = base only
  const void* lora_A = nullptr;  // [n_adapters, rank, K] contiguous, dtype a_dtype
  DType a_dtype = DType::kBFloat16;
  const void* lora_B = nullptr;  // [n_adapters, N, rank] contiguous, dtype b_dtype
  DType b_dtype = DType::kBFloat16;
  const float* scale = nullptr;  // [n_adapters]
  int n_adapters = 0;
  int rank = 0;  // padded rank r (ranks smaller than r are zero-padded in A and B)
  // outputs
  void* y = nullptr;     // [M, N], act_dtype
  float* xa = nullptr;   // [M, rank] float32 (written when n_adapters > 0 and rank > 0)
  // split-K workspace (only when plan.split_k > 1)
  float* partial = nullptr;  // [split_k, M, N] float32, any content
  int* counters = nullptr;   // [n_tiles] int32, any content (the shrink launch zeroes it)
};

struct DecodePlan {
  bool vec = true;         // the tensor-core kernel (K % 32 == 0, 16-byte aligned pointers) or the generic path
  int mt = 8;              // activation rows computed, padded: 8 or 16 (tensor-core), 16 (generic)
  int gk = 0;              // tensor-core kernel: K elements of a row per weight load and scale (32 or 64)
  int rows_per_block = 0;  // output features (N) per block
  int n_tiles = 0;         // blocks along N
  int split_k = 1;         // blocks along K
  int k_slab = 0;          // K elements per split (a multiple of the 1024-element window)
  size_t partial_elems = 0;
  size_t counter_elems = 0;
};

// Choose the kernel variant and split-K for a problem. `num_sms`: multiprocessor count of the device.
// `force_split_k` > 0 overrides the heuristic (clamped to the number of K windows); `force_generic`
// selects the byte-wise path even where 16-byte loads would work (for tests).
DecodePlan plan_nf4_lora_decode(const DecodeParams& p, int num_sms, int force_split_k = 0,
                                bool force_generic = false);

// Launch the shrink (x A^T, also zeroing the split-K counters) and the fused GEMV + expand on `stream`.
// Returns cudaErrorInvalidValue for parameters the kernels do not support, else the launch status.
cudaError_t launch_nf4_lora_decode(const DecodeParams& p, const DecodePlan& plan, cudaStream_t stream);

}  // namespace xkern
