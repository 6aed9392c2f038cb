// CPU emulation of the parts of the CUDA execution model that csrc/nf4_lora_decode.cuh uses, so the
// kernel source itself can be run and checked on machines without a GPU (tests/ops/test_cuda_backend.py).
//
// - every CUDA thread of a block is a std::thread; blocks run one after another (the kernels never
//   wait for another block, so this is a legal schedule; the split-K "last block" is then the last);
// - __syncthreads: a std::barrier over the block; exiting threads drop out of it;
// - __shfl_xor_sync, __shfl_sync and mma.sync (m16n8k16, float32 accumulation in double): per-warp slot arrays
//   between two per-warp barriers (all 32 lanes must call them, as on the hardware, or the emulation
//   hangs); the mma reads its fragments in the PTX ISA's register layout;
// - __byte_perm: the PTX prmt selection (default mode);
// - __shared__ variables are function statics (one block at a time); dynamic shared memory is a
//   static buffer poisoned with 0xff bytes (NaN in fp16/bf16/fp32) before every block;
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
#include <type_traits>
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
  std::vector<uint32_t>* mma_slots;   // [warps * 32 * 6]: each lane's A (4) and B (2) registers
};
inline thread_local BlockState* t_block = nullptr;

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

inline float __shfl_sync(unsigned /*mask*/, float v, int src_lane) {
  xkern_emu::BlockState* b = xkern_emu::t_block;
  const int t = static_cast<int>(threadIdx.x);
  const int w = t >> 5;
  (*b->shuffle_slots)[t] = v;
  (*b->warp_barriers)[w]->arrive_and_wait();
  const float r = (*b->shuffle_slots)[w * 32 + (src_lane & 31)];
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

inline unsigned byte_perm(unsigned x, unsigned y, unsigned selector) {
  const uint64_t bytes = (static_cast<uint64_t>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((bytes >> (8 * ((selector >> (4 * i)) & 7))) & 0xffu) << (8 * i);
  return r;
}

template <typename T>
inline double emu_half_value(uint32_t reg, int upper) {
  const unsigned short bits = static_cast<unsigned short>(upper ? reg >> 16 : reg & 0xffffu);
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(__ushort_as_half(bits));
  } else {
    return static_cast<double>(__uint_as_float(static_cast<unsigned>(bits) << 16));
  }
}

template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, const float (&c)[4]) {
  xkern_emu::BlockState* blk = xkern_emu::t_block;
  const int tid = static_cast<int>(threadIdx.x);
  const int w = tid >> 5;
  const int lane = tid & 31;
  uint32_t* slots = blk->mma_slots->data() + static_cast<size_t>(w) * 32 * 6;
  for (int i = 0; i < 4; ++i) slots[lane * 6 + i] = a[i];
  slots[lane * 6 + 4] = b0;
  slots[lane * 6 + 5] = b1;
  (*blk->warp_barriers)[w]->arrive_and_wait();
  // A[row][k]: lane (row % 8) * 4 + (k % 8) / 2, register (row >= 8) + 2 (k >= 8), half k % 2
  // B[k][col]: lane col * 4 + (k % 8) / 2, register 4 + (k >= 8), half k % 2
  const int g = lane >> 2;
  const int t = lane & 3;
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1);
    const int col = 2 * t + (e & 1);
    double sum = c[e];
    for (int k = 0; k < 16; ++k) {
      const uint32_t ar = slots[((row & 7) * 4 + (k & 7) / 2) * 6 + (row >= 8) + 2 * (k >= 8)];
      const uint32_t br = slots[(col * 4 + (k & 7) / 2) * 6 + 4 + (k >= 8)];
      sum += emu_half_value<T>(ar, k & 1) * emu_half_value<T>(br, k & 1);
    }
    out[e] = static_cast<float>(sum);
  }
  (*blk->warp_barriers)[w]->arrive_and_wait();
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

}  // namespace decode
}  // namespace xkern
