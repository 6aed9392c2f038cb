// CPU emulation of the parts of the CUDA execution model that csrc/nf4_lora_decode.cuh uses, so the
// kernel source itself can be run and checked on machines without a GPU (tests/ops/test_cuda_backend.py).
//
// - every CUDA thread of a block is a std::thread; blocks run one after another (the kernels never
//   wait for another block, so this is a legal schedule; the split-K "last block" is then the last);
// - __syncthreads: a std::barrier over the block; exiting threads drop out of it;
// - __shfl_xor_sync: a per-warp slot array between two per-warp barriers (all 32 lanes must call it,
//   as on the hardware, or the emulation hangs);
// - __shared__ variables are function statics (one block at a time); dynamic shared memory is a
//   static buffer poisoned with 0xff bytes (NaN in fp16/bf16/fp32) before every block;
// - cp.async copies are queued per thread; commit_group closes a group; wait_group<N> performs the
//   oldest committed groups until at most N are pending -- so a missing wait reads the poison.
// Not emulated: memory-model subtleties between blocks, timing, bank conflicts, register limits.
#pragma once

#define __shared__ static
#define __launch_bounds__(...)

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <vector>

struct EmuIndex {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmuIndex threadIdx;
inline thread_local EmuIndex blockIdx;

namespace xkern_emu {

constexpr size_t kSmemBytes = 256 * 1024;
alignas(16) inline unsigned char g_smem[kSmemBytes];

struct BlockState {
  std::barrier<>* block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>>* warp_barriers;
  std::vector<float>* shuffle_slots;  // [warps * 32]
};
inline thread_local BlockState* t_block = nullptr;

struct PendingCopy {
  void* dst;
  const void* src;
  bool valid;
};
inline thread_local std::vector<PendingCopy> t_open_group;
inline thread_local std::vector<std::vector<PendingCopy>> t_committed;

inline void perform(const std::vector<PendingCopy>& group) {
  for (const PendingCopy& c : group) {
    if (c.valid) {
      std::memcpy(c.dst, c.src, 16);
    } else {
      std::memset(c.dst, 0, 16);
    }
  }
}

}  // namespace xkern_emu

inline void __syncthreads() { xkern_emu::t_block->block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) {
  xkern_emu::BlockState* b = xkern_emu::t_block;
  const int t = static_cast<int>(threadIdx.x);
  const int w = t >> 5;
  const int lane = t & 31;
  (*b->shuffle_slots)[w * 32 + lane] = v;
  (*b->warp_barriers)[w]->arrive_and_wait();
  const float r = (*b->shuffle_slots)[w * 32 + (lane ^ lane_mask)];
  (*b->warp_barriers)[w]->arrive_and_wait();
  return r;
}

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

using std::min;  // the device min(int, int)

namespace xkern {
namespace decode {

inline unsigned char* dynamic_smem() { return xkern_emu::g_smem; }

inline void cp_async16(void* smem, const void* gmem, bool valid) {
  if ((reinterpret_cast<uintptr_t>(smem) & 15u) || (valid && (reinterpret_cast<uintptr_t>(gmem) & 15u))) {
    throw std::runtime_error("cp.async with a misaligned 16-byte address");
  }
  xkern_emu::t_open_group.push_back({smem, gmem, valid});
}

inline void cp_async_commit() {
  xkern_emu::t_committed.push_back(std::move(xkern_emu::t_open_group));
  xkern_emu::t_open_group.clear();
}

template <int N>
inline void cp_async_wait() {
  while (xkern_emu::t_committed.size() > static_cast<size_t>(N)) {
    xkern_emu::perform(xkern_emu::t_committed.front());
    xkern_emu::t_committed.erase(xkern_emu::t_committed.begin());
  }
}

}  // namespace decode
}  // namespace xkern
