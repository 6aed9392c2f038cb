// Launch plan of the decode-regime kernels: variant (16-byte or generic loads, padded row count)
// and split-K. Host-only C++, shared by the extension and the CPU host emulator of the kernels.
#include <cstddef>
#include <cstdint>

#include "nf4_lora_decode.h"

namespace xkern {

using decode::kMaxSplitK;
using decode::kWarps;
using decode::kWindow;
using decode::rows_per_warp;

namespace {

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

int ceil_div(int a, int b) { return (a + b - 1) / b; }

}  // namespace

DecodePlan plan_nf4_lora_decode(const DecodeParams& p, int num_sms, int force_split_k, bool force_generic) {
  DecodePlan plan;
  const int m = p.M < 1 ? 1 : p.M;
  plan.mt = m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : m <= 8 ? 8 : 16;
  plan.vec = !force_generic && p.K % 32 == 0 && aligned16(p.packed) && aligned16(p.x);
  if (!plan.vec) plan.mt = 16;  // one generic instantiation; rows >= M are zero and not stored
  plan.rows_per_block = kWarps * rows_per_warp(plan.mt, plan.vec);
  plan.n_tiles = ceil_div(p.N < 1 ? 1 : p.N, plan.rows_per_block);
  const int windows = ceil_div(p.K < 1 ? 1 : p.K, kWindow);
  int split;
  if (force_split_k > 0) {
    split = force_split_k;
  } else {
    // Heuristic (untuned): about two blocks per SM in total, at least two windows per split so a
    // block overlaps one window's loads with the previous window's math.
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
