// Runs the decode kernels of csrc/nf4_lora_decode.cuh on the CPU under the emulation of
// cuda_host_shim.h. Built as a shared library by tests/ops/test_cuda_backend.py (g++ -std=c++20
// -DXKERN_HOST_EMULATION) and called through ctypes with CPU tensors; it mirrors
// launch_nf4_lora_decode (nf4_lora_decode.cu): the same plan, the shrink launch, then the GEMV.
// Not part of the extension build (setup.py compiles csrc/*.cpp|cu only, not this folder).
#include "cuda_host_shim.h"

#include <thread>

#include "../nf4_lora_decode.cuh"
#include "../nf4_lora_decode.h"

namespace xkern_emu {

using xkern::DecodeParams;
using xkern::DecodePlan;
using xkern::DType;
using xkern::decode::kThreads;
using xkern::decode::kWarps;

template <typename Body>
void run_grid(unsigned grid_x, unsigned grid_y, Body body) {
  for (unsigned by = 0; by < grid_y; ++by) {
    for (unsigned bx = 0; bx < grid_x; ++bx) {
      std::memset(g_smem, 0xff, kSmemBytes);
      std::barrier<> block_barrier(kThreads);
      std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
      for (int w = 0; w < kWarps; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
      std::vector<float> slots(kThreads, 0.f);
      std::vector<uint32_t> mma_slots(static_cast<size_t>(kThreads) * 6, 0u);
      BlockState state{&block_barrier, &warp_barriers, &slots, &mma_slots};
      std::vector<std::thread> threads;
      threads.reserve(kThreads);
      for (int t = 0; t < kThreads; ++t) {
        threads.emplace_back([&, t, bx, by] {
          threadIdx = {static_cast<unsigned>(t), 0, 0};
          blockIdx = {bx, by, 0};
          t_block = &state;
          body();
          warp_barriers[t >> 5]->arrive_and_drop();
          block_barrier.arrive_and_drop();
        });
      }
      for (auto& th : threads) th.join();
    }
  }
}

template <typename T>
void gemv_for(const DecodeParams& p, const DecodePlan& plan, int lg_block) {
  xkern::decode::visit_gemv<T>(plan, p.double_quant, [&](auto variant) {
    using V = decltype(variant);
    static_assert(V::smem <= kSmemBytes, "emulated shared memory too small");
    run_grid(plan.n_tiles, plan.split_k, [&] { V::kernel(p, plan.k_slab, plan.split_k, lg_block); });
  });
}

template <typename T, typename TA>
void shrink(const DecodeParams& p, const DecodePlan& plan) {
  const bool has_lora = p.n_adapters > 0 && p.rank > 0;
  const unsigned gx = has_lora ? static_cast<unsigned>((p.rank + kWarps - 1) / kWarps) : 1u;
  const unsigned gy = has_lora ? static_cast<unsigned>(p.M) : 1u;
  const bool vec = p.K % 8 == 0 && (reinterpret_cast<uintptr_t>(p.x) & 15u) == 0 &&
                   (reinterpret_cast<uintptr_t>(p.lora_A) & 15u) == 0;
  const int n_counters = plan.split_k > 1 ? static_cast<int>(plan.counter_elems) : 0;
  run_grid(gx, gy, [&] { xkern::decode::lora_shrink_kernel<T, TA>(p, n_counters, vec); });
}

template <typename T>
void shrink_for(const DecodeParams& p, const DecodePlan& plan) {
  switch (p.a_dtype) {
    case DType::kFloat32: return shrink<T, float>(p, plan);
    case DType::kFloat16: return shrink<T, __half>(p, plan);
    case DType::kBFloat16: return shrink<T, __nv_bfloat16>(p, plan);
  }
}

}  // namespace xkern_emu

extern "C" int xkern_emu_decode(const void* x, int act_dtype, int M, int N, int K, const uint8_t* packed,
                                const void* absmax, const float* absmax2, const float* code2, const float* offset,
                                int blocksize, int double_quant, const int32_t* ids, const void* lora_A, int a_dtype,
                                const void* lora_B, int b_dtype, const float* scale, int n_adapters, int rank,
                                void* y, float* xa, int num_sms, int force_split_k, int force_generic,
                                int* plan_out) {
  using namespace xkern;
  try {
    DecodeParams p;
    p.x = x;
    p.act_dtype = static_cast<DType>(act_dtype);
    p.M = M;
    p.N = N;
    p.K = K;
    p.packed = packed;
    p.absmax = absmax;
    p.absmax2 = absmax2;
    p.code2 = code2;
    p.offset = offset;
    p.blocksize = blocksize;
    p.double_quant = double_quant != 0;
    p.ids = ids;
    p.lora_A = lora_A;
    p.a_dtype = static_cast<DType>(a_dtype);
    p.lora_B = lora_B;
    p.b_dtype = static_cast<DType>(b_dtype);
    p.scale = scale;
    p.n_adapters = n_adapters;
    p.rank = rank;
    p.y = y;
    p.xa = xa;
    const DecodePlan plan = plan_nf4_lora_decode(p, num_sms, force_split_k, force_generic != 0);
    int lg_block = 0;
    while ((1 << lg_block) < blocksize) ++lg_block;
    if ((1 << lg_block) != blocksize || lg_block < 5 || M < 1 || M > 16) return -1;
    // poisoned workspace: the shrink launch must zero the counters, the GEMV must write every partial
    std::vector<float> partial(plan.partial_elems, std::nanf(""));
    std::vector<int> counters(plan.counter_elems, 12345);
    p.partial = partial.empty() ? nullptr : partial.data();
    p.counters = counters.empty() ? nullptr : counters.data();
    plan_out[0] = plan.vec ? 1 : 0;
    plan_out[1] = plan.mt;
    plan_out[2] = plan.rows_per_block;
    plan_out[3] = plan.n_tiles;
    plan_out[4] = plan.split_k;
    plan_out[5] = plan.k_slab;
    plan_out[6] = plan.gk;
    const bool has_lora = n_adapters > 0 && rank > 0;
    const bool half = p.act_dtype == DType::kFloat16;
    if (has_lora || plan.split_k > 1) {
      if (half) {
        xkern_emu::shrink_for<__half>(p, plan);
      } else {
        xkern_emu::shrink_for<__nv_bfloat16>(p, plan);
      }
    }
    if (half) {
      xkern_emu::gemv_for<__half>(p, plan, lg_block);
    } else {
      xkern_emu::gemv_for<__nv_bfloat16>(p, plan, lg_block);
    }
    for (int c : counters) {
      if (c != 0) return -3;  // the last block of every N tile resets its counter
    }
    return 0;
  } catch (const std::exception&) {
    return -2;
  }
}
