// Launchers of the decode-regime NF4 + multi-adapter LoRA kernels (no torch: nvcc compiles this
// file on its own, which is what tests/ops/test_cuda_backend.py checks on machines without a GPU).
// The launch plan (variant, split-K) is made in nf4_lora_decode_plan.cpp.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "nf4_lora_decode.cuh"
#include "nf4_lora_decode.h"

namespace xkern {

using decode::kThreads;
using decode::kWarps;
using decode::kWindow;

namespace {

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

int ceil_div(int a, int b) { return (a + b - 1) / b; }

int log2_exact(int v) {
  int lg = 0;
  while ((1 << lg) < v) ++lg;
  return (1 << lg) == v ? lg : -1;
}

// Opt in to more than 48 KiB of dynamic shared memory for `Kernel`, once per device and kernel (kept out
// of graph capture: the first launch on a device happens before any capture of it).
template <auto Kernel>
cudaError_t allow_smem(size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  static std::atomic<uint64_t> configured{0};  // one per kernel: Kernel is a template argument
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const uint64_t bit = dev < 64 ? (uint64_t{1} << dev) : 0;
  if (bit == 0 || !(configured.load() & bit)) {
    err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (err != cudaSuccess) return err;
    configured.fetch_or(bit);
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_gemv_for(const DecodeParams& p, const DecodePlan& plan, int lg_block, cudaStream_t stream) {
  return decode::visit_gemv<T>(plan, p.double_quant, [&](auto variant) {
    using V = decltype(variant);
    const cudaError_t err = allow_smem<V::kernel>(V::smem);
    if (err != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>(plan.n_tiles), static_cast<unsigned>(plan.split_k));
    V::kernel<<<grid, kThreads, V::smem, stream>>>(p, plan.k_slab, plan.split_k, lg_block);
    return cudaGetLastError();
  });
}

template <typename T, typename TA>
cudaError_t launch_shrink(const DecodeParams& p, const DecodePlan& plan, cudaStream_t stream) {
  const bool has_lora = p.n_adapters > 0 && p.rank > 0;
  const dim3 grid(has_lora ? static_cast<unsigned>(ceil_div(p.rank, kWarps)) : 1u,
                  has_lora ? static_cast<unsigned>(p.M) : 1u);
  const bool vec = p.K % 8 == 0 && aligned16(p.x) && aligned16(p.lora_A);
  const int n_counters = plan.split_k > 1 ? static_cast<int>(plan.counter_elems) : 0;
  decode::lora_shrink_kernel<T, TA><<<grid, kThreads, 0, stream>>>(p, n_counters, vec);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_shrink_for(const DecodeParams& p, const DecodePlan& plan, cudaStream_t stream) {
  switch (p.a_dtype) {
    case DType::kFloat32: return launch_shrink<T, float>(p, plan, stream);
    case DType::kFloat16: return launch_shrink<T, __half>(p, plan, stream);
    case DType::kBFloat16: return launch_shrink<T, __nv_bfloat16>(p, plan, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_nf4_lora_decode(const DecodeParams& p, const DecodePlan& plan, cudaStream_t stream) {
  const int lg_block = log2_exact(p.blocksize);
  const bool has_lora = p.n_adapters > 0 && p.rank > 0;
  if (p.M < 1 || p.M > 16 || p.N < 1 || p.K < 1 || lg_block < 5 || plan.split_k < 1 || plan.n_tiles < 1 ||
      plan.k_slab % kWindow != 0 || static_cast<int64_t>(plan.k_slab) * (plan.split_k - 1) >= p.K ||
      static_cast<int64_t>(plan.k_slab) * plan.split_k < p.K || !p.x || !p.packed || !p.absmax || !p.y ||
      (p.double_quant && (!p.absmax2 || !p.code2 || !p.offset)) ||
      (has_lora && (!p.ids || !p.lora_A || !p.lora_B || !p.scale || !p.xa)) ||
      (plan.split_k > 1 && (!p.partial || !p.counters || plan.counter_elems < static_cast<size_t>(plan.n_tiles))) ||
      (plan.vec && ((plan.gk != 32 && plan.gk != 64) || p.K % plan.gk != 0 || p.blocksize < plan.gk ||
                    !aligned16(p.packed) || !aligned16(p.x))) ||
      (p.act_dtype != DType::kFloat16 && p.act_dtype != DType::kBFloat16)) {
    return cudaErrorInvalidValue;
  }
  cudaError_t err = cudaSuccess;
  if (has_lora || plan.split_k > 1) {  // xa must be complete before the GEMV's expand epilogue
    err = p.act_dtype == DType::kFloat16 ? launch_shrink_for<__half>(p, plan, stream)
                                         : launch_shrink_for<__nv_bfloat16>(p, plan, stream);
    if (err != cudaSuccess) return err;
  }
  return p.act_dtype == DType::kFloat16 ? launch_gemv_for<__half>(p, plan, lg_block, stream)
                                        : launch_gemv_for<__nv_bfloat16>(p, plan, lg_block, stream);
}

}  // namespace xkern
