// Launch plan of the decode-regime kernels: variant (16-byte or generic loads, padded row count)
// and split-K. Host-only C++, shared by the extension and the CPU host emulator of the kernels.
#include <cstddef>
#include <cstdint>

#include "nf4_lora_decode.h"

namespace xkern {

using decode::kMaxSplitK;
using decode::kWarps;
using decode::kWindow;

namespace {

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

int ceil_div(int a, int b) { return (a + b - 1) / b; }

}  // namespace

DecodePlan plan_nf4_lora_decode(const DecodeParams& p, int num_sms, int force_split_k, bool force_generic) {
  DecodePlan plan;
  const int m = p.M < 1 ? 1 : p.M;
  // the tensor-core kernel indexes quantization blocks in 32 bits
  const bool few_blocks = static_cast<int64_t>(p.N) * p.K / (p.blocksize > 0 ? p.blocksize : 1) < (int64_t{1} << 31);
  plan.vec = !force_generic && p.K % 32 == 0 && p.blocksize >= 32 && few_blocks && aligned16(p.packed) &&
             aligned16(p.x);
  if (plan.vec) {  // tensor cores: 8 or 16 activation rows (rows >= M are zero and not stored)
    plan.mt = m <= 8 ? 8 : 16;
    plan.gk = (p.K % 64 == 0 && p.blocksize >= 64) ? 64 : 32;
    plan.rows_per_block = decode::kMmaRows;
  } else {  // one generic instantiation
    plan.mt = 16;
    plan.gk = 0;
    plan.rows_per_block = kWarps * decode::kGenericRowsPerWarp;
  }
  plan.n_tiles = ceil_div(p.N < 1 ? 1 : p.N, plan.rows_per_block);
  const int windows = ceil_div(p.K < 1 ? 1 : p.K, kWindow);
  int split;
  if (force_split_k > 0) {
    split = force_split_k;
  } else {
    // Heuristic (untuned): about two blocks per SM in total, at least two windows per split so every
    // warp has chunks to prefetch while it computes.
    const int target = 2 * (num_sms > 0 ? num_sms : 108);
    split = ceil_div(target, plan.n_tiles);
    const int by_windows = windows / 2 > 1 ? windows / 2 : 1;
    if (split > by_windows) split = by_windows;
  }
  if (split > windows) split = windows;
  if (split > kMaxSplitK) split = kMaxSplitK;
  if (split < 1) split = 1;
  const int windows_per_split = ceil_div(windows, split);
  plan.split_k = ceil_div(windows, windows_per_split);  // no empty split
  plan.k_slab = windows_per_split * kWindow;
  if (plan.split_k > 1) {
    plan.partial_elems = static_cast<size_t>(plan.split_k) * p.M * p.N;
    plan.counter_elems = static_cast<size_t>(plan.n_tiles);
  }
  return plan;
}

}  // namespace xkern
